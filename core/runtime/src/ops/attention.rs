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
//! Masks are given as masks, not as an additive bias, so that the kernel can
//! skip what they exclude: per batch row it computes only the window of
//! query rows that are items and of keys from the first to the last item.
//! A masked key gets the bias -1e9 (-2e9 when causal and padding both mask
//! it, as the composed sum of the two biases), whose weight `exp(-1e9 - max)`
//! is exactly 0 in f32 whenever the query sees one unmasked key, so leaving
//! it out changes no weight and no sum. A batch row where some query would
//! see no unmasked key is computed over all its keys instead, as composed.
//!
//! The arithmetic is the composed path's: `softmax(q k^T * scale + bias)`,
//! times the dropout factors of [`super::dropout`] (the same masks, drawn
//! from the same call of the context's generator), times `v`.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::fused::{contiguous, cpu_f32, fast, softmax_row, View};
use super::matmul::{gemm_into as matmul, Mat};
use super::{composed, DropoutMasks};
use crate::ForwardCtx;

/// Which keys each query sees, and which queries are padding.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionMask<'a> {
    /// Query i sees keys j <= i only.
    pub causal: bool,
    /// (b, lk), 1 at items and 0 at padding: padding keys are masked.
    pub keys: Option<&'a Tensor>,
    /// (b, lq), 1 at items and 0 at padding: the output rows of padding
    /// queries are zero (the encoders zero them anyway).
    pub queries: Option<&'a Tensor>,
}

/// The additive bias of a causal mask: -1e9 above the diagonal.
const MASKED: f32 = -1e9;

impl AttentionMask<'_> {
    /// The additive bias the composed path adds to the scores, broadcasting
    /// to (b, h, lq, lk): the causal bias plus the key padding bias.
    pub fn bias(
        &self,
        lq: usize,
        lk: usize,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        let causal = if self.causal {
            if lq != lk {
                bail!("causal attention needs as many queries as keys, got {lq} and {lk}");
            }
            Some(super::causal_bias(lq, device)?)
        } else {
            None
        };
        let padding = self.keys.map(super::key_padding_bias).transpose()?;
        Ok(match (causal, padding) {
            (Some(c), Some(p)) => Some(c.broadcast_add(&p)?),
            (c, p) => c.or(p),
        })
    }
}

/// Multi-head attention of `q` (b, lq, d) over `k` and `v` (b, lk, d) with
/// `heads` heads of d / heads columns each: per head `softmax(q k^T * scale +
/// bias)` with the bias of `mask`, dropout `p` on the weights, times `v`; the
/// heads' outputs side by side, (b, lq, d), zero at padding queries. Off the
/// CPU or for dtypes other than f32 this is [`composed::attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    mask: AttentionMask,
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
    if mask.causal && lq != lk {
        bail!("causal attention needs as many queries as keys, got {lq} and {lk}");
    }
    let flags = |m: Option<&Tensor>, l: usize, what: &str| -> Result<Option<Vec<bool>>> {
        let Some(m) = m else { return Ok(None) };
        if m.dims() != [b, l] {
            bail!("attention: {what} mask {:?} for ({b}, {l})", m.dims());
        }
        let v = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(v.into_iter().map(|x| x != 0.0).collect()))
    };
    let (keys, queries) = (
        flags(mask.keys, lk, "key")?,
        flags(mask.queries, lq, "query")?,
    );
    if !(fast(q) && fast(k) && fast(v)) {
        return composed::attention(q, k, v, heads, scale, mask, p, ctx);
    }
    let masks = DropoutMasks::draw(p, b, ctx)?;
    let op = Attention {
        dims: Dims {
            b,
            h: heads,
            lq,
            lk,
            d,
            dh: d / heads,
        },
        scale: scale as f32,
        causal: mask.causal,
        keys,
        queries,
        masks,
        saved: OnceLock::new(),
    };
    q.apply_op3(k, v, op)
}

struct Attention {
    dims: Dims,
    scale: f32,
    causal: bool,
    /// (b, lk) / (b, lq): true at items.
    keys: Option<Vec<bool>>,
    queries: Option<Vec<bool>>,
    masks: Option<DropoutMasks>,
    saved: OnceLock<Saved>,
}

/// What the forward leaves for the backward.
struct Saved {
    windows: Vec<Window>,
    /// Per batch row, per head, its window's softmax weights before dropout
    /// (rows of padding queries zero).
    weights: Vec<f32>,
    /// The dropout factors (0 or 1 / (1 - p)) of the same entries; `None`
    /// without dropout.
    factors: Option<Vec<f32>>,
}

/// The shapes of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dh: usize,
}

