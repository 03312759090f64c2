//! Prepared datasets: reading `inter.txt`, the leave-one-out split, padded
//! batches and seeded negative sampling.
//!
//! `inter.txt` holds one `user item` pair per line, each user's lines in time
//! order, ids from 1. Split per user: train = `seq[:-2]`, validation target =
//! `seq[-2]`, test target = `seq[-1]`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use llm_esr_runtime::{ExampleCtx, Rng};

use crate::plugin_host::GuardedObjective;

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

/// A user of a dataset, by 0-based index: the position of its sequence.
///
/// Files, `recommend` and the long-tail tables number users from 1:
/// [`UserIdx::from_id`] and [`UserIdx::id`] are the only conversions. Plugins
/// (retrieval) take the 0-based index as a plain `u32` ([`UserIdx::index32`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserIdx(u32);

impl UserIdx {
    /// The user at 0-based position `index`.
    pub fn new(index: u32) -> UserIdx {
        UserIdx(index)
    }

    /// The user numbered `id` (from 1) in files and on the command line;
    /// `None` for 0.
    pub fn from_id(id: u32) -> Option<UserIdx> {
        id.checked_sub(1).map(UserIdx)
    }

    /// The number of this user in files (from 1).
    pub fn id(self) -> u32 {
        self.0 + 1
    }

    /// The 0-based position, for indexing.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The 0-based position as plugins take it.
    pub fn index32(self) -> u32 {
        self.0
    }
}

pub struct Dataset {
    pub dir: PathBuf,
    pub num_users: usize,
    pub num_items: usize,
    /// `seqs[u.index()]` is user `u`'s full sequence.
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

    /// Every user, in order.
    pub fn users(&self) -> impl Iterator<Item = UserIdx> {
        (0..self.num_users as u32).map(UserIdx)
    }

    /// The user numbered `id` (from 1), or an error saying which ids exist.
    pub fn user_by_id(&self, id: u32) -> Result<UserIdx> {
        match UserIdx::from_id(id) {
            Some(u) if u.index() < self.num_users => Ok(u),
            _ => bail!(
                "unknown user {id}: the dataset has users 1..={}",
                self.num_users
            ),
        }
    }

    /// User `u`'s full sequence.
    pub fn sequence(&self, u: UserIdx) -> &[u32] {
        &self.seqs[u.index()]
    }

    /// Training part of user `u`: `seq[:-2]`, or the whole sequence of a
    /// user with fewer than 3 items (see [`llm_esr_prep::train_part`]).
    pub fn train_seq(&self, u: UserIdx) -> &[u32] {
        llm_esr_prep::train_part(self.sequence(u))
    }

    /// Users that can be evaluated: at least one input item.
    pub fn eval_users(&self) -> Vec<UserIdx> {
        self.users()
            .filter(|&u| self.sequence(u).len() >= 3)
            .collect()
    }

    /// Input and target for evaluation of user `u` on `split`.
    pub fn eval_case(&self, u: UserIdx, split: Split) -> (&[u32], u32) {
        let s = self.sequence(u);
        let n = s.len();
        match split {
            Split::Valid => (&s[..n - 2], s[n - 2]),
            Split::Test => (&s[..n - 1], s[n - 1]),
        }
    }

    pub fn has_item(&self, u: UserIdx, item: u32) -> bool {
        self.history(u).binary_search(&item).is_ok()
    }

    /// User `u`'s distinct items, sorted.
    pub fn history(&self, u: UserIdx) -> &[u32] {
        &self.history[u.index()]
    }

