//! Checks of a config against its dataset before any work: the ranges that
//! depend on the data ([`Config::validate_for`]) and whether the largest
//! allocations of the run can fit in the memory available now.
//!
//! The memory estimate counts only the large tables that the input sizes
//! drive (item tables with their gradients and Adam state, the backbone's
//! weights, the activations of one training batch, the scores of one
//! evaluation batch) with modest factors, so it is a lower estimate: a run it
//! refuses cannot fit; a run it accepts may still need more.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use llm_esr_prep::memory::{available_bytes, human};

use llm_esr_runtime::PluginKind;

use crate::config::{config_error, is_config_error, Config, EvalMode, Variant};
use crate::data::Dataset;
use crate::plugin_host;

/// Loads the dataset of `cfg` and checks the config against it; returns the
/// dataset for the run, so that it is read once.
pub fn check(cfg: &Config) -> Result<Dataset> {
    let ds = Dataset::load(&cfg.data_dir()?)?;
    check_with(cfg, &ds)?;
    Ok(ds)
}

/// [`check`] of many configs (a sweep), loading each dataset once.
pub fn check_all(cfgs: &[Config]) -> Result<()> {
    let mut loaded: HashMap<PathBuf, Dataset> = HashMap::new();
    for cfg in cfgs {
        let dir = cfg.data_dir()?;
        if !loaded.contains_key(&dir) {
            loaded.insert(dir.clone(), Dataset::load(&dir)?);
        }
        check_with(cfg, &loaded[&dir])?;
    }
    Ok(())
}

/// [`check`] with the dataset already loaded.
pub fn check_with(cfg: &Config, ds: &Dataset) -> Result<()> {
    cfg.validate_for(ds)?;
    if cfg.model.variant != Variant::Plain {
        // The artifacts are loaded later; a missing manifest fails now.
        let dir = cfg.artifacts_dir()?;
        llm_esr_prep::Manifest::load(&dir).with_context(|| {
            format!(
                "loading semantic artifacts from {} (config key `model.artifacts`)",
                dir.display()
            )
        })?;
    }
    check_plugins_exist(cfg)?;
    let se_dim = semantic_width(cfg);
    let parts = estimate(cfg, ds, se_dim);
    let total: f64 = parts.iter().map(|(_, b)| b).sum();
    if let Some(avail) = available_bytes() {
        if total > avail as f64 {
            let list: Vec<String> = parts
                .iter()
                .map(|(what, b)| format!("{what}: {}", human(*b)))
                .collect();
            bail!(
                "not enough memory: run `{}` needs at least {} ({}) but only {} is available \
                 (MemAvailable); lower `train.batch_size`, `eval.batch_size`, `data.max_len` or \
                 `model.hidden`, or use a machine with more memory",
                cfg.name,
                human(total),
                list.join("; "),
                human(avail as f64)
            );
        }
    }
    Ok(())
}

/// The plugins the config names can be loaded (an unknown name is an error
/// of its key, exit status 2). Their sections are checked when they are built.
fn check_plugins_exist(cfg: &Config) -> Result<()> {
    let m = &cfg.model;
    let llmesr = m.variant == Variant::Llmesr;
    let dirs = crate::assemble::plugin_dirs(cfg)?;
    let wanted = [
        (PluginKind::Backbone, "model.backbone", &m.backbone, true),
        (
            PluginKind::Fusion,
            "model.fusion",
            &m.fusion,
            llmesr && m.co_view && m.se_view,
        ),
        (
            PluginKind::Retrieval,
            "model.retrieval",
            &m.retrieval,
            llmesr && m.distill,
        ),
    ];
    for (kind, key, name, used) in wanted {
        if used {
            plugin_host::load(&dirs, kind, name).map_err(|e| {
                if is_config_error(&e) {
                    config_error(format!("config key `{key}`: {e:#}"))
                } else {
                    e
                }
            })?;
        }
    }
    Ok(())
}

/// Width of `E_se` from the artifact manifest, when the model has a semantic view.
fn semantic_width(cfg: &Config) -> Option<usize> {
    let m = &cfg.model;
    if m.variant != Variant::Llmesr || !m.se_view {
        return None;
    }
    let manifest = llm_esr_prep::Manifest::load(&cfg.artifacts_dir().ok()?).ok()?;
    manifest.stages.get("item_emb").map(|e| e.cols)
}

