//! The generic training loop (RecBole's trainer, Horovod's wrapped
//! optimizer): for each global batch, this rank's shard -> the model's loss ->
//! backward -> the data-parallel sum -> one Adam step. It knows nothing of
//! methods, views or distillation: a model is anything that implements
//! [`StepModel`].

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{Tensor, Var};
use llm_esr_runtime::Rng;
use tracing::warn;

use crate::config::{Config, NanPolicy};
use crate::flat;
use crate::optim::Adam;
use crate::parallel::DataParallel;
use crate::progress::Progress;
use crate::step::{GlobalCounts, Loss};

/// What the trainer asks of a model: RecBole's `calculate_loss`, split so that
/// the global number of targets is known before the loss is normalised.
pub trait StepModel {
    /// One training example (a user and a copy, for the recommenders).
    type Sample: Clone;
    /// A shard turned into the model's inputs and targets.
    type Prepared;

    /// The inputs and targets of this rank's shard of a batch of `epoch`.
    fn prepare(&self, shard: &[Self::Sample], epoch: usize) -> Result<Self::Prepared>;
    /// Number of targets in a prepared shard (the loss's normaliser).
    fn targets(&self, prepared: &Self::Prepared) -> usize;
    /// The loss of a prepared shard at global step `step`, divided by the
    /// global counts so that the ranks' gradients sum to the whole batch's.
    fn loss(&self, prepared: Self::Prepared, global: GlobalCounts, step: u64) -> Result<Loss>;
}

/// The config keys the loop reads.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub seed: u64,
    pub batch_size: usize,
    /// Stop after this many global steps (0: no limit).
    pub max_steps: u64,
    pub nan_policy: NanPolicy,
    /// For the advice of the divergence message.
    pub lr: f64,
}

impl TrainSettings {
    pub fn from_config(cfg: &Config) -> Self {
        TrainSettings {
            seed: cfg.seed,
            batch_size: cfg.train.batch_size,
            max_steps: cfg.train.max_steps as u64,
            nan_policy: cfg.train.nan_policy,
            lr: cfg.train.lr,
        }
    }
}

/// What one training step did.
pub enum StepOutcome {
    /// The update was applied; the global batch loss.
    Applied(f64),
    /// The loss or a gradient was not finite (described); nothing was applied.
    NonFinite(String),
}

/// What one epoch did.
#[derive(Debug, Clone, Copy)]
pub struct EpochStats {
    /// Mean global batch loss of the applied steps.
    pub loss: f64,
    /// Steps skipped under `train.nan_policy: skip_step`.
    pub skipped: u64,
}

pub struct Trainer<'a> {
    dp: DataParallel<'a>,
    /// Named parameters, in the order of the flat gradient.
    vars: Vec<(String, Var)>,
    plain: Vec<Var>,
    settings: TrainSettings,
}

impl<'a> Trainer<'a> {
    pub fn new(dp: DataParallel<'a>, vars: Vec<(String, Var)>, settings: TrainSettings) -> Self {
        let plain = vars.iter().map(|(_, v)| v.clone()).collect();
        Trainer {
            dp,
            vars,
            plain,
            settings,
        }
    }

