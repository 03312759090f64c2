//! Training objectives: which inputs a user's training sequence gives and
//! which of their positions carry the ranking loss.
//!
//! A backbone returns its objective from [`crate::Backbone::objective`]; the
//! host asks it which users train and how many copies of each an epoch has,
//! builds every training example of a batch through it, and asks it for the
//! input of a user at evaluation. The host keeps what must not depend on the
//! objective: the random stream of each (user, epoch, copy), negatives that
//! exclude the user's history ([`ExampleCtx::negative`]), left padding and
//! truncation to the last `max_len` tokens, the loss.
//!
//! Built in, for plugins to reuse: [`NextItem`] (next-item prediction at every
//! position, SASRec, or at the last position only, GRU4Rec) and [`Cloze`]
//! (masked items, BERT4Rec). What is not here: batching and padding (the
//! host's), and the loss itself (one sampled negative per target, BCE).

use candle_core::Result;

use crate::Rng;

/// One ranking target of an [`Example`]: the encoder output at `position` of
/// the input should score `item` above `negative`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index into [`Example::input`] (0 = its oldest token).
    pub position: usize,
    /// The item to predict there, in `1..=num_items`.
    pub item: u32,
    /// Its sampled negative, in `1..=num_items`.
    pub negative: u32,
}

/// One training copy of a user: the input tokens, oldest first and not
/// padded, and the targets on them (at most one per position).
///
/// The host left-pads the input and keeps its last `max_len` tokens (fewer
/// when the batch is shorter); targets whose position falls before the kept
/// part are dropped. Tokens are item ids in `1..=num_items`, or the mask
/// token when the objective asked for one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Example {
    pub input: Vec<u32>,
    pub targets: Vec<Target>,
}

/// What the host hands an objective to build one example: the copy's random
/// stream, the sizes, and the negative sampler.
pub struct ExampleCtx<'a> {
    /// The stream of this (user, epoch, copy): the same draws on every rank
    /// and in every batch the copy lands in. The only randomness to use.
    pub rng: &'a mut Rng,
    /// Item ids run `1..=num_items`.
    pub num_items: usize,
    /// The longest input the backbone takes (`data.max_len`).
    pub max_len: usize,
    /// The mask token's id, when [`TrainingObjective::needs_mask_token`].
    pub mask_token: Option<u32>,
    /// The host's sampler: an item the user never interacted with, drawn
    /// from the stream it is given.
    pub sampler: &'a mut dyn FnMut(&mut Rng) -> u32,
}

impl ExampleCtx<'_> {
    /// A negative for this user, drawn from [`ExampleCtx::rng`].
    pub fn negative(&mut self) -> u32 {
        (self.sampler)(&mut *self.rng)
    }

    /// A uniform item in `1..=num_items` (the user's own items included),
    /// drawn from [`ExampleCtx::rng`].
    pub fn random_item(&mut self) -> u32 {
        1 + self.rng.below(self.num_items as u64) as u32
    }

    /// The mask token, or an error naming `objective` when the host gave none.
    pub fn mask_token(&self, objective: &str) -> Result<u32> {
        self.mask_token.ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "objective `{objective}` needs a mask token but the host gave none"
            ))
        })
    }
}

/// How a backbone is trained: the open replacement of a fixed list of
/// objectives. Implementations keep no state between calls (the host may
/// call them from any rank, in any order) and draw randomness only from
/// [`ExampleCtx::rng`].
pub trait TrainingObjective: Send + Sync {
    /// A few words for logs and errors, e.g. `cloze (mask_prob 0.6)`.
    fn describe(&self) -> String;

    /// Training copies of each user per epoch (at least 1). Epoch `e`, copy
    /// `c` of user `u` draws from the stream `(seed, copies * e + c, u)`.
    /// The epoch's samples are copy 0 of every qualifying user in user
    /// order, then copy 1 of each, and so on, before shuffling.
    fn copies(&self) -> usize {
        1
    }

    /// Whether a user with this training sequence (oldest first) trains.
    fn qualifies(&self, train: &[u32]) -> bool;

