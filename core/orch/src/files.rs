//! Writing results safely: every file is written to a temporary sibling and
//! renamed into place, so a crash never leaves a half-written result. The
//! implementation is `llm_esr_prep::fsutil` (shared with `prepare` and
//! `embed`); these are the orchestrator's byte, JSON and line forms of it.

use std::path::Path;

use anyhow::Result;
use llm_esr_prep::fsutil::{write_bytes_atomic, write_json_atomic};

/// Writes `bytes` to `path` atomically, creating its directory when missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_bytes_atomic(path, bytes)
}

/// Writes `value` as pretty JSON followed by a line break, atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_json_atomic(path, value)
}

/// Appends one line (the whole line or nothing: rewrite-and-rename).
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    text.push_str(line);
    text.push('\n');
    write_atomic(path, text.as_bytes())
}
