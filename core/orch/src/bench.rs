//! `bench`: median times of the work a run repeats, and the process's peak
//! memory. Writes nothing but an optional prompt file.
//!
//! Three kinds of work (`--what`): a training `step` of a config (forward,
//! backward, all-reduce, update; with the epoch it implies), one `eval` pass
//! over the validation users, and the encoding of the first N user prompts
//! by the sentence encoder (`embed`, the prompts `embed` builds). Each is
//! repeated `warmup` times untimed, then `steps` times timed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use llm_esr_comm::Communicator;
use llm_esr_prep::prompts::{user_prompts, Template};
use llm_esr_prep::{EmbedConfig, SentenceEncoder};
use llm_esr_runtime::candle::Device;
use llm_esr_runtime::Rng;
use serde_json::json;

use crate::config::Config;
use crate::data::{training_samples, Dataset, Split};
use crate::train::Run;

/// What `bench` times.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// One training step (forward, backward, all-reduce, update).
    Step,
    /// One evaluation pass over the validation users.
    Eval,
    /// Encoding the first `--users` user prompts with `embed.model`.
    Embed,
}

/// Repetitions: `warmup` untimed, then `timed`.
#[derive(Clone, Copy, Debug)]
pub struct Reps {
    pub warmup: usize,
    pub timed: usize,
}

/// Calls `work(i)` for `i` in `0..warmup + timed`; returns the timed
/// durations in ms.
fn time_reps(reps: Reps, mut work: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(reps.timed);
    for i in 0..reps.warmup + reps.timed {
        let t0 = Instant::now();
        work(i)?;
        if i >= reps.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `reps` training steps; writes nothing. Returns the step times in
/// ms, their median, and the epoch they imply (steps per epoch x median).
pub fn steps(
    cfg: &Config,
    ds: Dataset,
    comm: &dyn Communicator,
    reps: Reps,
) -> Result<serde_json::Value> {
    let run = Run::new(cfg, comm, ds)?;
    let mut adam = run.start(None)?.adam;
    let mut samples = training_samples(&run.ds, run.model.objective())?;
    let steps_per_epoch = samples.len().div_ceil(cfg.train.batch_size);
    Rng::derive(cfg.seed, 0).shuffle(&mut samples);
    let mut batches = samples.chunks(cfg.train.batch_size).cycle();
    let times = time_reps(reps, |step| {
        let batch = batches.next().context("no training samples")?;
        let shard = crate::parallel::shard(batch, comm);
        // A non-finite step applies nothing; its time still counts.
        run.train_step(&shard, 0, step as u64, &mut adam)?;
        Ok(())
    })?;
    let median = median(&times);
    Ok(json!({
        "what": "step",
        "name": cfg.name,
        "backbone": cfg.model.backbone,
        "variant": cfg.model.variant,
        "batch_size": cfg.train.batch_size,
        "max_len": cfg.data.max_len,
        "ranks": comm.size(),
        "parameters": run.model.store.num_scalars(),
        "median_step_ms": median,
        "step_ms": times,
        "steps_per_epoch": steps_per_epoch,
        "epoch_estimate_s": median * steps_per_epoch as f64 / 1e3,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Times `reps` evaluation passes over this rank's share of the validation
/// users (sampled or full ranking as `eval.mode`); writes nothing.
pub fn eval_passes(
    cfg: &Config,
    ds: Dataset,
    comm: &dyn Communicator,
    reps: Reps,
) -> Result<serde_json::Value> {
    let device =
        llm_esr_prep::device::parse_device(&cfg.train.device, comm.local_rank(), "train.device")?;
    let run = Run::new(cfg, comm, ds)?;
    let users = crate::parallel::shard(&run.ds.eval_users(), comm);
    let times = time_reps(reps, |_| {
        crate::eval::rank_targets(&run.model, &run.ds, Split::Valid, cfg, &users, &device)?;
        Ok(())
    })?;
    Ok(json!({
        "what": "eval",
        "name": cfg.name,
        "variant": cfg.model.variant,
        "max_len": cfg.data.max_len,
        "eval_batch_size": cfg.eval.batch_size,
        "users": users.len(),
        "median_pass_ms": median(&times),
        "pass_ms": times,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// The prompts `embed` encodes for users `1..=n` of the dataset in `dir`.
fn first_user_prompts(embed: &EmbedConfig, dir: &Path, n: usize) -> Result<Vec<String>> {
    let mut data = llm_esr_prep::Dataset::load(dir)?;
    data.sequences.truncate(n);
    let text = data.item_text.as_ref().with_context(|| {
        format!(
            "bench --what embed needs {} (the item titles of the user prompts)",
            dir.join("item_text.tsv").display()
        )
    })?;
    let template = Template::parse(&embed.user_template, "embed.user_template")?;
    user_prompts(
        &template,
        &data.sequences,
        text,
        &embed.user_history_column,
        "embed.user_template",
    )
}

/// Times `reps` encodings of the first `users` user prompts with the
/// encoder of `embed` (its model, `max_tokens`, `max_batch_tokens`,
/// `batch_size`); writes the prompts, one JSON string a line, to
/// `prompts_out` first when given.
pub fn embed_users(
    embed: &EmbedConfig,
    data_dir: &Path,
    users: usize,
    prompts_out: Option<&PathBuf>,
    reps: Reps,
) -> Result<serde_json::Value> {
    let prompts = first_user_prompts(embed, data_dir, users)?;
    if let Some(path) = prompts_out {
        let lines: Vec<String> = prompts
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        llm_esr_prep::fsutil::write_bytes_atomic(path, (lines.join("\n") + "\n").as_bytes())?;
    }
    let enc = SentenceEncoder::load(&embed.model, &Device::Cpu, embed.max_tokens)?
        .with_max_batch_tokens(embed.max_batch_tokens);
    let tokens: usize = enc.token_ids(&prompts)?.iter().map(Vec::len).sum();
    let times = time_reps(reps, |_| {
        enc.encode(&prompts, embed.batch_size, "users")?;
        Ok(())
    })?;
    let median = median(&times);
    Ok(json!({
        "what": "embed",
        "model": embed.model,
        "texts": prompts.len(),
        "mean_tokens": tokens as f64 / prompts.len().max(1) as f64,
        "max_tokens": enc.max_tokens(),
        "max_batch_tokens": embed.max_batch_tokens,
        "median_ms": median,
        "encode_ms": times,
        "texts_per_second": prompts.len() as f64 / (median / 1e3),
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// This process's peak resident memory (Linux `VmHWM`), `None` elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
