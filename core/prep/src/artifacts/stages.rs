//! The four stages of [`embed`](super::embed), one function each: `E_se`
//! (items), `U_llm` (users), the PCA of `E_se` and the neighbours of `U_llm`.
//! Each takes its inputs and its key (every input that determines its output,
//! built by the `*_key` function beside it), writes its file and returns its
//! manifest entry; whether a stage runs at all is the manifest's decision
//! ([`Stages::run`](super::manifest::Stages::run)).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor};
use serde_json::json;

use super::manifest::{ModelInfo, Produced, StageEntry, StageStatus};
use super::tensors::{load_tensor, save_tensors};
use super::{EmbedConfig, ITEM_EMB_FILE, NEIGHBOURS_FILE, PCA_FILE, USER_EMB_FILE};
use crate::dataset::{Dataset, INTER_FILE};
use crate::encoder::SentenceEncoder;
use crate::fsutil::sha256_file;
use crate::import::{import_matrix, ImportSpec};
use crate::invalid::invalid_config;
use crate::knn::knn;
use crate::prompts::{item_prompts, user_prompts, Template};

/// The hashes of the inputs that the stage keys record.
pub(super) struct Fingerprints {
    /// sha256 of `inter.txt`.
    pub inter_sha: String,
    /// sha256 of `item_text.tsv`, when present.
    pub text_sha: Option<String>,
    /// The encoder, when a stage encodes text.
    pub model: Option<ModelInfo>,
    /// The encoder's part of the text stages' keys.
    model_key: Option<serde_json::Value>,
}

impl Fingerprints {
    /// Hashes the dataset's files and, when `needs_model`, the encoder's.
    pub fn of(
        cfg: &EmbedConfig,
        dataset_dir: &Path,
        data: &Dataset,
        needs_model: bool,
    ) -> Result<Self> {
        let inter_sha = sha256_file(&dataset_dir.join(INTER_FILE))?;
        let text_sha = match &data.item_text {
            Some(t) => Some(sha256_file(&t.path)?),
            None => None,
        };
        let model = if needs_model {
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
        let model_key = model.as_ref().map(|m| {
            json!({"name": m.name, "sha256": m.sha256, "tokenizer_sha256": m.tokenizer_sha256,
                   "max_tokens": cfg.max_tokens})
        });
        Ok(Fingerprints {
            inter_sha,
            text_sha,
            model,
            model_key,
        })
    }
}

/// The sentence encoder, loaded on first use (never when both embeddings are
/// imported or up to date) and shared by the two text stages.
pub(super) struct Encoder<'a> {
    cfg: &'a EmbedConfig,
    device: &'a Device,
    loaded: Option<SentenceEncoder>,
}

impl<'a> Encoder<'a> {
    pub fn new(cfg: &'a EmbedConfig, device: &'a Device) -> Self {
        Encoder {
            cfg,
            device,
            loaded: None,
        }
    }

    fn get(&mut self) -> Result<&SentenceEncoder> {
        if self.loaded.is_none() {
            let t = Instant::now();
            self.loaded = Some(
                SentenceEncoder::load(&self.cfg.model, self.device, self.cfg.max_tokens)?
                    .with_max_batch_tokens(self.cfg.max_batch_tokens),
            );
            tracing::info!(
                seconds = t.elapsed().as_secs_f64(),
                "loaded {}",
                self.cfg.model.display()
            );
        }
        self.loaded.as_ref().context("encoder")
    }
}

fn import_key(spec: &ImportSpec) -> Result<serde_json::Value> {
    Ok(
        json!({"path": spec.path.display().to_string(), "sha256": sha256_file(&spec.path)?,
              "tensor": spec.tensor}),
    )
}

fn prepend_zero_row(t: &Tensor) -> Result<Tensor> {
    let (_, d) = t.dims2()?;
    let zero = Tensor::zeros((1, d), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&zero, t], 0)?)
}

/// The key of stage `item_emb`: the import file, or the encoder, the item
/// template and the item text.
pub(super) fn item_emb_key(
    cfg: &EmbedConfig,
    fp: &Fingerprints,
    items: usize,
) -> Result<serde_json::Value> {
    Ok(match &cfg.item_import {
        Some(spec) => json!({"import": import_key(spec)?, "items": items}),
        None => json!({"model": fp.model_key, "template": cfg.item_template,
                       "item_text_sha256": fp.text_sha, "items": items}),
    })
}

/// Stage `item_emb`: `E_se`, encoded from the item prompts or imported, with a
/// zero padding row; the tensor is the PCA stage's input.
pub(super) fn item_emb(
    cfg: &EmbedConfig,
    key: serde_json::Value,
    data: &Dataset,
    template: &Template,
    encoder: &mut Encoder,
    out_dir: &Path,
) -> Result<Produced<Tensor>> {
    let items = data.num_items;
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
            let text = data.item_text.as_ref().context("item text")?;
            let prompts = item_prompts(template, text, items, "item_template")?;
            let enc = encoder.get()?;
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
    let sha = save_tensors(&out_dir.join(ITEM_EMB_FILE), &[("item_emb", full.clone())])?;
    Ok(Produced {
        entry: StageEntry::written(key, ITEM_EMB_FILE, sha, full.dims2()?, t, info),
        status,
        value: full,
    })
}

