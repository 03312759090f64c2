//! Adam, torch's `Adam` (bias-corrected, `eps` added to the root of the
//! second moment, L2 `weight_decay` added to the gradient).
//!
//! The parameters and both moments stay on their device between steps: each
//! parameter has its moments in one `(2, n)` tensor beside it, and on the CPU
//! one step is two in-place passes over each parameter's own storage (the
//! moments, then the parameter), with no copy of either. Elsewhere the same
//! arithmetic runs as tensor ops, in the same order, so both paths give the
//! same bits. The gradient arrives as the one flat f32 tensor that the
//! data-parallel all-reduce sums, on the parameters' device; on the CPU its
//! storage is read in place.

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{self, CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};

use crate::flat::{f32_mut, f32_ref};

pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    /// Per parameter: `[m; v]`, shape (2, n), on the parameter's device.
    moments: Vec<Tensor>,
}

impl Adam {
    pub fn new(
        vars: &[Var],
        lr: f64,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Tensor::zeros((2, v.elem_count()), DType::F32, v.device()))
            .collect::<candle::Result<_>>()?;
        Ok(Adam {
            lr,
            beta1: betas[0],
            beta2: betas[1],
            eps,
            weight_decay,
            step: 0,
            moments,
        })
    }

    /// Number of scalars updated (the length of the flat gradient).
    pub fn len(&self) -> usize {
        self.moments.iter().map(|m| m.elem_count() / 2).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one update to `vars` given their flat gradient `grad` (on
    /// their device, see [`crate::flat::gradient`]).
    pub fn step(&mut self, vars: &[Var], grad: &Tensor) -> Result<()> {
        if grad.elem_count() != self.len() || vars.len() != self.moments.len() {
            bail!(
                "Adam: {} gradients for {} parameters",
                grad.elem_count(),
                self.len()
            );
        }
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        let hyper = Hyper {
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            wd: self.weight_decay as f32,
        };
        let update = Update {
            step_size: (self.lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
        };
        let (storage, layout) = grad.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage {
            // In place: the moments, then the parameter, reading the gradient
            // where the all-reduce left it.
            let flat = f32_ref(cpu, layout)?;
            let mut off = 0;
            for (var, moments) in vars.iter().zip(&self.moments) {
                let n = var.elem_count();
                let op = Moments {
                    grad: &flat[off..off + n],
                    hyper,
                };
                moments.inplace_op2(
                    var.as_tensor(),
                    &Pass("adam-moments", |mv, p| op.apply(mv, p)),
                )?;
                var.as_tensor()
                    .inplace_op2(moments, &Pass("adam-update", |p, mv| update.apply(p, mv)))?;
                off += n;
            }
            return Ok(());
        }
        drop(storage);
        let mut off = 0;
        for (var, moments) in vars.iter().zip(&self.moments) {
            let n = var.elem_count();
            composed_step(var, moments, &grad.narrow(0, off, n)?, hyper, &update)?;
            off += n;
        }
        Ok(())
    }

    /// The moments as flat host vectors `(m, v)` in parameter order (checkpoints).
    pub fn moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut m, mut v) = (
            Vec::with_capacity(self.len()),
            Vec::with_capacity(self.len()),
        );
        for t in &self.moments {
            m.extend(t.get(0)?.to_vec1::<f32>()?);
            v.extend(t.get(1)?.to_vec1::<f32>()?);
        }
        Ok((m, v))
    }

    /// Restores moments saved by [`Adam::moments`].
    pub fn set_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        if m.len() != self.len() || v.len() != self.len() {
            bail!(
                "Adam: {} / {} saved moments for {} parameters",
                m.len(),
                v.len(),
                self.len()
            );
        }
        let mut off = 0;
        for t in &mut self.moments {
            let n = t.elem_count() / 2;
            let both = [&m[off..off + n], &v[off..off + n]].concat();
            *t = Tensor::from_vec(both, (2, n), t.device())?;
            off += n;
        }
        Ok(())
    }
}

/// First pass: `[m; v]` from the gradient (and the parameter, for weight
/// decay), exactly as torch orders the arithmetic.
struct Moments<'a> {
    grad: &'a [f32],
    hyper: Hyper,
}

/// The moment decay rates and the L2 weight decay, as f32.
#[derive(Clone, Copy)]
struct Hyper {
    b1: f32,
    b2: f32,
    wd: f32,
}

impl Moments<'_> {
    fn apply(&self, mv: &mut [f32], p: &[f32]) {
        let n = p.len();
        let (m, v) = mv.split_at_mut(n);
        let Hyper { b1, b2, wd } = self.hyper;
        for i in 0..n {
            let gi = self.grad[i] + wd * p[i];
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        }
    }
}

