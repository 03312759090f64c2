//! Finiteness of loaded numbers. A NaN or an infinity in an artifact, an
//! imported matrix or a checkpoint would train or score silently wrong (a NaN
//! score compares false with everything), so every float tensor that is loaded
//! is checked, and the first bad entry is named.

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{DType, Tensor};

/// The first entry of `t` (row-major index and value) that is not finite.
/// Integer tensors are always finite.
pub fn first_non_finite(t: &Tensor) -> Result<Option<(usize, f32)>> {
    if matches!(t.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Ok(None);
    }
    let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok(values
        .iter()
        .position(|x| !x.is_finite())
        .map(|i| (i, values[i])))
}

/// Fails when `t` holds a NaN or an infinity: "`what` has `value` at
/// [row, column]; `fix`".
pub fn ensure_finite(t: &Tensor, what: &str, fix: &str) -> Result<()> {
    let Some((i, value)) = first_non_finite(t)? else {
        return Ok(());
    };
    let at = match t.dims() {
        [_, cols] if *cols > 0 => format!("row {}, column {}", i / cols, i % cols),
        _ => format!("element {i}"),
    };
    bail!("{what} holds {value} at {at} (NaN and infinities are not allowed); {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::Device;

    #[test]
    fn names_the_first_bad_entry() -> Result<()> {
        let ok = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
        ensure_finite(&ok, "x", "fix")?;
        let bad = Tensor::new(&[[1f32, 2.], [f32::NAN, f32::INFINITY]], &Device::Cpu)?;
        let e = ensure_finite(&bad, "E_se", "rerun embed").unwrap_err();
        assert_eq!(
            e.to_string(),
            "E_se holds NaN at row 1, column 0 (NaN and infinities are not allowed); rerun embed"
        );
        let inf = Tensor::new(&[1f32, f32::NEG_INFINITY], &Device::Cpu)?;
        assert!(format!("{:#}", ensure_finite(&inf, "v", "f").unwrap_err())
            .contains("-inf at element 1"));
        Ok(())
    }
}
