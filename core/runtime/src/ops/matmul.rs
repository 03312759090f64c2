//! `x @ w^T` as one custom op on the CPU, and the `gemm` calls that the
//! fused kernels share.
//!
//! candle's matmul backward computes the gradient of both operands, even of
//! a constant one: the LLM-ESR adapter applied to the frozen 12,102 x 1,536
//! item table spent a third of a training step on the table's gradient. Here
//! each operand's gradient is computed only when it is tracked, and the
//! weight's gradient is written in its own (out, in) layout (candle's goes
//! through the transpose's backward: a zero tensor and a strided sum).
//!
//! The products are the ones candle's CPU matmul makes, with the same
//! strides, the same kernel and the same parallelism rule
//! (`RAYON_NUM_THREADS`).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};

use super::fused::{contiguous, cpu_f32, fast, View};

/// One matrix of a product: a slice that starts at its first element, with
/// row and column strides.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

/// `dst (m, n) = lhs (m, k) @ rhs (k, n)`, `dst` with row stride `dst_rs`
/// and column stride 1, overwritten. Bounds are checked here, once, so that
/// the unchecked kernel never reads or writes outside the slices.
pub(super) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
) {
    gemm_with(m, n, k, dst, dst_rs, lhs, rhs, Parallelism::None)
}

/// [`gemm_into`] with the given parallelism.
#[allow(clippy::too_many_arguments)]
fn gemm_with(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_rs, 1) < dst.len(),
        "matmul: destination bounds"
    );
    if k == 0 {
        for i in 0..m {
            dst[i * dst_rs..i * dst_rs + n].fill(0.0);
        }
        return;
    }
    assert!(
        last(m, k, lhs.rs, lhs.cs) < lhs.data.len(),
        "matmul: lhs bounds"
    );
    assert!(
        last(k, n, rhs.rs, rhs.cs) < rhs.data.len(),
        "matmul: rhs bounds"
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
            parallelism,
        )
    }
}

/// candle's rule: rayon threads when there are several.
fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        n if n > 1 => Parallelism::Rayon(n),
        _ => Parallelism::None,
    }
}

/// `x (rows, in) @ w^T` for `w (out, in)`.
struct MatmulT;

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "fused-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[rows, input], &[out, w_in]) = (l1.dims(), l2.dims()) else {
            bail!("{}: 2-D operands expected", self.name());
        };
        if w_in != input {
            bail!(
                "{}: ({rows}, {input}) and ({out}, {w_in}) do not fit",
                self.name()
            );
        }
        let x = contiguous(cpu_f32(s1, self.name())?, l1);
        let w = contiguous(cpu_f32(s2, self.name())?, l2);
        let mut y = vec![0f32; rows * out];
        let lhs = Mat {
            data: &x,
            rs: input,
            cs: 1,
        };
        let rhs = Mat {
            data: &w,
            rs: 1,
            cs: input,
        };
        gemm_with(rows, out, input, &mut y, out, lhs, rhs, parallelism());
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, input) = x.dims2()?;
        let out = w.dim(0)?;
        let gv = View::of(grad);
        let g = gv.data(self.name())?;
        let dx = if x.track_op() {
            // dx (rows, in) = g (rows, out) @ w (out, in).
            let wv = View::of(w);
            let wd = wv.data(self.name())?;
            let mut dx = vec![0f32; rows * input];
            let lhs = Mat {
                data: &g,
                rs: out,
                cs: 1,
            };
            let rhs = Mat {
                data: &wd,
                rs: input,
                cs: 1,
            };
            gemm_with(rows, input, out, &mut dx, input, lhs, rhs, parallelism());
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // dw (out, in) = g^T (out, rows) @ x (rows, in).
            let xv = View::of(x);
            let xd = xv.data(self.name())?;
            let mut dw = vec![0f32; out * input];
            let lhs = Mat {
                data: &g,
                rs: 1,
                cs: out,
            };
            let rhs = Mat {
                data: &xd,
                rs: input,
                cs: 1,
            };
            gemm_with(out, input, rows, &mut dw, input, lhs, rhs, parallelism());
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `x @ w^T` for `x` of shape (.., in) and `w` of shape (out, in), as one
/// 2-D matrix product over the rows of `x`. candle's `broadcast_matmul`
/// (and `candle_nn::Linear` on strided 3-D input) broadcasts `w` over the
/// batch, so its backward computes one weight gradient per batch row and sums
/// them with a strided reduction. On the CPU in f32 the product is one
/// custom op whose backward computes only the tracked operands' gradients.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&input, lead)) = dims.split_last() else {
        bail!("matmul_t of a scalar");
    };
    let (out, w_in) = w.dims2()?;
    if w_in != input {
        bail!("matmul_t: input {dims:?} and weight ({out}, {w_in}) do not fit");
    }
    let rows: usize = lead.iter().product();
    let mut shape = lead.to_vec();
    shape.push(out);
    let x2 = x.reshape((rows, input))?;
    let y = if fast(&x2) && fast(w) {
        x2.apply_op2(w, MatmulT)?
    } else {
        x2.matmul(&w.t()?)?
    };
    y.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff as max_diff, randn};
    use crate::Rng;
    use candle_core::Var;

    #[test]
    fn matches_candles_matmul_and_skips_constant_operands() -> Result<()> {
        let rng = &mut Rng::new(4);
        for (lead, input, out) in [
            (vec![3usize, 5], 7usize, 4usize),
            (vec![9], 16, 1),
            (vec![2, 1, 3], 1, 5),
        ] {
            let mut xs = lead.clone();
            xs.push(input);
            let (x0, w0) = (randn(&xs, 1.0, rng)?, randn(&[out, input], 1.0, rng)?);
            let mut ys = lead.clone();
            ys.push(out);
            let r = randn(&ys, 1.0, rng)?;
            for x_tracked in [true, false] {
                let (xa, wa) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
                let xa_t = if x_tracked {
                    xa.as_tensor().clone()
                } else {
                    x0.clone()
                };
                let ya = matmul_t(&xa_t, wa.as_tensor())?;
                let ga = (&ya * &r)?.sum_all()?.backward()?;
                let (xb, wb) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
                let yb = xb.as_tensor().broadcast_matmul(&wb.as_tensor().t()?)?;
                let gb = (&yb * &r)?.sum_all()?.backward()?;
                assert!(max_diff(&ya, &yb)? < 1e-5, "forward {lead:?}");
                let dw = max_diff(
                    ga.get(wa.as_tensor()).unwrap(),
                    gb.get(wb.as_tensor()).unwrap(),
                )?;
                assert!(dw < 1e-5, "weight gradient {lead:?}: {dw}");
                match ga.get(xa.as_tensor()) {
                    Some(dx) => {
                        assert!(x_tracked, "a constant input got a gradient");
                        let d = max_diff(dx, gb.get(xb.as_tensor()).unwrap())?;
                        assert!(d < 1e-5, "input gradient {lead:?}: {d}");
                    }
                    None => assert!(!x_tracked, "the input got no gradient"),
                }
            }
        }
        // A strided input (a transposed view) is read through its layout.
        let x = randn(&[6, 4], 1.0, rng)?;
        let w = randn(&[3, 6], 1.0, rng)?;
        let d = max_diff(&matmul_t(&x.t()?, &w)?, &x.t()?.matmul(&w.t()?)?)?;
        assert!(d < 1e-5, "{d}");
        let err = matmul_t(&x, &w).unwrap_err().to_string();
        assert!(err.contains("do not fit"), "{err}");
        Ok(())
    }
}
