//! Adam over one flat buffer per parameter set.
//!
//! Gradients are gathered into a single contiguous f32 buffer (the same buffer
//! that the data-parallel all-reduce sums), the update runs in plain loops over
//! it, and the new values are written back to the candle variables. This is
//! torch's `Adam` (bias-corrected, `eps` added to the root of the second moment,
//! L2 `weight_decay` added to the gradient).

use anyhow::Result;
use llm_esr_runtime::candle::{backprop::GradStore, Tensor, Var};

pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Adam {
    pub fn new(n: usize, lr: f64, betas: [f64; 2], eps: f64, weight_decay: f64) -> Self {
        Adam {
            lr,
            beta1: betas[0],
            beta2: betas[1],
            eps,
            weight_decay,
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Applies one update to `vars` given the flat gradient `grad`.
    pub fn step(&mut self, vars: &[Var], grad: &[f32]) -> Result<()> {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let step_size = (self.lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (eps, wd) = (self.eps as f32, self.weight_decay as f32);
        let mut off = 0;
        for var in vars {
            let n = var.elem_count();
            let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let g = &grad[off..off + n];
            let m = &mut self.m[off..off + n];
            let v = &mut self.v[off..off + n];
            for i in 0..n {
                let gi = g[i] + wd * p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
            }
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
            off += n;
        }
        Ok(())
    }
}

/// Concatenates the gradients of `vars` (zeros where a variable got none).
pub fn flatten_grads(vars: &[Var], grads: &GradStore) -> Result<Vec<f32>> {
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut flat = Vec::with_capacity(total);
    for var in vars {
        match grads.get(var.as_tensor()) {
            Some(g) => flat.extend(g.flatten_all()?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0.0, var.elem_count())),
        }
    }
    Ok(flat)
}

/// Concatenates the values of `vars`.
pub fn flatten_values(vars: &[Var]) -> Result<Vec<f32>> {
    let mut flat = Vec::new();
    for var in vars {
        flat.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(flat)
}

/// Writes a flat buffer back into `vars`.
pub fn assign_values(vars: &[Var], flat: &[f32]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::Device;

    /// Two steps of torch.optim.Adam(lr=0.1) on p = [1, -2] with grads [0.5, 0.25]
    /// then [-1, 2], computed by hand from the update rule.
    #[test]
    fn matches_hand_computed_adam() -> Result<()> {
        let var = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &Device::Cpu)?)?;
        let mut adam = Adam::new(2, 0.1, [0.9, 0.999], 1e-8, 0.0);
        adam.step(std::slice::from_ref(&var), &[0.5, 0.25])?;
        // Step 1: m_hat = g, v_hat = g^2, so p -= lr * sign(g) (up to eps).
        let p: Vec<f32> = var.as_tensor().to_vec1()?;
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] + 2.1).abs() < 1e-6,
            "{p:?}"
        );
        adam.step(std::slice::from_ref(&var), &[-1.0, 2.0])?;
        // Step 2, coordinate 0: m = 0.9*0.05 + 0.1*-1 = -0.055; v = 0.999*0.00025 + 0.001*1 = 0.00124975
        // m_hat = -0.055/0.19 = -0.289474; v_hat = 0.00124975/0.001999 = 0.625188; p = 0.9 + 0.1*0.289474/0.790688
        let p: Vec<f32> = var.as_tensor().to_vec1()?;
        let expect0 = 0.9 + 0.1 * 0.289_473_7 / 0.625_187_6f32.sqrt();
        assert!((p[0] - expect0).abs() < 1e-5, "{} vs {expect0}", p[0]);
        Ok(())
    }
}
