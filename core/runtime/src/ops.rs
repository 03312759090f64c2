//! Differentiable building blocks.
//!
//! candle's fused `LayerNorm` (on contiguous input), `ops::layer_norm` and
//! `ops::softmax_last_dim` have no backward pass: the graph silently stops there
//! and upstream parameters never learn. [`composed`] builds them from primitive
//! operations that all have gradients (the reference); [`fused`] has the same
//! functions as single CPU kernels with hand-written backward passes, several
//! times cheaper to train through. The functions exported here are the fused
//! ones; they fall back to the composed ones off the CPU and for dtypes other
//! than f32.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ForwardCtx;

pub mod attention;
pub mod composed;
pub mod fused;
pub mod matmul;

pub use attention::{attention, AttentionMask};
pub use fused::{
    bce_with_logits, bias_add, layer_norm, mask_rows, masked_softmax, softmax_last_dim,
};
pub use matmul::matmul_t;

/// Inverted dropout. One draw of `ctx.rng` per call; the mask element of row
/// `r` at index `(i1, .., ik)` is a hash of that draw, the row's key
/// (`ctx.rows`, else `r`) and the indices counted from the end of each
/// dimension. Left-padded sequences therefore keep their masks whatever the
/// padded length, batch or rank shard they are in.
pub fn dropout(x: &Tensor, p: f32, ctx: &mut ForwardCtx) -> Result<Tensor> {
    dropout_then(x, p, ctx, false)
}

/// `relu(dropout(x))`: the same mask (the same draw) as [`dropout`], then
/// the relu, in one fused node on the CPU.
pub fn dropout_relu(x: &Tensor, p: f32, ctx: &mut ForwardCtx) -> Result<Tensor> {
    dropout_then(x, p, ctx, true)
}