    pub fn dp(&self) -> DataParallel<'a> {
        self.dp
    }

    /// The trained parameters, in flat-gradient order.
    pub fn vars(&self) -> &[Var] {
        &self.plain
    }

    /// One pass over `samples` shuffled by the epoch's seed, in global
    /// batches of `batch_size`; `step` counts global steps. A non-finite step
    /// stops training (`nan_policy: error`) or is skipped (`skip_step`).
    pub fn epoch<M: StepModel>(
        &self,
        model: &M,
        samples: &[M::Sample],
        epoch: usize,
        adam: &mut Adam,
        step: &mut u64,
    ) -> Result<EpochStats> {
        let s = &self.settings;
        let mut order = samples.to_vec();
        Rng::derive(s.seed, epoch as u64).shuffle(&mut order);
        let steps = samples.len().div_ceil(s.batch_size);
        let progress = Progress::new(
            self.dp.is_root(),
            steps as u64,
            &format!("epoch {}", epoch + 1),
        );
        let (mut loss_sum, mut applied, mut skipped) = (0f64, 0usize, 0u64);
        let mut last_problem = String::new();
        for (k, batch) in order.chunks(s.batch_size).enumerate() {
            let shard = self.dp.shard(batch);
            match self.step(model, &shard, epoch, *step, adam)? {
                StepOutcome::Applied(loss) => {
                    loss_sum += loss;
                    applied += 1;
                    progress.inc(loss);
                }
                StepOutcome::NonFinite(problem) => {
                    let at = format!(
                        "epoch {}, step {} of {steps} (global step {})",
                        epoch + 1,
                        k + 1,
                        *step + 1
                    );
                    if s.nan_policy == NanPolicy::Error {
                        bail!(
                            "training diverged at {at}: {problem}. Nothing of this epoch was \
                             saved and no results.json was written; lower `train.lr` (now {}), \
                             check the inputs, or set `train.nan_policy: skip_step` to skip such \
                             steps",
                            s.lr
                        );
                    }
                    warn!("skipping the update of {at}: {problem}");
                    skipped += 1;
                    last_problem = problem;
                    progress.inc(f64::NAN);
                }
            }
            *step += 1;
            if s.max_steps > 0 && *step >= s.max_steps {
                break;
            }
        }
        progress.finish();
        if applied == 0 && skipped > 0 {
            bail!(
                "training diverged: every step of epoch {} was skipped ({skipped} steps; the last: \
                 {last_problem}); the parameters cannot recover, lower `train.lr` (now {}) or \
                 check the inputs",
                epoch + 1,
                s.lr
            );
        }
        Ok(EpochStats {
            loss: loss_sum / applied.max(1) as f64,
            skipped,
        })
    }

    /// Forward, backward, all-reduce, update of this rank's `shard` (possibly
    /// empty: the rank still joins the collectives).
    pub fn step<M: StepModel>(
        &self,
        model: &M,
        shard: &[M::Sample],
        epoch: usize,
        step: u64,
        adam: &mut Adam,
    ) -> Result<StepOutcome> {
        let prepared = (!shard.is_empty())
            .then(|| model.prepare(shard, epoch))
            .transpose()?;
        let mut counts = [
            prepared.as_ref().map_or(0, |p| model.targets(p)) as f64,
            shard.len() as f64,
        ];
        self.dp.sum(&mut counts)?;
        let global = GlobalCounts {
            targets: counts[0],
            samples: counts[1],
        };
        let (loss, grads) = match prepared {
            None => (0.0, None),
            Some(prepared) => {
                let loss = model.loss(prepared, global, step)?.total()?;
                (loss.to_scalar::<f32>()? as f64, Some(loss.backward()?))
            }
        };
        let (loss, grad) = self.dp.reduce(loss, grads.as_ref(), &self.plain)?;
        // Every rank holds the same reduced values, so all decide alike.
        if let Some(problem) = self.non_finite(loss, &grad)? {
            return Ok(StepOutcome::NonFinite(problem));
        }
        adam.step(&self.plain, &grad)?;
        Ok(StepOutcome::Applied(loss))
    }

    /// Describes a non-finite loss or the first non-finite entry of the
    /// reduced gradient, naming its parameter; `None` when all are finite.
    fn non_finite(&self, loss: f64, grad: &Tensor) -> Result<Option<String>> {
        if !loss.is_finite() {
            return Ok(Some(format!("the loss is {loss}")));
        }
        let Some((i, value)) = flat::first_non_finite(grad)? else {
            return Ok(None);
        };
        let mut offset = 0;
        for (name, var) in &self.vars {
            if i < offset + var.elem_count() {
                return Ok(Some(format!(
                    "the gradient of parameter `{name}` is {value} (entry {})",
                    i - offset
                )));
            }
            offset += var.elem_count();
        }
        Ok(Some(format!("gradient entry {i} is {value}")))
    }
}

#[cfg(test)]
mod tests {
    //! The loop on a small in-process model: least squares `y = x . w`,
    //! one target per sample.
    use llm_esr_comm::{Communicator, SingleProcess};
    use llm_esr_runtime::candle::{Device, D};

    use super::*;
    use crate::testing::on_ranks;

    const TRUE_W: [f32; 3] = [0.5, -1.0, 2.0];

    struct LeastSquares {
        w: Var,
        xs: Vec<[f32; 3]>,
        /// The loss of this global step is NaN.
        poison: Option<u64>,
    }

