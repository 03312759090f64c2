//! The report's figures, from its runs: learning curves (training loss and
//! validation NDCG@10 per epoch, seeds as a band), head vs tail bars per
//! variant, and a metric against each swept numeric hyper-parameter (the
//! paper's alpha and N study). Drawing is [`super::plots`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use statrs::statistics::Statistics;

use super::plots::{self, BarSeries, Bars, Curve, LearningCurves, ParamCurve};
use super::summary::{value, Column, Summary};
use super::{Collection, Variant};
use crate::eval::{Group, Metric};
use crate::run_dir::METRICS;

/// The metric of the curves and bars.
const METRIC: Metric = Metric::Ndcg(10);

/// Draws every figure into `dir`; returns the files written.
pub fn draw_all(c: &Collection, summary: &Summary, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = plots::learning_curves(&learning_curves(c)?, dir, "learning_curves")?;
    for metric in super::summary::METRICS {
        if let Some(b) = head_tail(summary, metric) {
            let stem = format!("head_tail_{}", metric.to_string().replace('@', ""));
            written.extend(plots::bars(&b, dir, &stem)?);
        }
    }
    for p in param_curves(c) {
        let stem = format!("param_{}", p.key.replace(['.', '/'], "_"));
        written.extend(plots::param_curve(&p, dir, &stem)?);
    }
    Ok(written)
}

/// (epoch, loss, validation overall NDCG@10) of every line of a run's
/// `metrics.jsonl`.
fn epochs(run_dir: &Path) -> Result<Vec<(u32, f64, f64)>> {
    let path = run_dir.join(METRICS);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} for the learning curves", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let epoch = v["epoch"].as_u64().unwrap_or(0) as u32;
        let loss = v["loss"].as_f64().unwrap_or(f64::NAN);
        let valid = v["valid"][Group::Overall.name()][METRIC.to_string()]
            .as_f64()
            .unwrap_or(f64::NAN);
        out.push((epoch, loss, valid));
    }
    Ok(out)
}

/// Mean, lowest and highest over seeds at each epoch of one variant.
fn curves(v: &Variant, per_run: &[Vec<(u32, f64, f64)>]) -> (Curve, Curve) {
    let last = per_run.iter().flatten().map(|e| e.0).max().unwrap_or(0);
    let epochs: Vec<u32> = (1..=last).collect();
    let band = |pick: fn(&(u32, f64, f64)) -> f64| {
        let mut c = Curve {
            label: v.name.clone(),
            epochs: epochs.clone(),
            mean: vec![],
            low: vec![],
            high: vec![],
        };
        for &e in &epochs {
            let xs: Vec<f64> = per_run
                .iter()
                .filter_map(|r| r.iter().find(|x| x.0 == e).map(pick))
                .filter(|x| x.is_finite())
                .collect();
            let (mean, low, high) = if xs.is_empty() {
                (f64::NAN, f64::NAN, f64::NAN)
            } else {
                (
                    xs.as_slice().mean(),
                    xs.as_slice().min(),
                    xs.as_slice().max(),
                )
            };
            c.mean.push(mean);
            c.low.push(low);
            c.high.push(high);
        }
        c
    };
    (band(|e| e.1), band(|e| e.2))
}

fn learning_curves(c: &Collection) -> Result<LearningCurves> {
    let mut plot = LearningCurves {
        title: "Learning curves (band: lowest to highest seed)".into(),
        loss: vec![],
        valid: vec![],
        valid_label: format!("valid {METRIC} (overall)"),
    };
    for v in &c.variants {
        let per_run: Vec<_> = v
            .runs
            .iter()
            .map(|r| epochs(&r.dir))
            .collect::<Result<_>>()?;
        let (loss, valid) = curves(v, &per_run);
        plot.loss.push(loss);
        plot.valid.push(valid);
    }
    Ok(plot)
}

/// Test `metric` of the tail and head groups, one bar per variant.
fn head_tail(summary: &Summary, metric: Metric) -> Option<Bars> {
    let groups: Vec<Group> = Group::ALL[1..]
        .iter()
        .copied()
        .filter(|g| summary.columns.contains(&Column { group: *g, metric }))
        .collect();
    if groups.is_empty() {
        return None;
    }
    let series = summary
        .rows
        .iter()
        .map(|row| {
            let (mut mean, mut std) = (vec![], vec![]);
            for g in &groups {
                let i = summary
                    .columns
                    .iter()
                    .position(|c| *c == Column { group: *g, metric });
                let cell = i.and_then(|i| row.cells[i].as_ref());
                mean.push(cell.map_or(f64::NAN, |c| c.mean));
                std.push(cell.and_then(|c| c.std).unwrap_or(f64::NAN));
            }
            BarSeries {
                label: row.name.clone(),
                mean,
                std,
            }
        })
        .collect();
    Some(Bars {
        title: format!("Test {metric} by long-tail group (error bars: std over seeds)"),
        y_label: format!("test {metric}"),
        categories: groups.iter().map(|g| g.title().to_string()).collect(),
        series,
    })
}

/// One curve per swept key whose values are all numbers, with at least two
/// of them: test NDCG@10 of Overall, Tail Item and Head Item against it.
/// Where other keys vary too, each point is the mean over the runs with that
/// value (said in the title).
fn param_curves(c: &Collection) -> Vec<ParamCurve> {
    let mut keys: Vec<&String> = c.variants.iter().flat_map(|v| v.params.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        let Some(xs) = numeric_values(c, key) else {
            continue;
        };
        let others_vary = c
            .variants
            .iter()
            .flat_map(|v| v.params.keys())
            .any(|k| k != key);
        let groups = [Group::Overall, Group::TailItem, Group::HeadItem];
        let series = groups
            .iter()
            .map(|&group| {
                let col = Column {
                    group,
                    metric: METRIC,
                };
                let (mut mean, mut std) = (vec![], vec![]);
                for &x in &xs {
                    let values: Vec<f64> = c
                        .variants
                        .iter()
                        .filter(|v| param(v, key) == Some(x))
                        .flat_map(|v| &v.runs)
                        .filter_map(|r| value(&r.results, col))
                        .collect();
                    mean.push(if values.is_empty() {
                        f64::NAN
                    } else {
                        values.as_slice().mean()
                    });
                    std.push(if values.len() > 1 {
                        values.as_slice().std_dev()
                    } else {
                        f64::NAN
                    });
                }
                BarSeries {
                    label: group.title().into(),
                    mean,
                    std,
                }
            })
            .collect();
        let (lo, hi) = (xs[0], xs[xs.len() - 1]);
        out.push(ParamCurve {
            title: format!(
                "Test {METRIC} against {key}{}",
                if others_vary {
                    " (mean over the other swept keys)"
                } else {
                    ""
                }
            ),
            key: key.clone(),
            y_label: format!("test {METRIC}"),
            log_x: lo > 0.0 && hi / lo >= 20.0,
            x: xs,
            series,
        });
    }
    out
}

fn param(v: &Variant, key: &str) -> Option<f64> {
    v.params.get(key)?.parse().ok()
}

/// The distinct values of `key`, ascending, when every variant has a
/// numeric one and there are at least two.
fn numeric_values(c: &Collection, key: &str) -> Option<Vec<f64>> {
    let mut xs = c
        .variants
        .iter()
        .map(|v| param(v, key))
        .collect::<Option<Vec<f64>>>()?;
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    (xs.len() >= 2 && xs.iter().all(|x| x.is_finite())).then_some(xs)
}
