//! Per-user test results of a run, `test_ranks.safetensors` in its
//! directory: for every evaluated user, its id, its held-out target, the
//! target's rank and its head/tail memberships. `report` reads them to compare
//! runs user by user (paired tests); any HR@K / NDCG@K of any group can be
//! recomputed from them.
//!
//! Tensors (all of length n, the number of evaluated users, ascending ids):
//! `user` (u32, ids from 1 as in the dataset's files), `target` (u32, item
//! id), `rank` (u32, candidates scored at or above the target: 0 is a hit at
//! 1), and, when the run had the groups, `head_item` and `head_user` (u8, 1 =
//! head). About 14 bytes a user.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use llm_esr_comm::Communicator;
use llm_esr_runtime::candle::{safetensors, DType, Device, Tensor};

use crate::data::UserIdx;
use crate::eval::{Group, Grouping, Metric, TargetRank};

/// The file name in a run directory.
pub const FILE: &str = "test_ranks.safetensors";

#[derive(Debug, Clone, PartialEq)]
pub struct UserRanks {
    /// User ids (from 1), ascending.
    pub user: Vec<u32>,
    pub target: Vec<u32>,
    pub rank: Vec<u32>,
    pub head_item: Option<Vec<bool>>,
    pub head_user: Option<Vec<bool>>,
}

impl UserRanks {
    /// Every rank's shard of target ranks put together (collective: every
    /// rank calls it and gets the whole table), in user order.
    pub fn gather(
        ranks: &[TargetRank],
        num_users: usize,
        grouping: &Grouping,
        comm: &dyn Communicator,
    ) -> Result<UserRanks> {
        // One dense row per user, summed over ranks: each user is evaluated
        // on exactly one rank, the others contribute zeros. `rank + 1` marks
        // an evaluated user.
        let mut dense = vec![0f64; 2 * num_users];
        for r in ranks {
            dense[2 * r.user.index()] = r.rank as f64 + 1.0;
            dense[2 * r.user.index() + 1] = r.target as f64;
        }
        comm.all_reduce_sum_f64(&mut dense)?;
        let mut out = UserRanks {
            user: vec![],
            target: vec![],
            rank: vec![],
            head_item: grouping.item_head.as_ref().map(|_| vec![]),
            head_user: grouping.user_head.as_ref().map(|_| vec![]),
        };
        for (i, pair) in dense.chunks(2).enumerate() {
            if pair[0] == 0.0 {
                continue;
            }
            let (user, target) = (UserIdx::new(i as u32), pair[1] as u32);
            out.user.push(user.id());
            out.target.push(target);
            out.rank.push(pair[0] as u32 - 1);
            if let (Some(h), Some(all)) = (out.head_item.as_mut(), &grouping.item_head) {
                h.push(all[target as usize]);
            }
            if let (Some(h), Some(all)) = (out.head_user.as_mut(), &grouping.user_head) {
                h.push(all[user.index()]);
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
    }

    /// Writes the table atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let cpu = &Device::Cpu;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, values) in [
            ("user", &self.user),
            ("target", &self.target),
            ("rank", &self.rank),
        ] {
            tensors.insert(name.into(), Tensor::from_slice(values, n, cpu)?);
        }
        for (name, flags) in [
            ("head_item", &self.head_item),
            ("head_user", &self.head_user),
        ] {
            if let Some(flags) = flags {
                let bytes: Vec<u8> = flags.iter().map(|&h| h as u8).collect();
                tensors.insert(name.into(), Tensor::from_vec(bytes, n, cpu)?);
            }
        }
        llm_esr_prep::fsutil::with_temp_path(path, |tmp| {
            safetensors::save(&tensors, tmp).with_context(|| format!("writing {}", path.display()))
        })
    }

