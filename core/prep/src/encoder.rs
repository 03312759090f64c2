//! A BERT-family sentence encoder (e.g. sentence-transformers/all-MiniLM-L6-v2)
//! on candle: WordPiece tokenization with the `tokenizers` crate, mean pooling
//! over the attention mask, L2 normalisation.
//!
//! Tokenizer settings are set explicitly, whatever `tokenizer.json` carries (the
//! all-MiniLM-L6-v2 file pads and truncates to 128): truncation to
//! `max_tokens` (default: `min(max_position_embeddings, 512)`, special tokens
//! included, longest-first, from the right); no padding in the tokenizer: texts
//! are sorted by token count and each batch is padded to its longest member
//! with the tokenizer's pad id, then the results are put back in input order.
//! Note: sentence-transformers truncates this model at 256 tokens
//! (`sentence_bert_config.json`); texts longer than that (long user prompts)
//! therefore differ from a sentence-transformers run unless `max_tokens: 256`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor, D};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::fsutil::progress_bar;

/// The three files a model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Checks that a model directory has every needed file; the error names the
/// missing path and what a model directory must contain.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist; point `model` at a Hugging Face BERT-family \
             model directory with {} (e.g. sentence-transformers/all-MiniLM-L6-v2)",
            dir.display(),
            MODEL_FILES.join(", ")
        );
    }
    for f in MODEL_FILES {
        let p = dir.join(f);
        if !p.is_file() {
            bail!(
                "{} is missing: a sentence-encoder model directory needs {} (download the full \
                 Hugging Face model, e.g. sentence-transformers/all-MiniLM-L6-v2)",
                p.display(),
                MODEL_FILES.join(", ")
            );
        }
    }
    Ok(())
}

/// The hidden size of the BERT model in `dir` (`hidden_size` of its
/// `config.json`), when it can be read.
pub fn model_width(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("hidden_size")?.as_u64().map(|w| w as usize)
}

/// A loaded sentence encoder.
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    max_tokens: usize,
    max_batch_tokens: usize,
    pad_id: u32,
    dir: PathBuf,
}

/// Default cap on padded tokens per batch (see [`SentenceEncoder::with_max_batch_tokens`]).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 1024;

