//! Where the shared test data lives: `LLM_ESR_DATA` (default
//! `../shared/datasets` relative to the workspace root) and `LLM_ESR_MODELS`
//! (default `../shared/models`). Missing data fails the test with a message;
//! it never passes silently.

#![allow(dead_code)]

use std::path::PathBuf;

fn workspace_root() -> PathBuf {
    // core/prep -> workspace root
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dir_from(var: &str, default: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) => PathBuf::from(v),
        None => workspace_root().join(default),
    }
}

/// A dataset folder, e.g. `beauty5_tiny`; panics with a clear message if absent.
pub fn dataset(name: &str) -> PathBuf {
    let dir = dir_from("LLM_ESR_DATA", "../shared/datasets").join(name);
    assert!(
        dir.join("inter.txt").is_file(),
        "test data missing: {} has no inter.txt; set LLM_ESR_DATA to the datasets folder \
         (see shared/datasets/README.md)",
        dir.display()
    );
    dir
}

/// The models folder; panics with a clear message if the MiniLM model is absent.
pub fn models() -> PathBuf {
    let dir = dir_from("LLM_ESR_MODELS", "../shared/models");
    assert!(
        dir.join("all-MiniLM-L6-v2/model.safetensors").is_file(),
        "test model missing: {}/all-MiniLM-L6-v2/model.safetensors; set LLM_ESR_MODELS to the \
         models folder",
        dir.display()
    );
    dir
}

pub fn minilm() -> PathBuf {
    models().join("all-MiniLM-L6-v2")
}

/// Formats an error with its whole context chain.
pub fn msg(e: &anyhow::Error) -> String {
    format!("{e:#}")
}
