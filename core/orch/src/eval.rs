//! Evaluation: ranks of held-out targets and HR@K / NDCG@K per user group.
//!
//! Sampled (official protocol): the target among `negatives` items drawn
//! uniformly from those the user never interacted with, fixed per user and
//! split. Full: the target among every item outside the user's history. A tie
//! with the target counts against it, so a model that scores everything alike
//! gets no credit. Users are sharded over ranks and the sums all-reduced.

use std::collections::BTreeMap;

use anyhow::Result;
use llm_esr_comm::Communicator;
use llm_esr_runtime::candle::{Device, Tensor};
use llm_esr_runtime::{ForwardCtx, Rng};

use crate::config::{Config, EvalMode};
use crate::data::{eval_negatives, Dataset, Padded, Split};
use crate::model::{last_position, Recommender};

/// group name -> metric name -> value; groups also carry `users` (their size).
pub type Metrics = BTreeMap<String, BTreeMap<String, f64>>;

/// Head/tail membership used to split metrics (see the long-tail module).
#[derive(Debug, Clone, Default)]
pub struct Grouping {
    /// Indexed by item id: true for head items.
    pub item_head: Option<Vec<bool>>,
    /// Indexed by 0-based user: true for head users.
    pub user_head: Option<Vec<bool>>,
}

impl Grouping {
    fn names(&self) -> Vec<&'static str> {
        let mut g = vec!["overall"];
        if self.item_head.is_some() {
            g.extend(["tail_item", "head_item"]);
        }
        if self.user_head.is_some() {
            g.extend(["tail_user", "head_user"]);
        }
        g
    }

    fn member(&self, group: &str, user: usize, target: u32) -> bool {
        match group {
            "overall" => true,
            "tail_item" => self.item_head.as_ref().is_some_and(|h| !h[target as usize]),
            "head_item" => self.item_head.as_ref().is_some_and(|h| h[target as usize]),
            "tail_user" => self.user_head.as_ref().is_some_and(|h| !h[user]),
            "head_user" => self.user_head.as_ref().is_some_and(|h| h[user]),
            _ => false,
        }
    }
}

/// 0-based rank of each evaluated user's target, for this rank's shard.
pub fn rank_targets(
    model: &Recommender,
    ds: &Dataset,
    split: Split,
    cfg: &Config,
    users: &[u32],
    device: &Device,
) -> Result<Vec<(u32, u32, usize)>> {
    let (max_len, pad_to_max_len, seed) = (cfg.data.max_len, cfg.data.pad_to_max_len, cfg.seed);
    let cfg = &cfg.eval;
    let tables = model.tables()?;
    // Chunks of users with similar input lengths pad little; the metric sums
    // do not depend on the order.
    let mut users = users.to_vec();
    users.sort_by_key(|&u| (ds.eval_case(u as usize, split).0.len().min(max_len), u));
    let mut out = Vec::with_capacity(users.len());
    let mut rng = Rng::new(0); // unused in eval mode
    for chunk in users.chunks(cfg.batch_size.max(1)) {
        let cases: Vec<(&[u32], u32)> = chunk
            .iter()
            .map(|&u| ds.eval_case(u as usize, split))
            .collect();
        let with_mask: Vec<Vec<u32>>;
        let inputs: Vec<&[u32]> = match model.mask_token {
            Some(m) => {
                // Cloze models predict the item at an appended mask token.
                with_mask = cases
                    .iter()
                    .map(|(s, _)| s.iter().copied().chain([m]).collect())
                    .collect();
                with_mask.iter().map(Vec::as_slice).collect()
            }
            None => cases.iter().map(|(s, _)| *s).collect(),
        };
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
                    cand.extend(eval_negatives(ds, u as usize, split, cfg.negatives, seed));
                }
                let cand = Tensor::from_vec(cand, (chunk.len(), cfg.negatives + 1), device)?;
                let scores: Vec<Vec<f32>> = model
                    .score_candidates(&tables, &user_vecs, &cand)?
                    .to_vec2()?;
                for ((&u, (_, target)), s) in chunk.iter().zip(&cases).zip(scores) {
                    let rank = s[1..].iter().filter(|&&x| counts_against(x, s[0])).count();
                    out.push((u, *target, rank));
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
                                && !ds.has_item(u as usize, j as u32)
                        })
                        .count();
                    out.push((u, *target, rank));
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
    ranks: &[(u32, u32, usize)],
    ks: &[usize],
    grouping: &Grouping,
    comm: &dyn Communicator,
) -> Result<Metrics> {
    let groups = grouping.names();
    let width = 1 + 2 * ks.len();
    let mut sums = vec![0f64; groups.len() * width];
    for &(u, target, rank) in ranks {
        for (g, name) in groups.iter().enumerate() {
            if !grouping.member(name, u as usize, target) {
                continue;
            }
            let row = &mut sums[g * width..(g + 1) * width];
            row[0] += 1.0;
            for (i, &k) in ks.iter().enumerate() {
                if rank < k {
                    row[1 + 2 * i] += 1.0;
                    row[2 + 2 * i] += 1.0 / ((rank + 2) as f64).log2();
                }
            }
        }
    }
    comm.all_reduce_sum_f64(&mut sums)?;
    let mut metrics = Metrics::new();
    for (g, name) in groups.iter().enumerate() {
        let row = &sums[g * width..(g + 1) * width];
        let n = row[0];
        let mut m = BTreeMap::new();
        m.insert("users".to_string(), n);
        for (i, &k) in ks.iter().enumerate() {
            let avg = |x: f64| if n > 0.0 { x / n } else { 0.0 };
            m.insert(format!("HR@{k}"), avg(row[1 + 2 * i]));
            m.insert(format!("NDCG@{k}"), avg(row[2 + 2 * i]));
        }
        metrics.insert(name.to_string(), m);
    }
    Ok(metrics)
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
        let ranks = vec![(0, 1, 0), (1, 2, 3), (2, 3, 12)];
        let m = aggregate(&ranks, &[10], &Grouping::default(), comm.as_ref())?;
        let o = &m["overall"];
        assert!((o["HR@10"] - 2.0 / 3.0).abs() < 1e-12);
        assert!((o["NDCG@10"] - (1.0 + 1.0 / 5f64.log2()) / 3.0).abs() < 1e-12);
        assert_eq!(o["users"], 3.0);
        Ok(())
    }
}
