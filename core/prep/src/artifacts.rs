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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::dataset::{Dataset, INTER_FILE, ITEM_TEXT_FILE};
use crate::encoder::{check_model_dir, SentenceEncoder};
use crate::fsutil::{sha256_file, with_temp_path, write_json_atomic};
use crate::import::{import_matrix, ImportSpec};
use crate::invalid::invalid_config;
use crate::knn::knn;
use crate::pca;
use crate::prompts::{
    check_item_template, check_user_template, item_prompts, user_prompts, Template,
    DEFAULT_ITEM_TEMPLATE, DEFAULT_USER_TEMPLATE,
};

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

/// The model recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Directory name, e.g. `all-MiniLM-L6-v2`.
    pub name: String,
    /// Directory as configured.
    pub dir: String,
    /// sha256 of `model.safetensors`.
    pub sha256: String,
    /// sha256 of `tokenizer.json`.
    pub tokenizer_sha256: String,
}

/// The dataset recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Directory as given.
    pub dir: String,
    /// Users.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// sha256 of `inter.txt`.
    pub inter_sha256: String,
    /// sha256 of `item_text.tsv`, when present.
    pub item_text_sha256: Option<String>,
}

/// One produced file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEntry {
    /// Every input that determines the output; a stage is up to date when this is
    /// unchanged.
    pub key: serde_json::Value,
    /// The output file name.
    pub file: String,
    /// sha256 of the output file.
    pub output_sha256: String,
    /// Rows of the main tensor.
    pub rows: usize,
    /// Columns of the main tensor.
    pub cols: usize,
    /// Seconds it took.
    pub seconds: f64,
    /// Stage-specific facts (e.g. texts per second, explained variance).
    pub info: serde_json::Value,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of this crate that wrote it.
    pub crate_version: String,
    /// The dataset.
    pub dataset: DatasetInfo,
    /// The model, when a stage encoded text.
    pub model: Option<ModelInfo>,
    /// Item template used.
    pub item_template: String,
    /// User template used.
    pub user_template: String,
    /// Stages by name: `item_emb`, `user_emb`, `pca`, `neighbours`.
    pub stages: BTreeMap<String, StageEntry>,
}

impl Manifest {
    /// Reads `manifest.json` from an artifact directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: no artifacts here; run `llm-esr-orch embed CONFIG`",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "parsing {}; rerun `llm-esr-orch embed CONFIG` (with --force if needed)",
                path.display()
            )
        })
    }
}

/// What happened to a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Computed now.
    Computed,
    /// Imported from a file now.
    Imported,
    /// Inputs unchanged; nothing done.
    UpToDate,
}

/// One stage of an [`embed`] run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// `item_emb`, `user_emb`, `pca` or `neighbours`.
    pub name: String,
    /// What happened.
    pub status: StageStatus,
    /// Seconds spent now (0 when up to date).
    pub seconds: f64,
    /// Rows x columns of the output.
    pub shape: (usize, usize),
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