/// The part of one batch row that is computed: query rows `q0..q1`, keys
/// `k0..k1`, and where its weights start in [`Saved::weights`].
#[derive(Clone, Copy, Debug)]
struct Window {
    q0: usize,
    q1: usize,
    k0: usize,
    k1: usize,
    at: usize,
}

impl Window {
    fn rows(&self) -> usize {
        self.q1 - self.q0
    }
    fn cols(&self) -> usize {
        self.k1 - self.k0
    }
    fn block(&self) -> usize {
        self.rows() * self.cols()
    }
}

/// `(first, last + 1)` of the true entries, `None` if there is none.
fn span(flags: &[bool]) -> Option<(usize, usize)> {
    let first = flags.iter().position(|&f| f)?;
    let last = flags.iter().rposition(|&f| f)?;
    Some((first, last + 1))
}

impl Attention {
    /// Rows `from..` of head `hh` of batch row `bi` of a (b, l, d) tensor:
    /// a matrix with row stride d.
    fn head<'a>(&self, x: &'a [f32], l: usize, bi: usize, hh: usize, from: usize) -> Mat<'a> {
        let Dims { d, dh, .. } = self.dims;
        Mat {
            data: &x[(bi * l + from) * d + hh * dh..],
            rs: d,
            cs: 1,
        }
    }

    /// The same, transposed: (dh, rows).
    fn head_t<'a>(&self, x: &'a [f32], l: usize, bi: usize, hh: usize, from: usize) -> Mat<'a> {
        Mat {
            rs: 1,
            cs: self.dims.d,
            ..self.head(x, l, bi, hh, from)
        }
    }

    fn is_query(&self, bi: usize, i: usize) -> bool {
        self.queries
            .as_ref()
            .is_none_or(|m| m[bi * self.dims.lq + i])
    }

    fn is_key(&self, bi: usize, j: usize) -> bool {
        self.keys.as_ref().is_none_or(|m| m[bi * self.dims.lk + j])
    }

    /// The windows of every batch row and the total size of their weights.
    fn windows(&self) -> (Vec<Window>, usize) {
        let Dims { b, h, lq, lk, .. } = self.dims;
        let mut at = 0;
        let windows = (0..b)
            .map(|bi| {
                let (q0, q1) = match &self.queries {
                    Some(m) => span(&m[bi * lq..(bi + 1) * lq]).unwrap_or((0, 0)),
                    None => (0, lq),
                };
                let (mut k0, mut k1) = match &self.keys {
                    Some(m) => span(&m[bi * lk..(bi + 1) * lk]).unwrap_or((0, lk)),
                    None => (0, lk),
                };
                // A query before the first item key sees none under the
                // causal mask: then the whole row, as composed.
                let unseen = self.causal && (q0..q1).any(|i| self.is_query(bi, i) && i < k0);
                if unseen {
                    (k0, k1) = (0, lk);
                }
                let w = Window { q0, q1, k0, k1, at };
                at += h * w.block();
                w
            })
            .collect();
        (windows, at)
    }

    /// The bias of key `j` for query `i` of batch row `bi`, as composed.
    fn bias(&self, bi: usize, i: usize, j: usize) -> f32 {
        let causal = if self.causal && j > i { MASKED } else { 0.0 };
        let padding = if self.is_key(bi, j) { 0.0 } else { MASKED };
        causal + padding
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
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            dh,
        } = self.dims;
        let q = contiguous(cpu_f32(s1, self.name())?, l1);
        let k = contiguous(cpu_f32(s2, self.name())?, l2);
        let v = contiguous(cpu_f32(s3, self.name())?, l3);
        let (windows, total) = self.windows();
        let mut weights = vec![0f32; total];
        let mut factors = self.masks.as_ref().map(|_| vec![0f32; total]);
        let mut dropped = Vec::new();
        let mut out = vec![0f32; b * lq * d];
        for (bi, w) in windows.iter().enumerate() {
            let (m, n) = (w.rows(), w.cols());
            let row_hash = self.masks.as_ref().map(|masks| masks.row_hash(bi));
            for hh in 0..h {
                let at = w.at + hh * w.block();
                let ws = &mut weights[at..at + w.block()];
                let (qh, kt) = (
                    self.head(&q, lq, bi, hh, w.q0),
                    self.head_t(&k, lk, bi, hh, w.k0),
                );
                matmul(m, n, dh, ws, n, qh, kt);
                for (r, row) in ws.chunks_exact_mut(n.max(1)).enumerate() {
                    let i = w.q0 + r;
                    if !self.is_query(bi, i) {
                        row.fill(0.0);
                        continue;
                    }
                    // Same arithmetic as composed: (s * scale) + bias, in f32.
                    for (c, s) in row.iter_mut().enumerate() {
                        *s = *s * self.scale + self.bias(bi, i, w.k0 + c);
                    }
                    softmax_row(row);
                }
                let applied: &[f32] = match (&self.masks, factors.as_mut(), row_hash) {
                    (Some(masks), Some(f), Some(row_hash)) => {
                        // The hashes of `dropout` on (b, h, lq, lk): indices
                        // counted from the end of each dimension.
                        let head_hash = DropoutMasks::child(row_hash, h - 1 - hh);
                        let fs = &mut f[at..at + w.block()];
                        for (r, frow) in fs.chunks_exact_mut(n.max(1)).enumerate() {
                            let qh = DropoutMasks::child(head_hash, lq - 1 - (w.q0 + r));
                            for (c, fv) in frow.iter_mut().enumerate() {
                                *fv = masks.factor(DropoutMasks::child(qh, lk - 1 - (w.k0 + c)));
                            }
                        }
                        dropped.clear();
                        dropped.extend(ws.iter().zip(fs.iter()).map(|(a, b)| a * b));
                        &dropped
                    }
                    _ => ws,
                };
                let dst = &mut out[(bi * lq + w.q0) * d + hh * dh..];
                let vh = self.head(&v, lk, bi, hh, w.k0);
                matmul(
                    m,
                    dh,
                    n,
                    dst,
                    d,
                    Mat {
                        data: applied,
                        rs: n,
                        cs: 1,
                    },
                    vh,
                );
            }
        }
        let _ = self.saved.set(Saved {
            windows,
            weights,
            factors,
        });
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
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            dh,
        } = self.dims;
        let (qv, kv, vv, gv) = (View::of(q), View::of(k), View::of(v), View::of(grad));
        let (qd, kd, vd) = (
            qv.data(self.name())?,
            kv.data(self.name())?,
            vv.data(self.name())?,
        );
        let g = gv.data(self.name())?;
        let mut dq = vec![0f32; b * lq * d];
        let mut dk = vec![0f32; b * lk * d];
        let mut dv = vec![0f32; b * lk * d];
        let (mut dw, mut dropped) = (Vec::new(), Vec::new());
        for (bi, w) in saved.windows.iter().enumerate() {
            let (m, n) = (w.rows(), w.cols());
            for hh in 0..h {
                let at = w.at + hh * w.block();
                let ws = &saved.weights[at..at + w.block()];
                let fs = saved.factors.as_ref().map(|f| &f[at..at + w.block()]);
                let gh = self.head(&g, lq, bi, hh, w.q0);
                // d(dropped weights) = g v^T.
                dw.resize(w.block(), 0.0);
                matmul(m, n, dh, &mut dw, n, gh, self.head_t(&vd, lk, bi, hh, w.k0));
                // dv = (dropped weights)^T g.
                let applied: &[f32] = match fs {
                    Some(fs) => {
                        dropped.clear();
                        dropped.extend(ws.iter().zip(fs).map(|(a, b)| a * b));
                        &dropped
                    }
                    None => ws,
                };
                let kv_at = (bi * lk + w.k0) * d + hh * dh;
                matmul(
                    n,
                    dh,
                    m,
                    &mut dv[kv_at..],
                    d,
                    Mat {
                        data: applied,
                        rs: 1,
                        cs: n,
                    },
                    gh,
                );
                // Through the dropout, then the softmax: ds = w * (dw - <dw, w>) * scale.
                if let Some(fs) = fs {
                    dw.iter_mut().zip(fs).for_each(|(x, &f)| *x *= f);
                }
                for (dr, wr) in dw.chunks_exact_mut(n.max(1)).zip(ws.chunks_exact(n.max(1))) {
                    let dot: f32 = dr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    for (x, &wv) in dr.iter_mut().zip(wr) {
                        *x = wv * (*x - dot) * self.scale;
                    }
                }
                let ds = Mat {
                    data: &dw,
                    rs: n,
                    cs: 1,
                };
                let ds_t = Mat {
                    data: &dw,
                    rs: 1,
                    cs: n,
                };
                let kh = self.head(&kd, lk, bi, hh, w.k0);
                let qh = self.head(&qd, lq, bi, hh, w.q0);
                matmul(
                    m,
                    dh,
                    n,
                    &mut dq[(bi * lq + w.q0) * d + hh * dh..],
                    d,
                    ds,
                    kh,
                );
                matmul(n, dh, m, &mut dk[kv_at..], d, ds_t, qh);
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
    use crate::testing::{max_abs_diff as max_diff, randn};
    use crate::Rng;
    use candle_core::{Device, Var};

    /// A (b, l) 0/1 mask: row r has `items[r]` items, left-padded.
    fn left_padded(items: &[usize], l: usize) -> Result<Tensor> {
        let v: Vec<f32> = items
            .iter()
            .flat_map(|&n| (0..l).map(move |j| (j >= l - n) as u8 as f32))
            .collect();
        Tensor::from_vec(v, (items.len(), l), &Device::Cpu)
    }

    struct Case<'a> {
        lq: usize,
        lk: usize,
        d: usize,
        heads: usize,
        mask: AttentionMask<'a>,
        p: f32,
        keys: Option<&'a [u64]>,
    }

    /// Output and the gradients of q, k, v of `sum(attention * r)`, once
    /// fused and once composed, from the same inputs and the same generator
    /// state.
    fn compare(b: usize, c: Case) -> Result<()> {
        let Case {
            lq,
            lk,
            d,
            heads,
            mask,
            p,
            keys,
        } = c;
        let rng = &mut Rng::new((b * 1000 + lq * 100 + lk * 10 + heads) as u64);
        let inputs = [
            randn(&[b, lq, d], 1.0, rng)?,
            randn(&[b, lk, d], 1.0, rng)?,
            randn(&[b, lk, d], 1.0, rng)?,
        ];
        let r = randn(&[b, lq, d], 1.0, rng)?;
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
                attention(q, k, v, heads, scale, mask, p, &mut ctx)?
            } else {
                composed::attention(q, k, v, heads, scale, mask, p, &mut ctx)?
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
        let what = format!("b {b} lq {lq} lk {lk} d {d} heads {heads} p {p} {mask:?}");
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
        let l = 6;
        // Rows with 6, 2, 4 and 1 items (left padding), and one empty row.
        let mask = left_padded(&[6, 2, 4, 1, 0], l)?;
        let keys: &[u64] = &[11, 5, 9, 3, 8];
        // A right-padded, holed key mask for cross-attention.
        let holed = Tensor::from_vec(
            vec![1f32, 0., 1., 1., 0., 0., 1., 0., 0., 0.],
            (2, 5),
            &Device::Cpu,
        )?;
        let m = |causal, keys: bool, queries: bool| AttentionMask {
            causal,
            keys: keys.then_some(&mask),
            queries: queries.then_some(&mask),
        };
        for p in [0.0, 0.5] {
            for (causal, k, q) in [
                (false, false, false),
                (true, false, false),
                (true, true, false),
                (true, true, true),
                (false, true, true),
                (true, false, true),
                (false, false, true),
            ] {
                for heads in [1, 2, 4] {
                    let c = Case {
                        lq: l,
                        lk: l,
                        d: 8,
                        heads,
                        mask: m(causal, k, q),
                        p,
                        keys: Some(keys),
                    };
                    compare(5, c)?;
                }
            }
            // Queries and keys of different lengths (cross-attention).
            let cross = AttentionMask {
                causal: false,
                keys: Some(&holed),
                queries: None,
            };
            compare(
                2,
                Case {
                    lq: 3,
                    lk: 5,
                    d: 6,
                    heads: 3,
                    mask: cross,
                    p,
                    keys: Some(&[1, 2]),
                },
            )?;
        }
        let one = AttentionMask::default();
        compare(
            1,
            Case {
                lq: 1,
                lk: 1,
                d: 2,
                heads: 1,
                mask: one,
                p: 0.3,
                keys: None,
            },
        )?;
        Ok(())
    }

    #[test]
    fn takes_the_dropout_draw_of_the_composed_version() -> Result<()> {
        // After either path, the generator is in the same state.
        let rng = &mut Rng::new(3);
        let x = randn(&[2, 4, 4], 1.0, rng)?;
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        let mask = AttentionMask::default();
        attention(
            &x,
            &x,
            &x,
            1,
            0.5,
            mask,
            0.5,
            &mut ForwardCtx::new(true, &mut a),
        )?;
        composed::attention(
            &x,
            &x,
            &x,
            1,
            0.5,
            mask,
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
        let none = AttentionMask::default();
        let (q, k) = (randn(&[2, 4, 6], 1.0, rng)?, randn(&[2, 3, 5], 1.0, rng)?);
        let err = attention(&q, &k, &k, 1, 1.0, none, 0.0, ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
        let err = attention(&q, &q, &q, 4, 1.0, none, 0.0, ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not split into 4 heads"), "{err}");
        let k6 = randn(&[2, 3, 6], 1.0, rng)?;
        let causal = AttentionMask {
            causal: true,
            ..none
        };
        let err = attention(&q, &k6, &k6, 1, 1.0, causal, 0.0, ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("as many queries as keys"), "{err}");
        let short = left_padded(&[1, 2], 3)?;
        let bad = AttentionMask {
            queries: Some(&short),
            ..none
        };
        let err = attention(&q, &q, &q, 1, 1.0, bad, 0.0, ctx)
            .unwrap_err()
            .to_string();
        assert!(err.contains("query mask [2, 3] for (2, 4)"), "{err}");
        Ok(())
    }
}
