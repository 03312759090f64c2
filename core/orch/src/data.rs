//! Prepared datasets: reading `inter.txt`, the leave-one-out split, padded
//! batches and seeded negative sampling.
//!
//! `inter.txt` holds one `user item` pair per line, each user's lines in time
//! order, ids from 1. Split per user: train = `seq[:-2]`, validation target =
//! `seq[-2]`, test target = `seq[-1]`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use llm_esr_runtime::{Objective, Rng};

/// Fails with what to do when `dir` is not a prepared dataset directory.
pub fn check_prepared(dir: &Path) -> Result<()> {
    let inter = dir.join(llm_esr_prep::dataset::INTER_FILE);
    if !inter.is_file() {
        bail!(
            "{} not found: point `data.dir` at a prepared dataset (run `llm-esr-orch prepare \
             CONFIG` to make one)",
            inter.display()
        );
    }
    Ok(())
}

pub struct Dataset {
    pub dir: PathBuf,
    pub num_users: usize,
    pub num_items: usize,
    /// `seqs[u - 1]` is user u's full sequence.
    pub seqs: Vec<Vec<u32>>,
    /// Each user's items, sorted, for membership tests.
    history: Vec<Vec<u32>>,
}

impl Dataset {
    /// Reads a prepared dataset with the reader `prepare` and `embed` use, so
    /// that every command sees the same users, items and item count.
    pub fn load(dir: &Path) -> Result<Dataset> {
        check_prepared(dir)?;
        let prepared = llm_esr_prep::Dataset::load(dir)?;
        let (seqs, num_items) = (prepared.sequences, prepared.num_items);
        let history: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| {
                let mut h = s.clone();
                h.sort_unstable();
                h.dedup();
                h
            })
            .collect();
        Ok(Dataset {
            dir: dir.to_path_buf(),
            num_users: seqs.len(),
            num_items,
            seqs,
            history,
        })
    }

    pub fn num_interactions(&self) -> usize {
        self.seqs.iter().map(Vec::len).sum()
    }

    /// Training part of user index `u` (0-based): `seq[:-2]`, or the whole
    /// sequence of a user with fewer than 3 items (see [`llm_esr_prep::train_part`]).
    pub fn train_seq(&self, u: usize) -> &[u32] {
        llm_esr_prep::train_part(&self.seqs[u])
    }

    /// Users (0-based) that can be evaluated: at least one input item.
    pub fn eval_users(&self) -> Vec<u32> {
        (0..self.num_users as u32)
            .filter(|&u| self.seqs[u as usize].len() >= 3)
            .collect()
    }

    /// Input and target for evaluation of user `u` on `split`.
    pub fn eval_case(&self, u: usize, split: Split) -> (&[u32], u32) {
        let s = &self.seqs[u];
        let n = s.len();
        match split {
            Split::Valid => (&s[..n - 2], s[n - 2]),
            Split::Test => (&s[..n - 1], s[n - 1]),
        }
    }

    pub fn has_item(&self, u: usize, item: u32) -> bool {
        self.history[u].binary_search(&item).is_ok()
    }

    pub fn history(&self, u: usize) -> &[u32] {
        &self.history[u]
    }

    /// A uniform item the user never interacted with.
    pub fn sample_negative(&self, u: usize, rng: &mut Rng) -> u32 {
        if self.history[u].len() >= self.num_items {
            // Degenerate: the user has every item. Any item is as good as none.
            return 1 + rng.below(self.num_items as u64) as u32;
        }
        loop {
            let it = 1 + rng.below(self.num_items as u64) as u32;
            if !self.has_item(u, it) {
                return it;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Valid,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// Left-padded id sequences, row-major (b, l), 0 = padding.
#[derive(Debug, Clone)]
pub struct Padded {
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
    pub b: usize,
    pub l: usize,
}

impl Padded {
    /// Keeps each sequence's last `max_len` items and pads on the left to the
    /// longest one (or to `max_len` when `to_max_len`).
    pub fn new(seqs: &[&[u32]], max_len: usize, to_max_len: bool) -> Padded {
        let longest = seqs
            .iter()
            .map(|s| s.len().min(max_len))
            .max()
            .unwrap_or(0)
            .max(1);
        let l = if to_max_len { max_len } else { longest };
        let b = seqs.len();
        let mut ids = vec![0u32; b * l];
        let mut mask = vec![0f32; b * l];
        for (r, s) in seqs.iter().enumerate() {
            let s = &s[s.len().saturating_sub(l)..];
            let off = r * l + (l - s.len());
            ids[off..off + s.len()].copy_from_slice(s);
            mask[off..off + s.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        Padded { ids, mask, b, l }
    }
}

/// Ranking-loss targets aligned with a padded input: `pos[k]` is the item to
/// predict at flat position k (0 = no loss there) and `neg[k]` its negative.
#[derive(Debug, Clone)]
pub struct Targets {
    pub pos: Vec<u32>,
    pub neg: Vec<u32>,
}

impl Targets {
    pub fn count(&self) -> usize {
        self.pos.iter().filter(|&&p| p != 0).count()
    }
}

/// The training samples of an epoch, before shuffling: each user with a
/// target once, or, for cloze training, each user with a training item twice
/// (random masking, then last-item masking).
pub fn training_samples(ds: &Dataset, objective: Objective) -> Vec<(u32, bool)> {
    let users = 0..ds.num_users as u32;
    match objective {
        Objective::Cloze { .. } => {
            let users: Vec<u32> = users
                .filter(|&u| !ds.train_seq(u as usize).is_empty())
                .collect();
            let mut samples: Vec<(u32, bool)> = users.iter().map(|&u| (u, false)).collect();
            samples.extend(users.iter().map(|&u| (u, true)));
            samples
        }
        _ => users
            .filter(|&u| ds.train_seq(u as usize).len() >= 2)
            .map(|u| (u, false))
            .collect(),
    }
}

/// Seed of the per-user stream of an epoch: the same user draws the same
/// negatives whichever rank or batch it lands in.
pub fn user_stream(seed: u64, epoch: usize, user: u32) -> Rng {
    Rng::derive(
        seed ^ 0x7472_6169_6e00_0000 ^ ((epoch as u64) << 32),
        user as u64,
    )
}

/// Next-item training batch: input `train[:-1]`, targets `train[1:]` at every
/// position (`all_positions`) or at the last one only.
pub fn next_item_batch(
    ds: &Dataset,
    users: &[u32],
    max_len: usize,
    to_max_len: bool,
    all_positions: bool,
    seed: u64,
    epoch: usize,
) -> (Padded, Targets) {
    let inputs: Vec<&[u32]> = users
        .iter()
        .map(|&u| {
            let t = ds.train_seq(u as usize);
            &t[..t.len() - 1]
        })
        .collect();
    let padded = Padded::new(&inputs, max_len, to_max_len);
    let l = padded.l;
    let mut pos = vec![0u32; padded.b * l];
    let mut neg = vec![0u32; padded.b * l];
    for (r, &u) in users.iter().enumerate() {
        let t = ds.train_seq(u as usize);
        let targets = &t[1..];
        let targets = &targets[targets.len().saturating_sub(l)..];
        let mut rng = user_stream(seed, epoch, u);
        let start = if all_positions { 0 } else { targets.len() - 1 };
        for (j, &item) in targets.iter().enumerate().skip(start) {
            let k = r * l + (l - targets.len()) + j;
            pos[k] = item;
            neg[k] = ds.sample_negative(u as usize, &mut rng);
        }
    }
    (padded, Targets { pos, neg })
}

/// Cloze training batch, the official BERT4Rec scheme: every user appears
/// twice per epoch, once with random masking of its training sequence (each
/// item with probability `mask_prob`: 80% the mask token, 10% a random item,
/// 10% unchanged, predicted in every case) and once with only its last item
/// masked (`last`).
#[allow(clippy::too_many_arguments)]
pub fn cloze_batch(
    ds: &Dataset,
    entries: &[(u32, bool)],
    max_len: usize,
    to_max_len: bool,
    mask_token: u32,
    mask_prob: f32,
    seed: u64,
    epoch: usize,
) -> (Padded, Targets) {
    let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(entries.len());
    let mut labels: Vec<Vec<u32>> = Vec::with_capacity(entries.len());
    let mut negs: Vec<Vec<u32>> = Vec::with_capacity(entries.len());
    for &(u, last) in entries {
        let seq = ds.train_seq(u as usize);
        let mut rng = user_stream(seed, 2 * epoch + last as usize, u);
        let mut tok = seq.to_vec();
        let mut lab = vec![0u32; seq.len()];
        let mut neg = vec![0u32; seq.len()];
        if last {
            let j = seq.len() - 1;
            tok[j] = mask_token;
            lab[j] = seq[j];
            neg[j] = ds.sample_negative(u as usize, &mut rng);
        } else {
            for (j, &s) in seq.iter().enumerate() {
                let r = rng.next_f64();
                if r < mask_prob as f64 {
                    let r = r / mask_prob as f64;
                    tok[j] = if r < 0.8 {
                        mask_token
                    } else if r < 0.9 {
                        1 + rng.below(ds.num_items as u64) as u32
                    } else {
                        s
                    };
                    lab[j] = s;
                    neg[j] = ds.sample_negative(u as usize, &mut rng);
                }
            }
        }
        tokens.push(tok);
        labels.push(lab);
        negs.push(neg);
    }
    let inputs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let padded = Padded::new(&inputs, max_len, to_max_len);
    let l = padded.l;
    let mut pos = vec![0u32; padded.b * l];
    let mut neg = vec![0u32; padded.b * l];
    for (r, (lab, ng)) in labels.iter().zip(&negs).enumerate() {
        let keep = lab.len().min(l);
        let (lab, ng) = (&lab[lab.len() - keep..], &ng[ng.len() - keep..]);
        let off = r * l + (l - keep);
        pos[off..off + keep].copy_from_slice(lab);
        neg[off..off + keep].copy_from_slice(ng);
    }
    (padded, Targets { pos, neg })
}

/// The fixed candidate negatives of a user for sampled evaluation.
pub fn eval_negatives(ds: &Dataset, u: usize, split: Split, n: usize, seed: u64) -> Vec<u32> {
    let tag = match split {
        Split::Valid => 0x0076_616c_6964_u64,
        Split::Test => 0x7465_7374_u64,
    };
    let mut rng = Rng::derive(seed ^ tag, u as u64);
    (0..n).map(|_| ds.sample_negative(u, &mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_left_and_truncates_to_the_last_items() {
        let a: &[u32] = &[1, 2, 3, 4];
        let b: &[u32] = &[5];
        let p = Padded::new(&[a, b], 3, false);
        assert_eq!(p.l, 3);
        assert_eq!(p.ids, vec![2, 3, 4, 0, 0, 5]);
        assert_eq!(p.mask, vec![1., 1., 1., 0., 0., 1.]);
        let p = Padded::new(&[b], 3, true);
        assert_eq!(p.ids, vec![0, 0, 5]);
    }
}
