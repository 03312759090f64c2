//! `scripts/setup.sh --check` against fake roots (LLM_ESR_SETUP_ROOT): it must
//! judge libclang, clang's headers and MPI by what the build uses (issue 9:
//! libclang-cpp.so.14 alone is not libclang). Needs bash; builds nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use llm_esr_tests::{text, workspace_root};

fn file(root: &Path, rel: &str, body: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, body).unwrap();
}

fn script(root: &Path, rel: &str, body: &str) {
    file(root, rel, &format!("#!/bin/sh\n{body}\n"));
    let path = root.join(rel);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A root with everything but libclang: working mpicc (whose -I holds mpi.h),
/// mpirun, pkg-config, cc, pgrep, python3 with pip, the C start files, and
/// libclang-cpp.so.14 (what libclang-cpp14 leaves on stock images).
fn base_root() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let inc = "usr/lib/x86_64-linux-gnu/openmpi/include";
    script(
        r,
        "usr/bin/mpicc",
        &format!("[ \"$1\" = -show ] && echo 'gcc -I/{inc} -I/{inc}/openmpi -L/usr/lib/x86_64-linux-gnu/openmpi/lib -lmpi'"),
    );
    file(r, &format!("{inc}/mpi.h"), "");
    for c in [
        "usr/bin/mpirun",
        "usr/bin/pkg-config",
        "usr/bin/cc",
        "usr/bin/pgrep",
        "usr/bin/python3",
    ] {
        script(r, c, "exit 0");
    }
    file(r, "usr/lib/x86_64-linux-gnu/crt1.o", "");
    file(r, "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", "");
    file(r, "usr/lib/llvm-14/lib/libclang-cpp.so.14", "");
    tmp
}

fn add_libclang(r: &Path) {
    file(r, "usr/lib/llvm-14/lib/libclang-14.so.1", "");
}

fn add_headers(r: &Path) {
    file(r, "usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h", "");
}

/// Runs the check; returns (exit code, listed packages).
fn check(root: &Path) -> (i32, Vec<String>) {
    let out = Command::new("bash")
        .args(["scripts/setup.sh", "--check"])
        .current_dir(workspace_root())
        .env("LLM_ESR_SETUP_ROOT", root)
        .env_remove("LIBCLANG_PATH")
        .env_remove("MPICC")
        .output()
        .expect("run bash");
    let listed = text(&out.stdout).lines().map(str::to_string).collect();
    (out.status.code().expect("exit code"), listed)
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let root = base_root();
    assert_eq!(check(root.path()), (1, vec!["libclang-dev".to_string()]));
    // With clang's headers present, only the libclang check can list it.
    add_headers(root.path());
    assert_eq!(check(root.path()), (1, vec!["libclang-dev".to_string()]));
}

#[test]
fn libclang_and_its_headers_leave_nothing_missing() {
    let root = base_root();
    add_libclang(root.path());
    add_headers(root.path());
    assert_eq!(check(root.path()), (0, vec!["nothing missing".to_string()]));
}

#[test]
fn libclang_without_builtin_headers_needs_libclang_dev() {
    let root = base_root();
    add_libclang(root.path());
    assert_eq!(check(root.path()), (1, vec!["libclang-dev".to_string()]));
}

#[test]
fn no_mpicc_needs_libopenmpi_dev() {
    let root = base_root();
    add_libclang(root.path());
    add_headers(root.path());
    fs::remove_file(root.path().join("usr/bin/mpicc")).unwrap();
    assert_eq!(check(root.path()), (1, vec!["libopenmpi-dev".to_string()]));
}

#[test]
fn mpicc_without_mpi_h_needs_libopenmpi_dev() {
    let root = base_root();
    add_libclang(root.path());
    add_headers(root.path());
    fs::remove_file(
        root.path()
            .join("usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h"),
    )
    .unwrap();
    assert_eq!(check(root.path()), (1, vec!["libopenmpi-dev".to_string()]));
}

#[test]
fn an_empty_root_lists_every_package() {
    let root = tempfile::tempdir().unwrap();
    let (code, listed) = check(root.path());
    assert_eq!(code, 1);
    for p in [
        "libclang-dev",
        "libopenmpi-dev",
        "openmpi-bin",
        "pkg-config",
        "gcc",
        "libc6-dev",
        "procps",
    ] {
        assert!(listed.contains(&p.to_string()), "{p} not in {listed:?}");
    }
}