    /// A uniform item the user never interacted with.
    pub fn sample_negative(&self, u: UserIdx, rng: &mut Rng) -> u32 {
        if self.history(u).len() >= self.num_items {
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

/// One training sample: a user and which of its copies per epoch
/// (`0..objective.copies()`; BERT4Rec's cloze has two: random masking, then
/// the last item masked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub user: UserIdx,
    pub copy: u32,
}

/// The training samples of an epoch, before shuffling: copy 0 of every user
/// the objective accepts, in user order, then copy 1 of each, and so on.
pub fn training_samples(ds: &Dataset, objective: &GuardedObjective) -> Result<Vec<Sample>> {
    let mut users = Vec::new();
    for u in ds.users() {
        if objective.qualifies(ds.train_seq(u))? {
            users.push(u);
        }
    }
    Ok((0..objective.copies() as u32)
        .flat_map(|copy| users.iter().map(move |&user| Sample { user, copy }))
        .collect())
}

/// Seed of the per-user stream of an epoch: the same user draws the same
/// negatives whichever rank or batch it lands in. Copy `c` of an objective
/// with `k` copies per epoch draws from stream `k * epoch + c`.
pub fn user_stream(seed: u64, epoch: usize, user: UserIdx) -> Rng {
    Rng::derive(
        seed ^ 0x7472_6169_6e00_0000 ^ ((epoch as u64) << 32),
        user.index() as u64,
    )
}

/// The training batch of `samples`: each sample's example built by the
/// objective from the user's training sequence, with the per-user stream of
/// its (epoch, copy) and negatives outside the user's history; inputs left
/// padded to their longest (or to `max_len`) keeping their last tokens, and
/// the targets of the kept positions.
#[allow(clippy::too_many_arguments)]
pub fn training_batch(
    ds: &Dataset,
    objective: &GuardedObjective,
    samples: &[Sample],
    max_len: usize,
    to_max_len: bool,
    mask_token: Option<u32>,
    seed: u64,
    epoch: usize,
) -> Result<(Padded, Targets)> {
    let copies = objective.copies();
    let mut examples = Vec::with_capacity(samples.len());
    for &Sample { user: u, copy } in samples {
        let mut rng = user_stream(seed, copies * epoch + copy as usize, u);
        let mut sampler = |rng: &mut Rng| ds.sample_negative(u, rng);
        let mut ctx = ExampleCtx {
            rng: &mut rng,
            num_items: ds.num_items,
            max_len,
            mask_token,
            sampler: &mut sampler,
        };
        examples.push(objective.example(copy as usize, ds.train_seq(u), &mut ctx)?);
    }
    let inputs: Vec<&[u32]> = examples.iter().map(|e| e.input.as_slice()).collect();
    let padded = Padded::new(&inputs, max_len, to_max_len);
    let l = padded.l;
    let mut pos = vec![0u32; padded.b * l];
    let mut neg = vec![0u32; padded.b * l];
    for (r, ex) in examples.iter().enumerate() {
        // Padded keeps the last `kept` tokens, from input position `first`.
        let kept = ex.input.len().min(l);
        let first = ex.input.len() - kept;
        for t in ex.targets.iter().filter(|t| t.position >= first) {
            let k = r * l + (l - kept) + (t.position - first);
            pos[k] = t.item;
            neg[k] = t.negative;
        }
    }
    Ok((padded, Targets { pos, neg }))
}

/// The fixed candidate negatives of a user for sampled evaluation.
pub fn eval_negatives(ds: &Dataset, u: UserIdx, split: Split, n: usize, seed: u64) -> Vec<u32> {
    let tag = match split {
        Split::Valid => 0x0076_616c_6964_u64,
        Split::Test => 0x7465_7374_u64,
    };
    let mut rng = Rng::derive(seed ^ tag, u.index() as u64);
    (0..n).map(|_| ds.sample_negative(u, &mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::{Cloze, NextItem, TrainingObjective};

    /// A dataset of `users` random sequences (lengths 1..=14, repeats
    /// allowed) over `items` items.
    fn dataset(users: usize, items: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed);
        let seqs: Vec<Vec<u32>> = (0..users)
            .map(|_| {
                let n = 1 + rng.below(14) as usize;
                (0..n).map(|_| 1 + rng.below(items as u64) as u32).collect()
            })
            .collect();
        let history = seqs
            .iter()
            .map(|s| {
                let mut h = s.clone();
                h.sort_unstable();
                h.dedup();
                h
            })
            .collect();
        Dataset {
            dir: PathBuf::new(),
            num_users: users,
            num_items: items,
            seqs,
            history,
        }
    }

    fn guarded(objective: impl TrainingObjective + 'static) -> GuardedObjective {
        GuardedObjective::new("test", Box::new(objective)).unwrap()
    }

    // The batching code before objectives came from the backbone (the closed
    // enum `Objective`), kept to show that the built-in objectives give the
    // same batches, draw for draw.

    fn old_training_samples(ds: &Dataset, cloze: bool) -> Vec<(UserIdx, bool)> {
        let users = ds.users();
        if cloze {
            let users: Vec<UserIdx> = users.filter(|&u| !ds.train_seq(u).is_empty()).collect();
            let mut samples: Vec<(UserIdx, bool)> = users.iter().map(|&u| (u, false)).collect();
            samples.extend(users.iter().map(|&u| (u, true)));
            samples
        } else {
            users
                .filter(|&u| ds.train_seq(u).len() >= 2)
                .map(|u| (u, false))
                .collect()
        }
    }

    fn old_next_item_batch(
        ds: &Dataset,
        users: &[UserIdx],
        max_len: usize,
        to_max_len: bool,
        all_positions: bool,
        seed: u64,
        epoch: usize,
    ) -> (Padded, Targets) {
        let inputs: Vec<&[u32]> = users
            .iter()
            .map(|&u| {
                let t = ds.train_seq(u);
                &t[..t.len() - 1]
            })
            .collect();
        let padded = Padded::new(&inputs, max_len, to_max_len);
        let l = padded.l;
        let mut pos = vec![0u32; padded.b * l];
        let mut neg = vec![0u32; padded.b * l];
        for (r, &u) in users.iter().enumerate() {
            let t = ds.train_seq(u);
            let targets = &t[1..];
            let targets = &targets[targets.len().saturating_sub(l)..];
            let mut rng = user_stream(seed, epoch, u);
            let start = if all_positions { 0 } else { targets.len() - 1 };
            for (j, &item) in targets.iter().enumerate().skip(start) {
                let k = r * l + (l - targets.len()) + j;
                pos[k] = item;
                neg[k] = ds.sample_negative(u, &mut rng);
            }
        }
        (padded, Targets { pos, neg })
    }

    #[allow(clippy::too_many_arguments)]
    fn old_cloze_batch(
        ds: &Dataset,
        entries: &[(UserIdx, bool)],
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
            let seq = ds.train_seq(u);
            let mut rng = user_stream(seed, 2 * epoch + last as usize, u);
            let mut tok = seq.to_vec();
            let mut lab = vec![0u32; seq.len()];
            let mut neg = vec![0u32; seq.len()];
            if last {
                let j = seq.len() - 1;
                tok[j] = mask_token;
                lab[j] = seq[j];
                neg[j] = ds.sample_negative(u, &mut rng);
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
                        neg[j] = ds.sample_negative(u, &mut rng);
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

    fn assert_same(a: &(Padded, Targets), b: &(Padded, Targets), what: &str) {
        assert_eq!((a.0.b, a.0.l), (b.0.b, b.0.l), "{what}");
        assert_eq!(a.0.ids, b.0.ids, "{what}");
        assert_eq!(a.0.mask, b.0.mask, "{what}");
        assert_eq!(a.1.pos, b.1.pos, "{what}");
        assert_eq!(a.1.neg, b.1.neg, "{what}");
    }

    #[test]
    fn built_in_objectives_batch_exactly_as_the_closed_enum_did() {
        let ds = dataset(40, 30, 3);
        let seed = 42;
        for (max_len, to_max_len) in [(5, false), (5, true), (20, false), (1, false)] {
            for epoch in [0, 3] {
                for all in [true, false] {
                    let objective = guarded(if all {
                        NextItem::all_positions()
                    } else {
                        NextItem::last_position()
                    });
                    let samples = training_samples(&ds, &objective).unwrap();
                    let old = old_training_samples(&ds, false);
                    assert_eq!(samples.len(), old.len());
                    assert!(samples
                        .iter()
                        .zip(&old)
                        .all(|(a, b)| a.user == b.0 && a.copy == 0));
                    for batch in samples.chunks(7) {
                        let users: Vec<UserIdx> = batch.iter().map(|s| s.user).collect();
                        let new = training_batch(
                            &ds, &objective, batch, max_len, to_max_len, None, seed, epoch,
                        )
                        .unwrap();
                        let old =
                            old_next_item_batch(&ds, &users, max_len, to_max_len, all, seed, epoch);
                        assert_same(&new, &old, &format!("next item {all} {max_len} {epoch}"));
                    }
                }
                let mask_token = ds.num_items as u32 + 1;
                let objective = guarded(Cloze { mask_prob: 0.6 });
                assert!(objective.needs_mask_token());
                let samples = training_samples(&ds, &objective).unwrap();
                let old = old_training_samples(&ds, true);
                assert_eq!(samples.len(), old.len());
                assert!(samples
                    .iter()
                    .zip(&old)
                    .all(|(a, b)| a.user == b.0 && (a.copy == 1) == b.1));
                for (batch, old_batch) in samples.chunks(7).zip(old.chunks(7)) {
                    let new = training_batch(
                        &ds,
                        &objective,
                        batch,
                        max_len,
                        to_max_len,
                        Some(mask_token),
                        seed,
                        epoch,
                    )
                    .unwrap();
                    let old = old_cloze_batch(
                        &ds, old_batch, max_len, to_max_len, mask_token, 0.6, seed, epoch,
                    );
                    assert_same(&new, &old, &format!("cloze {max_len} {epoch}"));
                }
            }
        }
    }

    /// An objective that puts a token out of range is refused with its name.
    struct Broken;

    impl TrainingObjective for Broken {
        fn describe(&self) -> String {
            "broken".into()
        }
        fn qualifies(&self, _train: &[u32]) -> bool {
            true
        }
        fn example(
            &self,
            _copy: usize,
            train: &[u32],
            _ctx: &mut ExampleCtx,
        ) -> llm_esr_runtime::candle::Result<llm_esr_runtime::Example> {
            let mut input = train.to_vec();
            input.push(999);
            Ok(llm_esr_runtime::Example {
                input,
                targets: vec![],
            })
        }
    }

    #[test]
    fn an_invalid_example_is_an_error_naming_the_objective() {
        let ds = dataset(3, 30, 1);
        let objective = guarded(Broken);
        let err = training_batch(
            &ds,
            &objective,
            &[Sample {
                user: UserIdx::new(0),
                copy: 0,
            }],
            5,
            false,
            None,
            1,
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`broken`") && err.contains("input token 999"),
            "{err}"
        );
    }

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
