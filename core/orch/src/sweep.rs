//! Sweeps: many runs from one YAML file, run one after another, resumable.
//!
//! ```yaml
//! config: ../beauty5_sasrec.yaml      # relative to the sweep file
//! name: table1                        # prefix of every run name
//! set: {train.epochs: 50}             # overrides for every run
//! grid:                               # the cartesian product of these
//!   model.backbone: [sasrec, gru4rec]
//!   model.variant: [plain, llmesr]
//! runs:                               # and/or explicit runs
//!   - {name: wo_sd, set: {model.distill: false}}
//! ```
//!
//! A run whose `results.json` exists is skipped, one with a checkpoint is
//! resumed, so rerunning a sweep after an interruption finishes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use llm_esr_comm::Communicator;
use serde::Deserialize;
use tracing::info;

use crate::config::{config_error, Config};
use crate::train::{self, TrainOptions};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    pub config: String,
    pub name: String,
    #[serde(default)]
    pub set: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<serde_yaml::Value>>,
    #[serde(default)]
    pub runs: Vec<SweepRun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRun {
    pub name: String,
    #[serde(default)]
    pub set: BTreeMap<String, serde_yaml::Value>,
}

/// One planned run: its name and its overrides.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub overrides: Vec<String>,
}

fn scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn override_of(key: &str, v: &serde_yaml::Value) -> String {
    let value = serde_yaml::to_string(v).unwrap_or_default();
    format!("{key}={}", value.trim())
}

impl Sweep {
    pub fn load(path: &Path) -> Result<(Sweep, PathBuf)> {
        let text = crate::limits::read_capped(path, "sweep")?;
        crate::limits::parse_yaml(&text)
            .map_err(|e| config_error(format!("sweep {}: {e}", path.display())))?;
        let sweep: Sweep = serde_yaml::from_str(&text)
            .map_err(|e| config_error(format!("sweep {}: {e}", path.display())))?;
        let mut runs = sweep.runs.len();
        if !sweep.grid.is_empty() {
            let product = sweep
                .grid
                .values()
                .try_fold(1usize, |n, v| n.checked_mul(v.len()));
            runs = product
                .and_then(|p| p.checked_add(runs))
                .unwrap_or(usize::MAX);
        }
        if runs > crate::limits::MAX_SWEEP_RUNS {
            return Err(config_error(format!(
                "sweep {}: `grid` and `runs` make {} runs, more than the {} accepted; split the \
                 sweep",
                path.display(),
                if runs == usize::MAX {
                    "too many".to_string()
                } else {
                    runs.to_string()
                },
                crate::limits::MAX_SWEEP_RUNS
            )));
        }
        let config = path.parent().unwrap_or(Path::new(".")).join(&sweep.config);
        Ok((sweep, config))
    }

    /// The grid's cartesian product (keys in sorted order), then the explicit runs.
    pub fn plan(&self) -> Vec<Planned> {
        let common: Vec<String> = self.set.iter().map(|(k, v)| override_of(k, v)).collect();
        let mut planned = Vec::new();
        if !self.grid.is_empty() {
            let mut combos: Vec<Vec<(&String, &serde_yaml::Value)>> = vec![vec![]];
            for (key, values) in &self.grid {
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        values.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push((key, v));
                            c
                        })
                    })
                    .collect();
            }
            for combo in combos {
                let suffix: Vec<String> = combo.iter().map(|(_, v)| scalar(v)).collect();
                let mut overrides = common.clone();
                overrides.extend(combo.iter().map(|(k, v)| override_of(k, v)));
                planned.push(Planned {
                    name: format!("{}_{}", self.name, suffix.join("_")),
                    overrides,
                });
            }
        }
        for run in &self.runs {
            let mut overrides = common.clone();
            overrides.extend(run.set.iter().map(|(k, v)| override_of(k, v)));
            planned.push(Planned {
                name: format!("{}_{}", self.name, run.name),
                overrides,
            });
        }
        planned
    }
}

/// Runs every planned run; returns (name, results) of all of them.
pub fn run(
    path: &Path,
    extra: &[String],
    comm: &dyn Communicator,
) -> Result<Vec<(String, serde_json::Value)>> {
    let (sweep, config) = Sweep::load(path)?;
    let planned = sweep.plan();
    // Resolve every config first: a typo in run 7 fails before run 1 starts.
    let mut configs = Vec::new();
    for p in &planned {
        let mut overrides = p.overrides.clone();
        overrides.extend(extra.iter().cloned());
        overrides.push(format!("name={}", p.name));
        let cfg =
            Config::load(&config, &overrides).with_context(|| format!("sweep run `{}`", p.name))?;
        configs.push(cfg);
    }
    // And against their datasets, for the runs still to do.
    let todo: Vec<Config> = configs
        .iter()
        .filter(|c| c.run_dir().is_ok_and(|d| !d.join(train::RESULTS).exists()))
        .cloned()
        .collect();
    crate::preflight::check_all(&todo)?;
    let mut results = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        let dir = cfg.run_dir()?;
        let done = dir.join(train::RESULTS);
        let value = if done.exists() {
            info!(run = %cfg.name, "{}/{}: already finished, skipped", i + 1, configs.len());
            serde_json::from_str(&std::fs::read_to_string(&done)?)
                .with_context(|| format!("{} is not valid JSON", done.display()))?
        } else {
            let resume = dir.join(train::CHECKPOINT).exists();
            info!(run = %cfg.name, resume, "{}/{}", i + 1, configs.len());
            let opts = TrainOptions {
                resume,
                force_config: false,
            };
            train::train(cfg, &opts, comm)?
        };
        results.push((cfg.name.clone(), value));
    }
    Ok(results)
}