/// Second pass: the parameter from the new moments.
struct Update {
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl Update {
    fn apply(&self, p: &mut [f32], mv: &[f32]) {
        let (m, v) = mv.split_at(p.len());
        for i in 0..p.len() {
            p[i] -= self.step_size * m[i] / (v[i].sqrt() / self.bc2_sqrt + self.eps);
        }
    }
}

/// One in-place pass on the CPU: the first buffer written, the second read.
struct Pass<F: Fn(&mut [f32], &[f32])>(&'static str, F);

impl<F: Fn(&mut [f32], &[f32])> InplaceOp2 for Pass<F> {
    fn name(&self) -> &'static str {
        self.0
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle::Result<()> {
        (self.1)(f32_mut(s1, l1)?, f32_ref(s2, l2)?);
        Ok(())
    }
}

/// The same two passes as tensor ops, for devices without the in-place
/// kernels; `g` is this parameter's part of the flat gradient.
fn composed_step(var: &Var, moments: &Tensor, g: &Tensor, h: Hyper, up: &Update) -> Result<()> {
    let p = var.as_tensor();
    let dev = p.device();
    let scalar = |x: f32| Tensor::new(x, dev);
    let pf = p.flatten_all()?;
    let g = if h.wd != 0.0 {
        (g + pf.broadcast_mul(&scalar(h.wd)?)?)?
    } else {
        g.clone()
    };
    let (m, v) = (moments.get(0)?, moments.get(1)?);
    let m = (m.broadcast_mul(&scalar(h.b1)?)? + g.broadcast_mul(&scalar(1.0 - h.b1)?)?)?;
    let v = (v.broadcast_mul(&scalar(h.b2)?)? + g.broadcast_mul(&scalar(1.0 - h.b2)?)?.mul(&g)?)?;
    let den = (v.sqrt()?.broadcast_div(&scalar(up.bc2_sqrt)?)?).broadcast_add(&scalar(up.eps)?)?;
    let step = m.broadcast_mul(&scalar(up.step_size)?)?.div(&den)?;
    var.set(&(pf - step)?.reshape(p.shape())?)?;
    moments.slice_set(&Tensor::stack(&[&m, &v], 0)?, 0, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::Device;

    fn flat(g: &[f32]) -> Tensor {
        Tensor::new(g, &Device::Cpu).unwrap()
    }

    /// Two steps of torch.optim.Adam(lr=0.1) on p = [1, -2] with grads [0.5, 0.25]
    /// then [-1, 2], computed by hand from the update rule.
    #[test]
    fn matches_hand_computed_adam() -> Result<()> {
        let var = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &Device::Cpu)?)?;
        let mut adam = Adam::new(std::slice::from_ref(&var), 0.1, [0.9, 0.999], 1e-8, 0.0)?;
        adam.step(std::slice::from_ref(&var), &flat(&[0.5, 0.25]))?;
        // Step 1: m_hat = g, v_hat = g^2, so p -= lr * sign(g) (up to eps).
        let p: Vec<f32> = var.as_tensor().to_vec1()?;
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] + 2.1).abs() < 1e-6,
            "{p:?}"
        );
        adam.step(std::slice::from_ref(&var), &flat(&[-1.0, 2.0]))?;
        // Step 2, coordinate 0: m = 0.9*0.05 + 0.1*-1 = -0.055; v = 0.999*0.00025 + 0.001*1 = 0.00124975
        // m_hat = -0.055/0.19 = -0.289474; v_hat = 0.00124975/0.001999 = 0.625188; p = 0.9 + 0.1*0.289474/0.790688
        let p: Vec<f32> = var.as_tensor().to_vec1()?;
        let expect0 = 0.9 + 0.1 * 0.289_473_7 / 0.625_187_6f32.sqrt();
        assert!((p[0] - expect0).abs() < 1e-5, "{} vs {expect0}", p[0]);
        Ok(())
    }

    /// The in-place CPU kernels and the composed tensor ops (the path of
    /// other devices) give the same bits, weight decay included.
    #[test]
    fn in_place_and_composed_steps_agree() -> Result<()> {
        let init: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Var::from_tensor(&Tensor::from_vec(init.clone(), (37,), &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(init, (37,), &Device::Cpu)?)?;
        let mut adam_a = Adam::new(std::slice::from_ref(&a), 0.01, [0.9, 0.999], 1e-8, 0.1)?;
        let mut adam_b = Adam::new(std::slice::from_ref(&b), 0.01, [0.9, 0.999], 1e-8, 0.1)?;
        for step in 0..5 {
            let grad: Vec<f32> = (0..37).map(|i| ((i * step) as f32 * 0.11).cos()).collect();
            adam_a.step(std::slice::from_ref(&a), &flat(&grad))?;
            // The composed path, forced on the CPU.
            adam_b.step += 1;
            let bc1 = 1.0 - 0.9f64.powi(adam_b.step as i32);
            let bc2 = 1.0 - 0.999f64.powi(adam_b.step as i32);
            let hyper = Hyper {
                b1: 0.9,
                b2: 0.999,
                wd: 0.1,
            };
            let up = Update {
                step_size: (0.01 / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                eps: 1e-8,
            };
            composed_step(&b, &adam_b.moments[0], &flat(&grad), hyper, &up)?;
        }
        let (pa, pb): (Vec<f32>, Vec<f32>) = (a.as_tensor().to_vec1()?, b.as_tensor().to_vec1()?);
        assert_eq!(pa, pb);
        assert_eq!(adam_a.moments()?, adam_b.moments()?);
        Ok(())
    }
}
