//! Differentiable building blocks.
//!
//! candle's fused `LayerNorm` (on contiguous input), `ops::layer_norm` and
//! `ops::softmax_last_dim` have no backward pass: the graph silently stops there
//! and upstream parameters never learn. These versions are composed of primitive
//! operations that all have gradients.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::ForwardCtx;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Layer normalisation over the last dimension with an affine transform.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Inverted dropout with a mask drawn from the run's generator.
pub fn dropout(x: &Tensor, p: f32, ctx: &mut ForwardCtx) -> Result<Tensor> {
    if !ctx.train || p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if ctx.rng.next_f32() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// A layer norm whose forward pass has a gradient.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A linear layer with Xavier-normal weights (torch's `xavier_normal_`) and zero
/// bias; `x @ W^T + b` over any number of leading dimensions.
pub fn linear_xavier(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<candle_nn::Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        crate::params::xavier_normal(out_dim, in_dim),
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(candle_nn::Linear::new(weight, bias))
}

/// Positional embeddings (b, l, d) counted from the left, as the official
/// code does: the k-th item of a row (k from 1) gets `table` row k - 1, so the
/// numbering does not depend on padding; padding positions get row 0 (the
/// encoders zero padding rows).
pub fn left_positions(table: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let rows = (mask.to_dtype(DType::F32)?.cumsum(1)? - 1.0)?
        .relu()?
        .to_dtype(DType::U32)?
        .flatten_all()?;
    table.index_select(&rows, 0)?.reshape((b, l, table.dim(1)?))
}

/// A linear layer as the official code initialises it: Xavier-normal weight,
/// and the bias left at torch's default U(-1/sqrt(in), 1/sqrt(in)) (the
/// official `xavier_normal_` pass skips 1-D tensors).
pub fn linear_torch_bias(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
) -> Result<candle_nn::Linear> {
    let weight = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        crate::params::xavier_normal(out_dim, in_dim),
    )?;
    let bound = 1.0 / (in_dim as f64).sqrt();
    let bias = vb.get_with_hints(
        out_dim,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(candle_nn::Linear::new(weight, Some(bias)))
}

/// Turns a (b, l) 0/1 mask into an additive attention bias of shape (b, 1, 1, l):
/// 0 where the key is an item, a large negative number where it is padding.
pub fn key_padding_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, l))
}

/// Additive causal bias of shape (1, 1, l, l): query i may see keys j <= i.
pub fn causal_bias(l: usize, device: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l * l)
        .map(|k| if k % l <= k / l { 0.0 } else { -1e9 })
        .collect();
    Tensor::from_vec(v, (1, 1, l, l), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_matches_candle_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 12.0, &dev)?.reshape((3, 4))?.sqr()?)?;
        let w = Var::from_tensor(&Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32, 0.0, -0.5, 1.0], &dev)?)?;
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-8)?;
        let theirs = candle_nn::ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-8)?;
        let diff = (ours.clone() - theirs)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let grads = ours.sqr()?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            assert!(grads.get(v.as_tensor()).is_some());
        }
        Ok(())
    }

    #[test]
    fn softmax_matches_candle() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.0, 10.0]], &Device::Cpu)?;
        let d = (softmax_last_dim(&x)? - candle_nn::ops::softmax_last_dim(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6);
        Ok(())
    }
}
