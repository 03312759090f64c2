//! The safetensors files of the artifacts: saved atomically with their hash,
//! loaded with errors that say to rerun `embed`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use llm_esr_runtime::candle::{Device, Tensor};

use crate::fsutil::{sha256_file, with_temp_path};

/// Saves tensors atomically as safetensors; returns the file's sha256.
pub(super) fn save_tensors(path: &Path, tensors: &[(&str, Tensor)]) -> Result<String> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok(((*n).to_string(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    with_temp_path(path, |tmp| {
        llm_esr_runtime::candle::safetensors::save(&map, tmp)
            .with_context(|| format!("writing {}", path.display()))?;
        // The safetensors writer creates its file private (0600); artifacts are
        // shared like every other output.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644));
        }
        Ok(())
    })?;
    sha256_file(path)
}

/// Loads one named tensor of an artifact file, with errors that say to rerun
/// `embed`.
pub(super) fn load_tensor(path: &Path, name: &str, device: &Device) -> Result<Tensor> {
    let rerun = "rerun `llm-esr-orch embed CONFIG`";
    if !path.is_file() {
        bail!("{} is missing; {rerun}", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = llm_esr_runtime::candle::safetensors::SliceSafetensors::new(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({e}); it is truncated or corrupt, {rerun} \
             --force",
            path.display()
        )
    })?;
    let t = st.load(name, device).map_err(|e| {
        anyhow::anyhow!(
            "{}: no usable tensor `{name}` ({e}); {rerun}",
            path.display()
        )
    })?;
    Ok(t)
}
