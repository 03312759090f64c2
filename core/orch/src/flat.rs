//! Parameters and gradients as one flat f32 buffer, in parameter order: the
//! unit of the data-parallel all-reduce and of the optimizer step.
//!
//! The flat gradient is a 1-D tensor on the parameters' device. On the CPU its
//! storage is read in place (no copy); elsewhere the same arithmetic runs as
//! tensor ops. Flat copies of the parameter values on the host exist only for
//! the rare collectives (the initial broadcast, the per-epoch replica check).

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{
    self, backprop::GradStore, CpuStorage, DType, Layout, Storage, Tensor, Var,
};

/// The gradients of `vars` concatenated into one 1-D tensor on their device;
/// zeros where a variable got none (or where this rank had no shard, `None`).
pub fn gradient(vars: &[Var], grads: Option<&GradStore>) -> Result<Tensor> {
    let Some(first) = vars.first() else {
        bail!("no parameters to train");
    };
    let device = first.device();
    let parts = vars
        .iter()
        .map(|var| match grads.and_then(|g| g.get(var.as_tensor())) {
            Some(g) => g.flatten_all(),
            None => Tensor::zeros(var.elem_count(), DType::F32, device),
        })
        .collect::<candle::Result<Vec<_>>>()?;
    // `cat` of one part would return that part itself, which may share the
    // gradient store's storage: the all-reduce writes in place, so copy.
    Ok(match parts.as_slice() {
        [one] => one.copy()?,
        _ => Tensor::cat(&parts, 0)?,
    })
}

/// Runs `f` on the f32 contents of a contiguous CPU tensor, in place in its
/// storage; `None` for tensors on other devices.
pub fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    Ok(Some(f(f32_ref(cpu, layout)?)))
}

/// The first entry of the flat tensor `t` that is not finite (index, value).
/// On the CPU one scan of the storage; elsewhere one reduction on the device,
/// and a copy to the host only when something is wrong.
pub fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f32)>> {
    let scan = |v: &[f32]| v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]));
    if let Some(found) = with_cpu_f32(t, scan)? {
        return Ok(found);
    }
    // 0 * x is NaN exactly when x is NaN or infinite.
    let probe = t.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()?;
    if probe.is_finite() {
        return Ok(None);
    }
    Ok(scan(&t.to_vec1::<f32>()?))
}

/// Concatenates the values of `vars` on the host.
pub fn values(vars: &[Var]) -> Result<Vec<f32>> {
    let mut flat = Vec::new();
    for var in vars {
        flat.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// Writes a flat host buffer back into `vars`.
pub fn assign_values(vars: &[Var], flat: &[f32]) -> Result<()> {
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    if flat.len() != total {
        bail!("{} values for {total} parameters", flat.len());
    }
    let mut off = 0;
    for var in vars {
        let n = var.elem_count();
        var.set(&Tensor::from_vec(
            flat[off..off + n].to_vec(),
            var.shape(),
            var.device(),
        )?)?;
        off += n;
    }
    Ok(())
}

/// The f32 contents of a contiguous CPU storage, for in-place kernels.
pub fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle::Result<&'a mut [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle::bail!("flat buffer: the tensor is not contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle::bail!("flat buffer: f32 tensors only"),
    }
}

/// [`f32_mut`], read-only.
pub fn f32_ref<'a>(s: &'a CpuStorage, l: &Layout) -> candle::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle::bail!("flat buffer: the tensor is not contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle::bail!("flat buffer: f32 tensors only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn gradient_is_flat_in_parameter_order_with_zeros_for_missing() -> Result<()> {
        let (a, unused, b) = (var(&[1.0, 2.0]), var(&[7.0]), var(&[3.0]));
        let loss = ((a.as_tensor().sum_all()? * 2.0)? + b.as_tensor().sqr()?.sum_all()?)?;
        let grads = loss.backward()?;
        let vars = [a, unused, b];
        assert_eq!(
            gradient(&vars, Some(&grads))?.to_vec1::<f32>()?,
            [2.0, 2.0, 0.0, 6.0]
        );
        assert_eq!(gradient(&vars, None)?.to_vec1::<f32>()?, [0.0; 4]);
        Ok(())
    }

    /// A single parameter's flat gradient is a copy, not the gradient store's
    /// own tensor (the all-reduce writes into it).
    #[test]
    fn single_parameter_gradient_is_a_copy() -> Result<()> {
        let a = var(&[1.0, 2.0]);
        let grads = (a.as_tensor().sum_all()? * 3.0)?.backward()?;
        let flat = gradient(std::slice::from_ref(&a), Some(&grads))?;
        flat.inplace_op1(&Zero)?;
        assert_eq!(flat.to_vec1::<f32>()?, [0.0, 0.0]);
        assert_eq!(
            grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?,
            [3.0, 3.0]
        );
        Ok(())
    }

    struct Zero;
    impl candle::InplaceOp1 for Zero {
        fn name(&self) -> &'static str {
            "zero"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle::Result<()> {
            f32_mut(s, l)?.fill(0.0);
            Ok(())
        }
    }

    #[test]
    fn finds_the_first_non_finite_entry() -> Result<()> {
        let t = Tensor::new(&[1.0f32, f32::INFINITY, f32::NAN], &Device::Cpu)?;
        assert_eq!(first_non_finite(&t)?, Some((1, f32::INFINITY)));
        let ok = Tensor::new(&[1.0f32, -3e38, 3e38], &Device::Cpu)?;
        assert_eq!(first_non_finite(&ok)?, None);
        Ok(())
    }

    #[test]
    fn values_round_trip() -> Result<()> {
        let vars = [var(&[1.0, 2.0]), var(&[3.0])];
        assign_values(&vars, &[4.0, 5.0, 6.0])?;
        assert_eq!(values(&vars)?, [4.0, 5.0, 6.0]);
        assert!(assign_values(&vars, &[1.0]).is_err());
        Ok(())
    }
}
