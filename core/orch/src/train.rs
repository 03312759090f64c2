//! One training run: its directory, the epochs of the generic [`Trainer`]
//! with early stopping on the validation metric, checkpoints, the final test
//! and `results.json`.
//!
//! Every rank starts from rank 0's parameters, takes its shard of each global
//! batch, and the loss is normalised by the global number of targets, so summed
//! gradients equal those of one process on the whole batch. Rank 0 alone
//! writes files and shows progress.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llm_esr_comm::Communicator;
use llm_esr_runtime::candle::{Device, Var};
use serde_json::json;
use tracing::{info, warn};

use crate::checkpoint::{self, TrainState};
use crate::config::{config_error, Config};
use crate::data::{training_samples, Dataset, Sample, Split};
use crate::eval::{self, Group, Grouping, Metric, Metrics, TargetRank};
use crate::files::{append_line, write_atomic, write_json};
use crate::model::Recommender;
use crate::optim::Adam;
use crate::parallel::DataParallel;
use crate::run_dir::RunDir;
pub use crate::run_dir::{BEST, CHECKPOINT, CONFIG_HASH, METRICS, RESOLVED, RESULTS};
use crate::step::OnDataset;
use crate::tracking::Tracker;
use crate::trainer::{EpochStats, StepOutcome, TrainSettings, Trainer};
use crate::user_ranks::UserRanks;

pub struct TrainOptions {
    pub resume: bool,
    /// Resume even though the config differs from the saved one.
    pub force_config: bool,
}

/// Where training starts: fresh, or from a checkpoint.
pub(crate) struct Start {
    pub(crate) adam: Adam,
    state: TrainState,
}

/// Everything one run holds.
pub(crate) struct Run<'a> {
    cfg: &'a Config,
    dp: DataParallel<'a>,
    trainer: Trainer<'a>,
    pub(crate) ds: Dataset,
    pub(crate) model: Recommender,
    vars: Vec<(String, Var)>,
    device: Device,
    /// Evaluation groups of the validation and the test split.
    groupings: [Grouping; 2],
    /// `eval.metric`: early stopping and the best epoch.
    early_stop: Metric,
    long_tail: serde_json::Value,
    run_dir: PathBuf,
}

pub fn train(
    cfg: &Config,
    opts: &TrainOptions,
    comm: &dyn Communicator,
) -> Result<serde_json::Value> {
    // Every check comes before the first write: a refused command leaves the
    // run directory as it was.
    let ds = checked_dataset(cfg)?;
    let run_dir = RunDir::lock(&cfg.run_dir()?, comm.rank() == 0)?;
    train_in(cfg, opts, comm, run_dir, ds)
}

/// The inputs of `cfg` checked before a run directory is touched: the
/// prepared dataset, the artifacts, and the config against both and against
/// memory. Returns the loaded dataset.
pub fn checked_dataset(cfg: &Config) -> Result<Dataset> {
    crate::data::check_prepared(&cfg.data_dir()?)?;
    crate::assemble::check_artifacts_dir(cfg)?;
    crate::preflight::check(cfg)
}

/// [`train`] in a run directory already locked by the caller (a sweep's
/// queue), with the dataset checked by [`crate::preflight::check`].
pub fn train_in(
    cfg: &Config,
    opts: &TrainOptions,
    comm: &dyn Communicator,
    mut run_dir: RunDir,
    ds: Dataset,
) -> Result<serde_json::Value> {
    let rank0 = comm.rank() == 0;
    run_dir.check_start(opts.resume)?;
    let changes = if opts.resume {
        run_dir.check_resume_config(cfg, opts.force_config)?
    } else {
        vec![]
    };
    let run = Run::new(cfg, comm, ds)?;
    let start = run.start(opts.resume.then(|| run_dir.file(CHECKPOINT)).as_deref())?;
    comm.barrier()?;
    if rank0 {
        run_dir.begin_writing();
        if opts.resume {
            run_dir.trim_metrics(start.state.epoch)?;
        } else {
            run_dir.clear_dead_run()?;
        }
        run_dir.write_holder()?;
        if !changes.is_empty() {
            warn!("resuming with changed settings: {}", changes.join("; "));
        }
        if !opts.resume || !changes.is_empty() {
            write_atomic(&run_dir.file(RESOLVED), cfg.to_yaml()?.as_bytes())?;
            let hash = crate::run_dir::config_hash(cfg)?;
            write_atomic(&run_dir.file(CONFIG_HASH), format!("{hash}\n").as_bytes())?;
        }
    }
    comm.barrier()?;
    run.fit(start)
}

