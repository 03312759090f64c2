//! Computes the runtime fingerprint: a hash of everything that decides the
//! binary layout of this crate (its sources, the workspace lock file, the
//! compiler, the flags, the profile and the enabled features). Plugins embed the
//! value they were built with; the host refuses any other.

use std::path::{Path, PathBuf};
use std::process::Command;

/// FNV-1a, 64 bit, run twice with different offsets for a 128-bit digest.
struct Fnv([u64; 2]);

impl Fnv {
    fn new() -> Self {
        Fnv([0xcbf29ce484222325, 0x84222325cbf29ce4])
    }
    fn write(&mut self, bytes: &[u8]) {
        for h in self.0.iter_mut() {
            for &b in bytes {
                *h ^= b as u64;
                *h = h.wrapping_mul(0x100000001b3);
            }
            // Separate fields so that ("ab","c") and ("a","bc") differ.
            *h ^= 0xff;
            *h = h.wrapping_mul(0x100000001b3);
        }
    }
    fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.0[0], self.0[1])
    }
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read runtime sources")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            source_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut hash = Fnv::new();

    let mut files = Vec::new();
    source_files(&manifest_dir.join("src"), &mut files);
    files.push(manifest_dir.join("Cargo.toml"));
    files.push(manifest_dir.join("build.rs"));
    let lock = manifest_dir.join("../../Cargo.lock");
    if lock.exists() {
        files.push(lock);
    }
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        hash.write(
            file.strip_prefix(&manifest_dir)
                .unwrap_or(file)
                .to_string_lossy()
                .as_bytes(),
        );
        hash.write(&std::fs::read(file).expect("read fingerprint input"));
    }
    println!("cargo:rerun-if-changed=src");

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let rustc_line = rustc_version
        .lines()
        .next()
        .unwrap_or("unknown rustc")
        .to_string();
    hash.write(rustc_version.as_bytes());

    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "TARGET",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
        hash.write(var.as_bytes());
        hash.write(std::env::var(var).unwrap_or_default().as_bytes());
    }
    let mut features: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("CARGO_FEATURE_"))
        .collect();
    features.sort();
    for f in features {
        hash.write(f.as_bytes());
    }

    println!("cargo:rustc-env=LLM_ESR_RUNTIME_FINGERPRINT={}", hash.hex());
    println!("cargo:rustc-env=LLM_ESR_RUSTC_VERSION={rustc_line}");
}
