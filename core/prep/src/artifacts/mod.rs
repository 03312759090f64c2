//! The cached semantic artifacts of a prepared dataset and the `embed` stage that
//! produces them.
//!
//! Files in the artifact directory (all written atomically: temporary file in
//! the same directory, then rename):
//! - `item_emb.safetensors`: tensor `item_emb`, f32 `(items + 1, D)`; row `i` is
//!   item id `i`, row 0 (padding) is zeros. This is `E_se`.
//! - `user_emb.safetensors`: tensor `user_emb`, f32 `(users, D_u)`; row `r` is
//!   user id `r + 1` (no padding row). This is `U_llm`.
//! - `pca.safetensors`: tensor `pca`, f32 `(items + 1, pca_dim)`, row 0 zeros
//!   (the `E_co` initialisation), plus `components` `(pca_dim, D)`, `mean` `(D)`
//!   and `explained_variance_ratio` `(pca_dim)`.
//! - `neighbours.safetensors`: `indices` u32 `(users, K)` with 0-based user rows
//!   (row `r` = user id `r + 1`), best first, never the user itself; `scores` f32
//!   `(users, K)` cosine similarities.
//! - `manifest.json` ([`Manifest`]): the model (name, sha256 of
//!   `model.safetensors`), templates, dimensions, sha256 of every input file and
//!   output, counts, this crate's version. [`embed`] skips every stage whose
//!   recorded inputs and output hash still match (no encoding work, logged as
//!   "up to date"); `force` recomputes all.
//!
//! One module per concern: `check` (the checks before any work), `stages`
//! (one function per stage: `E_se`, `U_llm`, PCA, neighbours, and their
//! keys), `manifest` ([`Manifest`] and the up-to-date bookkeeping of a run),
//! `tensors` (saving and loading the safetensors files) and `load`
//! ([`Artifacts::load`], the verified loader of the trainer); [`embed`] here
//! runs the stages in order.

mod check;
mod load;
mod manifest;
mod stages;
mod tensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use load::Artifacts;
pub use manifest::{DatasetInfo, Manifest, ModelInfo, StageEntry, StageReport, StageStatus};

use crate::import::ImportSpec;
use crate::prompts::{DEFAULT_ITEM_TEMPLATE, DEFAULT_USER_TEMPLATE};
use check::{check, needs_model, Checked};
use manifest::Stages;
use stages::{Encoder, Fingerprints};

/// `E_se` file.
pub const ITEM_EMB_FILE: &str = "item_emb.safetensors";
/// `U_llm` file.
pub const USER_EMB_FILE: &str = "user_emb.safetensors";
/// PCA file.
pub const PCA_FILE: &str = "pca.safetensors";
/// Similar-users file.
pub const NEIGHBOURS_FILE: &str = "neighbours.safetensors";
/// Manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Largest `embed.batch_size` (texts per encoder batch).
pub const MAX_EMBED_BATCH: usize = 65_536;
/// Largest `embed.max_batch_tokens`.
pub const MAX_BATCH_TOKENS: usize = 1 << 20;
/// Largest `embed.knn_block` (rows of similarities computed at once).
pub const MAX_KNN_BLOCK: usize = 65_536;
/// Largest `embed.pca_dim` (and `model.hidden`).
pub const MAX_PCA_DIM: usize = 4096;
/// Largest `embed.neighbours`.
pub const MAX_NEIGHBOURS: usize = 10_000;
/// Smallest `embed.max_tokens` ([CLS] text [SEP]).
pub const MIN_MAX_TOKENS: usize = 3;
/// Largest `embed.max_tokens`.
pub const MAX_MAX_TOKENS: usize = 8192;

