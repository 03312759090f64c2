//! Checkpoints: one safetensors file holding the parameters, the optimizer
//! moments and the training state (as a JSON byte tensor), written atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use llm_esr_runtime::candle::{safetensors, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::files::write_atomic;

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    pub step: u64,
    pub best_metric: f64,
    pub best_epoch: usize,
    pub bad_epochs: usize,
    /// Fingerprint of the parameter layout (names and shapes).
    pub layout: String,
    pub world_size: usize,
    /// Steps skipped under `train.nan_policy: skip_step` so far.
    #[serde(default)]
    pub skipped_steps: u64,
}

pub fn layout(vars: &[(String, Var)]) -> String {
    vars.iter()
        .map(|(n, v)| format!("{n}{:?}", v.dims()))
        .collect::<Vec<_>>()
        .join(";")
}

fn serialize(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    // candle writes safetensors to a path; go through a scratch file so the
    // caller can rename the whole thing atomically.
    let tmp = std::env::temp_dir().join(format!(
        "llm-esr-ckpt-{}-{:?}.st",
        std::process::id(),
        std::thread::current().id()
    ));
    safetensors::save(tensors, &tmp)?;
    let bytes = std::fs::read(&tmp)?;
    std::fs::remove_file(&tmp).ok();
    Ok(bytes)
}

pub fn save(
    path: &Path,
    vars: &[(String, Var)],
    m: &[f32],
    v: &[f32],
    state: &TrainState,
) -> Result<()> {
    let mut tensors = HashMap::new();
    for (name, var) in vars {
        tensors.insert(
            format!("param.{name}"),
            var.as_tensor().to_device(&Device::Cpu)?,
        );
    }
    tensors.insert(
        "adam.m".into(),
        Tensor::from_slice(m, m.len(), &Device::Cpu)?,
    );
    tensors.insert(
        "adam.v".into(),
        Tensor::from_slice(v, v.len(), &Device::Cpu)?,
    );
    let json = serde_json::to_vec(state)?;
    tensors.insert(
        "state.json".into(),
        Tensor::from_vec(json.clone(), json.len(), &Device::Cpu)?,
    );
    write_atomic(path, &serialize(&tensors)?)
}

/// Parameters only (the best model).
pub fn save_params(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let mut tensors = HashMap::new();
    for (name, var) in vars {
        tensors.insert(
            format!("param.{name}"),
            var.as_tensor().to_device(&Device::Cpu)?,
        );
    }
    write_atomic(path, &serialize(&tensors)?)
}

fn read(path: &Path) -> Result<HashMap<String, Tensor>> {
    safetensors::load(path, &Device::Cpu).with_context(|| {
        format!(
            "checkpoint {} is unreadable or truncated: delete it and train again without --resume",
            path.display()
        )
    })
}

/// Loads parameters saved by [`save`] or [`save_params`] into `vars`.
pub fn load_params(path: &Path, vars: &[(String, Var)]) -> Result<()> {
    let tensors = read(path)?;
    for (name, var) in vars {
        let t = tensors
            .get(&format!("param.{name}"))
            .with_context(|| format!("checkpoint {} has no parameter `{name}`: it was written by a different model configuration", path.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "checkpoint {}: parameter `{name}` has shape {:?}, the model expects {:?} (different configuration)",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        llm_esr_prep::finite::ensure_finite(
            t,
            &format!("checkpoint {}: parameter `{name}`", path.display()),
            "the file is corrupt or the run had diverged: delete it and train again",
        )?;
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Loads a full checkpoint: parameters into `vars`, returns (m, v, state).
pub fn load(path: &Path, vars: &[(String, Var)]) -> Result<(Vec<f32>, Vec<f32>, TrainState)> {
    let tensors = read(path)?;
    let state_bytes: Vec<u8> = tensors
        .get("state.json")
        .with_context(|| format!("{} is not a training checkpoint", path.display()))?
        .to_vec1()?;
    let state: TrainState = serde_json::from_slice(&state_bytes)
        .with_context(|| format!("{}: corrupt training state", path.display()))?;
    if state.layout != layout(vars) {
        bail!(
            "checkpoint {} was written by a model with different parameters; resume with the same configuration, or start a new run",
            path.display()
        );
    }
    load_params(path, vars)?;
    let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let get = |k: &str| -> Result<Vec<f32>> {
        let t = tensors
            .get(k)
            .with_context(|| format!("{}: missing `{k}`", path.display()))?;
        if t.dims() != [n] {
            bail!(
                "checkpoint {}: `{k}` has shape {:?}, the model has {n} parameters; delete the \
                 checkpoint and train again",
                path.display(),
                t.dims()
            );
        }
        llm_esr_prep::finite::ensure_finite(
            t,
            &format!("checkpoint {}: optimizer state `{k}`", path.display()),
            "the file is corrupt: delete it and train again",
        )?;
        Ok(t.to_vec1()?)
    };
    Ok((get("adam.m")?, get("adam.v")?, state))
}
