//! Sweeps: many runs from one YAML file ([`file`]), planned as points times
//! seeds ([`plan`]), trained by groups of ranks that take runs from a shared
//! queue in the sweep directory ([`queue`]), resumable.
//!
//! The sweep directory is `<output_dir>/<name>` (`output_dir` of the base
//! config after the sweep's and the command line's `set`): `sweep.json` (the
//! plan), `queue.lock`, and `runs/<run>/`, one run directory each. With
//! `--ranks-per-run k`, the N ranks of the job split into N / k groups
//! (an MPI communicator split); each group trains one run data-parallel, then
//! takes the next one still to do, so that runs of unequal length balance.
//! Rerunning the sweep finishes what is left: finished runs are kept (unless
//! their config changed, which stops the sweep), interrupted ones resume
//! from their checkpoint, failed ones are skipped unless `--retry-failed`.

pub mod file;
pub mod plan;
pub mod queue;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use llm_esr_comm::Communicator;
use serde_json::json;
use tracing::{info, warn};

use crate::config::{config_error, Config};
use crate::run_dir::{self, RunDir};
use crate::train::{self, TrainOptions};
pub use file::SweepFile;
pub use plan::Planned;
use queue::Queue;

/// The plan, in the sweep directory.
pub const PLAN_FILE: &str = "sweep.json";

/// The report's directory in the sweep directory.
pub const REPORT_DIR: &str = "report";

#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Ranks that train one run together (must divide the job's ranks).
    pub ranks_per_run: usize,
    /// Print the plan and stop.
    pub dry_run: bool,
    /// Train again, from scratch, finished runs whose config changed (their
    /// old directory is kept beside, renamed).
    pub rerun_changed: bool,
    /// Take failed runs again.
    pub retry_failed: bool,
}

impl Default for SweepOptions {
    fn default() -> Self {
        SweepOptions {
            ranks_per_run: 1,
            dry_run: false,
            rerun_changed: false,
            retry_failed: false,
        }
    }
}

/// A sweep, loaded, planned and resolved: every run's config checked.
pub struct Resolved {
    pub file: SweepFile,
    pub dir: PathBuf,
    pub planned: Vec<Planned>,
    pub configs: Vec<Config>,
    pub baseline: Option<String>,
}

impl Resolved {
    /// Loads `path` and resolves every run's config with `extra` overrides
    /// (a typo in run 7 fails before run 1 starts).
    pub fn load(path: &Path, extra: &[String]) -> Result<Resolved> {
        let (file, base) = SweepFile::load(path)?;
        let planned = file.plan()?;
        let baseline = file.baseline_group(&planned)?;
        let mut common: Vec<String> = file
            .set
            .iter()
            .map(|(k, v)| plan::override_of(k, v))
            .collect();
        common.extend(extra.iter().cloned());
        let base_cfg = Config::load(&base, &common)
            .with_context(|| format!("sweep {}: its base config", path.display()))?;
        let dir = PathBuf::from(crate::config::expand_env(
            "output_dir",
            &base_cfg.output_dir,
        )?)
        .join(&file.name);
        let runs_dir = dir.join("runs");
        let mut configs = Vec::with_capacity(planned.len());
        for p in &planned {
            let mut overrides = p.overrides.clone();
            overrides.extend(extra.iter().cloned());
            overrides.push(format!("output_dir={}", runs_dir.display()));
            overrides.push(format!("name={}", p.name));
            let cfg = Config::load(&base, &overrides)
                .with_context(|| format!("sweep {}: run `{}`", path.display(), p.name))?;
            configs.push(cfg);
        }
        Ok(Resolved {
            file,
            dir,
            planned,
            configs,
            baseline,
        })
    }

