//! Fused CPU kernels with hand-written backward passes.
//!
//! The composed versions in [`super::composed`] are correct but slow to
//! train: each primitive op is a node of candle's graph, and its backward
//! allocates a zero gradient, adds into it, and sums broadcasts back. Most of
//! a training step's backward went there. Each kernel here is one node: a
//! custom op whose forward is one pass over the rows of the last dimension,
//! and whose `bwd` computes the input gradients in one more pass.
//!
//! Only f32 on the CPU takes the fused path; any other device or dtype calls
//! the composed reference, so CUDA builds keep working unchanged. Inputs may
//! have any layout (transposed views, broadcasts): the kernels read them
//! through their strides and always return contiguous tensors.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    StorageRef, Tensor,
};

use super::composed;

/// Whether `t` can take the fused path.
pub(super) fn fast(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The rows over the last dimension of a layout: where each row starts in the
/// storage, its length and the stride along it. Handles every layout candle
/// makes (offsets, transposes, stride-0 broadcasts).
pub(super) struct Rows<'a> {
    lead_dims: &'a [usize],
    lead_strides: &'a [usize],
    start: usize,
    pub(super) len: usize,
    pub(super) step: usize,
    count: usize,
}

impl<'a> Rows<'a> {
    pub(super) fn new(layout: &'a Layout) -> Self {
        let dims = layout.dims();
        let strides = layout.stride();
        match dims.split_last() {
            // A scalar is one row of one element.
            None => Rows {
                lead_dims: &[],
                lead_strides: &[],
                start: layout.start_offset(),
                len: 1,
                step: 1,
                count: 1,
            },
            Some((&len, lead)) => Rows {
                lead_dims: lead,
                lead_strides: &strides[..lead.len()],
                start: layout.start_offset(),
                len,
                step: strides[lead.len()],
                count: lead.iter().product(),
            },
        }
    }

    /// Storage offset of the first element of row `r` (rows in row-major order).
    pub(super) fn offset(&self, mut r: usize) -> usize {
        let mut off = self.start;
        for (&d, &s) in self.lead_dims.iter().zip(self.lead_strides).rev() {
            off += (r % d) * s;
            r /= d;
        }
        off
    }
}

/// The elements of `data` under `layout` in row-major order: borrowed when the
/// layout is contiguous, gathered otherwise.
pub(super) fn contiguous<'a>(data: &'a [f32], layout: &Layout) -> Cow<'a, [f32]> {
    if let Some((a, b)) = layout.contiguous_offsets() {
        return Cow::Borrowed(&data[a..b]);
    }
    let rows = Rows::new(layout);
    let mut out = Vec::with_capacity(rows.count * rows.len);
    for r in 0..rows.count {
        let o = rows.offset(r);
        out.extend((0..rows.len).map(|j| data[o + j * rows.step]));
    }
    Cow::Owned(out)
}

pub(super) fn cpu_f32<'a>(s: &'a CpuStorage, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => bail!("{op}: f32 only, got {:?}", other.dtype()),
    }
}

/// Read access to a tensor's f32 elements in the backward pass.
pub(super) struct View<'a> {
    guard: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> View<'a> {
    pub(super) fn of(t: &'a Tensor) -> Self {
        let (guard, layout) = t.storage_and_layout();
        View { guard, layout }
    }

    pub(super) fn data(&self, op: &str) -> Result<Cow<'_, [f32]>> {
        match &*self.guard {
            Storage::Cpu(s) => Ok(contiguous(cpu_f32(s, op)?, self.layout)),
            _ => bail!("{op}: the fused backward runs on the CPU only"),
        }
    }
}

/// The length of the last dimension; rows = elements / that length.
pub(super) fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
}

// ---------------------------------------------------------------- softmax

/// In-place softmax of one row. A row that is all `-inf` becomes zeros (the
/// composed version gives NaN there: `-inf - -inf`); a NaN anywhere in the
/// row still spreads to the whole row, as it does composed, so the trainer's
/// non-finite guard still sees it.
pub(super) fn softmax_row(y: &mut [f32]) {
    let max = y.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        y.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for v in y.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in y.iter_mut() {
        *v *= inv;
    }
}