/// Saves tensors atomically as safetensors.
fn save_tensors(path: &Path, tensors: &[(&str, Tensor)]) -> Result<String> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok(((*n).to_string(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    with_temp_path(path, |tmp| {
        llm_esr_runtime::candle::safetensors::save(&map, tmp)
            .with_context(|| format!("writing {}", path.display()))?;
        // The safetensors writer creates its file private (0600); artifacts are
        // shared like every other output.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644));
        }
        Ok(())
    })?;
    sha256_file(path)
}

/// Loads one named tensor of an artifact file, with errors that say to rerun
/// `embed`.
fn load_tensor(path: &Path, name: &str, device: &Device) -> Result<Tensor> {
    let rerun = "rerun `llm-esr-orch embed CONFIG`";
    if !path.is_file() {
        bail!("{} is missing; {rerun}", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = llm_esr_runtime::candle::safetensors::SliceSafetensors::new(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({e}); it is truncated or corrupt, {rerun} \
             --force",
            path.display()
        )
    })?;
    let t = st.load(name, device).map_err(|e| {
        anyhow::anyhow!(
            "{}: no usable tensor `{name}` ({e}); {rerun}",
            path.display()
        )
    })?;
    Ok(t)
}

/// Fails unless `dir/file` has the sha256 that `embed` recorded for it: a
/// file edited, replaced or truncated since is not used.
fn verify_output(manifest: &Manifest, dir: &Path, file: &str) -> Result<()> {
    let path = dir.join(file);
    let rerun = "rerun `llm-esr-orch embed CONFIG` (with --force to recompute every stage)";
    let Some(entry) = manifest.stages.values().find(|e| e.file == file) else {
        bail!(
            "{}: {} records no stage that wrote {file}; {rerun}",
            path.display(),
            dir.join(MANIFEST_FILE).display()
        );
    };
    if !path.is_file() {
        bail!("{} is missing; {rerun}", path.display());
    }
    let actual = sha256_file(&path)?;
    if actual != entry.output_sha256 {
        bail!(
            "{} has changed since `embed` wrote it (sha256 {actual}, {} records {}); {rerun}",
            path.display(),
            dir.join(MANIFEST_FILE).display(),
            entry.output_sha256
        );
    }
    Ok(())
}

fn prepend_zero_row(t: &Tensor) -> Result<Tensor> {
    let (_, d) = t.dims2()?;
    let zero = Tensor::zeros((1, d), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&zero, t], 0)?)
}

fn up_to_date(
    manifest: Option<&Manifest>,
    out_dir: &Path,
    name: &str,
    key: &serde_json::Value,
) -> bool {
    let Some(entry) = manifest.and_then(|m| m.stages.get(name)) else {
        return false;
    };
    if &entry.key != key {
        return false;
    }
    let path = out_dir.join(&entry.file);
    matches!(sha256_file(&path), Ok(h) if h == entry.output_sha256)
}

/// The manifest and report of an [`embed`] run, stage by stage.
struct Stages<'a> {
    out_dir: &'a Path,
    previous: Option<&'a Manifest>,
    manifest: Manifest,
    reports: Vec<StageReport>,
}

impl Stages<'_> {
    /// The previous entry of stage `name` when its inputs (`key`) and output
    /// file are unchanged; it is then recorded as up to date.
    fn reuse(&mut self, name: &str, key: &serde_json::Value) -> Option<StageEntry> {
        if !up_to_date(self.previous, self.out_dir, name, key) {
            return None;
        }
        let entry = self.previous?.stages.get(name)?.clone();
        let path = self.out_dir.join(&entry.file);
        tracing::info!("{name}: up to date ({})", path.display());
        self.reports.push(StageReport {
            name: name.into(),
            status: StageStatus::UpToDate,
            seconds: 0.0,
            shape: (entry.rows, entry.cols),
        });
        self.manifest.stages.insert(name.into(), entry.clone());
        Some(entry)
    }

    /// Records a stage just done and saves the manifest, keeping the previous
    /// entries of the stages not reached yet (an interrupted run resumes).
    fn record(&mut self, name: &str, entry: StageEntry, status: StageStatus) -> Result<()> {
        self.reports.push(StageReport {
            name: name.into(),
            status,
            seconds: entry.seconds,
            shape: (entry.rows, entry.cols),
        });
        self.manifest.stages.insert(name.into(), entry);
        let merged = merge_previous(&self.manifest, self.previous);
        write_json_atomic(&self.out_dir.join(MANIFEST_FILE), &merged)
    }

    fn output_sha256(&self, name: &str) -> Option<String> {
        self.manifest
            .stages
            .get(name)
            .map(|e| e.output_sha256.clone())
    }
}

