//! Exact top-K cosine neighbours of the rows of `U_llm`, excluding each row
//! itself (the official `retrieval_users.ipynb` ranks `cosine_similarity(U, U)`
//! and drops the first column).
//!
//! Rows are L2-normalised (a zero row stays zero, cosine 0 with everything),
//! then blocks of `block` rows are multiplied against all rows with candle's
//! matmul and a partial selection keeps the best `k` of each row, so memory is
//! `block x n` scores, never `n x n`. Order: higher cosine first; equal scores
//! by lower row index first (deterministic).

use std::cmp::Ordering;

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor, D};

/// Neighbour lists, row-major `rows x k`.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    /// Number of rows.
    pub rows: usize,
    /// Neighbours per row.
    pub k: usize,
    /// 0-based row indices, best first.
    pub indices: Vec<u32>,
    /// Cosine similarities matching `indices`.
    pub scores: Vec<f32>,
}

fn better(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Computes the top-`k` neighbours of every row of `x` (`(n, D)`). `k` larger
/// than `n - 1` is an error.
pub fn knn(x: &Tensor, k: usize, block: usize) -> Result<Neighbours> {
    let (n, _d) = x.dims2()?;
    if k == 0 {
        bail!("neighbours must be at least 1");
    }
    if k >= n {
        bail!(
            "neighbours = {k} needs at least {} users, the dataset has {n}; lower `neighbours`",
            k + 1
        );
    }
    let block = block.max(1);
    let x = x.to_dtype(DType::F32)?;
    let values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    if values.iter().any(|v| !v.is_finite()) {
        bail!("the user embeddings contain non-finite values; recompute or re-import them");
    }
    let norms = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    // Zero rows: divide by 1 instead of 0.
    let safe = norms.eq(0f32)?.where_cond(&norms.ones_like()?, &norms)?;
    let xn = x.broadcast_div(&safe)?.contiguous()?;
    let xt = xn.t()?.contiguous()?;
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .max(1);
    let mut indices = vec![0u32; n * k];
    let mut scores = vec![0f32; n * k];
    let mut start = 0;
    while start < n {
        let len = block.min(n - start);
        let sims: Vec<f32> = xn
            .narrow(0, start, len)?
            .matmul(&xt)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let out_idx = &mut indices[start * k..(start + len) * k];
        let out_sc = &mut scores[start * k..(start + len) * k];
        let per = len.div_ceil(threads);
        std::thread::scope(|scope| {
            for ((t, idx_chunk), sc_chunk) in out_idx
                .chunks_mut(per * k)
                .enumerate()
                .zip(out_sc.chunks_mut(per * k))
            {
                let sims = &sims;
                scope.spawn(move || {
                    let mut cand: Vec<(f32, u32)> = Vec::with_capacity(n);
                    for (local, (irow, srow)) in idx_chunk
                        .chunks_mut(k)
                        .zip(sc_chunk.chunks_mut(k))
                        .enumerate()
                    {
                        let r = t * per + local;
                        let me = start + r;
                        let row = &sims[r * n..(r + 1) * n];
                        cand.clear();
                        cand.extend(
                            row.iter()
                                .enumerate()
                                .filter(|(j, _)| *j != me)
                                .map(|(j, &s)| (s + 0.0, j as u32)), // -0.0 -> 0.0
                        );
                        cand.select_nth_unstable_by(k - 1, better);
                        cand.truncate(k);
                        cand.sort_unstable_by(better);
                        for (c, (s, j)) in cand.iter().enumerate() {
                            irow[c] = *j;
                            srow[c] = *s;
                        }
                    }
                });
            }
        });
        start += len;
    }
    Ok(Neighbours {
        rows: n,
        k,
        indices,
        scores,
    })
}
