//! The compute device a config key names: `cpu`, `cuda` or `cuda:N`. The one
//! parser for `embed.device` and `train.device`.

use anyhow::{Context, Result};
use llm_esr_runtime::candle::Device;

use crate::invalid::invalid_config;

/// Opens the device that the config key `key` names (`spec`): `cpu`; `cuda`,
/// the GPU of this process, `local_rank` (`embed` passes 0, `train` the
/// launcher's local rank, so that each rank of a node takes its own GPU); or
/// `cuda:N`, GPU `N` whatever the rank. An unknown value is a configuration
/// error ([`crate::InvalidConfig`]); a GPU that cannot be opened (no CUDA in
/// this build, no such GPU) is an ordinary error. Both name `key`.
pub fn parse_device(spec: &str, local_rank: usize, key: &str) -> Result<Device> {
    let s = spec.trim();
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => local_rank,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(invalid_config(format!(
                    "config key `{key}`: unknown device `{s}` (use cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    Device::new_cuda(ordinal).with_context(|| {
        format!(
            "config key `{key}` = `{s}`: cannot open CUDA device {ordinal}: this binary has no \
             CUDA support or no such GPU is visible (build with `--features cuda` on a machine \
             with the CUDA toolkit)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_opens_and_unknown_values_are_config_errors_naming_the_key() {
        assert!(matches!(
            parse_device("cpu", 3, "train.device"),
            Ok(Device::Cpu)
        ));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = parse_device(bad, 0, "embed.device").unwrap_err();
            assert!(crate::is_invalid_config(&e), "{bad}: {e:#}");
            assert!(format!("{e:#}").contains("`embed.device`"), "{e:#}");
        }
    }

    #[test]
    fn cuda_is_the_local_rank_and_its_failure_names_key_and_ordinal() {
        if llm_esr_runtime::candle::utils::cuda_is_available() {
            return;
        }
        // Without CUDA support every GPU fails to open; the message says which.
        let e = parse_device("cuda", 3, "train.device").unwrap_err();
        let msg = format!("{e:#}");
        assert!(!crate::is_invalid_config(&e), "{msg}");
        assert!(
            msg.contains("`train.device` = `cuda`: cannot open CUDA device 3"),
            "{msg}"
        );
        let e = parse_device("cuda:1", 3, "embed.device").unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot open CUDA device 1"),
            "{e:#}"
        );
    }
}
