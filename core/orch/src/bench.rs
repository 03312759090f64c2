//! `bench`: the median time of a training step of a config (forward,
//! backward, all-reduce, update) and the process's peak memory. Writes
//! nothing.

use std::time::Instant;

use anyhow::Result;
use llm_esr_comm::Communicator;
use llm_esr_runtime::Rng;
use serde_json::json;

use crate::config::Config;
use crate::data::{training_samples, Dataset};
use crate::train::Run;

/// Times `steps` training steps (forward, backward, all-reduce, update) after
/// `warmup` untimed ones; writes nothing. Returns the step times in ms and
/// their median.
pub fn run(
    cfg: &Config,
    ds: Dataset,
    comm: &dyn Communicator,
    warmup: usize,
    steps: usize,
) -> Result<serde_json::Value> {
    let run = Run::new(cfg, comm, ds)?;
    let mut adam = run.start(None)?.adam;
    let mut samples = training_samples(&run.ds, run.model.objective())?;
    Rng::derive(cfg.seed, 0).shuffle(&mut samples);
    let mut times = Vec::with_capacity(steps);
    for (step, batch) in samples
        .chunks(cfg.train.batch_size)
        .cycle()
        .take(warmup + steps)
        .enumerate()
    {
        let shard = crate::parallel::shard(batch, comm);
        let t0 = Instant::now();
        // A non-finite step applies nothing; its time still counts.
        run.train_step(&shard, 0, step as u64, &mut adam)?;
        if step >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(json!({
        "name": cfg.name,
        "backbone": cfg.model.backbone,
        "variant": cfg.model.variant,
        "batch_size": cfg.train.batch_size,
        "max_len": cfg.data.max_len,
        "ranks": comm.size(),
        "parameters": run.model.store.num_scalars(),
        "median_step_ms": median,
        "step_ms": times,
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
