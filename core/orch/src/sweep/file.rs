//! The sweep file: what to run, read and checked before anything runs.
//!
//! ```yaml
//! config: ../beauty5_sasrec.yaml      # relative to the sweep file
//! name: table1                        # the sweep directory <output_dir>/table1
//! set: {train.epochs: 50}             # overrides for every run
//! grid:                               # the cartesian product of these
//!   model.backbone: [sasrec, gru4rec]
//!   model.variant: [plain, llmesr]
//! runs:                               # and/or explicit runs
//!   - {name: wo_sd, set: {model.distill: false}}
//! random:                             # and/or random search
//!   n: 20
//!   seed: 1
//!   space:
//!     train.lr: {log_uniform: [1.0e-4, 1.0e-2]}
//!     model.alpha: {choice: [0.01, 0.1, 1]}
//! seeds: [42, 43, 44]                 # every point above once per seed
//! baseline: sasrec_plain              # the group the others are tested against
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::config::config_error;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    pub config: String,
    pub name: String,
    #[serde(default)]
    pub set: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<serde_yaml::Value>>,
    #[serde(default)]
    pub runs: Vec<ExplicitRun>,
    #[serde(default)]
    pub random: Option<RandomSearch>,
    /// Every point is run once per seed (`seed=S`); a group's seeds are
    /// aggregated in reports.
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    /// The group (its name with or without the sweep's prefix) that reports
    /// test the others against.
    #[serde(default)]
    pub baseline: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitRun {
    pub name: String,
    #[serde(default)]
    pub set: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSearch {
    /// Number of points drawn.
    pub n: usize,
    /// Seed of the draws (not of training).
    #[serde(default)]
    pub seed: u64,
    /// Written `{log_uniform: [a, b]}` (a one-key map per distribution).
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub space: BTreeMap<String, Distribution>,
}

/// Where a random-search key takes its values.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Distribution {
    /// Uniform on [low, high].
    Uniform([f64; 2]),
    /// Log-uniform on [low, high], both positive.
    LogUniform([f64; 2]),
    /// A uniform integer in [low, high].
    IntUniform([i64; 2]),
    /// One of the listed values, uniformly.
    Choice(Vec<serde_yaml::Value>),
}

impl SweepFile {
    /// Reads and checks a sweep file; returns it with the path of its base
    /// config. Errors name the file and the key.
    pub fn load(path: &Path) -> Result<(SweepFile, PathBuf)> {
        let text = crate::limits::read_capped(path, "sweep")?;
        let bad =
            |e: &dyn std::fmt::Display| config_error(format!("sweep {}: {e}", path.display()));
        crate::limits::parse_yaml(&text).map_err(|e| bad(&e))?;
        let sweep: SweepFile = serde_yaml::from_str(&text).map_err(|e| bad(&e))?;
        sweep.check().map_err(|e| bad(&e))?;
        let config = path.parent().unwrap_or(Path::new(".")).join(&sweep.config);
        Ok((sweep, config))
    }

    /// Everything that can be checked without the base config.
    fn check(&self) -> Result<(), String> {
        for (key, values) in &self.grid {
            if values.is_empty() {
                return Err(format!("key `grid.{key}` has no values"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for run in &self.runs {
            if !seen.insert(&run.name) {
                return Err(format!("two entries of `runs` are named `{}`", run.name));
            }
        }
        if let Some(r) = &self.random {
            check_random(r)?;
        }
        if let Some(seeds) = &self.seeds {
            if seeds.is_empty() {
                return Err("key `seeds` is empty: list at least one seed, or remove it".into());
            }
            let mut sorted = seeds.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != seeds.len() {
                return Err("key `seeds` lists a seed twice".into());
            }
            let swept = self.set.keys().chain(self.grid.keys());
            let swept = swept.chain(self.runs.iter().flat_map(|r| r.set.keys()));
            let random = self.random.iter().flat_map(|r| r.space.keys());
            if swept.chain(random).any(|k| k == "seed") {
                return Err(
                    "`seed` is set by key `seeds`: do not also set it in `set`, \
                            `grid`, `runs` or `random`"
                        .into(),
                );
            }
        }
        let points = self.point_count();
        if points == Some(0) {
            return Err("no runs: give `grid`, `runs` or `random`".into());
        }
        let runs = points.and_then(|p| p.checked_mul(self.seeds.as_ref().map_or(1, Vec::len)));
        match runs {
            Some(n) if n <= crate::limits::MAX_SWEEP_RUNS => Ok(()),
            _ => Err(format!(
                "`grid`, `runs`, `random` and `seeds` make {} runs, more than the {} accepted; \
                 split the sweep",
                runs.map_or("too many".to_string(), |n| n.to_string()),
                crate::limits::MAX_SWEEP_RUNS
            )),
        }
    }

    /// Number of points (groups) before seeds; `None` on overflow.
    fn point_count(&self) -> Option<usize> {
        let grid = if self.grid.is_empty() {
            Some(0)
        } else {
            self.grid
                .values()
                .try_fold(1usize, |n, v| n.checked_mul(v.len()))
        };
        grid?
            .checked_add(self.runs.len())?
            .checked_add(self.random.as_ref().map_or(0, |r| r.n))
    }
}

fn check_random(r: &RandomSearch) -> Result<(), String> {
    if r.n == 0 {
        return Err("key `random.n` is 0: draw at least one point, or remove `random`".into());
    }
    if r.space.is_empty() {
        return Err("key `random.space` is empty: give at least one key to draw".into());
    }
    for (key, d) in &r.space {
        let at = format!("key `random.space.{key}`");
        match d {
            Distribution::Uniform([lo, hi]) if !(lo.is_finite() && hi.is_finite() && lo <= hi) => {
                return Err(format!(
                    "{at}: uniform needs finite [low, high] with low <= high"
                ))
            }
            Distribution::LogUniform([lo, hi])
                if !(lo.is_finite() && hi.is_finite() && *lo > 0.0 && lo <= hi) =>
            {
                return Err(format!(
                    "{at}: log_uniform needs 0 < low <= high (both finite)"
                ))
            }
            Distribution::IntUniform([lo, hi]) if lo > hi => {
                return Err(format!("{at}: int_uniform needs low <= high"))
            }
            Distribution::Choice(v) if v.is_empty() => {
                return Err(format!("{at}: choice needs at least one value"))
            }
            _ => {}
        }
    }
    Ok(())
}
