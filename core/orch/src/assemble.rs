//! From a config and a dataset to a ready model and its evaluation groups:
//! plugin search path, semantic artifacts, long-tail groups.

use std::path::PathBuf;

use anyhow::{Context, Result};
use llm_esr_prep::{long_tail, Artifacts, LongTail, TestUserLength};
use llm_esr_runtime::candle::Device;
use tracing::info;

use crate::config::{expand_env, Config, Variant};
use crate::data::{Dataset, Split};
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

/// Fails early, before a run directory exists, when the variant needs
/// artifacts and `model.artifacts` is unset.
pub fn check_artifacts_dir(cfg: &Config) -> Result<()> {
    if cfg.model.variant != Variant::Plain {
        cfg.artifacts_dir()?;
    }
    Ok(())
}

/// Loads the semantic artifacts when the variant needs them, checked against
/// the dataset before any training starts.
pub fn artifacts(cfg: &Config, ds: &Dataset, device: &Device) -> Result<Option<Artifacts>> {
    if cfg.model.variant == Variant::Plain {
        return Ok(None);
    }
    let dir = cfg.artifacts_dir()?;
    let a = Artifacts::load(&dir, ds.num_items, ds.num_users, device).with_context(|| {
        format!(
            "loading semantic artifacts from {} (config key `model.artifacts`)",
            dir.display()
        )
    })?;
    info!(dir = %dir.display(), dim = a.item_emb.dim(1)?, "semantic artifacts");
    Ok(Some(a))
}

pub fn build(
    cfg: &Config,
    ds: &Dataset,
    artifacts: Option<&Artifacts>,
    device: &Device,
) -> Result<Recommender> {
    Recommender::build(cfg, ds.num_items, artifacts, &plugin_dirs(cfg)?, device)
}

pub fn long_tail_groups(cfg: &Config, ds: &Dataset) -> Result<LongTail> {
    long_tail(&ds.seqs, ds.num_items, &cfg.data.long_tail).context("config key `data.long_tail`")
}

/// Head/tail membership for evaluating `split`: items by popularity
/// (distinct users), users by training length, or for the test split by the
/// test input when `data.long_tail.test_users_by` says so.
pub fn grouping(cfg: &Config, ds: &Dataset, lt: &LongTail, split: Split) -> Grouping {
    let by_input =
        split == Split::Test && cfg.data.long_tail.test_users_by == TestUserLength::TestInput;
    let user_head = if by_input {
        ds.users()
            .map(|u| {
                let (input, _) = ds.eval_case(u, Split::Test);
                lt.is_head_len(input.len().min(cfg.data.max_len))
            })
            .collect()
    } else {
        // LongTail indexes users by id (from 1); evaluation by index.
        ds.users().map(|u| lt.head_users[u.id() as usize]).collect()
    };
    Grouping {
        item_head: Some(lt.head_items.clone()),
        user_head: Some(user_head),
    }
}
