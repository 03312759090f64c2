//! Importing precomputed embedding matrices (e.g. OpenAI ada-002 vectors computed
//! elsewhere) from `.npy` or `.safetensors` files, with shape checks.
//!
//! `.npy`: version 1, 2 or 3, dtype float32 or float64 of either byte order,
//! 2-D; C order (Fortran order is transposed on read). The header is parsed here.
//! `.safetensors`: a named 2-D tensor (or the only tensor when no name is
//! given), any float dtype, converted to f32.

use std::path::Path;

use anyhow::{bail, Context, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// Where to import a matrix from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSpec {
    /// `.npy` or `.safetensors` file.
    pub path: std::path::PathBuf,
    /// Tensor name inside a safetensors file (default: its only tensor).
    #[serde(default)]
    pub tensor: Option<String>,
}

/// A parsed `.npy` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyMatrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row-major f32 data.
    pub data: Vec<f32>,
}

/// Reads a 2-D float32/float64 `.npy` file.
pub fn read_npy(path: &Path) -> Result<NpyMatrix> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading {} (is the path right?)", path.display()))?;
    parse_npy(&bytes).with_context(|| format!("{} is not a usable .npy matrix", path.display()))
}

fn parse_npy(bytes: &[u8]) -> Result<NpyMatrix> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("missing the \\x93NUMPY magic; save it with numpy.save");
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("truncated header");
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy version {v}"),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        bail!("truncated: the header says {header_len} bytes but the file ends before");
    }
    let header =
        std::str::from_utf8(&bytes[header_start..data_start]).context("header is not text")?;
    let descr = dict_value(header, "descr")
        .and_then(|v| {
            v.trim()
                .strip_prefix('\'')
                .and_then(|v| v.split('\'').next())
        })
        .context("header has no 'descr'")?
        .to_string();
    let fortran = match dict_value(header, "fortran_order").map(|v| v.trim_start()) {
        Some(v) if v.starts_with("True") => true,
        Some(v) if v.starts_with("False") => false,
        _ => bail!("header has no 'fortran_order'"),
    };
    let shape_text = dict_value(header, "shape")
        .and_then(|v| {
            let v = v.trim_start().strip_prefix('(')?;
            v.split(')').next()
        })
        .context("header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .context("unreadable 'shape'")?;
    if shape.len() != 2 {
        bail!("shape {shape:?} is not 2-D; expected (rows, dim)");
    }
    let (endian, kind) = descr.split_at(1);
    let big = match endian {
        "<" | "=" | "|" => false,
        ">" => true,
        _ => bail!("unsupported dtype '{descr}'; save as float32 or float64"),
    };
    let size = match kind {
        "f4" => 4,
        "f8" => 8,
        _ => bail!("unsupported dtype '{descr}'; save as float32 or float64"),
    };
    let n = shape[0].checked_mul(shape[1]).context("shape too large")?;
    let data = &bytes[data_start..];
    let want = n * size;
    if data.len() < want {
        bail!(
            "truncated: shape {:?} of '{descr}' needs {want} data bytes, the file has {}; \
             write it again",
            shape,
            data.len()
        );
    }
    if data.len() > want {
        bail!(
            "{} bytes after the {want} data bytes of shape {:?}; the header and data disagree",
            data.len() - want,
            shape
        );
    }
    let mut values = Vec::with_capacity(n);
    for chunk in data.chunks_exact(size) {
        let v = if size == 4 {
            let a = [chunk[0], chunk[1], chunk[2], chunk[3]];
            if big {
                f32::from_be_bytes(a)
            } else {
                f32::from_le_bytes(a)
            }
        } else {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            (if big {
                f64::from_be_bytes(a)
            } else {
                f64::from_le_bytes(a)
            }) as f32
        };
        values.push(v);
    }
    let (rows, cols) = (shape[0], shape[1]);
    if fortran {
        let mut t = vec![0f32; n];
        for r in 0..rows {
            for c in 0..cols {
                t[r * cols + c] = values[c * rows + r];
            }
        }
        values = t;
    }
    Ok(NpyMatrix {
        rows,
        cols,
        data: values,
    })
}