/// The key of stage `user_emb`: the import file, or the encoder, the user
/// template, its history column, the interactions and the item text.
pub(super) fn user_emb_key(
    cfg: &EmbedConfig,
    fp: &Fingerprints,
    users: usize,
) -> Result<serde_json::Value> {
    Ok(match &cfg.user_import {
        Some(spec) => json!({"import": import_key(spec)?, "users": users}),
        None => json!({"model": fp.model_key, "template": cfg.user_template,
                       "history_column": cfg.user_history_column,
                       "inter_sha256": fp.inter_sha, "item_text_sha256": fp.text_sha,
                       "users": users}),
    })
}

/// Stage `user_emb`: `U_llm`, encoded from the user prompts (training items
/// only) or imported; the tensor is the neighbour stage's input.
pub(super) fn user_emb(
    cfg: &EmbedConfig,
    key: serde_json::Value,
    data: &Dataset,
    template: &Template,
    encoder: &mut Encoder,
    out_dir: &Path,
) -> Result<Produced<Tensor>> {
    let users = data.num_users();
    let t = Instant::now();
    let (emb, status, info) = match &cfg.user_import {
        Some(spec) => (
            import_matrix(spec, &[users], "U_llm (users)")?,
            StageStatus::Imported,
            json!({}),
        ),
        None => {
            let text = data.item_text.as_ref().context("item text")?;
            let prompts = user_prompts(
                template,
                &data.sequences,
                text,
                &cfg.user_history_column,
                "user_template",
            )?;
            let enc = encoder.get()?;
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
    let sha = save_tensors(&out_dir.join(USER_EMB_FILE), &[("user_emb", emb.clone())])?;
    Ok(Produced {
        entry: StageEntry::written(key, USER_EMB_FILE, sha, emb.dims2()?, t, info),
        status,
        value: emb,
    })
}

/// The key of stage `pca`: the `E_se` file and the width.
pub(super) fn pca_key(item_emb_sha256: Option<String>, pca_dim: usize) -> serde_json::Value {
    json!({"item_emb_sha256": item_emb_sha256, "pca_dim": pca_dim})
}

/// Stage `pca`: the PCA of `E_se` (rows 1..), the `E_co` initialisation with a
/// zero padding row plus the fitted components, mean and explained variance
/// ratios. `item_emb` is the tensor the item stage just produced, `None` to
/// read it from its file. Returns the explained variance (sum of the kept
/// ratios).
pub(super) fn pca(
    cfg: &EmbedConfig,
    key: serde_json::Value,
    items: usize,
    item_emb: Option<Tensor>,
    out_dir: &Path,
) -> Result<Produced<f64>> {
    let t = Instant::now();
    let full = match item_emb {
        Some(e) => e,
        None => load_tensor(&out_dir.join(ITEM_EMB_FILE), "item_emb", &Device::Cpu)?,
    };
    let rows = full.narrow(0, 1, items)?;
    let width = rows.dim(1)?;
    if cfg.pca_dim > width {
        return Err(invalid_config(format!(
            "config key `embed.pca_dim`: {} is outside [1, {width}] (the width of the item \
             embeddings); lower `embed.pca_dim` (and `model.hidden`)",
            cfg.pca_dim
        )));
    }
    let fitted = crate::pca::fit(&rows, cfg.pca_dim)?;
    let projected = prepend_zero_row(&fitted.transform(&rows)?)?;
    let explained: f64 = fitted.explained_variance_ratio.iter().sum();
    let k = fitted.k();
    let d = fitted.dim;
    let sha = save_tensors(
        &out_dir.join(PCA_FILE),
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
    let info = json!({"explained_variance": explained,
                      "explained_variance_ratio": fitted.explained_variance_ratio});
    Ok(Produced {
        entry: StageEntry::written(key, PCA_FILE, sha, projected.dims2()?, t, info),
        status: StageStatus::Computed,
        value: explained,
    })
}

/// The key of stage `neighbours`: the `U_llm` file and the list length.
pub(super) fn neighbours_key(
    user_emb_sha256: Option<String>,
    neighbours: usize,
) -> serde_json::Value {
    json!({"user_emb_sha256": user_emb_sha256, "neighbours": neighbours})
}

/// Stage `neighbours`: the `embed.neighbours` most similar users of each user
/// (cosine of `U_llm`, on `device`). `user_emb` is the tensor the user stage
/// just produced, `None` to read it from its file.
pub(super) fn neighbours(
    cfg: &EmbedConfig,
    key: serde_json::Value,
    device: &Device,
    user_emb: Option<Tensor>,
    out_dir: &Path,
) -> Result<Produced<()>> {
    let t = Instant::now();
    let u = match user_emb {
        Some(u) => u,
        None => load_tensor(&out_dir.join(USER_EMB_FILE), "user_emb", &Device::Cpu)?,
    };
    let u = u.to_device(device)?;
    let nb = knn(&u, cfg.neighbours, cfg.knn_block)?;
    let indices = Tensor::from_vec(nb.indices, (nb.rows, nb.k), &Device::Cpu)?;
    let scores = Tensor::from_vec(nb.scores, (nb.rows, nb.k), &Device::Cpu)?;
    let sha = save_tensors(
        &out_dir.join(NEIGHBOURS_FILE),
        &[("indices", indices), ("scores", scores)],
    )?;
    let seconds = t.elapsed().as_secs_f64();
    tracing::info!(seconds, "neighbours: top-{} of {} users", nb.k, nb.rows);
    Ok(Produced {
        entry: StageEntry::written(key, NEIGHBOURS_FILE, sha, (nb.rows, nb.k), t, json!({})),
        status: StageStatus::Computed,
        value: (),
    })
}