/// Layers and attention heads of the backbone, for the built-in ones.
fn backbone_shape(cfg: &Config) -> (f64, f64, bool) {
    let enc = &cfg.model.encoder;
    let get = |k: &str, d: u64| enc.get(k).and_then(serde_yaml::Value::as_u64).unwrap_or(d) as f64;
    match cfg.model.backbone.as_str() {
        "sasrec" | "bert4rec" => (get("layers", 2), get("heads", 1), true),
        "gru4rec" => (get("layers", 1), 0.0, false),
        _ => (1.0, 0.0, false),
    }
}

/// The largest allocations of a run, in bytes, with what they are.
pub fn estimate(cfg: &Config, ds: &Dataset, se_dim: Option<usize>) -> Vec<(String, f64)> {
    const F32: f64 = 4.0;
    // A trainable value lives as the parameter, its gradient, the flat
    // all-reduced gradient, and Adam's two moments.
    const TRAINED: f64 = 5.0 * F32;
    let m = &cfg.model;
    let h = m.hidden as f64;
    let l = cfg.data.max_len as f64;
    let b = cfg.train.batch_size as f64;
    let eb = cfg.eval.batch_size as f64;
    let items = ds.num_items as f64;
    let rows = items + 2.0;
    let llmesr = m.variant == Variant::Llmesr;
    let co = !llmesr || m.co_view;
    let se = llmesr && m.se_view;
    let views = if co && se { 2.0 } else { 1.0 };
    let (layers, heads, transformer) = backbone_shape(cfg);
    let mut parts = Vec::new();

    let mut tables = if co { rows * h * TRAINED } else { 0.0 };
    if let (true, Some(d)) = (se, se_dim) {
        let d = d as f64;
        // Frozen E_se (loaded and padded), the adapted table and its gradient.
        tables += rows * d * 2.0 * F32 + rows * (d / 2.0 + h) * 2.0 * F32;
        if co {
            tables += rows * 2.0 * h * 2.0 * F32; // [co : se] item vectors
        }
    }
    parts.push((
        format!(
            "item tables ({} x {} with gradients and Adam state)",
            ds.num_items + 1,
            m.hidden
        ),
        tables,
    ));

    let per_layer = if transformer {
        6.0 * h * h + 9.0 * h
    } else {
        6.0 * h * h + 6.0 * h
    };
    let encoders = if llmesr && co && se && !m.share_encoder {
        2.0
    } else {
        1.0
    };
    let weights = (layers * per_layer + if transformer { l * h } else { 0.0 }) * encoders;
    parts.push(("backbone weights".into(), weights * TRAINED));

    // One training step: per layer a few (b, l, h) tensors kept for the
    // backward pass, and the (b, heads, l, l) attention scores.
    let step = |n: f64| {
        views * (n * l * h * F32 * (layers + 2.0) * 4.0 + n * heads * l * l * F32 * layers * 3.0)
    };
    let mut train = step(b);
    if llmesr && m.distill {
        train += step(256.0_f64.min(b * 10.0)); // a chunk of teachers
    }
    // Evaluation of one batch: encodings and the candidate scores.
    let scores = match cfg.eval.mode {
        EvalMode::Full => eb * (items + 1.0) * F32 * 2.0,
        EvalMode::Sampled => eb * (cfg.eval.negatives as f64 + 1.0) * h * views * F32 * 2.0,
    };
    let eval = step(eb) / 2.0 + scores;
    if train >= eval {
        parts.push((
            format!(
                "a training batch ({} x {} positions)",
                cfg.train.batch_size, cfg.data.max_len
            ),
            train,
        ));
    } else {
        parts.push((
            format!(
                "an evaluation batch ({} users, scores of {})",
                cfg.eval.batch_size,
                match cfg.eval.mode {
                    EvalMode::Full => format!("{} items each", ds.num_items + 1),
                    EvalMode::Sampled => format!("{} candidates each", cfg.eval.negatives + 1),
                }
            ),
            eval,
        ));
    }
    parts
}