/// The text after `'key':` in a Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    for quote in ['\'', '"'] {
        let pat = format!("{quote}{key}{quote}");
        if let Some(pos) = header.find(&pat) {
            let rest = &header[pos + pat.len()..];
            return rest.trim_start().strip_prefix(':');
        }
    }
    None
}

/// Reads one 2-D tensor (as f32, CPU) from a safetensors file.
pub fn read_safetensors(path: &Path, name: Option<&str>) -> Result<Tensor> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading {} (is the path right?)", path.display()))?;
    let st = llm_esr_runtime::candle::safetensors::SliceSafetensors::new(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({e}); it is truncated or corrupt, write it again",
            path.display()
        )
    })?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let name = match name {
        Some(n) => n.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => bail!(
            "{} holds {} tensors ({}); set `tensor` to the one to import",
            path.display(),
            names.len(),
            names.join(", ")
        ),
    };
    if !names.contains(&name) {
        bail!(
            "{} has no tensor `{name}` (tensors: {}); set `tensor` to one of them",
            path.display(),
            names.join(", ")
        );
    }
    let t = st
        .load(&name, &Device::Cpu)
        .with_context(|| format!("{}: loading tensor `{name}`", path.display()))?;
    if t.rank() != 2 {
        bail!(
            "{}: tensor `{name}` has shape {:?}; expected 2-D (rows, dim)",
            path.display(),
            t.dims()
        );
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Imports a matrix and checks its row count against `allowed_rows` (the first
/// entry is the expected one, named in the error as `what`). Returns an f32 CPU
/// tensor.
pub fn import_matrix(spec: &ImportSpec, allowed_rows: &[usize], what: &str) -> Result<Tensor> {
    let path = &spec.path;
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let t = match ext.as_str() {
        "npy" => {
            if spec.tensor.is_some() {
                bail!(
                    "{}: `tensor` applies to safetensors files only; remove it",
                    path.display()
                );
            }
            let m = read_npy(path)?;
            Tensor::from_vec(m.data, (m.rows, m.cols), &Device::Cpu)?
        }
        "safetensors" => read_safetensors(path, spec.tensor.as_deref())?,
        _ => bail!(
            "{}: unknown extension; import `.npy` or `.safetensors` files",
            path.display()
        ),
    };
    let (rows, cols) = t.dims2()?;
    if !allowed_rows.contains(&rows) {
        let want: Vec<String> = allowed_rows.iter().map(|r| r.to_string()).collect();
        bail!(
            "{}: shape ({rows}, {cols}) has {rows} rows but {what} needs {} rows; the file does \
             not belong to this dataset (rerun the export for the prepared ids)",
            path.display(),
            want.join(" or ")
        );
    }
    if cols == 0 {
        bail!("{}: shape ({rows}, 0) has no columns", path.display());
    }
    crate::finite::ensure_finite(
        &t,
        &path.display().to_string(),
        "fix the export (every value must be a finite number) and import it again",
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_bytes(descr: &str, shape: &str, fortran: bool, data: &[u8]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_f4_f8_and_fortran() {
        let vals = [1f32, 2., 3., 4., 5., 6.];
        let data: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let m = parse_npy(&npy_bytes("<f4", "(2, 3)", false, &data)).unwrap();
        assert_eq!((m.rows, m.cols), (2, 3));
        assert_eq!(m.data, vals.to_vec());
        let data8: Vec<u8> = vals
            .iter()
            .flat_map(|v| (*v as f64).to_le_bytes())
            .collect();
        let m = parse_npy(&npy_bytes("<f8", "(2, 3)", true, &data8)).unwrap();
        // Fortran order: column-major storage of [[1,3,5],[2,4,6]].
        assert_eq!(m.data, vec![1., 3., 5., 2., 4., 6.]);
        let e = parse_npy(&npy_bytes("<f4", "(2, 3)", false, &data[..20])).unwrap_err();
        assert!(format!("{e:#}").contains("truncated"));
        assert!(parse_npy(&npy_bytes("<i8", "(2, 3)", false, &data)).is_err());
        assert!(parse_npy(&npy_bytes("<f4", "(6,)", false, &data)).is_err());
    }
}
