//! Evaluation: ranks of held-out targets and HR@K / NDCG@K per user group.
//!
//! Sampled (official protocol): the target among `negatives` items drawn
//! uniformly from those the user never interacted with, fixed per user and
//! split. Full: the target among every item outside the user's history. A tie
//! with the target counts against it, so a model that scores everything alike
//! gets no credit. Users are sharded over ranks and the sums all-reduced.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, Result};
use llm_esr_comm::Communicator;
use llm_esr_runtime::candle::{Device, Tensor};
use llm_esr_runtime::{ForwardCtx, Rng};
use serde::{Serialize, Serializer};

use crate::config::{Config, EvalMode};
use crate::data::{eval_negatives, Dataset, Padded, Split, UserIdx};
use crate::model::{last_position, Recommender};

/// A group of evaluated users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Overall,
    /// Users whose target item is a tail item.
    TailItem,
    HeadItem,
    /// Users whose length puts them in the tail.
    TailUser,
    HeadUser,
}

impl Group {
    /// Every group, in the order of the paper's tables.
    pub const ALL: [Group; 5] = [
        Group::Overall,
        Group::TailItem,
        Group::HeadItem,
        Group::TailUser,
        Group::HeadUser,
    ];

    /// The group called `name` in `results.json`.
    pub fn from_name(name: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == name)
    }

    /// The heading of the paper's tables ("Tail Item").
    pub fn title(self) -> &'static str {
        match self {
            Group::Overall => "Overall",
            Group::TailItem => "Tail Item",
            Group::HeadItem => "Head Item",
            Group::TailUser => "Tail User",
            Group::HeadUser => "Head User",
        }
    }

    /// The name in `results.json` and `metrics.jsonl`.
    pub fn name(self) -> &'static str {
        match self {
            Group::Overall => "overall",
            Group::TailItem => "tail_item",
            Group::HeadItem => "head_item",
            Group::TailUser => "tail_user",
            Group::HeadUser => "head_user",
        }
    }
}

/// HR@K or NDCG@K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Hr(usize),
    Ndcg(usize),
}

impl Metric {
    /// This metric of a target at 0-based `rank`.
    pub fn of_rank(self, rank: usize) -> f64 {
        match self {
            Metric::Hr(k) if rank < k => 1.0,
            Metric::Ndcg(k) if rank < k => 1.0 / ((rank + 2) as f64).log2(),
            _ => 0.0,
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::Hr(k) => write!(f, "HR@{k}"),
            Metric::Ndcg(k) => write!(f, "NDCG@{k}"),
        }
    }
}

impl FromStr for Metric {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Metric> {
        let bad = || anyhow!("`{s}` is not a metric: use HR@K or NDCG@K, e.g. NDCG@10");
        let (name, k) = s.split_once('@').ok_or_else(bad)?;
        let k: usize = k.parse().map_err(|_| bad())?;
        match name {
            "HR" => Ok(Metric::Hr(k)),
            "NDCG" => Ok(Metric::Ndcg(k)),
            _ => Err(bad()),
        }
    }
}

/// The metrics of every cut-off `ks`: HR@K and NDCG@K for each K.
pub fn metrics_of(ks: &[usize]) -> Vec<Metric> {
    ks.iter()
        .flat_map(|&k| [Metric::Hr(k), Metric::Ndcg(k)])
        .collect()
}

/// One group's size and metric values.
#[derive(Debug, Clone)]
pub struct GroupMetrics {
    pub group: Group,
    /// Evaluated users in the group.
    pub users: f64,
    pub values: Vec<(Metric, f64)>,
}

/// The evaluation of one split, group by group. Serialises as
/// `{group: {metric: value, ..., "users": n}}`, the shape of `results.json`.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub groups: Vec<GroupMetrics>,
}

impl Metrics {
    pub fn get(&self, group: Group, metric: Metric) -> Option<f64> {
        let g = self.groups.iter().find(|g| g.group == group)?;
        g.values.iter().find(|(m, _)| *m == metric).map(|(_, v)| *v)
    }

