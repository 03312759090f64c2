//! Reports of finished runs: the runs of sweep directories and run
//! directories gathered into variants (runs that differ only by seed),
//! summarised as mean +- std over seeds with paired tests against a baseline
//! ([`summary`], [`stats`]), written as Markdown, CSV and LaTeX, and drawn
//! ([`figures`], [`plots`]). [`runs`] keeps the one-row-per-run tables.

pub mod figures;
pub mod plots;
pub mod runs;
pub mod stats;
pub mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tracing::warn;

use crate::run_dir::{RESOLVED, RESULTS};
use crate::sweep::PLAN_FILE;
pub use runs::{markdown, table, tables};
pub use summary::Summary;

/// One finished run.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    pub seed: Option<u64>,
    /// Its `results.json`.
    pub results: serde_json::Value,
}

/// Runs that differ only by their seed, in seed order.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    /// The swept values that distinguish it (from the sweep's plan).
    pub params: BTreeMap<String, String>,
    pub runs: Vec<Run>,
}

/// The variants of one report, and the one the others are tested against.
#[derive(Debug, Clone)]
pub struct Collection {
    pub variants: Vec<Variant>,
    pub baseline: Option<usize>,
}

impl Collection {
    /// Gathers the finished runs of `paths`: sweep directories (with a
    /// `sweep.json`: variants are its groups, the baseline its `baseline`)
    /// and run directories (with a `results.json`: runs whose resolved
    /// configs differ only by `seed` form one variant). `baseline` (a
    /// variant's name) overrides the sweeps'.
    pub fn load(paths: &[PathBuf], baseline: Option<&str>) -> Result<Collection> {
        if paths.is_empty() {
            bail!("give run directories (with {RESULTS}) or sweep directories (with {PLAN_FILE})");
        }
        let mut variants: Vec<(String, Variant)> = Vec::new();
        let mut sweep_baseline = None;
        for path in paths {
            if path.join(PLAN_FILE).is_file() {
                let (found, b) = sweep_variants(path)?;
                sweep_baseline = sweep_baseline.or(b);
                for v in found {
                    add(&mut variants, format!("sweep:{}", v.name), v);
                }
            } else if path.join(RESULTS).is_file() {
                let (key, run, label) = run_of(path)?;
                let v = Variant {
                    name: label,
                    params: BTreeMap::new(),
                    runs: vec![run],
                };
                add(&mut variants, key, v);
            } else {
                bail!(
                    "{} is neither a finished run (no {RESULTS}) nor a sweep directory (no \
                     {PLAN_FILE}): give a run directory written by `train` or the directory \
                     of a sweep",
                    path.display()
                );
            }
        }
        let mut variants: Vec<Variant> = variants.into_iter().map(|(_, v)| v).collect();
        for v in &mut variants {
            v.runs.sort_by_key(|r| r.seed);
        }
        unique_names(&mut variants);
        let wanted = baseline.map(str::to_string).or(sweep_baseline);
        let baseline = match wanted {
            None => None,
            Some(b) => Some(variants.iter().position(|v| v.name == b).ok_or_else(|| {
                let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
                anyhow!(
                    "baseline `{b}` is none of the variants reported: {}",
                    names.join(", ")
                )
            })?),
        };
        Ok(Collection { variants, baseline })
    }

    pub fn baseline(&self) -> Option<&Variant> {
        self.baseline.map(|i| &self.variants[i])
    }
}

/// Adds `v` to the variant with the same `key`, or as a new one.
fn add(variants: &mut Vec<(String, Variant)>, key: String, v: Variant) {
    match variants.iter_mut().find(|(k, _)| *k == key) {
        Some((_, existing)) => existing.runs.extend(v.runs),
        None => variants.push((key, v)),
    }
}

/// Two variants of one name (e.g. the same sweep given twice with other
/// configs) get their position appended, so that rows stay apart.
fn unique_names(variants: &mut [Variant]) {
    for i in 1..variants.len() {
        if variants[..i].iter().any(|v| v.name == variants[i].name) {
            variants[i].name = format!("{} ({})", variants[i].name, i + 1);
        }
    }
}