/// Builds (or brings up to date) the artifacts of the prepared dataset in
/// `dataset_dir` into `out_dir`. See the module docs for the files.
pub fn embed(
    cfg: &EmbedConfig,
    dataset_dir: &Path,
    out_dir: &Path,
    force: bool,
) -> Result<ArtifactSummary> {
    // ---- Checks before any work. Errors of the configuration are
    // `InvalidConfig` (the orchestrator exits with status 2) and name the key.
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
    let needs_text = cfg.item_import.is_none() || cfg.user_import.is_none();
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
    let device = crate::device::parse_device(&cfg.device, 0, "embed.device")?;
    let needs_model = cfg.item_import.is_none() || cfg.user_import.is_none();
    if needs_model {
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
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating artifact directory {}", out_dir.display()))?;

    // ---- Fingerprints.
    let inter_sha = sha256_file(&dataset_dir.join(INTER_FILE))?;
    let text_sha = match &data.item_text {
        Some(t) => Some(sha256_file(&t.path)?),
        None => None,
    };
    let model_info = if needs_model {
        Some(ModelInfo {
            name: cfg
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: cfg.model.display().to_string(),
            sha256: sha256_file(&cfg.model.join("model.safetensors"))?,
            tokenizer_sha256: sha256_file(&cfg.model.join("tokenizer.json"))?,
        })
    } else {
        None
    };
    let model_key = model_info.as_ref().map(|m| {
        json!({"name": m.name, "sha256": m.sha256, "tokenizer_sha256": m.tokenizer_sha256,
               "max_tokens": cfg.max_tokens})
    });
    let import_key = |spec: &ImportSpec| -> Result<serde_json::Value> {
        Ok(
            json!({"path": spec.path.display().to_string(), "sha256": sha256_file(&spec.path)?,
                  "tensor": spec.tensor}),
        )
    };

    let previous = if force || !out_dir.join(MANIFEST_FILE).exists() {
        None
    } else {
        match Manifest::load(out_dir) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring the old manifest: {e:#}");
                None
            }
        }
    };
    let manifest = Manifest {
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        dataset: DatasetInfo {
            dir: dataset_dir.display().to_string(),
            users,
            items,
            inter_sha256: inter_sha.clone(),
            item_text_sha256: text_sha.clone(),
        },
        model: model_info.clone(),
        item_template: cfg.item_template.clone(),
        user_template: cfg.user_template.clone(),
        stages: BTreeMap::new(),
    };
    let mut stages = Stages {
        out_dir,
        previous: previous.as_ref(),
        manifest,
        reports: Vec::new(),
    };
    let mut encoder: Option<SentenceEncoder> = None;
    let get_encoder = |enc: &mut Option<SentenceEncoder>| -> Result<()> {
        if enc.is_none() {
            let t = Instant::now();
            *enc = Some(
                SentenceEncoder::load(&cfg.model, &device, cfg.max_tokens)?
                    .with_max_batch_tokens(cfg.max_batch_tokens),
            );
            tracing::info!(
                seconds = t.elapsed().as_secs_f64(),
                "loaded {}",
                cfg.model.display()
            );
        }
        Ok(())
    };

    // ---- Stage 1: E_se.
    let item_key = match &cfg.item_import {
        Some(spec) => json!({"import": import_key(spec)?, "items": items}),
        None => json!({"model": model_key, "template": cfg.item_template,
                       "item_text_sha256": text_sha, "items": items}),
    };
    let item_path = out_dir.join(ITEM_EMB_FILE);
    let mut item_emb: Option<Tensor> = None;
    if stages.reuse("item_emb", &item_key).is_none() {
        let t = Instant::now();
        let (emb, status, info) = match &cfg.item_import {
            Some(spec) => {
                let m = import_matrix(spec, &[items, items + 1], "E_se (items)")?;
                let m = if m.dims2()?.0 == items + 1 {
                    m.narrow(0, 1, items)?
                } else {
                    m
                };
                (m, StageStatus::Imported, json!({}))
            }
            None => {
                let text = text.context("item text")?;
                let prompts = item_prompts(&item_tpl, text, items, "item_template")?;
                get_encoder(&mut encoder)?;
                let enc = encoder.as_ref().context("encoder")?;
                let e = enc.encode(&prompts, cfg.batch_size, "items")?;
                let secs = t.elapsed().as_secs_f64();
                (
                    e,
                    StageStatus::Computed,
                    json!({"texts_per_second": items as f64 / secs,
                    "max_tokens": enc.max_tokens(), "example_prompt": prompts.first()}),
                )
            }
        };
        let full = prepend_zero_row(&emb.to_dtype(DType::F32)?)?;
        let sha = save_tensors(&item_path, &[("item_emb", full.clone())])?;
        let (rows, cols) = full.dims2()?;
        let seconds = t.elapsed().as_secs_f64();
        let entry = StageEntry {
            key: item_key,
            file: ITEM_EMB_FILE.into(),
            output_sha256: sha,
            rows,
            cols,
            seconds,
            info,
        };
        stages.record("item_emb", entry, status)?;
        item_emb = Some(full);
    }

    // ---- Stage 2: U_llm.
    let user_key = match &cfg.user_import {
        Some(spec) => json!({"import": import_key(spec)?, "users": users}),
        None => json!({"model": model_key, "template": cfg.user_template,
                       "history_column": cfg.user_history_column,
                       "inter_sha256": inter_sha, "item_text_sha256": text_sha, "users": users}),
    };
    let user_path = out_dir.join(USER_EMB_FILE);
    let mut user_emb: Option<Tensor> = None;
    if stages.reuse("user_emb", &user_key).is_none() {
        let t = Instant::now();
        let (emb, status, info) = match &cfg.user_import {
            Some(spec) => (
                import_matrix(spec, &[users], "U_llm (users)")?,
                StageStatus::Imported,
                json!({}),
            ),
            None => {
                let text = text.context("item text")?;
                let prompts = user_prompts(
                    &user_tpl,
                    &data.sequences,
                    text,
                    &cfg.user_history_column,
                    "user_template",
                )?;
                get_encoder(&mut encoder)?;
                let enc = encoder.as_ref().context("encoder")?;
                let e = enc.encode(&prompts, cfg.batch_size, "users")?;
                let secs = t.elapsed().as_secs_f64();
                (
                    e,
                    StageStatus::Computed,
                    json!({"texts_per_second": users as f64 / secs,
                    "max_tokens": enc.max_tokens()}),
                )
            }
        };
        let emb = emb.to_dtype(DType::F32)?;
        let sha = save_tensors(&user_path, &[("user_emb", emb.clone())])?;
        let (rows, cols) = emb.dims2()?;
        let seconds = t.elapsed().as_secs_f64();
        let entry = StageEntry {
            key: user_key,
            file: USER_EMB_FILE.into(),
            output_sha256: sha,
            rows,
            cols,
            seconds,
            info,
        };
        stages.record("user_emb", entry, status)?;
        user_emb = Some(emb);
    }
    drop(encoder);

    // ---- Stage 3: PCA of E_se (rows 1..).
    let pca_key = json!({"item_emb_sha256": stages.output_sha256("item_emb"),
                         "pca_dim": cfg.pca_dim});
    let pca_path = out_dir.join(PCA_FILE);
    let explained;
    if let Some(e) = stages.reuse("pca", &pca_key) {
        explained = e
            .info
            .get("explained_variance")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
    } else {
        let t = Instant::now();
        let full = match item_emb.take() {
            Some(e) => e,
            None => load_tensor(&item_path, "item_emb", &Device::Cpu)?,
        };
        let rows = full.narrow(0, 1, items)?;
        let width = rows.dim(1)?;
        if cfg.pca_dim > width {
            return Err(bad(format!(
                "config key `embed.pca_dim`: {} is outside [1, {width}] (the width of the item \
                 embeddings); lower `embed.pca_dim` (and `model.hidden`)",
                cfg.pca_dim
            )));
        }
        let fitted = pca::fit(&rows, cfg.pca_dim)?;
        let projected = prepend_zero_row(&fitted.transform(&rows)?)?;
        explained = fitted.explained_variance_ratio.iter().sum();
        let k = fitted.k();
        let d = fitted.dim;
        let sha = save_tensors(
            &pca_path,
            &[
                ("pca", projected.clone()),
                (
                    "components",
                    Tensor::from_vec(
                        fitted
                            .components
                            .iter()
                            .map(|&v| v as f32)
                            .collect::<Vec<_>>(),
                        (k, d),
                        &Device::Cpu,
                    )?,
                ),
                (
                    "mean",
                    Tensor::from_vec(
                        fitted.mean.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                        d,
                        &Device::Cpu,
                    )?,
                ),
                (
                    "explained_variance_ratio",
                    Tensor::from_vec(
                        fitted
                            .explained_variance_ratio
                            .iter()
                            .map(|&v| v as f32)
                            .collect::<Vec<_>>(),
                        k,
                        &Device::Cpu,
                    )?,
                ),
            ],
        )?;
        let seconds = t.elapsed().as_secs_f64();
        tracing::info!(
            seconds,
            explained_variance = explained,
            "pca: {} -> {k} dims",
            d
        );
        let (rows, cols) = projected.dims2()?;
        let entry = StageEntry {
            key: pca_key,
            file: PCA_FILE.into(),
            output_sha256: sha,
            rows,
            cols,
            seconds,
            info: json!({"explained_variance": explained,
                         "explained_variance_ratio": fitted.explained_variance_ratio}),
        };
        stages.record("pca", entry, StageStatus::Computed)?;
    }

    // ---- Stage 4: neighbours of U_llm.
    let nb_key = json!({"user_emb_sha256": stages.output_sha256("user_emb"),
                        "neighbours": cfg.neighbours});
    let nb_path = out_dir.join(NEIGHBOURS_FILE);
    if stages.reuse("neighbours", &nb_key).is_none() {
        let t = Instant::now();
        let u = match user_emb.take() {
            Some(u) => u,
            None => load_tensor(&user_path, "user_emb", &Device::Cpu)?,
        };
        let u = u.to_device(&device)?;
        let nb = knn(&u, cfg.neighbours, cfg.knn_block)?;
        let indices = Tensor::from_vec(nb.indices, (nb.rows, nb.k), &Device::Cpu)?;
        let scores = Tensor::from_vec(nb.scores, (nb.rows, nb.k), &Device::Cpu)?;
        let sha = save_tensors(&nb_path, &[("indices", indices), ("scores", scores)])?;
        let seconds = t.elapsed().as_secs_f64();
        tracing::info!(seconds, "neighbours: top-{} of {} users", nb.k, nb.rows);
        let entry = StageEntry {
            key: nb_key,
            file: NEIGHBOURS_FILE.into(),
            output_sha256: sha,
            rows: nb.rows,
            cols: nb.k,
            seconds,
            info: json!({}),
        };
        stages.record("neighbours", entry, StageStatus::Computed)?;
    }
    // Only this run's stages: entries of stages that no longer exist go.
    write_json_atomic(&out_dir.join(MANIFEST_FILE), &stages.manifest)?;

    let cols = |name: &str| stages.manifest.stages.get(name).map_or(0, |e| e.cols);
    let (item_dim, user_dim) = (cols("item_emb"), cols("user_emb"));
    Ok(ArtifactSummary {
        items,
        users,
        item_dim,
        user_dim,
        pca_dim: cfg.pca_dim,
        neighbours: cfg.neighbours,
        explained_variance: explained,
        stages: stages.reports,
    })
}

