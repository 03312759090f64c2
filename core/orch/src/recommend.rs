//! `recommend`: top-K items for users of a finished run, from its saved
//! configuration, best parameters and the cached semantic artifacts only.

use std::path::Path;

use anyhow::{bail, Context, Result};
use llm_esr_runtime::candle::{Device, Tensor};
use llm_esr_runtime::{ForwardCtx, Rng};
use serde_json::json;

use crate::config::Config;
use crate::data::{Dataset, Padded};
use crate::model::last_position;
use crate::{assemble, checkpoint, train};

pub fn recommend(run_dir: &Path, users: &[u32], k: usize) -> Result<serde_json::Value> {
    let cfg_path = run_dir.join(train::RESOLVED);
    if !cfg_path.exists() {
        bail!(
            "{} not found: {} is not a run directory written by `train`",
            cfg_path.display(),
            run_dir.display()
        );
    }
    let cfg = Config::load(&cfg_path, &[])?;
    let best = run_dir.join(train::BEST);
    if !best.exists() {
        bail!(
            "{} not found: the run has not finished an epoch",
            best.display()
        );
    }
    let device = Device::Cpu;
    let ds = Dataset::load(&cfg.data_dir()?)?;
    let users = users
        .iter()
        .map(|&id| ds.user_by_id(id))
        .collect::<Result<Vec<_>>>()?;
    let artifacts = assemble::artifacts(&cfg, &ds, &device)?;
    let model = assemble::build(&cfg, &ds, artifacts.as_ref(), &device)?;
    checkpoint::load_params(&best, &model.vars()).context("loading the best parameters")?;

    let tables = model.tables()?;
    // The objective's input (cloze models append the mask token).
    let inputs: Vec<Vec<u32>> = users
        .iter()
        .map(|&u| model.inference_input(ds.sequence(u)))
        .collect::<Result<_>>()?;
    let inputs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let padded = Padded::new(&inputs, cfg.data.max_len, cfg.data.pad_to_max_len);
    let ids = Tensor::from_vec(padded.ids, (padded.b, padded.l), &device)?;
    let mask = Tensor::from_vec(padded.mask, (padded.b, padded.l), &device)?;
    let mut rng = Rng::new(0);
    let mut ctx = ForwardCtx::new(false, &mut rng);
    let user_vecs = last_position(&model.encode(&tables, &ids, &mask, &mut ctx)?)?;
    let scores: Vec<Vec<f32>> = model.score_all(&tables, &user_vecs)?.to_vec2()?;
    let mut out = Vec::new();
    for (&u, s) in users.iter().zip(scores) {
        let mut items: Vec<(u32, f32)> = (1..s.len() as u32)
            .filter(|&i| !ds.has_item(u, i))
            .map(|i| (i, s[i as usize]))
            .collect();
        items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        items.truncate(k);
        let items: Vec<_> = items
            .into_iter()
            .map(|(i, s)| json!({"item": i, "score": s}))
            .collect();
        out.push(json!({"user": u.id(), "items": items}));
    }
    Ok(json!({"run": run_dir.display().to_string(), "k": k, "recommendations": out}))
}
