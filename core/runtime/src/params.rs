//! A parameter store that initialises from the run's seed.
//!
//! It plugs into `candle_nn::VarBuilder` as a backend, so plugins are written the
//! usual candle way (`load(vb, cfg)` with named weights and `Init` hints), while
//! every initial value is drawn from [`Rng`] in creation order: the same seed
//! gives the same parameters on every rank and every run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};

use crate::Rng;

#[derive(Default)]
struct Inner {
    vars: BTreeMap<String, Var>,
    /// Creation order, which is also the order the optimizer sees.
    order: Vec<String>,
    rng: Option<Rng>,
}

/// Shared handle; clones refer to the same parameters.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        ParamStore {
            inner: Arc::new(Mutex::new(Inner {
                rng: Some(Rng::new(seed)),
                ..Default::default()
            })),
        }
    }

    /// A `VarBuilder` that creates f32 variables in this store on `device`.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// All variables in creation order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let inner = self.inner.lock().unwrap();
        inner
            .order
            .iter()
            .map(|n| (n.clone(), inner.vars[n].clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Var> {
        self.inner.lock().unwrap().vars.get(name).cloned()
    }

    /// Adds a variable whose value the host computed (e.g. a PCA table).
    pub fn insert(&self, name: &str, value: &Tensor) -> Result<Var> {
        let mut inner = self.inner.lock().unwrap();
        if inner.vars.contains_key(name) {
            candle_core::bail!("parameter `{name}` is defined twice");
        }
        let var = Var::from_tensor(value)?;
        inner.vars.insert(name.to_string(), var.clone());
        inner.order.push(name.to_string());
        Ok(var)
    }

    /// Total number of scalars.
    pub fn num_scalars(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// The names of `vars` whose gradient in `grads` is missing, zero or not
/// finite: the check of every "gradients reach every parameter" test, for
/// plugin authors as for the host.
pub fn params_without_gradient(
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, var) in vars {
        let norm = match grads.get(var.as_tensor()) {
            Some(g) => g
                .abs()?
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?,
            None => 0.0,
        };
        if !(norm > 0.0 && norm.is_finite()) {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}

fn sample(rng: &mut Rng, shape: &Shape, init: Init, device: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let values: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.next_f64()) as f32)
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let dims = shape.dims();
            let receptive: usize = dims.iter().skip(2).product();
            let fan_in = dims.get(1).copied().unwrap_or(1) * receptive;
            let fan_out = dims.first().copied().unwrap_or(1) * receptive;
            let fan = match fan {
                FanInOut::FanIn => fan_in,
                FanInOut::FanOut => fan_out,
            } as f64;
            let gain = match non_linearity {
                NonLinearity::ReLU => 2f64.sqrt(),
                NonLinearity::Tanh => 5.0 / 3.0,
                NonLinearity::Linear | NonLinearity::Sigmoid => 1.0,
                NonLinearity::SELU => 0.75,
                NonLinearity::ExplicitGain(g) => g,
            };
            let std = gain / fan.sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n).map(|_| (std * rng.normal()) as f32).collect(),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| (bound * (2.0 * rng.next_f64() - 1.0)) as f32)
                        .collect()
                }
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), device)
}

impl candle_nn::var_builder::SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(var) = inner.vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "parameter `{name}` has shape {:?}, asked for {:?}",
                    var.shape(),
                    shape
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let rng = inner.rng.as_mut().expect("param store rng");
        let value = sample(rng, &shape, init, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&value)?;
        inner.vars.insert(name.to_string(), var.clone());
        inner.order.push(name.to_string());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.inner.lock().unwrap().vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("parameter `{name}` does not exist"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.lock().unwrap().vars.contains_key(name)
    }
}

/// Xavier-normal hint for a 2-D weight of shape (out, in), as torch computes it.
pub fn xavier_normal(fan_out: usize, fan_in: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (fan_in + fan_out) as f64).sqrt(),
    }
}
