//! The llm-esr-orch engine: configuration, plugin host, data, model assembly,
//! training, evaluation and reports. The binary `llm-esr-orch` is a thin CLI
//! over this library; integration tests drive it the same way.
//!
//! Not here: candle and the plugin API (the shared runtime crate), the
//! communicators (`llm-esr-comm`), dataset preparation and semantic artifacts
//! (`llm-esr-prep`), and the models themselves (plugins).

pub mod assemble;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod distill;
pub mod eval;
pub mod files;
pub mod flat;
pub mod limits;
pub mod logging;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod plugin_host;
pub mod preflight;
pub mod progress;
pub mod recommend;
pub mod report;
pub mod run_dir;
pub mod step;
pub mod sweep;
#[cfg(test)]
mod testing;
pub mod tracking;
pub mod train;
pub mod trainer;
pub mod user_ranks;
