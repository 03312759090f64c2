//! Lets `target/release/comm-selftest` start without LD_LIBRARY_PATH: the
//! workspace links libstd dynamically (`-C prefer-dynamic`), so the crate's
//! binaries carry an rpath to the toolchain's libstd (and to their own folder).

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    if !sysroot.is_empty() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{sysroot}/lib/rustlib/{target}/lib");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