    impl LeastSquares {
        fn new(n: usize, poison: Option<u64>) -> Self {
            let xs = (0..n)
                .map(|i| {
                    let t = i as f32;
                    [(t * 0.7).sin(), (t * 1.3).cos(), (t * 0.3).sin() + 0.5]
                })
                .collect();
            let w = Var::from_tensor(
                &Tensor::zeros(3, llm_esr_runtime::candle::DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
            LeastSquares { w, xs, poison }
        }

        fn y(x: &[f32; 3]) -> f32 {
            x.iter().zip(TRUE_W).map(|(a, b)| a * b).sum()
        }
    }

    impl StepModel for LeastSquares {
        type Sample = usize;
        type Prepared = (Tensor, Tensor);

        fn prepare(&self, shard: &[usize], _epoch: usize) -> Result<(Tensor, Tensor)> {
            let x: Vec<f32> = shard.iter().flat_map(|&i| self.xs[i]).collect();
            let y: Vec<f32> = shard.iter().map(|&i| Self::y(&self.xs[i])).collect();
            Ok((
                Tensor::from_vec(x, (shard.len(), 3), &Device::Cpu)?,
                Tensor::from_vec(y, shard.len(), &Device::Cpu)?,
            ))
        }

        fn targets(&self, prepared: &(Tensor, Tensor)) -> usize {
            prepared.1.elem_count()
        }

        fn loss(&self, (x, y): (Tensor, Tensor), global: GlobalCounts, step: u64) -> Result<Loss> {
            let pred = x
                .broadcast_mul(&self.w.as_tensor().unsqueeze(0)?)?
                .sum(D::Minus1)?;
            let mut ranking = ((pred - y)?.sqr()?.sum_all()? / global.targets)?;
            if self.poison == Some(step) {
                ranking = (ranking * f64::NAN)?;
            }
            Ok(Loss {
                ranking,
                auxiliary: None,
            })
        }
    }

    fn settings(nan_policy: NanPolicy, max_steps: u64) -> TrainSettings {
        TrainSettings {
            seed: 7,
            batch_size: 4,
            max_steps,
            nan_policy,
            lr: 0.05,
        }
    }

    /// Trains `epochs` epochs on `comm`; the parameters, the epoch stats and
    /// the global step count, or the error.
    fn train(
        comm: &dyn Communicator,
        model: &LeastSquares,
        settings: TrainSettings,
        epochs: usize,
    ) -> Result<(Vec<f32>, Vec<EpochStats>, u64)> {
        let trainer = Trainer::new(
            DataParallel::new(comm),
            vec![("w".into(), model.w.clone())],
            settings.clone(),
        );
        let mut adam = Adam::new(trainer.vars(), settings.lr, [0.9, 0.999], 1e-8, 0.0)?;
        let samples: Vec<usize> = (0..model.xs.len()).collect();
        let (mut stats, mut step) = (vec![], 0);
        for epoch in 0..epochs {
            stats.push(trainer.epoch(model, &samples, epoch, &mut adam, &mut step)?);
            if settings.max_steps > 0 && step >= settings.max_steps {
                break;
            }
        }
        Ok((model.w.as_tensor().to_vec1()?, stats, step))
    }

    #[test]
    fn learns_the_least_squares_solution() -> Result<()> {
        let model = LeastSquares::new(9, None);
        let (w, stats, step) = train(&SingleProcess, &model, settings(NanPolicy::Error, 0), 150)?;
        assert_eq!(step, 150 * 3, "9 samples in batches of 4: 3 steps an epoch");
        for (got, want) in w.iter().zip(TRUE_W) {
            assert!((got - want).abs() < 2e-2, "w = {w:?}, want {TRUE_W:?}");
        }
        assert!(
            stats[149].loss < 1e-2 * stats[0].loss,
            "{:?}",
            (stats[0], stats[149])
        );
        Ok(())
    }

    /// 9 samples in batches of 4: the last batch has one sample, so rank 1
    /// takes an empty shard and still joins the collectives.
    #[test]
    fn two_ranks_train_like_one_process() -> Result<()> {
        let (one, ..) = train(
            &SingleProcess,
            &LeastSquares::new(9, None),
            settings(NanPolicy::Error, 0),
            5,
        )?;
        let two = on_ranks(2, |comm| {
            let model = LeastSquares::new(9, None);
            train(comm, &model, settings(NanPolicy::Error, 0), 5)
                .unwrap()
                .0
        });
        for w in two {
            for (a, b) in w.iter().zip(&one) {
                assert!((a - b).abs() < 1e-6, "{w:?} vs {one:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_non_finite_step_stops_training_by_default() {
        let model = LeastSquares::new(9, Some(4));
        let err = train(&SingleProcess, &model, settings(NanPolicy::Error, 0), 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "training diverged at epoch 2, step 2 of 3 (global step 5): the loss is NaN"
            ),
            "{err}"
        );
    }

    #[test]
    fn skip_step_skips_only_the_bad_update() -> Result<()> {
        let model = LeastSquares::new(9, Some(4));
        let (w, stats, step) = train(&SingleProcess, &model, settings(NanPolicy::SkipStep, 0), 3)?;
        let skipped: Vec<u64> = stats.iter().map(|s| s.skipped).collect();
        assert_eq!(skipped, [0, 1, 0]);
        assert_eq!(step, 9);
        assert!(w.iter().all(|x| x.is_finite()) && stats.iter().all(|s| s.loss.is_finite()));
        Ok(())
    }

    #[test]
    fn max_steps_stops_inside_an_epoch() -> Result<()> {
        let model = LeastSquares::new(9, None);
        let (_, stats, step) = train(&SingleProcess, &model, settings(NanPolicy::Error, 5), 10)?;
        assert_eq!((step, stats.len()), (5, 2));
        Ok(())
    }

    /// The parameter named in the message is the one whose gradient is bad.
    #[test]
    fn a_non_finite_gradient_names_its_parameter() -> Result<()> {
        let trainer = Trainer::new(
            DataParallel::new(&SingleProcess),
            vec![
                ("a".into(), Var::new(&[1f32, 2.0], &Device::Cpu)?),
                ("b".into(), Var::new(&[3f32], &Device::Cpu)?),
            ],
            settings(NanPolicy::Error, 0),
        );
        let grad = Tensor::new(&[0f32, 1.0, f32::INFINITY], &Device::Cpu)?;
        assert_eq!(
            trainer.non_finite(1.0, &grad)?.as_deref(),
            Some("the gradient of parameter `b` is inf (entry 0)")
        );
        assert_eq!(trainer.non_finite(1.0, &grad.zeros_like()?)?, None);
        Ok(())
    }
}
