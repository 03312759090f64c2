//! Plugin discovery against hostile files on the plugin path: a library that
//! exports a declaration of another ABI version whose "strings" are not
//! pointers, and a library whose constructor crashes. Each is compiled here
//! from a few lines of C with `cc`. Neither may take the orchestrator down:
//! `plugins` lists files without opening them, `plugins --inspect` opens each
//! in a child process, and `train` opens only the plugins it asks for.

use std::path::{Path, PathBuf};
use std::process::Output;

use llm_esr_tests::{run_cli, text, tiny_train_args};

/// A declaration whose first u32 is 999 and whose pointer-sized fields are
/// small integers: reading any of them as a string faults.
const FOREIGN_ABI: &str = r#"
#include <stdint.h>
struct declaration {
    uint32_t abi_version;
    uintptr_t rustc_version, fingerprint, kind, name, version, create;
};
const struct declaration llm_esr_plugin_declaration = {
    999, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38
};
"#;

/// A library whose constructor dies by SIGSEGV as soon as it is opened
/// (the default action is restored first: the Rust runtime installs its own
/// SIGSEGV handler for stack overflows).
const CRASHING_CONSTRUCTOR: &str = r#"
#include <signal.h>
__attribute__((constructor)) static void crash(void) {
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
}
"#;

/// A declaration that passes every check (its ABI version, compiler and
/// fingerprint are filled in from the host's) and a `create` that dies by
/// SIGSEGV.
const CRASHING_CREATE: &str = r#"
#include <signal.h>
#include <stdint.h>
static void create(void) {
    signal(SIGSEGV, SIG_DFL);
    raise(SIGSEGV);
}
struct declaration {
    uint32_t abi_version;
    const char *rustc_version, *fingerprint, *kind, *name, *version;
    void (*create)(void);
};
const struct declaration llm_esr_plugin_declaration = {
    ABI_VERSION, RUSTC_VERSION, FINGERPRINT, "backbone", "crashy-create", "0.0.1", create
};
"#;

/// Compiles `source` into `dir/file` as a shared library.
fn build_library(dir: &Path, file: &str, source: &str) -> PathBuf {
    build_library_with(dir, file, source, &[])
}

/// As [`build_library`], with `-D` definitions for the C preprocessor.
fn build_library_with(dir: &Path, file: &str, source: &str, defines: &[String]) -> PathBuf {
    let src = dir.join(format!("{file}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(file);
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O0"])
        .args(defines)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc (a C compiler is needed to build the test libraries)");
    assert!(status.success(), "cc failed on {}", src.display());
    std::fs::remove_file(&src).unwrap();
    out
}

/// A plugin directory holding only the foreign-ABI library.
fn foreign_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_library(dir.path(), "libllm_esr_plugin_foreign.so", FOREIGN_ABI);
    (dir, lib)
}

/// A plugin directory holding only the crashing library, named as plugin `crashy`.
fn crashy_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_library(
        dir.path(),
        "libllm_esr_plugin_crashy.so",
        CRASHING_CONSTRUCTOR,
    );
    (dir, lib)
}

fn plugins(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["plugins"];
    args.extend_from_slice(extra);
    run_cli(&args, &[("LLM_ESR_PLUGIN_PATH", dir.to_str().unwrap())])
}

/// The listing line for `path` and the reason line after it, if any.
fn listing_of(stdout: &str, path: &Path) -> (String, String) {
    let path = path.display().to_string();
    let mut lines = stdout.lines();
    let line = lines
        .by_ref()
        .find(|l| l.ends_with(&path))
        .unwrap_or_else(|| panic!("{path} not listed:\n{stdout}"))
        .to_string();
    let reason = lines
        .next()
        .filter(|l| l.trim_start().starts_with("reason:"))
        .unwrap_or("")
        .to_string();
    (line, reason)
}