/// While a run is in progress, keeps the previous entries of stages not yet
/// reached, so that an interrupted run can resume where it stopped.
fn merge_previous(current: &Manifest, previous: Option<&Manifest>) -> Manifest {
    let mut m = current.clone();
    if let Some(p) = previous {
        for (k, v) in &p.stages {
            m.stages.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    m
}

/// The artifacts, loaded and checked against the dataset.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `E_se`: `(items + 1, D)` f32, row 0 zeros.
    pub item_emb: Tensor,
    /// `U_llm`: `(users, D_u)` f32, row 0 = user 1; `None` when the file is absent.
    pub user_emb: Option<Tensor>,
    /// PCA init of `E_co`: `(items + 1, pca_dim)` f32, row 0 zeros.
    pub pca: Tensor,
    /// Similar users: `(users, K)` u32, 0-based user rows, best first.
    pub neighbours: Tensor,
    /// Their cosine similarities: `(users, K)` f32.
    pub neighbour_scores: Tensor,
    /// The manifest.
    pub manifest: Manifest,
}

impl Artifacts {
    /// Loads the artifacts in `dir` onto `device`, checking every shape against
    /// the dataset (`expected_items` items, `expected_users` users). Errors name
    /// the file and say to rerun `llm-esr-orch embed CONFIG`.
    pub fn load(
        dir: &Path,
        expected_items: usize,
        expected_users: usize,
        device: &Device,
    ) -> Result<Artifacts> {
        let rerun = "rerun `llm-esr-orch embed CONFIG`";
        let manifest = Manifest::load(dir)?;
        if manifest.dataset.items != expected_items || manifest.dataset.users != expected_users {
            bail!(
                "{}: the artifacts were built for {} items and {} users, the dataset has {} items \
                 and {} users; {rerun}",
                dir.join(MANIFEST_FILE).display(),
                manifest.dataset.items,
                manifest.dataset.users,
                expected_items,
                expected_users
            );
        }
        let check = |path: &Path,
                     name: &str,
                     t: &Tensor,
                     rows: usize,
                     cols: Option<usize>,
                     dtype: DType|
         -> Result<()> {
            let dims = t.dims();
            let ok = dims.len() == 2
                && dims[0] == rows
                && cols.is_none_or(|c| dims[1] == c)
                && t.dtype() == dtype;
            if !ok {
                bail!(
                    "{}: tensor `{name}` has shape {:?} ({:?}) but the dataset needs ({rows}, {}) \
                     ({dtype:?}); {rerun}",
                    path.display(),
                    dims,
                    t.dtype(),
                    cols.map(|c| c.to_string()).unwrap_or_else(|| "D".into())
                );
            }
            Ok(())
        };
        // Every file must be the one `embed` wrote (its sha256 in the
        // manifest), and every float in it finite.
        let verified = |file: &str| -> Result<PathBuf> {
            let p = dir.join(file);
            verify_output(&manifest, dir, file)?;
            Ok(p)
        };
        let finite = |p: &Path, name: &str, t: &Tensor| {
            crate::finite::ensure_finite(
                t,
                &format!("{}: tensor `{name}`", p.display()),
                &format!("{rerun} --force"),
            )
        };
        let p = verified(ITEM_EMB_FILE)?;
        let item_emb = load_tensor(&p, "item_emb", device)?;
        finite(&p, "item_emb", &item_emb)?;
        check(
            &p,
            "item_emb",
            &item_emb,
            expected_items + 1,
            None,
            DType::F32,
        )?;
        let p = dir.join(USER_EMB_FILE);
        let user_emb = if p.exists() {
            let p = verified(USER_EMB_FILE)?;
            let u = load_tensor(&p, "user_emb", device)?;
            check(&p, "user_emb", &u, expected_users, None, DType::F32)?;
            finite(&p, "user_emb", &u)?;
            Some(u)
        } else {
            None
        };
        let p = verified(PCA_FILE)?;
        let pca = load_tensor(&p, "pca", device)?;
        check(&p, "pca", &pca, expected_items + 1, None, DType::F32)?;
        finite(&p, "pca", &pca)?;
        let p = verified(NEIGHBOURS_FILE)?;
        let neighbours = load_tensor(&p, "indices", &Device::Cpu)?;
        check(&p, "indices", &neighbours, expected_users, None, DType::U32)?;
        let k = neighbours.dims()[1];
        let scores = load_tensor(&p, "scores", device)?;
        check(&p, "scores", &scores, expected_users, Some(k), DType::F32)?;
        finite(&p, "scores", &scores)?;
        let flat: Vec<u32> = neighbours.flatten_all()?.to_vec1()?;
        for (pos, &j) in flat.iter().enumerate() {
            let row = pos.checked_div(k).unwrap_or(0);
            if j as usize >= expected_users || j as usize == row {
                bail!(
                    "{}: neighbour {j} of user row {row} is out of range or the user itself; {rerun}",
                    p.display()
                );
            }
        }
        let neighbours = neighbours.to_device(device)?;
        Ok(Artifacts {
            item_emb,
            user_emb,
            pca,
            neighbours,
            neighbour_scores: scores,
            manifest,
        })
    }
}
