//! What the model computes for one training step (RecBole's
//! `calculate_loss`): the padded inputs and targets of a shard, as the
//! backbone's objective wants them, and the loss: the ranking BCE plus, for
//! LLM-ESR with distillation, `alpha` times the distillation loss. The trainer
//! sees only [`Prepared`], [`GlobalCounts`] and [`Loss`]; variants, students
//! and teachers are decided here and in [`crate::distill`].

use anyhow::Result;
use llm_esr_runtime::candle::{Tensor, D};
use llm_esr_runtime::{ForwardCtx, Rng};

use crate::config::StudentPass;
pub use crate::data::Sample;
use crate::data::{training_batch, Dataset, Padded, Targets, UserIdx};
use crate::model::{bce_loss, last_position, Recommender};
use crate::trainer::StepModel;

/// The settings of the step that come from the config, fixed at build time.
#[derive(Debug, Clone)]
pub struct StepSettings {
    pub seed: u64,
    pub max_len: usize,
    pub pad_to_max_len: bool,
    /// Weight of the distillation loss.
    pub alpha: f32,
    /// Source of the distillation student.
    pub student: StudentPass,
}

/// A shard of a training batch, ready for [`Recommender::loss`].
pub struct Prepared {
    samples: Vec<Sample>,
    padded: Padded,
    targets: Targets,
}

impl Prepared {
    /// Positions with a ranking target in this shard.
    pub fn targets(&self) -> usize {
        self.targets.count()
    }

    /// Samples in this shard.
    pub fn samples(&self) -> usize {
        self.samples.len()
    }
}

/// Sums over every rank's shard of the global batch: the loss divides by
/// these, so that summing the ranks' gradients gives the gradient of one
/// process on the whole batch.
#[derive(Debug, Clone, Copy)]
pub struct GlobalCounts {
    pub targets: f64,
    pub samples: f64,
}

/// The loss of a shard: ranking plus an optional auxiliary term (already
/// weighted).
pub struct Loss {
    pub ranking: Tensor,
    pub auxiliary: Option<Tensor>,
}

impl Loss {
    pub fn total(self) -> Result<Tensor> {
        Ok(match self.auxiliary {
            Some(aux) => (self.ranking + aux)?,
            None => self.ranking,
        })
    }
}

impl Recommender {
    /// The padded inputs and targets of `shard`, built by the backbone's
    /// objective.
    pub fn prepare(&self, ds: &Dataset, shard: &[Sample], epoch: usize) -> Result<Prepared> {
        let s = &self.settings;
        let (padded, targets) = training_batch(
            ds,
            self.objective(),
            shard,
            s.max_len,
            s.pad_to_max_len,
            self.mask_token,
            s.seed,
            epoch,
        )?;
        Ok(Prepared {
            samples: shard.to_vec(),
            padded,
            targets,
        })
    }

    /// The loss of a prepared shard at global step `step`, normalised by the
    /// global counts.
    pub fn loss(
        &self,
        ds: &Dataset,
        prepared: Prepared,
        global: GlobalCounts,
        step: u64,
    ) -> Result<Loss> {
        let s = &self.settings;
        let Prepared {
            samples,
            padded,
            targets,
        } = prepared;
        let dev = &self.device;
        let (b, l) = (padded.b, padded.l);
        let users: Vec<UserIdx> = samples.iter().map(|s| s.user).collect();
        let teachers = self
            .retrieval()
            .map(|r| crate::distill::Teachers::new(r, ds, &users))
            .transpose()?;
        // The items this step reads: inputs, targets, negatives, teachers' inputs.
        let mut items: Vec<u32> = padded
            .ids
            .iter()
            .chain(&targets.pos)
            .chain(&targets.neg)
            .copied()
            .collect();
        items.extend(teachers.iter().flat_map(|t| t.items()));
        items.sort_unstable();
        items.dedup();
        let ids = Tensor::from_vec(padded.ids, (b, l), dev)?;
        let mask = Tensor::from_vec(padded.mask, (b, l), dev)?;
        let weight: Vec<f32> = targets.pos.iter().map(|&p| (p != 0) as u8 as f32).collect();
        let weight = Tensor::from_vec(weight, b * l, dev)?;
        let pos = Tensor::from_vec(targets.pos, b * l, dev)?;
        let neg = Tensor::from_vec(targets.neg, b * l, dev)?;
        // Dropout keyed by sample: the same masks on any number of ranks.
        let copies = self.objective().copies();
        let rows: Vec<u64> = samples.iter().map(|&s| sample_key(s, copies)).collect();
        let mut rng = Rng::derive(s.seed ^ 0x64726f70, step);
        let mut ctx = ForwardCtx::new(true, &mut rng).with_rows(&rows);
        let tables = self.tables_for(Some(&items))?;
        let states = self.encode(&tables, &ids, &mask, &mut ctx)?;
        let h = states.reshape((b * l, ()))?;
        let logits = |items: &Tensor| -> Result<Tensor> {
            Ok((tables.output.index_select(items, 0)? * &h)?.sum(D::Minus1)?)
        };
        let ranking = bce_loss(
            &logits(&pos)?,
            &logits(&neg)?,
            &weight,
            global.targets.max(1.0),
        )?;
        let (Some(retrieval), Some(teachers)) = (self.retrieval(), teachers) else {
            return Ok(Loss {
                ranking,
                auxiliary: None,
            });
        };
        let teacher = teachers.encode(self, &tables, step)?;
        let student = match s.student {
            StudentPass::Shared => last_position(&states)?,
            StudentPass::Second => {
                let mut rng = Rng::derive(s.seed ^ 0x0073_7475_6465_6e74, step);
                let mut ctx = ForwardCtx::new(true, &mut rng).with_rows(&rows);
                last_position(&self.encode(&tables, &ids, &mask, &mut ctx)?)?
            }
        };
        // MSE is a mean over this shard; weight it by its share of the batch.
        let share = samples.len() as f64 / global.samples;
        let sd = (retrieval.distill_loss(&student, &teacher)? * (share * s.alpha as f64))?;
        Ok(Loss {
            ranking,
            auxiliary: Some(sd),
        })
    }
}

/// A recommender on its dataset: what the generic trainer trains.
pub struct OnDataset<'a> {
    pub model: &'a Recommender,
    pub ds: &'a Dataset,
}

impl StepModel for OnDataset<'_> {
    type Sample = Sample;
    type Prepared = Prepared;

    fn prepare(&self, shard: &[Sample], epoch: usize) -> Result<Prepared> {
        self.model.prepare(self.ds, shard, epoch)
    }

    fn targets(&self, prepared: &Prepared) -> usize {
        prepared.targets()
    }

    fn loss(&self, prepared: Prepared, global: GlobalCounts, step: u64) -> Result<Loss> {
        self.model.loss(self.ds, prepared, global, step)
    }
}

/// The global key of a training sample (user, copy) of an objective with
/// `copies` copies per epoch: `user * max(copies, 2) + copy`, i.e.
/// `2 * user + copy` for the built-in objectives (one or two copies).
fn sample_key(Sample { user, copy }: Sample, copies: usize) -> u64 {
    user.index() as u64 * copies.max(2) as u64 + copy as u64
}
