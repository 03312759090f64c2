//! Data parallelism in the spirit of Horovod's `DistributedOptimizer`: the
//! only code that talks to the communicator while training. It shards each
//! global batch (every rank takes items r, r + N, r + 2N, ... of the same
//! ordered list), starts every rank from rank 0's parameters, sums the
//! normalisers and the gradients (one flat f32 tensor per step, reduced in
//! place on the parameters' device) over ranks, and checks after each epoch
//! that the ranks still agree. With one rank every collective is a no-op.

use anyhow::{bail, Context, Result};
use llm_esr_comm::Communicator;
use llm_esr_runtime::candle::{
    self, backprop::GradStore, CpuStorage, InplaceOp1, Layout, Tensor, Var,
};

use crate::flat;

/// This rank's shard of `items`.
pub fn shard<T: Clone>(items: &[T], comm: &dyn Communicator) -> Vec<T> {
    items
        .iter()
        .skip(comm.rank())
        .step_by(comm.size())
        .cloned()
        .collect()
}

#[derive(Clone, Copy)]
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
        let mut values = flat::values(vars)?;
        self.comm.broadcast(&mut values, 0)?;
        flat::assign_values(vars, &values)
    }

    /// Sums per-shard counts over the ranks (the loss normalisers).
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.comm.all_reduce_sum_f64(values)?;
        Ok(())
    }

    /// The summed loss and the summed gradient of `vars` as one flat tensor
    /// on their device (zeros where a variable got none, or where this rank
    /// had no shard, `grads` = `None`).
    pub fn reduce(
        &self,
        loss: f64,
        grads: Option<&GradStore>,
        vars: &[Var],
    ) -> Result<(f64, Tensor)> {
        let grad = flat::gradient(vars, grads)?;
        let mut loss = [loss];
        if self.comm.size() == 1 {
            return Ok((loss[0], grad));
        }
        let grad = self.all_reduce(grad)?;
        self.comm.all_reduce_sum_f64(&mut loss)?;
        Ok((loss[0], grad))
    }

    /// Sums a flat f32 tensor over the ranks: in place on the CPU and, with
    /// NCCL, on the GPU; through a host copy for a GPU tensor on an MPI
    /// communicator.
    fn all_reduce(&self, grad: Tensor) -> Result<Tensor> {
        if grad.device().is_cpu() || device_reduce(self.comm) {
            grad.inplace_op1(&AllReduceSum { comm: self.comm })?;
            return Ok(grad);
        }
        let mut host = grad.to_vec1::<f32>()?;
        self.comm.all_reduce_sum(&mut host)?;
        Ok(Tensor::from_vec(host, grad.elem_count(), grad.device())?)
    }

    /// Ranks must hold identical parameters; a cheap checksum tells.
    pub fn check_replicas(&self, vars: &[Var]) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let local: f64 = flat::values(vars)?.iter().map(|&x| x as f64).sum();
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

/// Whether `comm` sums device buffers where they are (NCCL).
fn device_reduce(comm: &dyn Communicator) -> bool {
    #[cfg(feature = "cuda")]
    if comm.as_nccl().is_some() {
        return true;
    }
    let _ = comm;
    false
}

/// The in-place sum of a contiguous flat f32 tensor over the ranks.
struct AllReduceSum<'a> {
    comm: &'a dyn Communicator,
}

impl InplaceOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle::Result<()> {
        let buf = flat::f32_mut(storage, layout)?;
        self.comm
            .all_reduce_sum(buf)
            .map_err(|e| candle::Error::Msg(format!("gradient all-reduce: {e}")))
    }

    /// NCCL sums the tensor's own device memory, on the communicator's stream.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle::CudaStorage, layout: &Layout) -> candle::Result<()> {
        let Some(nccl) = self.comm.as_nccl() else {
            candle::bail!("gradient all-reduce: a CUDA tensor needs the NCCL communicator");
        };
        let n = layout.shape().elem_count();
        if layout.contiguous_offsets() != Some((0, n)) {
            candle::bail!("gradient all-reduce: the flat gradient must be contiguous from 0");
        }
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        if slice.len() != n {
            candle::bail!(
                "gradient all-reduce: {} elements stored for {n}",
                slice.len()
            );
        }
        nccl.all_reduce_sum_device(slice)
            .map_err(|e| candle::Error::Msg(format!("gradient all-reduce (NCCL): {e}")))
    }
}

#[cfg(test)]
mod tests {
    use llm_esr_runtime::candle::Device;

    use super::*;
    use crate::testing::on_ranks;

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
                let (loss, grad) = dp.reduce(0.0, None, &vars).unwrap();
                return (loss, grad.to_vec1::<f32>().unwrap());
            }
            // loss = 2 * sum(a) + b^2: gradients [2, 2] and [6].
            let loss = ((a.as_tensor().sum_all().unwrap() * 2.0).unwrap()
                + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let (loss, grad) = dp.reduce(1.5, Some(&grads), &vars).unwrap();
            (loss, grad.to_vec1::<f32>().unwrap())
        });
        for (loss, grad) in reduced {
            assert_eq!(loss, 1.5);
            assert_eq!(grad, vec![2.0, 2.0, 0.0, 6.0]);
        }
    }
}
