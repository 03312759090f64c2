//! Helpers for testing plugins and kernels: random tensors, left-padded
//! random batches, extra left padding, and the largest difference between
//! two tensors.

use candle_core::{DType, Device, Result, Tensor};

use crate::Rng;

/// Items (b, l, d) and mask (b, l) on the CPU for sequences of these lengths,
/// left-padded as the host pads them: standard normal items drawn from
/// `seed`, `pad` at padding positions.
pub fn left_padded(
    lens: &[usize],
    l: usize,
    d: usize,
    pad: f32,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    let mut rng = Rng::new(seed);
    let b = lens.len();
    let mut items = vec![pad; b * l * d];
    let mut mask = vec![0f32; b * l];
    for (i, &n) in lens.iter().enumerate() {
        if n > l {
            candle_core::bail!("left_padded: length {n} is longer than {l}");
        }
        for t in l - n..l {
            mask[i * l + t] = 1.0;
            for v in &mut items[(i * l + t) * d..(i * l + t + 1) * d] {
                *v = rng.normal() as f32;
            }
        }
    }
    Ok((
        Tensor::from_vec(items, (b, l, d), &Device::Cpu)?,
        Tensor::from_vec(mask, (b, l), &Device::Cpu)?,
    ))
}

/// The same batch with `k` more padding positions (zeros) on the left.
pub fn pad_left(items: &Tensor, mask: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (b, _, d) = items.dims3()?;
    let zi = Tensor::zeros((b, k, d), DType::F32, items.device())?;
    let zm = Tensor::zeros((b, k), DType::F32, mask.device())?;
    Ok((
        Tensor::cat(&[&zi, items], 1)?,
        Tensor::cat(&[&zm, mask], 1)?,
    ))
}

/// `max |a - b|` over all elements, as f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()
}

/// A (CPU) tensor of `shape` with normal entries of standard deviation
/// `scale`, drawn from `rng`.
pub fn randn(shape: &[usize], scale: f32, rng: &mut Rng) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}
