//! Fused multi-head scaled dot-product attention on the CPU, with dropout on
//! the attention weights and a hand-written backward.
//!
//! Composed, attention is a split into heads (a transposed copy), two
//! batched matrix products, the masked softmax, a dropout mask tensor and
//! its product, and a merge of the heads (another copy): each a graph node
//! whose backward allocates and adds gradients as large as the (b, h, l, l)
//! weights. Here it is one node. The forward keeps the softmax weights and
//! the dropout factors for the backward; the products run through `gemm` (the
//! kernel candle's CPU matmul calls) directly on the heads' strided slices of
//! the (b, l, d) projections, so no head is ever copied out.
//!
//! The arithmetic is the composed path's: `softmax(q k^T * scale + bias)`,
//! times the dropout factors of [`super::dropout`] (the same masks, drawn
//! from the same call of the context's generator), times `v`.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use gemm::{gemm, Parallelism};

use super::fused::{contiguous, cpu_f32, fast, softmax_row, Rows, View};
use super::{composed, DropoutMasks};
use crate::ForwardCtx;

/// Multi-head attention of `q` (b, lq, d) over `k` and `v` (b, lk, d) with
/// `heads` heads of d / heads columns each: per head `softmax(q k^T * scale +
/// bias)`, dropout `p` on the weights, times `v`; the heads' outputs side by
/// side, (b, lq, d). `bias` (an additive mask, no gradient) broadcasts to
/// (b, heads, lq, lk). Off the CPU or for dtypes other than f32 this is
/// [`composed::attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    bias: Option<&Tensor>,
    p: f32,
    ctx: &mut ForwardCtx,
) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let (bk, lk, dk) = k.dims3()?;
    if (bk, dk) != (b, d) || v.dims3()? != (b, lk, d) {
        bail!(
            "attention: queries {:?}, keys {:?} and values {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || d % heads != 0 {
        bail!("attention: {d} columns do not split into {heads} heads");
    }
    let trainable_bias = bias.is_some_and(|t| t.track_op());
    if !(fast(q) && fast(k) && fast(v) && bias.is_none_or(fast)) || trainable_bias {
        return composed::attention(q, k, v, heads, scale, bias, p, ctx);
    }
    let bias = bias
        .map(|t| t.broadcast_as((b, heads, lq, lk)))
        .transpose()?;
    let masks = DropoutMasks::draw(p, b, ctx)?;
    q.apply_op3(
        k,
        v,
        Attention {
            heads,
            scale: scale as f32,
            bias,
            masks,
            saved: OnceLock::new(),
        },
    )
}

struct Attention {
    heads: usize,
    scale: f32,
    /// Broadcast to (b, heads, lq, lk).
    bias: Option<Tensor>,
    masks: Option<DropoutMasks>,
    saved: OnceLock<Saved>,
}

/// What the forward leaves for the backward, (b, heads, lq, lk) each.
struct Saved {
    /// The softmax weights before dropout.
    weights: Vec<f32>,
    /// The dropout factors (0 or 1 / (1 - p)); `None` without dropout.
    factors: Option<Vec<f32>>,
}

/// The shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dh: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout, heads: usize) -> Result<Self> {
        let (&[b, lq, d], &[_, lk, _]) = (q.dims(), k.dims()) else {
            bail!("fused attention: 3-D inputs expected");
        };
        Ok(Dims {
            b,
            h: heads,
            lq,
            lk,
            d,
            dh: d / heads,
        })
    }

    /// Elements of one (lq, lk) weight matrix.
    fn block(&self) -> usize {
        self.lq * self.lk
    }
}