    /// Reads a table written by [`UserRanks::save`], checking its shape.
    pub fn load(path: &Path) -> Result<UserRanks> {
        let bad = |why: String| {
            anyhow::anyhow!(
                "{} is not a per-user results table ({why}); rerun the run's final test, or \
                 remove the file to report the run without paired tests",
                path.display()
            )
        };
        let tensors = safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read it: {e}")))?;
        let u32s = |name: &str| -> Result<Vec<u32>> {
            let t = tensors
                .get(name)
                .ok_or_else(|| bad(format!("no `{name}`")))?;
            if t.dtype() != DType::U32 || t.rank() != 1 {
                return Err(bad(format!("`{name}` is not a 1-D u32 tensor")));
            }
            Ok(t.to_vec1()?)
        };
        let flags = |name: &str| -> Result<Option<Vec<bool>>> {
            let Some(t) = tensors.get(name) else {
                return Ok(None);
            };
            if t.dtype() != DType::U8 || t.rank() != 1 {
                return Err(bad(format!("`{name}` is not a 1-D u8 tensor")));
            }
            Ok(Some(
                t.to_vec1::<u8>()?.into_iter().map(|b| b != 0).collect(),
            ))
        };
        let out = UserRanks {
            user: u32s("user")?,
            target: u32s("target")?,
            rank: u32s("rank")?,
            head_item: flags("head_item")?,
            head_user: flags("head_user")?,
        };
        let n = out.len();
        let lengths = [
            out.target.len(),
            out.rank.len(),
            out.head_item.as_ref().map_or(n, Vec::len),
            out.head_user.as_ref().map_or(n, Vec::len),
        ];
        if lengths.iter().any(|&l| l != n) {
            return Err(bad(format!(
                "tensors of unequal lengths {n} and {lengths:?}"
            )));
        }
        if out.user.windows(2).any(|w| w[0] >= w[1]) || out.user.first() == Some(&0) {
            return Err(bad("user ids are not ascending from 1".into()));
        }
        Ok(out)
    }

    /// Whether each user is in `group`; `None` when the run had no such
    /// grouping.
    pub fn members(&self, group: Group) -> Option<Vec<bool>> {
        let flip = |v: &Vec<bool>| v.iter().map(|h| !h).collect();
        match group {
            Group::Overall => Some(vec![true; self.len()]),
            Group::HeadItem => self.head_item.clone(),
            Group::TailItem => self.head_item.as_ref().map(flip),
            Group::HeadUser => self.head_user.clone(),
            Group::TailUser => self.head_user.as_ref().map(flip),
        }
    }

    /// `metric` of every user.
    pub fn values(&self, metric: Metric) -> Vec<f64> {
        self.rank
            .iter()
            .map(|&r| metric.of_rank(r as usize))
            .collect()
    }
}

/// Fails unless `a` and `b` evaluated the same users (a paired test needs
/// them), naming both files.
pub fn check_same_users(a: &UserRanks, a_name: &str, b: &UserRanks, b_name: &str) -> Result<()> {
    if a.user != b.user {
        bail!(
            "{a_name} and {b_name} evaluated different users ({} and {}): paired tests need \
             the same dataset and split",
            a.len(),
            b.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use llm_esr_comm::SingleProcess;

    use super::*;

    fn table() -> UserRanks {
        let grouping = Grouping {
            item_head: Some(vec![false, true, false, true]),
            user_head: Some(vec![true, false, false]),
        };
        let ranks = [
            TargetRank {
                user: UserIdx::new(2),
                target: 3,
                rank: 0,
            },
            TargetRank {
                user: UserIdx::new(0),
                target: 2,
                rank: 12,
            },
        ];
        UserRanks::gather(&ranks, 3, &grouping, &SingleProcess).unwrap()
    }

    #[test]
    fn gathers_in_user_order_with_memberships() {
        let t = table();
        assert_eq!(t.user, [1, 3]);
        assert_eq!(t.target, [2, 3]);
        assert_eq!(t.rank, [12, 0]);
        assert_eq!(t.head_item, Some(vec![false, true]));
        assert_eq!(t.head_user, Some(vec![true, false]));
        assert_eq!(t.members(Group::TailUser), Some(vec![false, true]));
        assert_eq!(t.values(Metric::Hr(10)), [0.0, 1.0]);
    }

    #[test]
    fn round_trips_and_refuses_a_broken_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(FILE);
        let t = table();
        t.save(&path)?;
        assert_eq!(UserRanks::load(&path)?, t);
        std::fs::write(&path, b"not safetensors")?;
        let err = UserRanks::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(FILE) && err.contains("not a per-user results table"),
            "{err}"
        );
        Ok(())
    }
}
