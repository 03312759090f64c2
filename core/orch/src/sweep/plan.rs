//! From a sweep file to the list of runs: points (grid, explicit runs, random
//! draws) times seeds, each with its group, parameters and overrides.

use std::collections::{BTreeMap, HashSet};

use anyhow::Result;
use llm_esr_runtime::Rng;

use super::file::{Distribution, SweepFile};
use crate::config::config_error;

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The run's name and directory (`<group>_s<seed>` with seeds).
    pub name: String,
    /// The point it belongs to: runs that differ only by seed.
    pub group: String,
    pub seed: Option<u64>,
    /// The swept values that distinguish the group (grid keys, explicit
    /// runs' keys, random draws), as YAML scalars.
    pub params: BTreeMap<String, String>,
    /// Everything the sweep sets, as `key=value`.
    pub overrides: Vec<String>,
}

/// A point before seeds.
struct Point {
    group: String,
    params: Vec<(String, serde_yaml::Value)>,
}

/// A YAML value as it reads in a name or a table: strings bare.
pub fn scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// `key=value` with the value in YAML.
pub fn override_of(key: &str, v: &serde_yaml::Value) -> String {
    let value = serde_yaml::to_string(v).unwrap_or_default();
    format!("{key}={}", value.trim())
}

impl SweepFile {
    /// The grid's cartesian product (keys in sorted order), then the explicit
    /// runs, then the random draws; each once per seed. Fails when two runs
    /// would share a name.
    pub fn plan(&self) -> Result<Vec<Planned>> {
        let common: Vec<String> = self.set.iter().map(|(k, v)| override_of(k, v)).collect();
        let seeds: Vec<Option<u64>> = match &self.seeds {
            Some(s) => s.iter().copied().map(Some).collect(),
            None => vec![None],
        };
        let mut planned = Vec::new();
        let mut names = HashSet::new();
        for point in self.points() {
            for &seed in &seeds {
                let mut overrides = common.clone();
                overrides.extend(point.params.iter().map(|(k, v)| override_of(k, v)));
                let name = match seed {
                    Some(s) => {
                        overrides.push(format!("seed={s}"));
                        format!("{}_s{s}", point.group)
                    }
                    None => point.group.clone(),
                };
                if !names.insert(name.clone()) {
                    return Err(config_error(format!(
                        "sweep `{}`: two runs are named `{name}`; rename an entry of `runs`",
                        self.name
                    )));
                }
                planned.push(Planned {
                    name,
                    group: point.group.clone(),
                    seed,
                    params: point
                        .params
                        .iter()
                        .map(|(k, v)| (k.clone(), scalar(v)))
                        .collect(),
                    overrides,
                });
            }
        }
        Ok(planned)
    }

    fn points(&self) -> Vec<Point> {
        let mut points = Vec::new();
        if !self.grid.is_empty() {
            let mut combos: Vec<Vec<(String, serde_yaml::Value)>> = vec![vec![]];
            for (key, values) in &self.grid {
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        values.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push((key.clone(), v.clone()));
                            c
                        })
                    })
                    .collect();
            }
            for params in combos {
                let suffix: Vec<String> = params.iter().map(|(_, v)| scalar(v)).collect();
                points.push(Point {
                    group: format!("{}_{}", self.name, suffix.join("_")),
                    params,
                });
            }
        }
        for run in &self.runs {
            points.push(Point {
                group: format!("{}_{}", self.name, run.name),
                params: run
                    .set
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            });
        }
        if let Some(r) = &self.random {
            let mut rng = Rng::new(r.seed);
            let width = r.n.to_string().len().max(2);
            for i in 0..r.n {
                let params = r
                    .space
                    .iter()
                    .map(|(k, d)| (k.clone(), draw(d, &mut rng)))
                    .collect();
                points.push(Point {
                    group: format!("{}_r{i:0width$}", self.name),
                    params,
                });
            }
        }
        points
    }

    /// The group named by `baseline` (with or without the sweep's prefix);
    /// an error naming the key when it names none.
    pub fn baseline_group(&self, planned: &[Planned]) -> Result<Option<String>> {
        let Some(b) = &self.baseline else {
            return Ok(None);
        };
        let prefixed = format!("{}_{b}", self.name);
        let found = planned
            .iter()
            .find(|p| p.group == *b || p.group == prefixed)
            .map(|p| p.group.clone());
        match found {
            Some(g) => Ok(Some(g)),
            None => {
                let mut groups: Vec<&str> = planned.iter().map(|p| p.group.as_str()).collect();
                groups.dedup();
                Err(config_error(format!(
                    "sweep `{}`: key `baseline` names `{b}`, which is none of its groups: {}",
                    self.name,
                    groups.join(", ")
                )))
            }
        }
    }
}

