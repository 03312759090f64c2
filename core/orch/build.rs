//! Lets `target/release/llm-esr-orch` (and `mpirun ... llm-esr-orch`) start
//! without LD_LIBRARY_PATH: the binary links libstd and the shared runtime
//! dynamically, so it carries an rpath to its own directory (where cargo puts
//! libllm_esr_runtime.so and the plugins) and to the toolchain's libstd.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/deps");
    if !sysroot.is_empty() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{sysroot}/lib/rustlib/{target}/lib");
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{sysroot}/lib");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
