//! From a config and a dataset to a ready model and its evaluation groups:
//! plugin search path, variant-specific initialisation, long-tail groups.

use std::path::PathBuf;

use anyhow::Result;
use llm_esr_runtime::candle::Device;

use crate::config::{expand_env, Config};
use crate::data::Dataset;
use crate::eval::Grouping;
use crate::model::Recommender;
use crate::plugin_host;

/// Plugin directories from the config, the environment and the binary's place.
pub fn plugin_dirs(cfg: &Config) -> Result<Vec<PathBuf>> {
    let configured = cfg
        .plugins
        .paths
        .iter()
        .map(|p| expand_env("plugins.paths", p).map(PathBuf::from))
        .collect::<Result<Vec<_>>>()?;
    Ok(plugin_host::search_dirs(&configured))
}

pub fn build(cfg: &Config, ds: &Dataset, device: &Device) -> Result<Recommender> {
    Recommender::build(cfg, ds.num_items, &plugin_dirs(cfg)?, device)
}

pub fn grouping(_cfg: &Config, _ds: &Dataset) -> Result<Grouping> {
    Ok(Grouping::default())
}

pub fn long_tail_summary(_cfg: &Config, _ds: &Dataset) -> Result<serde_json::Value> {
    Ok(serde_json::Value::Null)
}