/// The variants of a sweep directory (finished runs only) and its baseline.
fn sweep_variants(dir: &Path) -> Result<(Vec<Variant>, Option<String>)> {
    let path = dir.join(PLAN_FILE);
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let runs = plan["runs"]
        .as_array()
        .ok_or_else(|| anyhow!("{} has no `runs` list: is it a sweep plan?", path.display()))?;
    let mut variants: Vec<(String, Variant)> = Vec::new();
    let mut missing = Vec::new();
    for r in runs {
        let field = |k: &str| {
            r[k].as_str()
                .ok_or_else(|| anyhow!("{}: a run without `{k}`", path.display()))
        };
        let (name, group, rel) = (field("name")?, field("group")?, field("dir")?);
        let run_dir = dir.join(rel);
        if !run_dir.join(RESULTS).is_file() {
            missing.push(name.to_string());
            continue;
        }
        let params = r["params"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let run = Run {
            name: name.to_string(),
            seed: r["seed"].as_u64(),
            results: read_results(&run_dir)?,
            dir: run_dir,
        };
        let v = Variant {
            name: group.to_string(),
            params,
            runs: vec![run],
        };
        add(&mut variants, group.to_string(), v);
    }
    if !missing.is_empty() {
        warn!(
            "{}: {} runs not finished (left out): {}",
            dir.display(),
            missing.len(),
            missing.join(", ")
        );
    }
    let baseline = plan["baseline"].as_str().map(str::to_string);
    Ok((variants.into_iter().map(|(_, v)| v).collect(), baseline))
}

/// A run directory as (variant key, run, variant label): the key is its
/// resolved config without `seed`, `name` and `output_dir`; the label its
/// name without a trailing `_s<seed>`.
fn run_of(dir: &Path) -> Result<(String, Run, String)> {
    let results = read_results(dir)?;
    let name = results["name"].as_str().unwrap_or("?").to_string();
    let path = dir.join(RESOLVED);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: is it a finished run?", path.display()))?;
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", path.display()))?;
    let seed = cfg.get("seed").and_then(serde_yaml::Value::as_u64);
    if let Some(map) = cfg.as_mapping_mut() {
        for key in ["seed", "name", "output_dir"] {
            map.remove(key);
        }
    }
    let key = format!("config:{}", serde_yaml::to_string(&cfg)?);
    let label = match seed {
        Some(s) => name
            .strip_suffix(&format!("_s{s}"))
            .unwrap_or(&name)
            .to_string(),
        None => name.clone(),
    };
    let run = Run {
        name,
        dir: dir.to_path_buf(),
        seed,
        results,
    };
    Ok((key, run, label))
}

fn read_results(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(RESULTS);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: is it a finished run?", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Where [`write`] puts the summary and the plots.
pub struct Outputs {
    pub csv: Option<PathBuf>,
    pub latex: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub plots: Option<PathBuf>,
}

impl Outputs {
    /// Everything in `dir`: summary.md, summary.csv, summary.tex, plots/.
    pub fn all_in(dir: &Path) -> Outputs {
        Outputs {
            csv: Some(dir.join("summary.csv")),
            latex: Some(dir.join("summary.tex")),
            markdown: Some(dir.join("summary.md")),
            plots: Some(dir.join("plots")),
        }
    }
}

/// Summarises `collection`, writes what `out` asks for, and returns the
/// summary and the files written.
pub fn write(collection: &Collection, out: &Outputs) -> Result<(Summary, Vec<PathBuf>)> {
    let summary = Summary::of(collection)?;
    let mut written = Vec::new();
    let texts = [
        (&out.markdown, summary.markdown()),
        (&out.csv, summary.csv()?),
        (&out.latex, summary.latex()),
    ];
    for (path, text) in texts {
        if let Some(path) = path {
            crate::files::write_atomic(path, text.as_bytes())?;
            written.push(path.clone());
        }
    }
    if let Some(dir) = &out.plots {
        written.extend(figures::draw_all(collection, &summary, dir)?);
    }
    Ok((summary, written))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::{Group, Metric};
    use crate::user_ranks::UserRanks;

    /// A finished run in `dir`: per-user ranks (users 1..=n, the first
    /// `head` of them with a head target item), the results they give, two
    /// epochs of metrics, and a resolved config with `seed`.
    pub fn fake_run(dir: &Path, name: &str, seed: u64, ranks: &[u32], head: usize) -> Run {
        std::fs::create_dir_all(dir).unwrap();
        let n = ranks.len();
        let table = UserRanks {
            user: (1..=n as u32).collect(),
            target: vec![1; n],
            rank: ranks.to_vec(),
            head_item: Some((0..n).map(|i| i < head).collect()),
            head_user: None,
        };
        table.save(&dir.join(crate::user_ranks::FILE)).unwrap();
        let mut test = serde_json::Map::new();
        for group in [Group::Overall, Group::HeadItem, Group::TailItem] {
            let keep = table.members(group).unwrap();
            let mut g = serde_json::Map::new();
            for m in [Metric::Hr(10), Metric::Ndcg(10)] {
                let v = summary_values(&table, m, &keep);
                g.insert(m.to_string(), serde_json::json!(v.0 / v.1));
            }
            let users = keep.iter().filter(|k| **k).count();
            g.insert("users".into(), serde_json::json!(users));
            test.insert(group.name().into(), serde_json::Value::Object(g));
        }
        let results = serde_json::json!({"name": name, "test": test});
        crate::files::write_json(&dir.join(RESULTS), &results).unwrap();
        let lines = "{\"epoch\":1,\"loss\":0.9,\"valid\":{\"overall\":{\"NDCG@10\":0.1}}}\n\
                     {\"epoch\":2,\"loss\":0.7,\"valid\":{\"overall\":{\"NDCG@10\":0.2}}}\n";
        std::fs::write(dir.join(crate::run_dir::METRICS), lines).unwrap();
        let cfg = format!("name: {name}\nseed: {seed}\noutput_dir: runs\nmodel: {{hidden: 64}}\n");
        std::fs::write(dir.join(RESOLVED), cfg).unwrap();
        Run {
            name: name.into(),
            dir: dir.to_path_buf(),
            seed: Some(seed),
            results,
        }
    }

    fn summary_values(t: &UserRanks, m: Metric, keep: &[bool]) -> (f64, f64) {
        let v: Vec<f64> = t
            .values(m)
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(v, _)| v)
            .collect();
        (v.iter().sum(), v.len() as f64)
    }

    #[test]
    fn run_directories_that_differ_only_by_seed_are_one_variant() {
        let tmp = tempfile::tempdir().unwrap();
        let d = |n: &str| tmp.path().join(n);
        fake_run(&d("a_s2"), "a_s2", 2, &[0, 3, 20], 1);
        fake_run(&d("a_s1"), "a_s1", 1, &[1, 3, 9], 1);
        fake_run(&d("b"), "b", 1, &[5, 5, 5], 1);
        // b's config differs by more than its seed.
        let cfg = std::fs::read_to_string(d("b").join(RESOLVED)).unwrap();
        std::fs::write(d("b").join(RESOLVED), cfg.replace("64", "32")).unwrap();
        let paths = [d("a_s2"), d("b"), d("a_s1")];
        let c = Collection::load(&paths, Some("b")).unwrap();
        let names: Vec<&str> = c.variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let seeds: Vec<_> = c.variants[0].runs.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, [Some(1), Some(2)]);
        assert_eq!(c.baseline, Some(1));

        let err = Collection::load(&paths, Some("c")).unwrap_err().to_string();
        assert!(
            err.contains("baseline `c`") && err.contains("a, b"),
            "{err}"
        );
        let err = Collection::load(&[tmp.path().to_path_buf()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither a finished run"), "{err}");
    }
}
