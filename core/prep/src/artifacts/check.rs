//! The checks of [`embed`](super::embed) before any work: ranges, the
//! dataset, templates, imports, memory, the device and the model directory.

use std::path::Path;

use anyhow::{bail, Result};
use llm_esr_runtime::candle::Device;

use super::{
    EmbedConfig, MAX_BATCH_TOKENS, MAX_EMBED_BATCH, MAX_KNN_BLOCK, MAX_MAX_TOKENS, MAX_NEIGHBOURS,
    MAX_PCA_DIM, MIN_MAX_TOKENS,
};
use crate::dataset::{Dataset, ITEM_TEXT_FILE};
use crate::device::parse_device;
use crate::encoder::check_model_dir;
use crate::invalid::invalid_config;
use crate::prompts::{check_item_template, check_user_template, Template};

/// What the checks loaded, for the stages.
pub(super) struct Checked {
    /// The prepared dataset.
    pub data: Dataset,
    /// `embed.item_template`, parsed.
    pub item_tpl: Template,
    /// `embed.user_template`, parsed.
    pub user_tpl: Template,
    /// `embed.device` (`cuda` is GPU 0).
    pub device: Device,
}

/// Whether a stage encodes text (an embedding is not imported).
pub(super) fn needs_model(cfg: &EmbedConfig) -> bool {
    cfg.item_import.is_none() || cfg.user_import.is_none()
}

/// Checks `cfg` against the dataset in `dataset_dir` before any work and loads
/// what the stages read. Errors of the configuration are `InvalidConfig` (the
/// orchestrator exits with status 2) and name the key.
pub(super) fn check(cfg: &EmbedConfig, dataset_dir: &Path) -> Result<Checked> {
    let bad = |msg: String| invalid_config(msg);
    let as_config = |e: anyhow::Error| invalid_config(format!("{e:#}"));
    for (key, value, max) in [
        ("embed.batch_size", cfg.batch_size, MAX_EMBED_BATCH),
        (
            "embed.max_batch_tokens",
            cfg.max_batch_tokens,
            MAX_BATCH_TOKENS,
        ),
        ("embed.knn_block", cfg.knn_block, MAX_KNN_BLOCK),
        ("embed.pca_dim", cfg.pca_dim, MAX_PCA_DIM),
    ] {
        if value == 0 || value > max {
            return Err(bad(format!(
                "config key `{key}`: {value} is outside [1, {max}]"
            )));
        }
    }
    if let Some(m) = cfg.max_tokens {
        if !(MIN_MAX_TOKENS..=MAX_MAX_TOKENS).contains(&m) {
            return Err(bad(format!(
                "config key `embed.max_tokens`: {m} is outside [{MIN_MAX_TOKENS}, \
                 {MAX_MAX_TOKENS}] ([CLS] text [SEP] needs 3)"
            )));
        }
    }
    let data = Dataset::load(dataset_dir)?;
    let items = data.num_items;
    let users = data.num_users();
    let item_tpl = Template::parse(&cfg.item_template, "embed.item_template").map_err(as_config)?;
    let user_tpl = Template::parse(&cfg.user_template, "embed.user_template").map_err(as_config)?;
    let needs_text = needs_model(cfg);
    let text = match (&data.item_text, needs_text) {
        (Some(t), _) => Some(t),
        (None, false) => None,
        (None, true) => bail!(
            "{} is missing: prompts need item text; prepare the dataset with an item text file, \
             or set `item_import` and `user_import`",
            dataset_dir.join(ITEM_TEXT_FILE).display()
        ),
    };
    if cfg.item_import.is_none() {
        if let Some(t) = text {
            check_item_template(&item_tpl, t, "embed.item_template").map_err(as_config)?;
        }
    }
    if cfg.user_import.is_none() {
        check_user_template(&user_tpl, "embed.user_template").map_err(as_config)?;
        if let Some(t) = text {
            if t.column(&cfg.user_history_column).is_none() {
                return Err(bad(format!(
                    "config key `embed.user_history_column`: `{}` is not a column of {} \
                     (columns: {}); set it to one of them",
                    cfg.user_history_column,
                    t.path.display(),
                    t.columns.join(", ")
                )));
            }
        }
    }
    let most = users.saturating_sub(1).min(MAX_NEIGHBOURS);
    if cfg.neighbours == 0 || cfg.neighbours > most {
        return Err(bad(format!(
            "config key `embed.neighbours`: {} is outside [1, {most}] (at most {MAX_NEIGHBOURS}, \
             and fewer than the {users} users of the dataset {}: a user is not its own \
             neighbour); lower `embed.neighbours`",
            cfg.neighbours,
            dataset_dir.display()
        )));
    }
    if items < 2 {
        bail!("PCA needs at least 2 items, the dataset has {items}");
    }
    for spec in [&cfg.item_import, &cfg.user_import].into_iter().flatten() {
        if !spec.path.is_file() {
            bail!(
                "import file {} does not exist; fix the path or remove the import",
                spec.path.display()
            );
        }
    }
    // The largest tables of this stage: the neighbour lists (indices and
    // scores) and a block of kNN similarities.
    crate::memory::ensure_fits(
        &format!(
            "the similar-user lists ({users} users x {} neighbours)",
            cfg.neighbours
        ),
        users as f64 * (cfg.neighbours as f64 * 8.0 + cfg.knn_block.min(users) as f64 * 4.0),
        "lower `embed.neighbours` or `embed.knn_block`",
    )?;
    let device = parse_device(&cfg.device, 0, "embed.device")?;
    if needs_model(cfg) {
        check_model_dir(&cfg.model)?;
    }
    if cfg.item_import.is_none() {
        // PCA keeps at most the encoder's width; say so before encoding.
        if let Some(width) = crate::encoder::model_width(&cfg.model) {
            if cfg.pca_dim > width {
                return Err(bad(format!(
                    "config key `embed.pca_dim`: {} is outside [1, {width}] (the width of the \
                     encoder {}); lower `embed.pca_dim` (and `model.hidden`)",
                    cfg.pca_dim,
                    cfg.model.display()
                )));
            }
        }
    }
    Ok(Checked {
        data,
        item_tpl,
        user_tpl,
        device,
    })
}