/// `dz = y * (g - sum(g * y))` per row, times `scale`.
fn softmax_bwd(y: &[f32], g: &[f32], n: usize, scale: f32) -> Vec<f32> {
    let mut dz = vec![0f32; y.len()];
    if n == 0 {
        return dz;
    }
    for ((yr, gr), dr) in y
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(dz.chunks_exact_mut(n))
    {
        let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
        for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
            *d = yv * (gv - dot) * scale;
        }
    }
    dz
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = contiguous(cpu_f32(s, self.name())?, l).into_owned();
        let n = last_dim(l);
        if n > 0 {
            y.chunks_exact_mut(n).for_each(softmax_row);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (yv, gv) = (View::of(res), View::of(grad));
        let n = last_dim(res.layout());
        let dx = softmax_bwd(&yv.data(self.name())?, &gv.data(self.name())?, n, 1.0);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Softmax over the last dimension. A row that is all `-inf` gives zeros
/// (the composed version gives NaN).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fast(x) {
        return composed::softmax_last_dim(x);
    }
    x.apply_op1(Softmax)
}

/// `softmax(scores * scale + bias)`; the bias arrives broadcast to the shape of
/// the scores (stride 0 where it repeats, nothing materialised).
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!(
                "{}: scores {:?} and bias {:?} differ in shape",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let x = contiguous(cpu_f32(s1, self.name())?, l1);
        let bias = cpu_f32(s2, self.name())?;
        let rows = Rows::new(l2);
        let n = rows.len;
        let mut y = vec![0f32; x.len()];
        if n > 0 {
            for (r, (xr, yr)) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)).enumerate() {
                let o = rows.offset(r);
                // Same arithmetic as composed: (s * scale) + bias, in f32.
                for (j, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
                    *yv = xv * self.scale + bias[o + j * rows.step];
                }
                softmax_row(yr);
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (yv, gv) = (View::of(res), View::of(grad));
        let (y, g) = (yv.data(self.name())?, gv.data(self.name())?);
        let n = last_dim(res.layout());
        let dscores = (scores.track_op())
            .then(|| {
                Tensor::from_vec(
                    softmax_bwd(&y, &g, n, self.scale),
                    scores.shape(),
                    scores.device(),
                )
            })
            .transpose()?;
        // Attention biases are constants; a trainable one still gets its gradient.
        let dbias = (bias.track_op())
            .then(|| Tensor::from_vec(softmax_bwd(&y, &g, n, 1.0), bias.shape(), bias.device()))
            .transpose()?;
        Ok((dscores, dbias))
    }
}

/// `softmax(scores * scale + bias)` over the last dimension, as attention
/// needs it; `bias` (an additive mask) broadcasts to the shape of `scores`.
/// One pass instead of a scale, a broadcast add and a softmax, each with its
/// own backward. Rows that are all `-inf` give zeros.
pub fn masked_softmax(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    if !fast(scores) || bias.is_some_and(|b| !fast(b)) {
        return composed::masked_softmax(scores, scale, bias);
    }
    let bias = match bias {
        Some(b) => b.broadcast_as(scores.shape())?,
        None => Tensor::zeros((), DType::F32, scores.device())?.broadcast_as(scores.shape())?,
    };
    scores.apply_op2(
        &bias,
        MaskedSoftmax {
            scale: scale as f32,
        },
    )
}

// ------------------------------------------------------------- layer norm