    /// Copy `copy` (in `0..copies()`) of a user with training sequence
    /// `train` (oldest first, as long as it is: truncation to `max_len` is
    /// the objective's to respect when it matters for its draws).
    fn example(&self, copy: usize, train: &[u32], ctx: &mut ExampleCtx) -> Result<Example>;

    /// Whether the item tables need a row for a mask token (`num_items + 1`).
    fn needs_mask_token(&self) -> bool {
        false
    }

    /// The input that predicts the item after `history` (evaluation and
    /// `recommend`); the host scores the encoder output at its last position.
    /// Default: the history itself.
    fn inference_input(&self, history: &[u32], _mask_token: Option<u32>) -> Result<Vec<u32>> {
        Ok(history.to_vec())
    }
}

/// Next-item prediction: input `train[:-1]`, target `train[i + 1]` at
/// position `i`, at every position (SASRec) or at the last one only
/// (GRU4Rec). One negative per target, drawn in position order; only the
/// positions the host keeps (the last `max_len`) draw one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextItem {
    /// Every position (true) or the last one only.
    pub all_positions: bool,
}

impl NextItem {
    /// Targets at every position (SASRec).
    pub fn all_positions() -> Self {
        NextItem {
            all_positions: true,
        }
    }

    /// A target at the last position only (GRU4Rec).
    pub fn last_position() -> Self {
        NextItem {
            all_positions: false,
        }
    }
}

impl TrainingObjective for NextItem {
    fn describe(&self) -> String {
        if self.all_positions {
            "next item at every position".into()
        } else {
            "next item at the last position".into()
        }
    }

    /// At least one input item and one target.
    fn qualifies(&self, train: &[u32]) -> bool {
        train.len() >= 2
    }

    fn example(&self, _copy: usize, train: &[u32], ctx: &mut ExampleCtx) -> Result<Example> {
        if train.len() < 2 {
            candle_core::bail!(
                "{}: a training sequence of {} items has no target",
                self.describe(),
                train.len()
            );
        }
        let n = train.len() - 1;
        let kept = n.min(ctx.max_len);
        let first = if self.all_positions { n - kept } else { n - 1 };
        let mut targets = Vec::with_capacity(n - first);
        for position in first..n {
            targets.push(Target {
                position,
                item: train[position + 1],
                negative: ctx.negative(),
            });
        }
        Ok(Example {
            input: train[..n].to_vec(),
            targets,
        })
    }
}

/// The cloze task of the official BERT4Rec: every user twice per epoch.
/// Copy 0 masks each training item with probability `mask_prob` (of those,
/// 80% become the mask token, 10% a random item, 10% stay; all are
/// predicted); copy 1 masks the last item only. Per position of copy 0 the
/// draws are: `r`, then a random item when `0.8 <= r / mask_prob < 0.9`, then
/// the negative. Every position draws, also those the host then truncates.
/// At inference the mask token is appended to the history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cloze {
    pub mask_prob: f32,
}

impl TrainingObjective for Cloze {
    fn describe(&self) -> String {
        format!("cloze (mask_prob {})", self.mask_prob)
    }

    fn copies(&self) -> usize {
        2
    }

    /// At least one training item.
    fn qualifies(&self, train: &[u32]) -> bool {
        !train.is_empty()
    }

    fn example(&self, copy: usize, train: &[u32], ctx: &mut ExampleCtx) -> Result<Example> {
        let mask_token = ctx.mask_token("cloze")?;
        let mut input = train.to_vec();
        let mut targets = Vec::new();
        if copy == 1 {
            let Some(position) = train.len().checked_sub(1) else {
                candle_core::bail!("cloze: an empty training sequence has no item to mask");
            };
            input[position] = mask_token;
            targets.push(Target {
                position,
                item: train[position],
                negative: ctx.negative(),
            });
        } else {
            let p = self.mask_prob as f64;
            for (position, &item) in train.iter().enumerate() {
                let r = ctx.rng.next_f64();
                if r < p {
                    let r = r / p;
                    input[position] = if r < 0.8 {
                        mask_token
                    } else if r < 0.9 {
                        ctx.random_item()
                    } else {
                        item
                    };
                    targets.push(Target {
                        position,
                        item,
                        negative: ctx.negative(),
                    });
                }
            }
        }
        Ok(Example { input, targets })
    }

    fn needs_mask_token(&self) -> bool {
        true
    }