/// One matrix of a product: a slice that starts at its first element, with
/// row and column strides.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `dst (m, n) = lhs (m, k) @ rhs (k, n)`, `dst` with row stride `dst_rs`
/// and column stride 1, overwritten. Bounds are checked here, once, so that
/// the unchecked kernel never reads or writes outside the slices.
fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, lhs: Mat, rhs: Mat) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_rs, 1) < dst.len(),
        "attention: destination bounds"
    );
    if k == 0 {
        for i in 0..m {
            dst[i * dst_rs..i * dst_rs + n].fill(0.0);
        }
        return;
    }
    assert!(
        last(m, k, lhs.rs, lhs.cs) < lhs.data.len(),
        "attention: lhs bounds"
    );
    assert!(
        last(k, n, rhs.rs, rhs.cs) < rhs.data.len(),
        "attention: rhs bounds"
    );
    // SAFETY: every index the kernel touches, (i * rs + j * cs) for i < rows
    // and j < cols of each operand, was checked against its slice above;
    // `dst` is exclusively borrowed and overlaps neither input.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

impl Attention {
    /// Head `hh` of batch row `bi` of a (b, l, d) tensor: (l, dh) with row
    /// stride d.
    fn head<'a>(x: &'a [f32], dims: Dims, l: usize, bi: usize, hh: usize) -> Mat<'a> {
        Mat {
            data: &x[bi * l * dims.d + hh * dims.dh..],
            rs: dims.d,
            cs: 1,
        }
    }

    /// The same head transposed: (dh, l).
    fn head_t<'a>(x: &'a [f32], dims: Dims, l: usize, bi: usize, hh: usize) -> Mat<'a> {
        Mat {
            rs: 1,
            cs: dims.d,
            ..Self::head(x, dims, l, bi, hh)
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(l1, l2, self.heads)?;
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            dh,
        } = dims;
        let q = contiguous(cpu_f32(s1, self.name())?, l1);
        let k = contiguous(cpu_f32(s2, self.name())?, l2);
        let v = contiguous(cpu_f32(s3, self.name())?, l3);
        let bias = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &bias {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(s) => Some((cpu_f32(s, self.name())?, Rows::new(layout))),
                _ => bail!("{}: the bias is not on the CPU", self.name()),
            },
            None => None,
        };
        let block = dims.block();
        let mut weights = vec![0f32; b * h * block];
        let mut factors = self.masks.as_ref().map(|_| vec![0f32; b * h * block]);
        let mut dropped = vec![0f32; block];
        let mut out = vec![0f32; b * lq * d];
        for bi in 0..b {
            if let (Some(masks), Some(f)) = (&self.masks, factors.as_mut()) {
                masks.fill_row(
                    bi,
                    &[h, lq, lk],
                    &mut f[bi * h * block..(bi + 1) * h * block],
                );
            }
            for hh in 0..h {
                let at = (bi * h + hh) * block;
                let w = &mut weights[at..at + block];
                let (qh, kt) = (
                    Self::head(&q, dims, lq, bi, hh),
                    Self::head_t(&k, dims, lk, bi, hh),
                );
                matmul(lq, lk, dh, w, lk, qh, kt);
                for (i, row) in w.chunks_exact_mut(lk.max(1)).enumerate() {
                    if let Some((data, rows)) = &bias {
                        let o = rows.offset((bi * h + hh) * lq + i);
                        // Same arithmetic as composed: (s * scale) + bias, in f32.
                        for (j, s) in row.iter_mut().enumerate() {
                            *s = *s * self.scale + data[o + j * rows.step];
                        }
                    } else {
                        row.iter_mut().for_each(|s| *s *= self.scale);
                    }
                    softmax_row(row);
                }
                let applied: &[f32] = match &factors {
                    Some(f) => {
                        for ((x, &wv), &fv) in
                            dropped.iter_mut().zip(w.iter()).zip(&f[at..at + block])
                        {
                            *x = wv * fv;
                        }
                        &dropped
                    }
                    None => w,
                };
                let dst = &mut out[bi * lq * d + hh * dh..];
                let vh = Self::head(&v, dims, lk, bi, hh);
                matmul(
                    lq,
                    dh,
                    lk,
                    dst,
                    d,
                    Mat {
                        data: applied,
                        rs: lk,
                        cs: 1,
                    },
                    vh,
                );
            }
        }
        let _ = self.saved.set(Saved { weights, factors });
        Ok((CpuStorage::F32(out), Shape::from((b, lq, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.get() else {
            bail!("{}: backward before forward", self.name());
        };
        let dims = Dims::of(q.layout(), k.layout(), self.heads)?;
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            dh,
        } = dims;
        let (qv, kv, vv, gv) = (View::of(q), View::of(k), View::of(v), View::of(grad));
        let (qd, kd, vd) = (
            qv.data(self.name())?,
            kv.data(self.name())?,
            vv.data(self.name())?,
        );
        let g = gv.data(self.name())?;
        let block = dims.block();
        let mut dq = vec![0f32; b * lq * d];
        let mut dk = vec![0f32; b * lk * d];
        let mut dv = vec![0f32; b * lk * d];
        let mut dw = vec![0f32; block];
        let mut dropped = vec![0f32; block];
        for bi in 0..b {
            for hh in 0..h {
                let at = (bi * h + hh) * block;
                let w = &saved.weights[at..at + block];
                let f = saved.factors.as_ref().map(|f| &f[at..at + block]);
                let gh = Self::head(&g, dims, lq, bi, hh);
                // d(dropped weights) = g v^T.
                matmul(
                    lq,
                    lk,
                    dh,
                    &mut dw,
                    lk,
                    gh,
                    Self::head_t(&vd, dims, lk, bi, hh),
                );
                // dv = (dropped weights)^T g.
                let applied: &[f32] = match f {
                    Some(f) => {
                        for ((x, &wv), &fv) in dropped.iter_mut().zip(w).zip(f) {
                            *x = wv * fv;
                        }
                        &dropped
                    }
                    None => w,
                };
                let at_v = bi * lk * d + hh * dh;
                matmul(
                    lk,
                    dh,
                    lq,
                    &mut dv[at_v..],
                    d,
                    Mat {
                        data: applied,
                        rs: 1,
                        cs: lk,
                    },
                    gh,
                );
                // Through the dropout, then the softmax: ds = w * (dw - <dw, w>) * scale.
                if let Some(f) = f {
                    dw.iter_mut().zip(f).for_each(|(x, &fv)| *x *= fv);
                }
                for (dr, wr) in dw
                    .chunks_exact_mut(lk.max(1))
                    .zip(w.chunks_exact(lk.max(1)))
                {
                    let dot: f32 = dr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    for (x, &wv) in dr.iter_mut().zip(wr) {
                        *x = wv * (*x - dot) * self.scale;
                    }
                }
                let ds = Mat {
                    data: &dw,
                    rs: lk,
                    cs: 1,
                };
                let ds_t = Mat {
                    data: &dw,
                    rs: 1,
                    cs: lk,
                };
                let kh = Self::head(&kd, dims, lk, bi, hh);
                let qh = Self::head(&qd, dims, lq, bi, hh);
                matmul(lq, dh, lk, &mut dq[bi * lq * d + hh * dh..], d, ds, kh);
                matmul(lk, dh, lq, &mut dk[at_v..], d, ds_t, qh);
            }
        }
        let wrap = |t: &Tensor, g: Vec<f32>| -> Result<Option<Tensor>> {
            t.track_op()
                .then(|| Tensor::from_vec(g, t.shape(), t.device()))
                .transpose()
        };
        Ok((wrap(q, dq)?, wrap(k, dk)?, wrap(v, dv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], rng: &mut Rng) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        assert_eq!(a.dims(), b.dims());
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Output and the gradients of q, k, v of `sum(attention * r)`, once
    /// fused and once composed, from the same inputs and the same generator
    /// state.
    #[allow(clippy::too_many_arguments)]
    fn compare(
        b: usize,
        lq: usize,
        lk: usize,
        d: usize,
        heads: usize,
        bias: Option<&Tensor>,
        p: f32,
        keys: Option<&[u64]>,
    ) -> Result<()> {
        let rng = &mut Rng::new((b * 1000 + lq * 100 + lk * 10 + heads) as u64);
        let inputs = [
            randn(&[b, lq, d], rng)?,
            randn(&[b, lk, d], rng)?,
            randn(&[b, lk, d], rng)?,
        ];
        let r = randn(&[b, lq, d], rng)?;
        let run = |fused: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let mut gen = Rng::new(7);
            let mut ctx = ForwardCtx::new(true, &mut gen);
            if let Some(keys) = keys {
                ctx = ctx.with_rows(keys);
            }
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let scale = 1.0 / ((d / heads) as f64).sqrt();
            let y = if fused {
                attention(q, k, v, heads, scale, bias, p, &mut ctx)?
            } else {
                composed::attention(q, k, v, heads, scale, bias, p, &mut ctx)?
            };
            let grads = (&y * &r)?.sum_all()?.backward()?;
            let g = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned().expect("a gradient"))
                .collect();
            Ok((y, g))
        };
        let (ya, ga) = run(true)?;
        let (yb, gb) = run(false)?;
        let what = format!("b {b} lq {lq} lk {lk} d {d} heads {heads} p {p}");
        assert!(
            max_diff(&ya, &yb)? < 1e-5,
            "{what}: forward {}",
            max_diff(&ya, &yb)?
        );
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            let diff = max_diff(a, b)?;
            assert!(diff < 1e-5, "{what}: gradient of input {i}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn matches_the_composed_version() -> Result<()> {
        let dev = Device::Cpu;
        // Causal plus key padding: rows 0 and 2 start with two padding keys.
        let l = 6;
        let causal = crate::ops::causal_bias(l, &dev)?;
        let mask = Tensor::from_vec(
            (0..3 * l)
                .map(|i| if i % l < 2 && i / l != 1 { 0f32 } else { 1.0 })
                .collect(),
            (3, l),
            &dev,
        )?;
        let padding = crate::ops::key_padding_bias(&mask)?;
        let both = causal.broadcast_add(&padding)?;
        for p in [0.0, 0.5] {
            compare(3, l, l, 8, 1, None, p, None)?;
            compare(3, l, l, 8, 2, Some(&causal), p, None)?;
            compare(3, l, l, 8, 4, Some(&both), p, Some(&[11, 5, 9]))?;
            // Queries and keys of different lengths (cross-attention).
            compare(2, 3, 5, 6, 3, None, p, Some(&[1, 2]))?;
        }
        compare(1, 1, 1, 2, 1, None, 0.3, None)?;
        Ok(())
    }

    #[test]
    fn takes_the_dropout_draw_of_the_composed_version() -> Result<()> {
        // After either path, the generator is in the same state.
        let rng = &mut Rng::new(3);
        let x = randn(&[2, 4, 4], rng)?;
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        attention(
            &x,
            &x,
            &x,
            1,
            0.5,
            None,
            0.5,
            &mut ForwardCtx::new(true, &mut a),
        )?;
        composed::attention(
            &x,
            &x,
            &x,
            1,
            0.5,
            None,
            0.5,
            &mut ForwardCtx::new(true, &mut b),
        )?;
        assert_eq!(a.next_u64(), b.next_u64());
        Ok(())
    }

    #[test]
    fn refuses_inputs_that_do_not_fit() -> Result<()> {
        let rng = &mut Rng::new(3);
        let mut gen = Rng::new(1);
        let ctx = &mut ForwardCtx::new(false, &mut gen);
        let (q, k) = (randn(&[2, 4, 6], rng)?, randn(&[2, 3, 5], rng)?);
        let err = attention(&q, &k, &k, 1, 1.0, None, 0.0, ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
        let err = attention(&q, &q, &q, 4, 1.0, None, 0.0, ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not split into 4 heads"), "{err}");
        Ok(())
    }
}