impl SentenceEncoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from
    /// `model_dir`. `max_tokens: None` uses `min(max_position_embeddings, 512)`.
    pub fn load(model_dir: &Path, device: &Device, max_tokens: Option<usize>) -> Result<Self> {
        check_model_dir(model_dir)?;
        let config_path = model_dir.join("config.json");
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: BertConfig = serde_json::from_str(&config_text).with_context(|| {
            format!(
                "{} is not a BERT config (needs hidden_size, num_hidden_layers, \
                 max_position_embeddings, ...); only BERT-family encoders are supported",
                config_path.display()
            )
        })?;
        let limit = config.max_position_embeddings.min(512);
        let max_tokens = match max_tokens {
            None => limit,
            Some(m) if m < 3 => {
                return Err(crate::invalid::invalid_config(format!(
                    "config key `embed.max_tokens`: {m} is below 3 ([CLS] text [SEP])"
                )))
            }
            Some(m) if m > config.max_position_embeddings => {
                return Err(crate::invalid::invalid_config(format!(
                    "config key `embed.max_tokens`: {m} exceeds the model's \
                     max_position_embeddings = {} ({}); lower `embed.max_tokens`",
                    config.max_position_embeddings,
                    config_path.display()
                )))
            }
            Some(m) => m,
        };

        let tok_path = model_dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot load the tokenizer ({e}); it must be a Hugging Face `tokenizers` \
                 JSON file",
                tok_path.display()
            )
        })?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .unwrap_or(config.pad_token_id as u32);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| anyhow::anyhow!("{}: setting truncation: {e}", tok_path.display()))?;
        // Padding is done per length-sorted batch below.
        tokenizer.with_padding(None);

        let weights_path = model_dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path)
            .with_context(|| format!("reading {}", weights_path.display()))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device).with_context(
            || {
                format!(
                    "{} is not a valid safetensors file (truncated or corrupt?); download it again",
                    weights_path.display()
                )
            },
        )?;
        let model = BertModel::load(vb, &config).with_context(|| {
            format!(
                "{}: the weights do not match a BERT model with this config.json",
                weights_path.display()
            )
        })?;
        Ok(SentenceEncoder {
            model,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
            max_tokens,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            pad_id,
            dir: model_dir.to_path_buf(),
        })
    }

    /// Caps a batch at `n` padded tokens (texts x longest length; at least one
    /// text per batch). Long texts then run in smaller batches, which keeps the
    /// activations small: large fresh allocations cost page faults (the
    /// attention scores alone are `batch x heads x len^2` floats).
    pub fn with_max_batch_tokens(mut self, n: usize) -> Self {
        self.max_batch_tokens = n.max(1);
        self
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Truncation length in tokens (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The WordPiece tokens of one text, special tokens included.
    pub fn tokens(&self, text: &str) -> Result<Vec<String>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing `{text}`: {e}"))?;
        Ok(enc.get_tokens().to_vec())
    }

    /// Token ids of every text (truncated, not padded).
    pub fn token_ids(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(2048) {
            let encs = self
                .tokenizer
                .encode_batch(chunk.iter().map(|s| s.as_str()).collect::<Vec<_>>(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            out.extend(encs.into_iter().map(|e| e.get_ids().to_vec()));
        }
        Ok(out)
    }

    /// Embeds texts: an `(n, dim)` f32 tensor on the CPU, rows in input order,
    /// each row L2-normalised. `label` names the progress bar.
    pub fn encode(&self, texts: &[String], batch_size: usize, label: &str) -> Result<Tensor> {
        if batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        let n = texts.len();
        if n == 0 {
            return Ok(Tensor::zeros((0, self.dim), DType::F32, &Device::Cpu)?);
        }
        let t0 = Instant::now();
        let ids = self.token_ids(texts)?;
        let mut order: Vec<usize> = (0..n).collect();
        // Longest first: the largest batch runs first (fails fast on memory).
        order.sort_by(|&a, &b| ids[b].len().cmp(&ids[a].len()).then(a.cmp(&b)));
        let mut out = vec![0f32; n * self.dim];
        let bar = progress_bar(n as u64, label);
        let mut start = 0;
        while start < n {
            // Sorted longest first: the first text sets the padded length.
            let longest = ids[order[start]].len().max(1);
            let fit = (self.max_batch_tokens / longest).max(1);
            let end = (start + batch_size.min(fit)).min(n);
            let batch = &order[start..end];
            start = end;
            let emb = self.embed_batch(batch.iter().map(|&i| ids[i].as_slice()))?;
            for (row, &i) in batch.iter().enumerate() {
                out[i * self.dim..(i + 1) * self.dim]
                    .copy_from_slice(&emb[row * self.dim..(row + 1) * self.dim]);
            }
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            texts = n,
            seconds = secs,
            per_second = n as f64 / secs.max(1e-9),
            "encoded {label}"
        );
        Ok(Tensor::from_vec(out, (n, self.dim), &Device::Cpu)?)
    }

    /// One padded batch -> flat `(b * dim)` normalised mean-pooled embeddings.
    fn embed_batch<'a>(&self, batch: impl Iterator<Item = &'a [u32]>) -> Result<Vec<f32>> {
        let seqs: Vec<&[u32]> = batch.collect();
        let b = seqs.len();
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut input = vec![self.pad_id; b * len];
        let mut mask = vec![0u32; b * len];
        for (r, s) in seqs.iter().enumerate() {
            input[r * len..r * len + s.len()].copy_from_slice(s);
            for m in &mut mask[r * len..r * len + s.len()] {
                *m = 1;
            }
        }
        let input = Tensor::from_vec(input, (b, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, len), &self.device)?;
        let type_ids = input.zeros_like()?;
        let hidden = self.model.forward(&input, &type_ids, Some(&mask))?; // (b, len, dim)
        let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, len, 1)
        let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (b, dim)
        let counts = maskf.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (b, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        let normed = mean.broadcast_div(&norm)?;
        Ok(normed
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}
