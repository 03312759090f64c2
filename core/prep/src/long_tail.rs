//! Long-tail groups: head/tail items by popularity and head/tail users by
//! sequence length.
//!
//! Conventions (decided here, used by the trainer's evaluation groups too):
//! - item popularity = the number of distinct users that have the item anywhere
//!   in their full sequence (training part, validation and test target), as the
//!   official `get_item_pop` (`pop[items] += 1` on a numpy array counts each
//!   user once per item);
//! - user length = the length of the training part `seq[:-2]` (the whole sequence
//!   when it has fewer than 3 items, see [`crate::split::train_part`]);
//! - a value is **head** when it is `>=` its threshold and **tail** when it is
//!   `<` the threshold. This is the official rule: `metric_pop_report` counts an
//!   item as tail when `pop < ts_item` and `metric_len_report` a user as short
//!   when `len < ts_user`;
//! - Pareto (`pareto: p`, default 0.2): sort values in descending order, take the
//!   value at rank `ceil(p * n)` (1-based) as the threshold; ties at the boundary
//!   join the head, so the head holds at least a fraction `p`;
//! - a fixed `ts_item` / `ts_user` overrides Pareto for that side (the official
//!   per-dataset values: Yelp 12/13, Fashion 3/4, Beauty 9/4 as `ts_user`/`ts_item`).
//!
//! Note: the official code groups test users by the length of the test input
//! (`seq[:-1]`, one more than the training part); [`TestUserLength::TestInput`]
//! asks the trainer to classify test users with [`LongTail::is_head_len`] on
//! that length instead of reading `head_users`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::split::train_part;

/// How the long-tail thresholds are chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LongTailConfig {
    /// Head share for the Pareto rule (default 0.2); used for each side that has
    /// no fixed threshold.
    pub pareto: Option<f64>,
    /// Fixed user threshold: head users have a training length `>= ts_user`.
    pub ts_user: Option<usize>,
    /// Fixed item threshold: head items have a popularity `>= ts_item`.
    pub ts_item: Option<usize>,
    /// The length that makes a test user head or tail (validation users are
    /// always grouped by their input, the training part).
    pub test_users_by: TestUserLength,
}

/// The length of a user in the test report's user groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestUserLength {
    /// The training part `seq[:-2]`, the same groups as validation (default).
    TrainLength,
    /// The test input `seq[:-1]` cut to `data.max_len`, as the official
    /// `metric_len_report` (one item longer than the training part).
    TestInput,
}

impl Default for LongTailConfig {
    fn default() -> Self {
        LongTailConfig {
            pareto: Some(0.2),
            ts_user: None,
            ts_item: None,
            test_users_by: TestUserLength::TrainLength,
        }
    }
}

/// Where a threshold came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdRule {
    /// The value at rank `ceil(p * n)` of the descending order.
    Pareto(f64),
    /// Given in the config.
    Fixed,
}

/// Thresholds and group sizes (what `dataset.json` records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongTailSummary {
    /// Head items have popularity `>= item_threshold`.
    pub item_threshold: usize,
    /// How `item_threshold` was chosen.
    pub item_rule: ThresholdRule,
    /// Head users have a training length `>= user_threshold`.
    pub user_threshold: usize,
    /// How `user_threshold` was chosen.
    pub user_rule: ThresholdRule,
    /// Number of head items.
    pub head_items: usize,
    /// Number of tail items.
    pub tail_items: usize,
    /// Number of head users.
    pub head_users: usize,
    /// Number of tail users.
    pub tail_users: usize,
}

/// Long-tail membership of every item and user.
#[derive(Debug, Clone, PartialEq)]
pub struct LongTail {
    /// Thresholds and group sizes.
    pub summary: LongTailSummary,
    /// `item_popularity[id]`: distinct users having item `id` (index 0 = padding, 0).
    pub item_popularity: Vec<u32>,
    /// `user_length[id]`: training-part length of user `id` (index 0 = padding, 0).
    pub user_length: Vec<u32>,
    /// `head_items[id]` (index 0 = padding, false).
    pub head_items: Vec<bool>,
    /// `head_users[id]` (index 0 = padding, false).
    pub head_users: Vec<bool>,
}

impl LongTail {
    /// Whether a user with this length (e.g. an evaluation input length) is head.
    pub fn is_head_len(&self, len: usize) -> bool {
        len >= self.summary.user_threshold
    }

    /// Whether an item with this popularity is head.
    pub fn is_head_pop(&self, popularity: usize) -> bool {
        popularity >= self.summary.item_threshold
    }
}