impl<'a> Run<'a> {
    /// Loads the long-tail groups, artifacts and model of `cfg` for the
    /// dataset `ds` (loaded and checked by [`crate::preflight::check`]).
    pub(crate) fn new(cfg: &'a Config, comm: &'a dyn Communicator, ds: Dataset) -> Result<Run<'a>> {
        let device = llm_esr_prep::device::parse_device(
            &cfg.train.device,
            comm.local_rank(),
            "train.device",
        )?;
        info!(
            users = ds.num_users,
            items = ds.num_items,
            interactions = ds.num_interactions(),
            dir = %ds.dir.display(),
            "dataset"
        );
        let lt = crate::assemble::long_tail_groups(cfg, &ds)?;
        let artifacts = crate::assemble::artifacts(cfg, &ds, &device)?;
        let model = crate::assemble::build(cfg, &ds, artifacts.as_ref(), &device)?;
        drop(artifacts);
        let vars = model.vars();
        let dp = DataParallel::new(comm);
        info!(
            model = %model.describe(),
            parameters = model.store.num_scalars(),
            ranks = comm.size(),
            backend = comm.backend(),
            "model"
        );
        Ok(Run {
            cfg,
            dp,
            trainer: Trainer::new(dp, vars.clone(), TrainSettings::from_config(cfg)),
            early_stop: cfg
                .eval
                .metric
                .parse()
                .map_err(|e| config_error(format!("config key `eval.metric`: {e}")))?,
            groupings: [Split::Valid, Split::Test]
                .map(|split| crate::assemble::grouping(cfg, &ds, &lt, split)),
            long_tail: {
                let mut v = serde_json::to_value(&lt.summary)?;
                v["test_users_by"] = serde_json::to_value(cfg.data.long_tail.test_users_by)?;
                v
            },
            ds,
            model,
            vars,
            device,
            run_dir: cfg.run_dir()?,
        })
    }
}