/// One draw of `d`.
fn draw(d: &Distribution, rng: &mut Rng) -> serde_yaml::Value {
    use serde_yaml::Value;
    match d {
        Distribution::Uniform([lo, hi]) => Value::from(lo + rng.next_f64() * (hi - lo)),
        Distribution::LogUniform([lo, hi]) => {
            let (a, b) = (lo.ln(), hi.ln());
            Value::from((a + rng.next_f64() * (b - a)).exp())
        }
        Distribution::IntUniform([lo, hi]) => {
            let span = (hi - lo) as u64 + 1;
            Value::from(lo + rng.below(span) as i64)
        }
        Distribution::Choice(values) => values[rng.below(values.len() as u64) as usize].clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(yaml: &str) -> SweepFile {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn grid_then_runs_then_draws_each_once_per_seed() -> Result<()> {
        let s = sweep(
            "config: c.yaml\nname: t\nset: {train.epochs: 2}\n\
             grid: {model.backbone: [sasrec, gru4rec]}\n\
             runs: [{name: x, set: {model.alpha: 0.5}}]\n\
             random: {n: 2, seed: 3, space: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}, \
             model.n: {int_uniform: [2, 4]}}}\nseeds: [1, 2]\n",
        );
        let p = s.plan()?;
        let names: Vec<&str> = p.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "t_sasrec_s1",
                "t_sasrec_s2",
                "t_gru4rec_s1",
                "t_gru4rec_s2",
                "t_x_s1",
                "t_x_s2",
                "t_r00_s1",
                "t_r00_s2",
                "t_r01_s1",
                "t_r01_s2"
            ]
        );
        assert_eq!(
            p[1].overrides,
            ["train.epochs=2", "model.backbone=sasrec", "seed=2"]
        );
        assert_eq!(p[4].params["model.alpha"], "0.5");
        // Draws are in range, reproducible, and the same for every seed.
        for r in &p[6..] {
            let lr: f64 = r.params["train.lr"].parse()?;
            let n: i64 = r.params["model.n"].parse()?;
            assert!((1e-4..=1e-2).contains(&lr) && (2..=4).contains(&n), "{r:?}");
        }
        assert_eq!(p[6].params, p[7].params);
        assert_ne!(p[6].params, p[8].params);
        assert_eq!(s.plan()?, p);
        assert_eq!(s.baseline_group(&p)?, None);
        Ok(())
    }

    #[test]
    fn the_baseline_must_name_a_group() {
        let mut s = sweep("config: c.yaml\nname: t\ngrid: {model.variant: [plain, llmesr]}\n");
        let p = s.plan().unwrap();
        s.baseline = Some("plain".into());
        assert_eq!(s.baseline_group(&p).unwrap().as_deref(), Some("t_plain"));
        s.baseline = Some("t_llmesr".into());
        assert_eq!(s.baseline_group(&p).unwrap().as_deref(), Some("t_llmesr"));
        s.baseline = Some("nope".into());
        let err = s.baseline_group(&p).unwrap_err().to_string();
        assert!(
            err.contains("`baseline`") && err.contains("t_plain, t_llmesr"),
            "{err}"
        );
    }

    #[test]
    fn clashing_names_are_refused() {
        let s = sweep(
            "config: c.yaml\nname: t\ngrid: {model.variant: [plain]}\nruns: [{name: plain}]\n",
        );
        let err = s.plan().unwrap_err().to_string();
        assert!(err.contains("two runs are named `t_plain`"), "{err}");
    }
}