/// Computes popularity, lengths, thresholds and head/tail membership.
///
/// `sequences[0]` is user 1; item ids are `1..=num_items` (0 is padding and must
/// not occur).
pub fn long_tail(
    sequences: &[Vec<u32>],
    num_items: usize,
    cfg: &LongTailConfig,
) -> Result<LongTail> {
    if let Some(p) = cfg.pareto {
        if !(p > 0.0 && p <= 1.0) {
            return Err(crate::invalid::invalid_config(format!(
                "long_tail.pareto must be in (0, 1], got {p}; the paper uses 0.2"
            )));
        }
    }
    let mut popularity = vec![0u32; num_items + 1];
    let mut last_seen = vec![u32::MAX; num_items + 1];
    for (u, seq) in sequences.iter().enumerate() {
        for &i in seq {
            let i = i as usize;
            if i == 0 || i > num_items {
                bail!(
                    "user {}: item id {i} outside 1..={num_items}; the sequences do not match \
                     the item count",
                    u + 1
                );
            }
            if last_seen[i] != u as u32 {
                last_seen[i] = u as u32;
                popularity[i] += 1;
            }
        }
    }
    let mut lengths = vec![0u32; sequences.len() + 1];
    for (u, seq) in sequences.iter().enumerate() {
        lengths[u + 1] = train_part(seq).len() as u32;
    }

    let (item_threshold, item_rule) =
        threshold(&popularity[1..], cfg.ts_item, cfg.pareto, "ts_item")?;
    let (user_threshold, user_rule) = threshold(&lengths[1..], cfg.ts_user, cfg.pareto, "ts_user")?;
    let mut head_items = vec![false; num_items + 1];
    for i in 1..=num_items {
        head_items[i] = popularity[i] as usize >= item_threshold;
    }
    let mut head_users = vec![false; sequences.len() + 1];
    for u in 1..=sequences.len() {
        head_users[u] = lengths[u] as usize >= user_threshold;
    }
    let n_head_items = head_items.iter().filter(|&&h| h).count();
    let n_head_users = head_users.iter().filter(|&&h| h).count();
    let summary = LongTailSummary {
        item_threshold,
        item_rule,
        user_threshold,
        user_rule,
        head_items: n_head_items,
        tail_items: num_items - n_head_items,
        head_users: n_head_users,
        tail_users: sequences.len() - n_head_users,
    };
    tracing::info!(
        item_threshold,
        user_threshold,
        head_items = summary.head_items,
        tail_items = summary.tail_items,
        head_users = summary.head_users,
        tail_users = summary.tail_users,
        "long-tail groups (head: popularity >= item threshold, training length >= user threshold)"
    );
    Ok(LongTail {
        summary,
        item_popularity: popularity,
        user_length: lengths,
        head_items,
        head_users,
    })
}

fn threshold(
    values: &[u32],
    fixed: Option<usize>,
    pareto: Option<f64>,
    key: &str,
) -> Result<(usize, ThresholdRule)> {
    if let Some(t) = fixed {
        return Ok((t, ThresholdRule::Fixed));
    }
    let Some(p) = pareto else {
        return Err(crate::invalid::invalid_config(format!(
            "long_tail: set `pareto` (e.g. 0.2) or `{key}`"
        )));
    };
    if values.is_empty() {
        return Ok((0, ThresholdRule::Pareto(p)));
    }
    let mut sorted: Vec<u32> = values.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let k = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Ok((sorted[k - 1] as usize, ThresholdRule::Pareto(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_and_fixed() {
        // 5 users; item 1 in all, item 2 in 3, item 3 in 1 (twice), items 4..5 in 1.
        let seqs = vec![
            vec![1, 2, 3, 3, 4],
            vec![1, 2, 5],
            vec![1, 2, 1],
            vec![1],
            vec![1, 4],
        ];
        let lt = long_tail(&seqs, 5, &LongTailConfig::default()).unwrap();
        assert_eq!(lt.item_popularity, vec![0, 5, 3, 1, 2, 1]);
        // ceil(0.2 * 5) = 1 -> threshold = 5.
        assert_eq!(lt.summary.item_threshold, 5);
        assert_eq!(lt.head_items, vec![false, true, false, false, false, false]);
        // train lengths: 3, 1, 1, 1, 2 -> threshold 3.
        assert_eq!(lt.user_length, vec![0, 3, 1, 1, 1, 2]);
        assert_eq!(lt.summary.user_threshold, 3);
        assert_eq!(lt.summary.head_users, 1);
        let cfg = LongTailConfig {
            pareto: None,
            ts_user: Some(2),
            ts_item: Some(2),
            ..LongTailConfig::default()
        };
        let lt = long_tail(&seqs, 5, &cfg).unwrap();
        assert_eq!(lt.summary.head_items, 3);
        assert_eq!(lt.summary.tail_items, 2);
        assert_eq!(lt.summary.head_users, 2);
        assert!(lt.is_head_len(2) && !lt.is_head_len(1));
        let bad = LongTailConfig {
            pareto: None,
            ts_user: None,
            ts_item: Some(1),
            ..LongTailConfig::default()
        };
        assert!(long_tail(&seqs, 5, &bad).is_err());
    }
}