/// Layer norm over the last dimension, affine. The forward keeps each row's
/// mean and reciprocal standard deviation for the backward.
struct LayerNormOp {
    eps: f32,
    /// `[mean, rstd]` per row, written once by the forward.
    stats: OnceLock<Vec<[f32; 2]>>,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let name = self.name();
        let n = last_dim(l1);
        if l2.dims() != [n] || l3.dims() != [n] {
            bail!(
                "{name}: weight {:?} and bias {:?} must be ({n},) for input {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let x = contiguous(cpu_f32(s1, name)?, l1);
        let w = contiguous(cpu_f32(s2, name)?, l2);
        let b = contiguous(cpu_f32(s3, name)?, l3);
        let mut y = vec![0f32; x.len()];
        let mut stats = Vec::with_capacity(x.len().checked_div(n).unwrap_or(0));
        if n > 0 {
            // The composed mean multiplies the sum by 1/n (candle's mean).
            let inv_n = (1.0 / n as f64) as f32;
            for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
                let mean = xr.iter().sum::<f32>() * inv_n;
                let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() * inv_n;
                let rstd = 1.0 / (var + self.eps).sqrt();
                for (((yv, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w.iter()).zip(b.iter()) {
                    *yv = (xv - mean) * rstd * wv + bv;
                }
                stats.push([mean, rstd]);
            }
        }
        // A op value is applied once; a second forward would be a bug here.
        if self.stats.set(stats).is_err() {
            bail!("{name}: op applied twice");
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let Some(stats) = self.stats.get() else {
            bail!("{name}: backward before forward");
        };
        let (xv, wv, gv) = (View::of(x), View::of(weight), View::of(grad));
        let (xs, w, g) = (xv.data(name)?, wv.data(name)?, gv.data(name)?);
        let n = w.len();
        let want_dx = x.track_op();
        let mut dx = vec![0f32; if want_dx { xs.len() } else { 0 }];
        let mut dw = vec![0f32; n];
        let mut db = vec![0f32; n];
        if n > 0 {
            let inv_n = 1.0 / n as f32;
            let mut xhat = vec![0f32; n];
            for (r, (xr, gr)) in xs.chunks_exact(n).zip(g.chunks_exact(n)).enumerate() {
                let [mean, rstd] = stats[r];
                // sum(g * w) and sum(g * w * xhat) give the two projections
                // that the normalisation takes out of the gradient.
                let (mut s1, mut s2) = (0f32, 0f32);
                for j in 0..n {
                    let xh = (xr[j] - mean) * rstd;
                    xhat[j] = xh;
                    let gw = gr[j] * w[j];
                    s1 += gw;
                    s2 += gw * xh;
                    dw[j] += gr[j] * xh;
                    db[j] += gr[j];
                }
                if want_dx {
                    let (m1, m2) = (s1 * inv_n, s2 * inv_n);
                    let dr = &mut dx[r * n..(r + 1) * n];
                    for j in 0..n {
                        dr[j] = rstd * (gr[j] * w[j] - m1 - xhat[j] * m2);
                    }
                }
            }
        }
        let dev = x.device();
        let dx = want_dx
            .then(|| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        let dw = (weight.track_op())
            .then(|| Tensor::from_vec(dw, weight.shape(), dev))
            .transpose()?;
        let db = (bias.track_op())
            .then(|| Tensor::from_vec(db, bias.shape(), dev))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// Layer normalisation over the last dimension with an affine transform
/// (`weight` and `bias` of the last dimension's size).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !(fast(x) && fast(weight) && fast(bias)) {
        return composed::layer_norm(x, weight, bias, eps);
    }
    x.apply_op3(
        weight,
        bias,
        LayerNormOp {
            eps: eps as f32,
            stats: OnceLock::new(),
        },
    )
}

// -------------------------------------------------------- BCE with logits

/// `log(1 + exp(x))` without overflow.
fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + exp(-x))` without overflow.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `(sum(w * softplus(-pos)) + sum(w * softplus(neg))) / count`, a scalar.
struct BceWithLogits {
    count: f64,
}

impl CustomOp3 for BceWithLogits {
    fn name(&self) -> &'static str {
        "fused-bce-with-logits"
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
        let name = self.name();
        if l1.dims() != l2.dims() || l1.dims() != l3.dims() {
            bail!(
                "{name}: positive {:?}, negative {:?} and weight {:?} logits differ in shape",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let pos = contiguous(cpu_f32(s1, name)?, l1);
        let neg = contiguous(cpu_f32(s2, name)?, l2);
        let w = contiguous(cpu_f32(s3, name)?, l3);
        // Summed in f64: one rounding for the whole batch instead of one per
        // element of a long f32 sum.
        let mut sum = 0f64;
        for ((&p, &n), &wv) in pos.iter().zip(neg.iter()).zip(w.iter()) {
            sum += (wv * (softplus(-p) + softplus(n))) as f64;
        }
        Ok((
            CpuStorage::F32(vec![(sum / self.count) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        pos: &Tensor,
        neg: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let g = grad.to_scalar::<f32>()? as f64 / self.count;
        let g = g as f32;
        let (pv, nv, wv) = (View::of(pos), View::of(neg), View::of(weight));
        let (p, n, w) = (pv.data(name)?, nv.data(name)?, wv.data(name)?);
        let dev = pos.device();
        // d softplus(x) / dx = sigmoid(x), so d softplus(-p) / dp = -sigmoid(-p).
        let dpos = (pos.track_op())
            .then(|| {
                let d = p
                    .iter()
                    .zip(w.iter())
                    .map(|(&x, &wv)| -sigmoid(-x) * wv * g)
                    .collect();
                Tensor::from_vec(d, pos.shape(), dev)
            })
            .transpose()?;
        let dneg = (neg.track_op())
            .then(|| {
                let d = n
                    .iter()
                    .zip(w.iter())
                    .map(|(&x, &wv)| sigmoid(x) * wv * g)
                    .collect();
                Tensor::from_vec(d, neg.shape(), dev)
            })
            .transpose()?;
        let dweight = (weight.track_op())
            .then(|| {
                let d = p
                    .iter()
                    .zip(n.iter())
                    .map(|(&a, &b)| (softplus(-a) + softplus(b)) * g)
                    .collect();
                Tensor::from_vec(d, weight.shape(), dev)
            })
            .transpose()?;
        Ok((dpos, dneg, dweight))
    }
}

/// BCE with logits for one negative per target, as the official code: the
/// log-loss of the positive logits plus that of the negative logits, weighted
/// by `weight` (1 at targets, 0 at padding), summed and divided by `count`.
/// A scalar. The fused gradient is the exact `sigmoid`; the composed one is 0
/// at a logit of exactly 0 (relu' and abs' are 0 there), which only padding
/// positions (weight 0) reach in practice.
pub fn bce_with_logits(pos: &Tensor, neg: &Tensor, weight: &Tensor, count: f64) -> Result<Tensor> {
    if !(fast(pos) && fast(neg) && fast(weight)) {
        return composed::bce_with_logits(pos, neg, weight, count);
    }
    pos.apply_op3(neg, weight, BceWithLogits { count })
}

// --------------------------------------------------------------- bias add

/// `y + b` with `b` along the last dimension of `y`. Composed, the backward of
/// the broadcast add sums the gradient over every leading dimension with
/// candle's generic strided reduction, which took a third of a SASRec
/// training step; here the bias gradient is one pass of column sums.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(l1);
        if l2.dims() != [n] {
            bail!(
                "{}: bias {:?} for rows of {n} (input {:?})",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        let mut y = contiguous(cpu_f32(s1, self.name())?, l1).into_owned();
        let b = contiguous(cpu_f32(s2, self.name())?, l2);
        if n > 0 {
            for row in y.chunks_exact_mut(n) {
                for (v, &bv) in row.iter_mut().zip(b.iter()) {
                    *v += bv;
                }
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.track_op().then(|| grad.clone());
        let db = if b.track_op() {
            let gv = View::of(grad);
            let g = gv.data(self.name())?;
            let n = b.elem_count();
            let mut sums = vec![0f32; n];
            if n > 0 {
                for row in g.chunks_exact(n) {
                    for (s, &v) in sums.iter_mut().zip(row) {
                        *s += v;
                    }
                }
            }
            Some(Tensor::from_vec(sums, b.shape(), b.device())?)
        } else {
            None
        };
        Ok((dx, db))
    }
}

/// `x + bias` with `bias` (n) added to every row of the last dimension (n)
/// of `x`.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !(fast(x) && fast(bias)) {
        return composed::bias_add(x, bias);
    }
    x.apply_op2(bias, BiasAdd)
}

// ------------------------------------------------- constant multipliers

/// `x * f` for factors that are constants (dropout masks, padding masks):
/// element `i` is multiplied by `factors[i / inner]`. Composed, a product
/// with a constant still computes the constant's gradient in the backward
/// (a product, a zero tensor and a sum, and for a broadcast mask a strided
/// reduction on top); here the backward is the one product the input needs.
struct ConstMul {
    factors: Vec<f32>,
    inner: usize,
    /// Then `max(., 0)`, with candle's gradient (1 where the product is >= 0).
    relu: bool,
}

impl CustomOp1 for ConstMul {
    fn name(&self) -> &'static str {
        "fused-const-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = contiguous(cpu_f32(s, self.name())?, l).into_owned();
        self.apply(&mut y)?;
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let gv = View::of(grad);
        let mut g = gv.data(self.name())?.into_owned();
        if self.relu {
            // Where x * f < 0 the gradient is 0 (f >= 0, so that is x < 0
            // with f > 0, or never where f = 0).
            let xv = View::of(arg);
            let x = xv.data(self.name())?;
            let mut t = x.into_owned();
            self.apply(&mut t)?;
            g.iter_mut().zip(&t).for_each(|(gv, &tv)| {
                if tv < 0.0 {
                    *gv = 0.0
                }
            });
        }
        self.apply(&mut g)?;
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

impl ConstMul {
    fn apply(&self, y: &mut [f32]) -> Result<()> {
        if y.len() != self.factors.len() * self.inner {
            bail!(
                "{}: {} factors of {} elements for {} elements",
                self.name(),
                self.factors.len(),
                self.inner,
                y.len()
            );
        }
        if self.inner > 0 {
            for (chunk, &f) in y.chunks_exact_mut(self.inner).zip(&self.factors) {
                chunk.iter_mut().for_each(|v| *v *= f);
            }
        }
        Ok(())
    }
}

/// `x` times constant `factors`, one per run of `inner` consecutive
/// elements (row-major); for `x` that can take the fused path.
pub(super) fn const_mul(x: &Tensor, factors: Vec<f32>, inner: usize) -> Result<Tensor> {
    x.apply_op1(ConstMul {
        factors,
        inner,
        relu: false,
    })
}

/// `relu(x * factors)`, the factors one per element (a dropout mask), with
/// candle's relu gradient; for `x` that can take the fused path.
pub(super) fn const_mul_relu(x: &Tensor, factors: Vec<f32>) -> Result<Tensor> {
    x.apply_op1(ConstMul {
        factors,
        inner: 1,
        relu: true,
    })
}

/// `x` (.., n) with the rows where `mask` (the leading dims of `x`) is 0
/// multiplied by 0 and the others by 1, as `x.broadcast_mul(mask[.., None])`
/// does; `mask` is a constant (no gradient).
pub fn mask_rows(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&n, lead)) = dims.split_last() else {
        bail!("mask_rows of a scalar");
    };
    if mask.dims() != lead {
        bail!("mask_rows: mask {:?} for rows {lead:?}", mask.dims());
    }
    if fast(x) && !mask.track_op() {
        let factors = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        return const_mul(x, factors, n);
    }
    x.broadcast_mul(
        &mask
            .to_dtype(x.dtype())?
            .unsqueeze(candle_core::D::Minus1)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;
    use candle_core::{Device, Var};

    use crate::testing::randn;

    /// `max |a - b| <= tol * max(1, max |b|)`: absolute near 1, relative for
    /// the large gradients of zero-variance (padding) rows.
    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let b = b.flatten_all()?.to_vec1::<f32>()?;
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| {
            if (x - y).is_nan() {
                f32::NAN
            } else {
                m.max((x - y).abs())
            }
        });
        assert!(
            diff <= tol * scale,
            "{what}: max diff {diff}, scale {scale}"
        );
        Ok(())
    }

    /// Forward values and gradients of `sum(f(inputs) * r)` w.r.t. every
    /// input, `r` a fixed random tensor so that no gradient is trivially zero.
    fn value_and_grads(
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Var],
        r: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let grads = (&y * r)?.sum_all()?.backward()?;
        let gs = inputs
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned().expect("a gradient"))
            .collect();
        Ok((y, gs))
    }

    /// Runs `fused` and `reference` on the same inputs (built by `make` for
    /// each, so the graphs are separate) and compares outputs and gradients.
    fn check(
        what: &str,
        make: &dyn Fn() -> Result<Vec<Var>>,
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) -> Result<()> {
        let (a_in, b_in) = (make()?, make()?);
        let shape = reference(
            &b_in
                .iter()
                .map(|v| v.as_tensor().clone())
                .collect::<Vec<_>>(),
        )?
        .dims()
        .to_vec();
        let r = randn(&shape, 1.0, &mut Rng::new(99))?;
        let (ya, ga) = value_and_grads(fused, &a_in, &r)?;
        let (yb, gb) = value_and_grads(reference, &b_in, &r)?;
        assert!(
            ya.is_contiguous(),
            "{what}: the kernel returns contiguous output"
        );
        assert_close(&format!("{what}: forward"), &ya, &yb, tol)?;
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            assert_close(&format!("{what}: gradient of input {i}"), a, b, tol)?;
        }
        Ok(())
    }

    /// Rows `rows` of the last two dims' leading index set to zero, as the
    /// encoders zero padding positions.
    fn zero_rows(x: &Tensor, every: usize) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = *dims.last().unwrap();
        let rows = x.elem_count() / n;
        let keep: Vec<f32> = (0..rows)
            .flat_map(|r| std::iter::repeat_n(if r % every == 0 { 0.0 } else { 1.0 }, n))
            .collect();
        x * Tensor::from_vec(keep, dims, x.device())?
    }

    fn ln_inputs(shape: &[usize], seed: u64, padding: bool, transposed: bool) -> Result<Vec<Var>> {
        let rng = &mut Rng::new(seed);
        let n = *shape.last().unwrap();
        let mut x = randn(shape, 2.0, rng)?.affine(1.0, 0.5)?;
        if padding {
            x = zero_rows(&x, 3)?;
        }
        let x = if transposed {
            // Stored as (.., n, m), seen as (.., m, n): the last dim is strided.
            let k = shape.len();
            let mut t = shape.to_vec();
            t.swap(k - 2, k - 1);
            Var::from_tensor(&x.reshape(t)?)?
        } else {
            Var::from_tensor(&x)?
        };
        let w = Var::from_tensor(&randn(&[n], 1.0, rng)?.affine(1.0, 1.0)?)?;
        let b = Var::from_tensor(&randn(&[n], 1.0, rng)?)?;
        Ok(vec![x, w, b])
    }

    fn ln_check(shape: &[usize], padding: bool, transposed: bool, eps: f64) -> Result<()> {
        let view = |t: &[Tensor]| -> Result<Tensor> {
            if transposed {
                let k = t[0].rank();
                t[0].transpose(k - 2, k - 1)
            } else {
                Ok(t[0].clone())
            }
        };
        check(
            &format!("layer norm {shape:?} padding {padding} transposed {transposed}"),
            &|| {
                ln_inputs(
                    shape,
                    shape.iter().sum::<usize>() as u64,
                    padding,
                    transposed,
                )
            },
            &|t| {
                let x = view(t)?;
                let (rows, cols) = (x.dim(x.rank() - 2)?, x.dim(x.rank() - 1)?);
                if transposed && rows > 1 && cols > 1 {
                    assert!(!x.is_contiguous(), "the view is strided");
                }
                layer_norm(&x, &t[1], &t[2], eps)
            },
            &|t| composed::layer_norm(&view(t)?, &t[1], &t[2], eps),
            1e-5,
        )
    }

    #[test]
    fn layer_norm_matches_the_composed_version() -> Result<()> {
        for shape in [[4usize, 9, 64], [2, 7, 5], [1, 1, 1], [1, 1, 8], [1, 6, 1]] {
            for padding in [false, true] {
                ln_check(&shape, padding, false, 1e-8)?;
            }
        }
        ln_check(&[3, 5, 64], true, false, 1e-5)?;
        Ok(())
    }

    #[test]
    fn layer_norm_reads_strided_input() -> Result<()> {
        ln_check(&[3, 6, 5], true, true, 1e-8)?;
        ln_check(&[2, 64, 12], false, true, 1e-8)?;
        ln_check(&[7, 1], false, true, 1e-8)?;
        Ok(())
    }

    #[test]
    fn layer_norm_checks_the_affine_shapes() -> Result<()> {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let err = layer_norm(&x, &w, &w, 1e-8).unwrap_err().to_string();
        assert!(err.contains("must be (4,)"), "{err}");
        Ok(())
    }

    /// A row of scores with `masked` entries at -1e9 (as the attention biases
    /// of the encoders do).
    fn masked_scores(shape: &[usize], seed: u64) -> Result<Tensor> {
        let rng = &mut Rng::new(seed);
        let x = randn(shape, 3.0, rng)?;
        let n = *shape.last().unwrap();
        let rows = x.elem_count() / n;
        // Row r masks its first r % (n + 1) entries: some none, some all.
        let bias: Vec<f32> = (0..rows)
            .flat_map(|r| (0..n).map(move |j| if j < r % (n + 1) { -1e9 } else { 0.0 }))
            .collect();
        x + Tensor::from_vec(bias, shape, &Device::Cpu)?
    }

    #[test]
    fn softmax_matches_the_composed_version() -> Result<()> {
        for shape in [
            [2usize, 3, 7, 7],
            [1, 1, 1, 1],
            [1, 1, 1, 9],
            [1, 2, 6, 1],
            [3, 2, 50, 50],
        ] {
            check(
                &format!("softmax {shape:?}"),
                &|| Ok(vec![Var::from_tensor(&masked_scores(&shape, 5)?)?]),
                &|t| softmax_last_dim(&t[0]),
                &|t| composed::softmax_last_dim(&t[0]),
                1e-5,
            )?;
            // Strided: the softmax over what is stored as the second-last dim.
            check(
                &format!("softmax {shape:?} transposed"),
                &|| Ok(vec![Var::from_tensor(&masked_scores(&shape, 6)?)?]),
                &|t| softmax_last_dim(&t[0].transpose(2, 3)?),
                &|t| composed::softmax_last_dim(&t[0].transpose(2, 3)?),
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn softmax_of_an_all_minus_infinity_row_is_zero_where_composed_is_nan() -> Result<()> {
        let inf = f32::NEG_INFINITY;
        let x = Var::new(&[[inf, inf, inf], [1.0, inf, 2.0]], &Device::Cpu)?;
        let y = softmax_last_dim(x.as_tensor())?;
        let rows = y.to_vec2::<f32>()?;
        assert_eq!(rows[0], [0.0, 0.0, 0.0]);
        assert_eq!(rows[1][1], 0.0);
        assert!((rows[1][0] + rows[1][2] - 1.0).abs() < 1e-6);
        let composed = composed::softmax_last_dim(x.as_tensor())?.to_vec2::<f32>()?;
        assert!(composed[0].iter().all(|v| v.is_nan()));
        let g = (y * Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?)?
            .sum_all()?
            .backward()?;
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f32>()?;
        assert_eq!(g[0], [0.0, 0.0, 0.0]);
        assert!(g[1].iter().all(|v| v.is_finite()));
        Ok(())
    }

    /// The encoders' attention bias: causal (1, 1, l, l) plus key padding
    /// (b, 1, 1, l); sample 0 is all padding, so its rows are fully masked.
    fn attention_bias(b: usize, l: usize) -> Result<Tensor> {
        let mask: Vec<f32> = (0..b)
            .flat_map(|s| (0..l).map(move |j| if s > 0 && j >= (s * 3) % l { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, l), &Device::Cpu)?;
        crate::ops::causal_bias(l, &Device::Cpu)?
            .broadcast_add(&crate::ops::key_padding_bias(&mask)?)
    }

    #[test]
    fn masked_softmax_matches_the_composed_version() -> Result<()> {
        for (b, h, l) in [(4usize, 2usize, 9usize), (1, 1, 1), (3, 1, 50), (2, 3, 2)] {
            let scale = 1.0 / (8f64).sqrt();
            let bias = attention_bias(b, l)?;
            check(
                &format!("masked softmax ({b}, {h}, {l}, {l})"),
                &|| {
                    Ok(vec![Var::from_tensor(&randn(
                        &[b, h, l, l],
                        3.0,
                        &mut Rng::new(3),
                    )?)?])
                },
                &|t| masked_softmax(&t[0], scale, Some(&bias)),
                &|t| composed::masked_softmax(&t[0], scale, Some(&bias)),
                1e-5,
            )?;
            check(
                &format!("masked softmax ({b}, {h}, {l}, {l}) without bias, transposed"),
                &|| {
                    Ok(vec![Var::from_tensor(&randn(
                        &[b, h, l, l],
                        3.0,
                        &mut Rng::new(4),
                    )?)?])
                },
                &|t| masked_softmax(&t[0].transpose(2, 3)?, scale, None),
                &|t| composed::masked_softmax(&t[0].transpose(2, 3)?, scale, None),
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn masked_softmax_gives_a_trainable_bias_its_gradient() -> Result<()> {
        let scale = 0.5;
        check(
            "masked softmax, trainable (1, h, 1, l) bias",
            &|| {
                let rng = &mut Rng::new(8);
                Ok(vec![
                    Var::from_tensor(&randn(&[2, 3, 4, 5], 2.0, rng)?)?,
                    Var::from_tensor(&randn(&[1, 3, 1, 5], 2.0, rng)?)?,
                ])
            },
            &|t| masked_softmax(&t[0], scale, Some(&t[1])),
            &|t| composed::masked_softmax(&t[0], scale, Some(&t[1])),
            1e-5,
        )
    }

    #[test]
    fn bce_with_logits_matches_the_composed_version() -> Result<()> {
        for len in [1usize, 7, 6400] {
            check(
                &format!("bce with logits ({len})"),
                &|| {
                    let rng = &mut Rng::new(len as u64);
                    // Some large logits (softplus in its linear range) and a
                    // weight that is 0 at a third of the positions (padding).
                    let w: Vec<f32> = (0..len).map(|i| (i % 3 != 2) as u8 as f32).collect();
                    Ok(vec![
                        Var::from_tensor(&randn(&[len], 6.0, rng)?)?,
                        Var::from_tensor(&randn(&[len], 6.0, rng)?)?,
                        Var::from_tensor(&Tensor::from_vec(w, len, &Device::Cpu)?)?,
                    ])
                },
                &|t| bce_with_logits(&t[0], &t[1], &t[2], 0.7 * len as f64),
                &|t| composed::bce_with_logits(&t[0], &t[1], &t[2], 0.7 * len as f64),
                1e-5,
            )?;
        }
        // Strided logits: (l, b) stored, (b, l) seen.
        check(
            "bce with logits, transposed",
            &|| {
                let rng = &mut Rng::new(11);
                Ok(vec![
                    Var::from_tensor(&randn(&[5, 4], 3.0, rng)?)?,
                    Var::from_tensor(&randn(&[5, 4], 3.0, rng)?)?,
                    Var::from_tensor(&randn(&[4, 5], 1.0, rng)?.abs()?)?,
                ])
            },
            &|t| bce_with_logits(&t[0].t()?, &t[1].t()?, &t[2], 20.0),
            &|t| composed::bce_with_logits(&t[0].t()?, &t[1].t()?, &t[2], 20.0),
            1e-5,
        )
    }

    #[test]
    fn bias_add_matches_the_composed_version() -> Result<()> {
        for shape in [vec![4usize, 9, 16], vec![7, 5], vec![1, 1], vec![3, 1, 1]] {
            let n = *shape.last().unwrap();
            let seed = shape.iter().sum::<usize>() as u64;
            check(
                &format!("bias add {shape:?}"),
                &|| {
                    let rng = &mut Rng::new(seed);
                    Ok(vec![
                        Var::from_tensor(&zero_rows(&randn(&shape, 2.0, rng)?, 3)?)?,
                        Var::from_tensor(&randn(&[n], 1.0, rng)?)?,
                    ])
                },
                &|t| bias_add(&t[0], &t[1]),
                &|t| composed::bias_add(&t[0], &t[1]),
                1e-6,
            )?;
        }
        // A strided input (the transpose of what is stored).
        check(
            "bias add, transposed",
            &|| {
                let rng = &mut Rng::new(5);
                Ok(vec![
                    Var::from_tensor(&randn(&[6, 4], 1.0, rng)?)?,
                    Var::from_tensor(&randn(&[6], 1.0, rng)?)?,
                ])
            },
            &|t| bias_add(&t[0].t()?, &t[1]),
            &|t| composed::bias_add(&t[0].t()?, &t[1]),
            1e-6,
        )
    }

    #[test]
    fn mask_rows_matches_the_broadcast_product() -> Result<()> {
        let mask = Tensor::from_vec(vec![1f32, 0., 1., 1., 0., 0.], (2, 3), &Device::Cpu)?;
        check(
            "mask rows",
            &|| {
                Ok(vec![Var::from_tensor(&randn(
                    &[2, 3, 4],
                    1.0,
                    &mut Rng::new(3),
                )?)?])
            },
            &|t| mask_rows(&t[0], &mask),
            &|t| t[0].broadcast_mul(&mask.unsqueeze(2)?),
            0.0,
        )?;
        let err = mask_rows(&mask, &mask).unwrap_err().to_string();
        assert!(err.contains("mask [2, 3] for rows [2]"), "{err}");
        Ok(())
    }
}