impl Run<'_> {
    /// Fresh optimizer and state, or both (and the parameters) from the
    /// checkpoint at `resume`. Writes nothing.
    pub(crate) fn start(&self, resume: Option<&Path>) -> Result<Start> {
        let cfg = self.cfg;
        let mut adam = Adam::new(
            self.trainer.vars(),
            cfg.train.lr,
            cfg.train.adam_betas,
            cfg.train.adam_eps,
            cfg.train.weight_decay,
        )?;
        let mut state = TrainState {
            epoch: 0,
            step: 0,
            best_metric: f64::NEG_INFINITY,
            best_epoch: 0,
            bad_epochs: 0,
            layout: checkpoint::layout(&self.vars),
            world_size: self.dp.comm().size(),
            skipped_steps: 0,
        };
        if let Some(ckpt) = resume {
            let (m, v, s) = checkpoint::load(ckpt, &self.vars)?;
            adam.set_moments(&m, &v)?;
            adam.step = s.step;
            state = s;
            info!(
                epoch = state.epoch,
                best_epoch = state.best_epoch,
                "resumed from {}",
                ckpt.display()
            );
        }
        Ok(Start { adam, state })
    }

    fn fit(&self, start: Start) -> Result<serde_json::Value> {
        let cfg = self.cfg;
        let rank0 = self.dp.is_root();
        let Start {
            mut adam,
            mut state,
        } = start;
        let ckpt = self.run_dir.join(CHECKPOINT);
        // Identical parameters everywhere: rank 0's.
        self.dp.broadcast_parameters(self.trainer.vars())?;

        let samples = training_samples(&self.ds, self.model.objective())?;
        let mut tracker = if rank0 { Tracker::open(cfg)? } else { None };
        let started = Instant::now();
        while state.epoch < cfg.train.epochs {
            let epoch = state.epoch;
            let t0 = Instant::now();
            let EpochStats { loss, skipped } = self.trainer.epoch(
                &self.on_dataset(),
                &samples,
                epoch,
                &mut adam,
                &mut state.step,
            )?;
            state.skipped_steps += skipped;
            let train_seconds = t0.elapsed().as_secs_f64();
            self.dp.check_replicas(self.trainer.vars())?;
            let valid = self.evaluate(Split::Valid)?;
            let metric = valid
                .get(Group::Overall, self.early_stop)
                .context("the validation metric was not computed")?;
            state.epoch += 1;
            if metric > state.best_metric {
                state.best_metric = metric;
                state.best_epoch = state.epoch;
                state.bad_epochs = 0;
                if rank0 {
                    checkpoint::save_params(&self.run_dir.join(BEST), &self.vars)?;
                }
            } else {
                state.bad_epochs += 1;
            }
            info!(
                epoch = state.epoch,
                loss = format!("{loss:.4}"),
                metric = %cfg.eval.metric,
                valid = format!("{metric:.4}"),
                best_epoch = state.best_epoch,
                seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
                "epoch"
            );
            if rank0 {
                let line = json!({
                    "epoch": state.epoch,
                    "loss": loss,
                    "skipped_steps": skipped,
                    "valid": valid,
                    "seconds": t0.elapsed().as_secs_f64(),
                    "train_seconds": train_seconds,
                });
                append_line(&self.run_dir.join(METRICS), &line.to_string())?;
                if let Some(t) = tracker.as_mut() {
                    t.epoch(state.epoch, loss, &valid)?;
                }
                if cfg.train.checkpoint {
                    let (m, v) = adam.moments()?;
                    checkpoint::save(&ckpt, &self.vars, &m, &v, &state)?;
                }
            }
            self.dp.barrier()?;
            if cfg.train.patience > 0 && state.bad_epochs >= cfg.train.patience {
                info!(
                    epoch = state.epoch,
                    "early stop: no improvement for {} epochs", cfg.train.patience
                );
                break;
            }
            if cfg.train.max_steps > 0 && state.step >= cfg.train.max_steps as u64 {
                info!(step = state.step, "stopping at train.max_steps");
                break;
            }
        }
        self.finish(&state, started.elapsed().as_secs_f64(), tracker)
    }

    /// The model on its dataset, as the trainer sees it.
    fn on_dataset(&self) -> OnDataset<'_> {
        OnDataset {
            model: &self.model,
            ds: &self.ds,
        }
    }

    /// One training step of this rank's `shard` (for `bench`).
    pub(crate) fn train_step(
        &self,
        shard: &[Sample],
        epoch: usize,
        step: u64,
        adam: &mut Adam,
    ) -> Result<StepOutcome> {
        self.trainer
            .step(&self.on_dataset(), shard, epoch, step, adam)
    }

    fn evaluate(&self, split: Split) -> Result<Metrics> {
        Ok(self.evaluate_ranks(split)?.0)
    }

    /// The metrics of `split` and this rank's shard of target ranks.
    fn evaluate_ranks(&self, split: Split) -> Result<(Metrics, Vec<TargetRank>)> {
        let cfg = self.cfg;
        let users = self.dp.shard(&self.ds.eval_users());
        let ranks = eval::rank_targets(&self.model, &self.ds, split, cfg, &users, &self.device)?;
        let grouping = self.grouping(split);
        let metrics = eval::aggregate(&ranks, &cfg.eval.ks, grouping, self.dp.comm())?;
        Ok((metrics, ranks))
    }

    fn grouping(&self, split: Split) -> &Grouping {
        &self.groupings[(split == Split::Test) as usize]
    }

    fn finish(
        &self,
        state: &TrainState,
        seconds: f64,
        tracker: Option<Tracker>,
    ) -> Result<serde_json::Value> {
        let best = self.run_dir.join(BEST);
        if !best.exists() {
            // Never score untrained parameters as a result.
            bail!(
                "{} is missing: no epoch finished, so there is nothing to test (no results.json \
                 was written)",
                best.display()
            );
        }
        checkpoint::load_params(&best, &self.vars)?;
        let valid = self.evaluate(Split::Valid)?;
        let (test, ranks) = self.evaluate_ranks(Split::Test)?;
        let per_user = UserRanks::gather(
            &ranks,
            self.ds.num_users,
            self.grouping(Split::Test),
            self.dp.comm(),
        )?;
        let results = json!({
            "name": self.cfg.name,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "skipped_steps": state.skipped_steps,
            "valid": valid,
            "test": test,
            "eval_mode": self.cfg.eval.mode,
            "world_size": self.dp.comm().size(),
            "seconds": seconds,
            "peak_rss_mib": crate::bench::peak_rss_mib(),
            "long_tail": self.long_tail,
        });
        if self.dp.is_root() {
            // Before results.json, which marks the run finished.
            per_user.save(&self.run_dir.join(crate::user_ranks::FILE))?;
            if let Some(mut t) = tracker {
                t.test(state.epoch, &test)?;
            }
            write_json(&self.run_dir.join(RESULTS), &results)?;
            info!(
                "results written to {}",
                self.run_dir.join(RESULTS).display()
            );
            eprintln!("{}", crate::report::table(&self.cfg.name, &results));
        }
        Ok(results)
    }
}