/// Asserts that the process exited by itself (not by a signal).
fn assert_exited(out: &Output) {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            None,
            "killed by a signal; stderr:\n{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn plugins_lists_a_foreign_abi_file_without_opening_it() {
    let (dir, lib) = foreign_dir();
    let out = plugins(dir.path(), &[]);
    assert_exited(&out);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    let (line, reason) = listing_of(&stdout, &lib);
    assert!(line.starts_with("?"), "{line}");
    assert!(
        line.contains(" foreign ") && line.contains(" not inspected "),
        "{line}"
    );
    assert_eq!(reason, "", "{stdout}");
    // The built-in plugins are listed the same way, unopened.
    let sasrec = stdout
        .lines()
        .find(|l| l.contains("libllm_esr_plugin_sasrec.so"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(sasrec.contains(" sasrec ") && sasrec.contains(" not inspected "));
}

#[test]
fn plugins_inspect_refuses_a_foreign_abi() {
    let (dir, lib) = foreign_dir();
    let out = plugins(dir.path(), &["--inspect"]);
    assert_exited(&out);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    let (line, reason) = listing_of(&stdout, &lib);
    assert!(
        line.contains(" foreign ") && line.contains(" refused "),
        "{line}"
    );
    assert!(
        reason.contains(&format!(
            "plugin ABI version 999 but the host expects {}; rebuild the plugin against this host",
            llm_esr_runtime::abi::ABI_VERSION
        )),
        "{reason}"
    );
    // The listing goes on: the built-in plugins are checked and fine.
    let sasrec = stdout
        .lines()
        .find(|l| l.contains("libllm_esr_plugin_sasrec.so"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        sasrec.starts_with("backbone") && sasrec.contains(" ok "),
        "{sasrec}"
    );
}

/// Before the fix every `libllm_esr_plugin_*.so` on the path was opened and
/// its strings followed, so this run died by SIGSEGV.
#[test]
fn train_ignores_a_foreign_abi_file_it_did_not_ask_for() {
    let (dir, _lib) = foreign_dir();
    let runs = tempfile::tempdir().unwrap();
    let args = tiny_train_args(
        &runs.path().display().to_string(),
        "beside_foreign",
        &["train.epochs=1", "train.max_steps=2"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(
        &args,
        &[("LLM_ESR_PLUGIN_PATH", dir.path().to_str().unwrap())],
    );
    assert_exited(&out);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(runs.path().join("beside_foreign/results.json").exists());
}

#[test]
fn a_crash_while_loading_the_requested_plugin_is_an_error() {
    let (dir, lib) = crashy_dir();
    let runs = tempfile::tempdir().unwrap();
    let args = tiny_train_args(
        &runs.path().display().to_string(),
        "crashy",
        &[
            "model.backbone=crashy",
            "train.epochs=1",
            "train.max_steps=2",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(
        &args,
        &[("LLM_ESR_PLUGIN_PATH", dir.path().to_str().unwrap())],
    );
    assert_exited(&out);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("backbone plugin `crashy`"), "{stderr}");
    assert!(
        stderr.contains(&lib.display().to_string()),
        "the file is not named: {stderr}"
    );
    assert!(
        stderr.contains("crashed while loading (signal 11, SIGSEGV)"),
        "{stderr}"
    );

    let out = plugins(dir.path(), &["--inspect"]);
    assert_exited(&out);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    let (line, reason) = listing_of(&stdout, &lib);
    assert!(
        line.contains(" crashy ") && line.contains(" refused "),
        "{line}"
    );
    assert!(
        reason.contains("crashed while loading (signal 11, SIGSEGV)"),
        "{reason}"
    );
}

/// A plugin must live in the file its name gives: the SASRec library copied
/// under another plugin's file name is refused, clearly, by `plugins
/// --inspect` and by `train`.
#[test]
fn a_plugin_under_another_file_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libllm_esr_plugin_renamed.so");
    std::fs::copy(llm_esr_tests::plugin_file("llm_esr_plugin_sasrec"), &lib).unwrap();
    let out = plugins(dir.path(), &["--inspect"]);
    assert_exited(&out);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    let (line, reason) = listing_of(&stdout, &lib);
    assert!(
        line.contains(" sasrec ") && line.contains(" refused "),
        "{line}"
    );
    assert!(
        reason.contains("declares the name `sasrec`")
            && reason.contains("libllm_esr_plugin_sasrec.so"),
        "{reason}"
    );

    let stderr = failing_train_with_plugins(dir.path(), "renamed", "renamed");
    assert!(
        stderr.contains("backbone plugin `renamed`")
            && stderr.contains("declares the name `sasrec`"),
        "{stderr}"
    );
}

/// The declaration is read and accepted in the child, then `create` crashes
/// there: `train` fails naming the plugin, the file and the stage.
#[test]
fn a_crash_in_create_of_the_requested_plugin_is_an_error() {
    // The host's ABI version, compiler and fingerprint, as its inspector
    // prints them.
    let sasrec = llm_esr_tests::plugin_file("llm_esr_plugin_sasrec");
    let out = run_cli(&["__inspect-plugin", sasrec.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let decl = &first["declaration"];
    let define = |name: &str, key: &str| format!("-D{name}={:?}", decl[key].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let lib = build_library_with(
        dir.path(),
        "libllm_esr_plugin_crashy_create.so",
        CRASHING_CREATE,
        &[
            format!("-DABI_VERSION={}", decl["abi_version"].as_u64().unwrap()),
            define("RUSTC_VERSION", "rustc_version"),
            define("FINGERPRINT", "fingerprint"),
        ],
    );

    let stderr = failing_train_with_plugins(dir.path(), "crashy_create", "crashy-create");
    assert!(
        stderr.contains("backbone plugin `crashy-create`")
            && stderr.contains(&lib.display().to_string())
            && stderr.contains("crashed in its `create()` (signal 11, SIGSEGV)"),
        "{stderr}"
    );
}

/// One epoch of beauty5_tiny named `name` with `model.backbone=backbone` and
/// `plugins` on the plugin path, which must fail with exit status 1; its
/// standard error.
fn failing_train_with_plugins(plugins: &std::path::Path, name: &str, backbone: &str) -> String {
    let runs = tempfile::tempdir().unwrap();
    let backbone = format!("model.backbone={backbone}");
    let args = tiny_train_args(
        &runs.path().display().to_string(),
        name,
        &[backbone.as_str(), "train.epochs=1"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&args, &[("LLM_ESR_PLUGIN_PATH", plugins.to_str().unwrap())]);
    assert_exited(&out);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}
