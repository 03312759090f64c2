//! The composed reference versions of the fused kernels in [`super::fused`]:
//! built from primitive candle ops that all have gradients, so candle's
//! autograd differentiates them. They are what the fused kernels are tested
//! against, and what runs on devices other than the CPU and on dtypes other
//! than f32.

use candle_core::{Result, Tensor, D};

use crate::ForwardCtx;

/// Softmax over the last dimension. A row that is all `-inf` gives NaN
/// (`-inf - -inf`); the fused kernel gives zeros there.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `softmax(scores * scale + bias)` over the last dimension; `bias`
/// broadcasts to the shape of `scores`.
pub fn masked_softmax(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut s = (scores * scale)?;
    if let Some(bias) = bias {
        s = s.broadcast_add(bias)?;
    }
    softmax_last_dim(&s)
}

/// Layer normalisation over the last dimension with an affine transform.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// BCE with logits for one negative per target: `(sum(w * softplus(-pos)) +
/// sum(w * softplus(neg))) / count`, a scalar. softplus is written
/// `relu(x) + log(1 + exp(-|x|))`, which neither overflows nor loses the
/// small values that `log(sigmoid)` rounds to zero.
pub fn bce_with_logits(pos: &Tensor, neg: &Tensor, weight: &Tensor, count: f64) -> Result<Tensor> {
    let softplus =
        |x: &Tensor| -> Result<Tensor> { x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()? };
    let pos = (softplus(&pos.neg()?)? * weight)?.sum_all()?;
    let neg = (softplus(neg)? * weight)?.sum_all()?;
    (pos + neg)? / count
}

/// `x + bias`, `bias` broadcast along the leading dimensions.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(bias)
}

/// Multi-head attention as separate graph nodes: the heads split out of `q`
/// (b, lq, d) and `k`, `v` (b, lk, d), `masked_softmax(q k^T, scale, bias)`
/// with the bias of `mask`, dropout `p` on the weights, times `v`, the heads
/// merged back (b, lq, d), and the rows of padding queries zeroed.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: super::AttentionMask,
    p: f32,
    ctx: &mut ForwardCtx,
) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let lk = k.dim(1)?;
    let split = |x: &Tensor| -> Result<Tensor> {
        let l = x.dim(1)?;
        x.reshape((b, l, heads, d / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    let bias = mask.bias(lq, lk, scores.device())?;
    let weights = masked_softmax(&scores, scale, bias.as_ref())?;
    let weights = super::dropout(&weights, p, ctx)?;
    let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, d))?;
    match mask.queries {
        Some(m) => out.broadcast_mul(&m.to_dtype(out.dtype())?.unsqueeze(D::Minus1)?),
        None => Ok(out),
    }
}