    /// One line per run: name, run directory, overrides.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "sweep `{}`: {} runs in {}{}\n",
            self.file.name,
            self.planned.len(),
            self.dir.display(),
            self.baseline
                .as_ref()
                .map_or(String::new(), |b| format!(", baseline {b}"))
        );
        for (p, cfg) in self.planned.iter().zip(&self.configs) {
            let dir = cfg
                .run_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            out.push_str(&format!("{}\t{}\t{}\n", p.name, dir, p.overrides.join(" ")));
        }
        out
    }

    /// `sweep.json`: the plan, for reports.
    fn plan_json(&self, sweep_file: &Path) -> serde_json::Value {
        let runs: Vec<serde_json::Value> = self
            .planned
            .iter()
            .map(|p| {
                json!({"name": p.name, "group": p.group, "seed": p.seed, "params": p.params,
                       "overrides": p.overrides, "dir": format!("runs/{}", p.name)})
            })
            .collect();
        json!({"name": self.file.name, "sweep_file": sweep_file.display().to_string(),
               "baseline": self.baseline, "seeds": self.file.seeds, "runs": runs})
    }

    /// Finished runs whose saved config differs from the planned one, each
    /// with its changed keys.
    fn changed_runs(&self, queue: &Queue) -> Result<Vec<(usize, Vec<String>)>> {
        let mut changed = Vec::new();
        for (i, (p, cfg)) in self.planned.iter().zip(&self.configs).enumerate() {
            if !queue.is_done(&p.name) {
                continue;
            }
            let dir = queue.run_dir(&p.name);
            let saved = std::fs::read_to_string(dir.join(run_dir::CONFIG_HASH)).ok();
            if saved.as_deref().map(str::trim) == Some(run_dir::config_hash(cfg)?.as_str()) {
                continue;
            }
            let saved_cfg: Config = serde_yaml::from_str(
                &std::fs::read_to_string(dir.join(train::RESOLVED)).with_context(|| {
                    format!("finished run {} has no {}", dir.display(), train::RESOLVED)
                })?,
            )?;
            let diffs = run_dir::differences(&saved_cfg, cfg)?;
            if !diffs.is_empty() {
                changed.push((i, diffs));
            }
        }
        Ok(changed)
    }
}

/// Runs the sweep at `path` on `comm` and writes its report; returns the
/// summary table on rank 0 (`None` elsewhere, on a dry run, or when no run
/// finished).
pub fn run(
    path: &Path,
    extra: &[String],
    opts: &SweepOptions,
    comm: &dyn Communicator,
) -> Result<Option<String>> {
    let sweep = Resolved::load(path, extra)?;
    if opts.dry_run {
        if comm.rank() == 0 {
            print!("{}", sweep.describe());
        }
        return Ok(None);
    }
    let k = opts.ranks_per_run;
    if k == 0 || !comm.size().is_multiple_of(k) {
        return Err(config_error(format!(
            "--ranks-per-run {k} does not divide the job's {} ranks: start a multiple of {k} \
             ranks, or choose a divisor",
            comm.size()
        )));
    }
    let queue = Queue::new(&sweep.dir)?;
    let changed = sweep.changed_runs(&queue)?;
    if !changed.is_empty() && !opts.rerun_changed {
        let list: Vec<String> = changed
            .iter()
            .map(|(i, d)| format!("{} ({})", sweep.planned[*i].name, d.join("; ")))
            .collect();
        return Err(config_error(format!(
            "sweep {}: finished runs whose config changed: {}. Nothing was trained; restore \
             the sweep file, or pass --rerun-changed to train them again (their old \
             directories are kept, renamed)",
            path.display(),
            list.join(", ")
        )));
    }
    comm.barrier()?;
    if comm.rank() == 0 {
        for (i, _) in &changed {
            set_aside(&queue.run_dir(&sweep.planned[*i].name))?;
        }
        crate::files::write_json(&sweep.dir.join(PLAN_FILE), &sweep.plan_json(path))?;
    }
    // The inputs of every run still to do, before any is trained.
    let todo: Vec<Config> = sweep
        .planned
        .iter()
        .zip(&sweep.configs)
        .filter(|(p, _)| !queue.is_done(&p.name))
        .map(|(_, c)| c.clone())
        .collect();
    crate::preflight::check_all(&todo)?;
    comm.barrier()?;
    let group = comm.split((comm.rank() / k) as u32, comm.rank() as u32)?;
    train_queue(&sweep, &queue, opts, group.as_ref(), comm.size() / k)?;
    comm.barrier()?;
    if comm.rank() != 0 {
        return Ok(None);
    }
    write_report(&sweep, &queue)
}