    pub fn users(&self, group: Group) -> Option<f64> {
        self.groups
            .iter()
            .find(|g| g.group == group)
            .map(|g| g.users)
    }
}

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<&str, BTreeMap<String, f64>> = self
            .groups
            .iter()
            .map(|g| {
                let mut values: BTreeMap<String, f64> =
                    g.values.iter().map(|(m, v)| (m.to_string(), *v)).collect();
                values.insert("users".into(), g.users);
                (g.group.name(), values)
            })
            .collect();
        map.serialize(serializer)
    }
}

/// The 0-based rank of a user's held-out target among its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRank {
    pub user: UserIdx,
    /// The target item id.
    pub target: u32,
    /// Candidates scored at or above the target.
    pub rank: usize,
}

/// Head/tail membership used to split metrics (see the long-tail module).
#[derive(Debug, Clone, Default)]
pub struct Grouping {
    /// Indexed by item id: true for head items.
    pub item_head: Option<Vec<bool>>,
    /// Indexed by [`UserIdx::index`]: true for head users.
    pub user_head: Option<Vec<bool>>,
}

impl Grouping {
    /// The groups this grouping reports.
    fn groups(&self) -> Vec<Group> {
        let mut g = vec![Group::Overall];
        if self.item_head.is_some() {
            g.extend([Group::TailItem, Group::HeadItem]);
        }
        if self.user_head.is_some() {
            g.extend([Group::TailUser, Group::HeadUser]);
        }
        g
    }

    fn member(&self, group: Group, r: &TargetRank) -> bool {
        let item_head = |h: &Vec<bool>| h[r.target as usize];
        let user_head = |h: &Vec<bool>| h[r.user.index()];
        match group {
            Group::Overall => true,
            Group::TailItem => self.item_head.as_ref().is_some_and(|h| !item_head(h)),
            Group::HeadItem => self.item_head.as_ref().is_some_and(item_head),
            Group::TailUser => self.user_head.as_ref().is_some_and(|h| !user_head(h)),
            Group::HeadUser => self.user_head.as_ref().is_some_and(user_head),
        }
    }
}