fn dropout_then(x: &Tensor, p: f32, ctx: &mut ForwardCtx, relu: bool) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&rows, inner_dims)) = dims.split_first() else {
        candle_core::bail!("dropout of a scalar");
    };
    let Some(masks) = DropoutMasks::draw(p, rows, ctx)? else {
        return if relu { x.relu() } else { Ok(x.clone()) };
    };
    let inner: usize = inner_dims.iter().product();
    let mut mask = vec![0f32; rows * inner];
    for (r, row) in mask.chunks_mut(inner.max(1)).enumerate() {
        masks.fill_row(r, inner_dims, row);
    }
    if fused::fast(x) {
        // The same product, without a graph node for the constant mask.
        return if relu {
            fused::const_mul_relu(x, mask)
        } else {
            fused::const_mul(x, mask, 1)
        };
    }
    let y = (x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// The dropout masks of one call: the call's draw, the row keys and the
/// keep threshold. `fill_row` writes row `r`'s factors (0 or `1 / (1 - p)`),
/// so that fused kernels draw exactly the masks that [`dropout`] draws.
#[derive(Clone, Debug)]
pub(crate) struct DropoutMasks {
    call: u64,
    keys: Option<Vec<u64>>,
    threshold: u64,
    scale: f32,
}

impl DropoutMasks {
    /// `None` when nothing is dropped (evaluation, or `p <= 0`); else one
    /// draw of `ctx.rng`, as one call of [`dropout`].
    pub(crate) fn draw(p: f32, rows: usize, ctx: &mut ForwardCtx) -> Result<Option<Self>> {
        if !ctx.train || p <= 0.0 {
            return Ok(None);
        }
        if let Some(keys) = ctx.rows {
            if keys.len() != rows {
                candle_core::bail!(
                    "dropout: {} row keys for a batch of {rows} rows",
                    keys.len()
                );
            }
        }
        Ok(Some(DropoutMasks {
            call: ctx.rng.next_u64(),
            keys: ctx.rows.map(<[u64]>::to_vec),
            // Keep when the top 32 bits of the hash reach p * 2^32.
            threshold: (p as f64 * 4294967296.0) as u64,
            scale: 1.0 / (1.0 - p),
        }))
    }

    /// Row `r`'s mask over the dimensions `dims` after the first.
    pub(crate) fn fill_row(&self, r: usize, dims: &[usize], out: &mut [f32]) {
        fill_mask(self.row_hash(r), dims, out, self.threshold, self.scale);
    }

    /// The hash that row `r`'s mask descends from: [`Self::child`] of it by
    /// each index counted from the end of its dimension, then [`Self::factor`].
    pub(crate) fn row_hash(&self, r: usize) -> u64 {
        let key = self.keys.as_ref().map_or(r as u64, |k| k[r]);
        child_hash(self.call, key)
    }

    /// The hash one dimension down, at `index_from_end`.
    pub(crate) fn child(hash: u64, index_from_end: usize) -> u64 {
        child_hash(hash, index_from_end as u64)
    }

    /// The factor of the element whose (last) hash is `hash`.
    pub(crate) fn factor(&self, hash: u64) -> f32 {
        if (hash >> 32) < self.threshold {
            0.0
        } else {
            self.scale
        }
    }
}

/// SplitMix64's finaliser of `parent + (index + 1) * golden`.
fn child_hash(parent: u64, index: u64) -> u64 {
    let mut z = parent.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_mask(hash: u64, dims: &[usize], out: &mut [f32], threshold: u64, scale: f32) {
    match dims {
        [] => out[0] = if (hash >> 32) < threshold { 0.0 } else { scale },
        [n] => {
            for (j, o) in out.iter_mut().enumerate() {
                let h = child_hash(hash, (n - 1 - j) as u64);
                *o = if (h >> 32) < threshold { 0.0 } else { scale };
            }
        }
        [n, rest @ ..] => {
            let inner = out.len() / n;
            for (j, block) in out.chunks_mut(inner.max(1)).enumerate() {
                let h = child_hash(hash, (n - 1 - j) as u64);
                fill_mask(h, rest, block, threshold, scale);
            }
        }
    }
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

/// A linear layer `x @ W^T + b` over any number of leading dimensions, with
/// parameters named `weight` (out, in) and `bias` (out). Unlike
/// `candle_nn::Linear` it multiplies as one 2-D product ([`matmul_t`]) for
/// any layout and adds the bias with one fused kernel ([`bias_add`]), whose
/// backward is a column sum instead of candle's generic broadcast reduction.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_t(x, &self.weight)?;
        match &self.bias {
            Some(b) => bias_add(&y, b),
            None => Ok(y),
        }
    }
}

/// The `(out, in)` weight of a linear layer, Xavier-normal (torch's
/// `xavier_normal_`), named `weight`.
fn xavier_weight(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Tensor> {
    vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        crate::params::xavier_normal(out_dim, in_dim),
    )
}

/// A linear layer with Xavier-normal weights (torch's `xavier_normal_`) and zero
/// bias; `x @ W^T + b` over any number of leading dimensions.
pub fn linear_xavier(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = xavier_weight(&vb, in_dim, out_dim)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
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
pub fn linear_torch_bias(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = xavier_weight(&vb, in_dim, out_dim)?;
    let bound = 1.0 / (in_dim as f64).sqrt();
    let bias = vb.get_with_hints(
        out_dim,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Linear::new(weight, Some(bias)))
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
    use crate::Rng;
    use candle_core::{Device, Var};

    fn dropout_mask(shape: &[usize], keys: &[u64], seed: u64) -> Result<Tensor> {
        let mut rng = Rng::new(seed);
        let ctx = &mut ForwardCtx::new(true, &mut rng).with_rows(keys);
        dropout(&Tensor::ones(shape, DType::F32, &Device::Cpu)?, 0.25, ctx)
    }

    #[test]
    fn dropout_drops_at_the_rate_and_rescales() -> Result<()> {
        let keys: Vec<u64> = (0..64).collect();
        let mask = dropout_mask(&[64, 50, 16], &keys, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.25).abs() < 0.005, "{dropped}");
        assert!(mask
            .iter()
            .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn a_rows_dropout_mask_does_not_depend_on_its_batch_or_padding() -> Result<()> {
        // (b, l, d): row key 11 padded to l = 5 among three rows, then to l = 3 alone.
        let wide = dropout_mask(&[3, 5, 4], &[10, 11, 12], 7)?;
        let alone = dropout_mask(&[1, 3, 4], &[11], 7)?;
        let tail = wide.narrow(0, 1, 1)?.narrow(1, 2, 3)?;
        assert_eq!(tail.to_vec3::<f32>()?, alone.to_vec3::<f32>()?);
        // (b, h, l, l) attention weights: both sequence dimensions are padded.
        let wide = dropout_mask(&[2, 2, 5, 5], &[4, 9], 3)?;
        let narrow = dropout_mask(&[1, 2, 3, 3], &[9], 3)?;
        let tail = wide.narrow(0, 1, 1)?.narrow(2, 2, 3)?.narrow(3, 2, 3)?;
        assert_eq!(
            tail.flatten_all()?.to_vec1::<f32>()?,
            narrow.flatten_all()?.to_vec1::<f32>()?
        );
        // Other keys, other masks.
        let other = dropout_mask(&[1, 3, 4], &[12], 7)?;
        assert_ne!(other.to_vec3::<f32>()?, alone.to_vec3::<f32>()?);
        Ok(())
    }

    #[test]
    fn fused_dropout_and_dropout_relu_match_the_product_with_the_mask() -> Result<()> {
        let dev = Device::Cpu;
        let keys: Vec<u64> = (0..4).collect();
        let mask = dropout_mask(&[4, 5, 6], &keys, 9)?;
        let mut rng = Rng::new(2);
        let vals: Vec<f32> = (0..120).map(|_| rng.normal() as f32).collect();
        let r = Tensor::from_vec(
            (0..120).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
            (4, 5, 6),
            &dev,
        )?;
        for relu in [false, true] {
            let x = Var::from_tensor(&Tensor::from_vec(vals.clone(), (4, 5, 6), &dev)?)?;
            let mut rng = Rng::new(9);
            let ctx = &mut ForwardCtx::new(true, &mut rng).with_rows(&keys);
            let fused = if relu {
                dropout_relu(x.as_tensor(), 0.25, ctx)?
            } else {
                dropout(x.as_tensor(), 0.25, ctx)?
            };
            let gf = (&fused * &r)?.sum_all()?.backward()?;
            let y = Var::from_tensor(&Tensor::from_vec(vals.clone(), (4, 5, 6), &dev)?)?;
            let mut composed = (y.as_tensor() * &mask)?;
            if relu {
                composed = composed.relu()?;
            }
            let gc = (&composed * &r)?.sum_all()?.backward()?;
            let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            assert_eq!(flat(&fused)?, flat(&composed)?, "relu {relu}: forward");
            let (a, b) = (
                gf.get(x.as_tensor()).unwrap(),
                gc.get(y.as_tensor()).unwrap(),
            );
            assert_eq!(flat(a)?, flat(b)?, "relu {relu}: gradient");
        }
        Ok(())
    }

    #[test]
    fn dropout_checks_the_number_of_row_keys() {
        let err = dropout_mask(&[3, 2], &[1, 2], 0).unwrap_err().to_string();
        assert!(err.contains("2 row keys for a batch of 3 rows"), "{err}");
    }

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