/// This group's share of the sweep: claim, train, repeat.
fn train_queue(
    sweep: &Resolved,
    queue: &Queue,
    opts: &SweepOptions,
    group: &dyn Communicator,
    groups: usize,
) -> Result<()> {
    let leader = group.rank() == 0;
    let started = Instant::now();
    let mut trained = 0usize;
    loop {
        // The leader claims; the group follows it.
        let mut claim: Option<RunDir> = None;
        let mut choice = Vec::new();
        if leader {
            if let Some((i, run_dir)) = queue.claim(&sweep.planned, opts.retry_failed)? {
                choice = (i as u64).to_le_bytes().to_vec();
                claim = Some(run_dir);
            }
        }
        group.broadcast_bytes(&mut choice, 0)?;
        let Ok(bytes) = <[u8; 8]>::try_from(choice.as_slice()) else {
            return Ok(());
        };
        let i = u64::from_le_bytes(bytes) as usize;
        let (p, cfg) = (&sweep.planned[i], &sweep.configs[i]);
        if leader {
            let t = queue.tally(&sweep.planned);
            info!(
                run = %p.name,
                "sweep {}: {} done, {} failed, {} left{}",
                sweep.file.name,
                t.done,
                t.failed,
                t.left,
                eta(started, trained, t.left, groups)
            );
        }
        let run_dir = match claim {
            Some(d) => d,
            None => RunDir::lock(&queue.run_dir(&p.name), false)?,
        };
        match train_one(cfg, run_dir, group) {
            Ok(()) => trained += 1,
            Err(e) => {
                warn!(run = %p.name, "run failed, the sweep goes on: {e:#}");
                if leader {
                    queue.record_failure(&p.name, &format!("{e:#}"))?;
                }
            }
        }
    }
}

fn train_one(cfg: &Config, run_dir: RunDir, group: &dyn Communicator) -> Result<()> {
    let resume = run_dir.file(train::CHECKPOINT).exists();
    let ds = train::checked_dataset(cfg)?;
    let opts = TrainOptions {
        resume,
        force_config: false,
    };
    train::train_in(cfg, &opts, group, run_dir, ds)?;
    Ok(())
}

/// ", about N min left" once a run has finished here.
fn eta(started: Instant, trained: usize, left: usize, groups: usize) -> String {
    if trained == 0 {
        return String::new();
    }
    let per_run = started.elapsed().as_secs_f64() / trained as f64;
    let minutes = per_run * left as f64 / groups.max(1) as f64 / 60.0;
    format!(", about {minutes:.0} min left")
}

/// Renames a finished run's directory `d` to `d.replaced-<unix seconds>`.
fn set_aside(dir: &Path) -> Result<()> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let to = PathBuf::from(format!("{}.replaced-{secs}", dir.display()));
    std::fs::rename(dir, &to)
        .with_context(|| format!("cannot move {} to {}", dir.display(), to.display()))?;
    info!("kept the changed run's old directory as {}", to.display());
    Ok(())
}

/// The sweep's report in `<sweep dir>/report/` (summary.md, .csv, .tex and
/// plots/), after naming the failed runs; returns the summary in Markdown,
/// `None` when no run has finished.
fn write_report(sweep: &Resolved, queue: &Queue) -> Result<Option<String>> {
    for p in &sweep.planned {
        if queue.has_failed(&p.name) {
            warn!(run = %p.name, "failed: see {}", queue.run_dir(&p.name).join(queue::FAILED).display());
        }
    }
    let collection = crate::report::Collection::load(std::slice::from_ref(&sweep.dir), None)?;
    if collection.variants.is_empty() {
        warn!("sweep {}: no finished run to report", sweep.file.name);
        return Ok(None);
    }
    let dir = sweep.dir.join(REPORT_DIR);
    let (summary, _) = crate::report::write(&collection, &crate::report::Outputs::all_in(&dir))
        .with_context(|| {
            format!(
                "the sweep's runs are kept, but its report could not be written to {}; fix the \
                 cause and run `llm-esr-orch report {}`",
                dir.display(),
                sweep.dir.display()
            )
        })?;
    info!("sweep report: {}", dir.display());
    Ok(Some(summary.markdown()))
}