/// 0-based rank of each evaluated user's target, for this rank's shard.
pub fn rank_targets(
    model: &Recommender,
    ds: &Dataset,
    split: Split,
    cfg: &Config,
    users: &[UserIdx],
    device: &Device,
) -> Result<Vec<TargetRank>> {
    let (max_len, pad_to_max_len, seed) = (cfg.data.max_len, cfg.data.pad_to_max_len, cfg.seed);
    let cfg = &cfg.eval;
    let tables = model.tables()?;
    // Chunks of users with similar input lengths pad little; the metric sums
    // do not depend on the order.
    let mut users = users.to_vec();
    users.sort_by_key(|&u| (ds.eval_case(u, split).0.len().min(max_len), u));
    let mut out = Vec::with_capacity(users.len());
    let mut rng = Rng::new(0); // unused in eval mode
    for chunk in users.chunks(cfg.batch_size.max(1)) {
        let cases: Vec<(&[u32], u32)> = chunk.iter().map(|&u| ds.eval_case(u, split)).collect();
        // The objective's input (cloze models append the mask token).
        let inputs: Vec<Vec<u32>> = cases
            .iter()
            .map(|(s, _)| model.inference_input(s))
            .collect::<Result<_>>()?;
        let inputs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let padded = Padded::new(&inputs, max_len, pad_to_max_len);
        let ids = Tensor::from_vec(padded.ids.clone(), (padded.b, padded.l), device)?;
        let mask = Tensor::from_vec(padded.mask.clone(), (padded.b, padded.l), device)?;
        let mut ctx = ForwardCtx::new(false, &mut rng);
        let user_vecs = last_position(&model.encode(&tables, &ids, &mask, &mut ctx)?)?;
        match cfg.mode {
            EvalMode::Sampled => {
                let mut cand = Vec::with_capacity(chunk.len() * (cfg.negatives + 1));
                for (&u, (_, target)) in chunk.iter().zip(&cases) {
                    cand.push(*target);
                    cand.extend(eval_negatives(ds, u, split, cfg.negatives, seed));
                }
                let cand = Tensor::from_vec(cand, (chunk.len(), cfg.negatives + 1), device)?;
                let scores: Vec<Vec<f32>> = model
                    .score_candidates(&tables, &user_vecs, &cand)?
                    .to_vec2()?;
                for ((&u, (_, target)), s) in chunk.iter().zip(&cases).zip(scores) {
                    let rank = s[1..].iter().filter(|&&x| counts_against(x, s[0])).count();
                    out.push(TargetRank {
                        user: u,
                        target: *target,
                        rank,
                    });
                }
            }
            EvalMode::Full => {
                let scores: Vec<Vec<f32>> = model.score_all(&tables, &user_vecs)?.to_vec2()?;
                for ((&u, (_, target)), s) in chunk.iter().zip(&cases).zip(scores) {
                    let t = s[*target as usize];
                    let rank = (1..s.len())
                        .filter(|&j| {
                            j != *target as usize
                                && counts_against(s[j], t)
                                && !ds.has_item(u, j as u32)
                        })
                        .count();
                    out.push(TargetRank {
                        user: u,
                        target: *target,
                        rank,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Whether a candidate scored `x` ranks at or above a target scored `target`.
/// Ties count against the target, and so does every NaN (in the candidate or
/// the target): a `>=` would be false for NaN and rank a diverged model first.
fn counts_against(x: f32, target: f32) -> bool {
    x >= target || x.is_nan() || target.is_nan()
}

/// Sums HR/NDCG per group locally, all-reduces, and averages.
pub fn aggregate(
    ranks: &[TargetRank],
    ks: &[usize],
    grouping: &Grouping,
    comm: &dyn Communicator,
) -> Result<Metrics> {
    let groups = grouping.groups();
    let metrics = metrics_of(ks);
    // Per group: the user count, then one sum per metric.
    let width = 1 + metrics.len();
    let mut sums = vec![0f64; groups.len() * width];
    for r in ranks {
        for (g, &group) in groups.iter().enumerate() {
            if !grouping.member(group, r) {
                continue;
            }
            let row = &mut sums[g * width..(g + 1) * width];
            row[0] += 1.0;
            for (i, m) in metrics.iter().enumerate() {
                row[1 + i] += m.of_rank(r.rank);
            }
        }
    }
    comm.all_reduce_sum_f64(&mut sums)?;
    let groups = groups
        .iter()
        .enumerate()
        .map(|(g, &group)| {
            let row = &sums[g * width..(g + 1) * width];
            let n = row[0];
            let avg = |x: f64| if n > 0.0 { x / n } else { 0.0 };
            GroupMetrics {
                group,
                users: n,
                values: metrics
                    .iter()
                    .enumerate()
                    .map(|(i, &m)| (m, avg(row[1 + i])))
                    .collect(),
            }
        })
        .collect();
    Ok(Metrics { groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_and_nan_count_against_the_target() {
        assert!(counts_against(1.0, 1.0));
        assert!(counts_against(2.0, 1.0));
        assert!(!counts_against(0.5, 1.0));
        assert!(counts_against(f32::NAN, 1.0));
        assert!(counts_against(0.5, f32::NAN));
        assert!(counts_against(f32::NAN, f32::NAN));
    }

    #[test]
    fn hand_computed_metrics() -> Result<()> {
        let comm = llm_esr_comm::init(llm_esr_comm::Backend::Single)?;
        // Ranks 0, 3, 12: HR@10 = 2/3; NDCG@10 = (1 + 1/log2(5)) / 3.
        let ranks: Vec<TargetRank> = [(0, 1, 0), (1, 2, 3), (2, 3, 12)]
            .map(|(user, target, rank)| TargetRank {
                user: UserIdx::new(user),
                target,
                rank,
            })
            .to_vec();
        let m = aggregate(&ranks, &[10], &Grouping::default(), comm.as_ref())?;
        let get = |metric: &str| m.get(Group::Overall, metric.parse().unwrap()).unwrap();
        assert!((get("HR@10") - 2.0 / 3.0).abs() < 1e-12);
        assert!((get("NDCG@10") - (1.0 + 1.0 / 5f64.log2()) / 3.0).abs() < 1e-12);
        assert_eq!(m.users(Group::Overall), Some(3.0));
        // The JSON shape of results.json.
        let json = serde_json::to_value(&m)?;
        assert_eq!(json["overall"]["users"], 3.0);
        assert_eq!(json["overall"]["HR@10"], 2.0 / 3.0);
        assert!("HR@x".parse::<Metric>().is_err() && "MRR@5".parse::<Metric>().is_err());
        Ok(())
    }
}
