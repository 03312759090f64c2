//! Data parallelism in the spirit of Horovod's `DistributedOptimizer`: the
//! only code that talks to the communicator while training. It shards each
//! global batch (every rank takes items r, r + N, r + 2N, ... of the same
//! ordered list), starts every rank from rank 0's parameters, sums the
//! normalisers and the gradients (one flat f32 buffer per step) over ranks,
//! and checks after each epoch that the ranks still agree. With one rank
//! every collective is a no-op.

use anyhow::{bail, Context, Result};
use llm_esr_comm::Communicator;
use llm_esr_runtime::candle::{backprop::GradStore, Var};

use crate::optim::{assign_values, flatten_grads, flatten_values};

/// This rank's shard of `items`.
pub fn shard<T: Clone>(items: &[T], comm: &dyn Communicator) -> Vec<T> {
    items
        .iter()
        .skip(comm.rank())
        .step_by(comm.size())
        .cloned()
        .collect()
}

pub struct DataParallel<'a> {
    comm: &'a dyn Communicator,
}

impl<'a> DataParallel<'a> {
    pub fn new(comm: &'a dyn Communicator) -> Self {
        DataParallel { comm }
    }

    pub fn comm(&self) -> &'a dyn Communicator {
        self.comm
    }

    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// This rank's shard of `items`.
    pub fn shard<T: Clone>(&self, items: &[T]) -> Vec<T> {
        shard(items, self.comm)
    }

    /// Every rank takes rank 0's parameters.
    pub fn broadcast_parameters(&self, vars: &[Var]) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut flat = flatten_values(vars)?;
        self.comm.broadcast(&mut flat, 0)?;
        assign_values(vars, &flat)
    }

    /// Sums per-shard counts over the ranks (the loss normalisers).
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.comm.all_reduce_sum_f64(values)?;
        Ok(())
    }

    /// The summed loss and the summed gradient of `vars` as one flat buffer
    /// (zeros where a variable got none, or where this rank had no shard).
    pub fn reduce(
        &self,
        loss: f64,
        grads: Option<&GradStore>,
        vars: &[Var],
        len: usize,
    ) -> Result<(f64, Vec<f32>)> {
        let mut grad = match grads {
            Some(g) => flatten_grads(vars, g)?,
            None => vec![0f32; len],
        };
        let mut loss = [loss];
        self.comm.all_reduce_sum(&mut grad)?;
        self.comm.all_reduce_sum_f64(&mut loss)?;
        Ok((loss[0], grad))
    }

    /// Ranks must hold identical parameters; a cheap checksum tells.
    pub fn check_replicas(&self, vars: &[Var]) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let local: f64 = flatten_values(vars)?.iter().map(|&x| x as f64).sum();
        let mut bytes = local.to_le_bytes().to_vec();
        self.comm.broadcast_bytes(&mut bytes, 0)?;
        let root = f64::from_le_bytes(bytes[..8].try_into().context("checksum broadcast")?);
        if (root - local).abs() > 1e-3 * (1.0 + local.abs()) {
            bail!(
                "rank {} parameters diverged from rank 0 (checksum {local} vs {root}): ranks \
                 must run the same build and config",
                self.comm.rank()
            );
        }
        Ok(())
    }

    pub fn barrier(&self) -> Result<()> {
        self.comm.barrier()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier, Mutex};

    use llm_esr_comm::{CommError, CommErrorKind};
    use llm_esr_runtime::candle::{Device, Tensor};

    use super::*;

    /// N ranks emulated by threads: each collective meets at a barrier and
    /// reads the others' buffers from shared slots.
    struct ThreadComm {
        rank: usize,
        size: usize,
        slots: Arc<Mutex<Vec<Vec<f64>>>>,
        barrier: Arc<Barrier>,
    }

    impl ThreadComm {
        fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
            self.slots.lock().unwrap()[self.rank] = mine;
            self.barrier.wait();
            let all = self.slots.lock().unwrap().clone();
            self.barrier.wait();
            all
        }

        fn sum(&self, buf: &[f64]) -> Vec<f64> {
            let all = self.exchange(buf.to_vec());
            (0..buf.len())
                .map(|i| all.iter().map(|b| b[i]).sum())
                .collect()
        }
    }

    impl Communicator for ThreadComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn local_rank(&self) -> usize {
            self.rank
        }
        fn backend(&self) -> &'static str {
            "threads"
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
            let wide: Vec<f64> = buf.iter().map(|&x| x as f64).collect();
            for (b, s) in buf.iter_mut().zip(self.sum(&wide)) {
                *b = s as f32;
            }
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
            buf.copy_from_slice(&self.sum(buf));
            Ok(())
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
            let all = self.exchange(buf.iter().map(|&x| x as f64).collect());
            for (b, &r) in buf.iter_mut().zip(&all[root]) {
                *b = r as f32;
            }
            Ok(())
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
            let all = self.exchange(buf.iter().map(|&x| x as f64).collect());
            *buf = all[root].iter().map(|&x| x as u8).collect();
            Ok(())
        }
        fn barrier(&self) -> Result<(), CommError> {
            self.barrier.wait();
            Ok(())
        }
        fn split(&self, _: u32, _: u32) -> Result<Box<dyn Communicator>, CommError> {
            Err(CommError::new(CommErrorKind::Unavailable, "not emulated"))
        }
    }

    /// Runs `f(comm)` on `size` emulated ranks and returns their results.
    fn on_ranks<T: Send + 'static>(
        size: usize,
        f: impl Fn(&dyn Communicator) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
        let barrier = Arc::new(Barrier::new(size));
        let f = Arc::new(f);
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let comm = ThreadComm {
                    rank,
                    size,
                    slots: slots.clone(),
                    barrier: barrier.clone(),
                };
                let f = f.clone();
                std::thread::spawn(move || f(&comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn shards_partition_the_batch() {
        let shards = on_ranks(3, |comm| {
            DataParallel::new(comm).shard(&[1, 2, 3, 4, 5, 6, 7])
        });
        assert_eq!(shards, vec![vec![1, 4, 7], vec![2, 5], vec![3, 6]]);
    }

    #[test]
    fn every_rank_starts_from_rank_0_and_agrees() {
        let params = on_ranks(2, |comm| {
            let dp = DataParallel::new(comm);
            let rank = comm.rank() as f32;
            let vars = [var(&[rank, 1.0 + rank]), var(&[10.0 * rank])];
            dp.broadcast_parameters(&vars).unwrap();
            dp.check_replicas(&vars).unwrap();
            vars.iter()
                .map(|v| v.as_tensor().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(params[0], vec![vec![0.0, 1.0], vec![0.0]]);
        assert_eq!(params[0], params[1]);
    }

    #[test]
    fn diverged_replicas_are_an_error() {
        let errors = on_ranks(2, |comm| {
            let vars = [var(&[comm.rank() as f32 * 5.0])];
            DataParallel::new(comm).check_replicas(&vars).is_err()
        });
        assert_eq!(errors, vec![false, true]);
    }

    /// The gradient of every variable, flattened into one buffer and summed
    /// over ranks; a rank without a shard contributes zeros, and a variable
    /// without a gradient gets zeros.
    #[test]
    fn gradients_are_summed_as_one_flat_buffer() {
        let reduced = on_ranks(2, |comm| {
            let dp = DataParallel::new(comm);
            let (a, b, unused) = (var(&[1.0, 2.0]), var(&[3.0]), var(&[7.0]));
            let vars = [a.clone(), unused, b.clone()];
            if comm.rank() == 1 {
                return dp.reduce(0.0, None, &vars, 4).unwrap();
            }
            // loss = 2 * sum(a) + b^2: gradients [2, 2] and [6].
            let loss = ((a.as_tensor().sum_all().unwrap() * 2.0).unwrap()
                + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            dp.reduce(1.5, Some(&grads), &vars, 4).unwrap()
        });
        for (loss, grad) in reduced {
            assert_eq!(loss, 1.5);
            assert_eq!(grad, vec![2.0, 2.0, 0.0, 6.0]);
        }
    }
}