    fn inference_input(&self, history: &[u32], mask_token: Option<u32>) -> Result<Vec<u32>> {
        let Some(m) = mask_token else {
            candle_core::bail!("cloze: the host gave no mask token");
        };
        Ok(history.iter().copied().chain([m]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items 1..=20; the user's history is {1, 2, 3}.
    fn sampler(rng: &mut Rng) -> u32 {
        loop {
            let it = 1 + rng.below(20) as u32;
            if it > 3 {
                return it;
            }
        }
    }

    fn build(
        objective: &dyn TrainingObjective,
        copy: usize,
        train: &[u32],
        max_len: usize,
        seed: u64,
    ) -> Example {
        let mut rng = Rng::new(seed);
        let mut sample = sampler;
        let mut ctx = ExampleCtx {
            rng: &mut rng,
            num_items: 20,
            max_len,
            mask_token: Some(21),
            sampler: &mut sample,
        };
        objective.example(copy, train, &mut ctx).unwrap()
    }

    #[test]
    fn next_item_targets_the_following_item_with_one_negative_each_in_order() {
        let train = [1u32, 2, 3, 1, 2];
        let ex = build(&NextItem::all_positions(), 0, &train, 10, 4);
        assert_eq!(ex.input, vec![1, 2, 3, 1]);
        let mut rng = Rng::new(4);
        let want: Vec<Target> = (0..4)
            .map(|position| Target {
                position,
                item: train[position + 1],
                negative: sampler(&mut rng),
            })
            .collect();
        assert_eq!(ex.targets, want);
        // Beyond max_len nothing is drawn: the last 2 positions get the
        // first 2 draws.
        let ex = build(&NextItem::all_positions(), 0, &train, 2, 4);
        assert_eq!(ex.targets.len(), 2);
        assert_eq!((ex.targets[0].position, ex.targets[0].item), (2, 1));
        assert_eq!(ex.targets[0].negative, want[0].negative);
        assert_eq!(ex.targets[1].negative, want[1].negative);
        let last = build(&NextItem::last_position(), 0, &train, 10, 4);
        assert_eq!(last.input, vec![1, 2, 3, 1]);
        assert_eq!(
            last.targets,
            vec![Target {
                position: 3,
                item: 2,
                negative: want[0].negative
            }]
        );
        assert!(!NextItem::all_positions().qualifies(&[1]));
        assert!(NextItem::last_position().qualifies(&[1, 2]));
    }

    #[test]
    fn cloze_draws_r_then_a_random_item_then_a_negative_per_position() {
        let train = [1u32, 2, 3, 1, 2, 3, 1, 2];
        let cloze = Cloze { mask_prob: 0.6 };
        let ex = build(&cloze, 0, &train, 4, 9);
        // The same draws by hand.
        let mut rng = Rng::new(9);
        let mut input = train.to_vec();
        let mut targets = Vec::new();
        for (j, &s) in train.iter().enumerate() {
            let r = rng.next_f64();
            if r < 0.6f32 as f64 {
                let r = r / 0.6f32 as f64;
                input[j] = if r < 0.8 {
                    21
                } else if r < 0.9 {
                    1 + rng.below(20) as u32
                } else {
                    s
                };
                targets.push(Target {
                    position: j,
                    item: s,
                    negative: sampler(&mut rng),
                });
            }
        }
        assert_eq!(ex, Example { input, targets });
        let last = build(&cloze, 1, &train, 4, 9);
        let mut rng = Rng::new(9);
        assert_eq!(last.input, [1, 2, 3, 1, 2, 3, 1, 21]);
        assert_eq!(
            last.targets,
            vec![Target {
                position: 7,
                item: 2,
                negative: sampler(&mut rng)
            }]
        );
        assert_eq!(cloze.copies(), 2);
        assert!(cloze.needs_mask_token());
        assert_eq!(
            cloze.inference_input(&[4, 5], Some(21)).unwrap(),
            vec![4, 5, 21]
        );
        assert!(cloze.inference_input(&[4, 5], None).is_err());
        assert_eq!(
            NextItem::all_positions()
                .inference_input(&[4, 5], None)
                .unwrap(),
            vec![4, 5]
        );
    }
}