/// Configuration of [`embed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Model directory with `config.json`, `tokenizer.json`, `model.safetensors`
    /// (default `models/all-MiniLM-L6-v2`).
    pub model: PathBuf,
    /// Item prompt template over `item_text.tsv` columns (see
    /// [`crate::prompts`]).
    pub item_template: String,
    /// User prompt template with `{history}`.
    pub user_template: String,
    /// The `item_text.tsv` column whose values make the user history.
    pub user_history_column: String,
    /// Texts per encoder batch (default 64).
    pub batch_size: usize,
    /// At most this many padded tokens per encoder batch (default 1024); long
    /// texts run in smaller batches.
    pub max_batch_tokens: usize,
    /// Tokenizer truncation in tokens (default: `min(max_position_embeddings,
    /// 512)`).
    pub max_tokens: Option<usize>,
    /// PCA width, the hidden size `d` (default 64).
    pub pca_dim: usize,
    /// Similar users stored per user (default 100).
    pub neighbours: usize,
    /// Rows per block of the kNN matrix product (default 1024).
    pub knn_block: usize,
    /// Import `E_se` instead of encoding: `(items, D)` (row 0 = item 1) or
    /// `(items + 1, D)` (row 0 = padding, ignored).
    pub item_import: Option<ImportSpec>,
    /// Import `U_llm` instead of encoding: `(users, D)`, row 0 = user 1.
    pub user_import: Option<ImportSpec>,
    /// `cpu`, `cuda` or `cuda:N` for the encoder and kNN (default `cpu`).
    pub device: String,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            model: PathBuf::from("models/all-MiniLM-L6-v2"),
            item_template: DEFAULT_ITEM_TEMPLATE.to_string(),
            user_template: DEFAULT_USER_TEMPLATE.to_string(),
            user_history_column: "title".to_string(),
            batch_size: 64,
            max_batch_tokens: crate::encoder::DEFAULT_MAX_BATCH_TOKENS,
            max_tokens: None,
            pca_dim: 64,
            neighbours: 100,
            knn_block: 1024,
            item_import: None,
            user_import: None,
            device: "cpu".to_string(),
        }
    }
}

/// The result of [`embed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactSummary {
    /// Items (the item tensors have `items + 1` rows).
    pub items: usize,
    /// Users.
    pub users: usize,
    /// Width of `E_se`.
    pub item_dim: usize,
    /// Width of `U_llm`.
    pub user_dim: usize,
    /// PCA width.
    pub pca_dim: usize,
    /// Neighbours per user.
    pub neighbours: usize,
    /// Sum of the explained variance ratios of the kept components.
    pub explained_variance: f64,
    /// Per stage, in order.
    pub stages: Vec<StageReport>,
}

/// Builds (or brings up to date) the artifacts of the prepared dataset in
/// `dataset_dir` into `out_dir`. See the module docs for the files.
pub fn embed(
    cfg: &EmbedConfig,
    dataset_dir: &Path,
    out_dir: &Path,
    force: bool,
) -> Result<ArtifactSummary> {
    let Checked {
        data,
        item_tpl,
        user_tpl,
        device,
    } = check(cfg, dataset_dir)?;
    let items = data.num_items;
    let users = data.num_users();
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating artifact directory {}", out_dir.display()))?;

    let fp = Fingerprints::of(cfg, dataset_dir, &data, needs_model(cfg))?;
    let manifest = Manifest {
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        dataset: DatasetInfo {
            dir: dataset_dir.display().to_string(),
            users,
            items,
            inter_sha256: fp.inter_sha.clone(),
            item_text_sha256: fp.text_sha.clone(),
        },
        model: fp.model.clone(),
        item_template: cfg.item_template.clone(),
        user_template: cfg.user_template.clone(),
        stages: BTreeMap::new(),
    };
    let mut book = Stages::start(out_dir, force, manifest);
    let mut encoder = Encoder::new(cfg, &device);

    let key = stages::item_emb_key(cfg, &fp, items)?;
    let item_emb = book.run("item_emb", key, |key| {
        stages::item_emb(cfg, key, &data, &item_tpl, &mut encoder, out_dir)
    })?;
    let key = stages::user_emb_key(cfg, &fp, users)?;
    let user_emb = book.run("user_emb", key, |key| {
        stages::user_emb(cfg, key, &data, &user_tpl, &mut encoder, out_dir)
    })?;
    drop(encoder);

    let key = stages::pca_key(book.output_sha256("item_emb"), cfg.pca_dim);
    let explained = match book.run("pca", key, |key| {
        stages::pca(cfg, key, items, item_emb, out_dir)
    })? {
        Some(explained) => explained,
        None => book
            .entry("pca")
            .and_then(|e| e.info.get("explained_variance"))
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
    };
    let key = stages::neighbours_key(book.output_sha256("user_emb"), cfg.neighbours);
    book.run("neighbours", key, |key| {
        stages::neighbours(cfg, key, &device, user_emb, out_dir)
    })?;
    let (manifest, reports) = book.finish()?;

    let cols = |name: &str| manifest.stages.get(name).map_or(0, |e| e.cols);
    let (item_dim, user_dim) = (cols("item_emb"), cols("user_emb"));
    Ok(ArtifactSummary {
        items,
        users,
        item_dim,
        user_dim,
        pca_dim: cfg.pca_dim,
        neighbours: cfg.neighbours,
        explained_variance: explained,
        stages: reports,
    })
}
