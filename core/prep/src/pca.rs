//! Exact PCA of the item embeddings `E_se` (n x D) down to `k` dimensions, the
//! initialisation of the collaborative table `E_co` (the official code uses
//! `sklearn.decomposition.PCA(n_components=64).fit_transform`).
//!
//! Method: centre the rows, form the D x D covariance in f64 (candle matmul),
//! eigen-decompose it exactly (Householder tridiagonalisation and implicit QL,
//! after the public-domain JAMA/EISPACK `tred2`/`tql2`; O(D^3), D is at most a
//! few thousand), keep the `k` largest eigenpairs, project the centred rows.
//! Signs are fixed deterministically: the largest-magnitude entry of every
//! component is positive (lowest index on ties), as sklearn's `svd_flip` on the
//! components. The explained variance ratio is `eigenvalue / trace`.

use anyhow::{bail, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor};

/// A fitted PCA.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    /// Input width D.
    pub dim: usize,
    /// Column means (D).
    pub mean: Vec<f64>,
    /// `k` components, row-major `k x D`, orthonormal rows, by decreasing
    /// variance.
    pub components: Vec<f64>,
    /// Variances along the components (eigenvalues of the covariance with
    /// divisor `n - 1`).
    pub eigenvalues: Vec<f64>,
    /// `eigenvalues / total variance`.
    pub explained_variance_ratio: Vec<f64>,
}

impl Pca {
    /// Number of components.
    pub fn k(&self) -> usize {
        self.eigenvalues.len()
    }

    /// Projects rows `(m, D)` onto the components: `(m, k)` f32.
    pub fn transform(&self, x: &Tensor) -> Result<Tensor> {
        let (_, d) = x.dims2()?;
        if d != self.dim {
            bail!("PCA fitted on width {} applied to width {d}", self.dim);
        }
        let dev = x.device().clone();
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let mean = Tensor::from_vec(self.mean.clone(), (1, d), &Device::Cpu)?;
        let comps = Tensor::from_vec(self.components.clone(), (self.k(), d), &Device::Cpu)?;
        let xc = x.broadcast_sub(&mean)?;
        let y = xc.matmul(&comps.t()?)?;
        Ok(y.to_dtype(DType::F32)?.to_device(&dev)?)
    }
}

/// Fits a `k`-component PCA on the rows of `x` (`(n, D)`, any float dtype).
pub fn fit(x: &Tensor, k: usize) -> Result<Pca> {
    let (n, d) = x.dims2()?;
    if k == 0 || k > d {
        bail!("pca_dim = {k} must be in 1..={d} (the embedding width)");
    }
    if n < 2 {
        bail!("PCA needs at least 2 rows, got {n}");
    }
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let mean_t = x.mean_keepdim(0)?;
    let xc = x.broadcast_sub(&mean_t)?;
    let cov = (xc.t()?.matmul(&xc)? / (n as f64 - 1.0))?;
    let mut a: Vec<f64> = cov.flatten_all()?.to_vec1()?;
    if a.iter().any(|v| !v.is_finite()) {
        bail!("the embeddings contain non-finite values; recompute or re-import them");
    }
    // Symmetrise exactly (matmul rounding).
    for i in 0..d {
        for j in 0..i {
            let v = 0.5 * (a[i * d + j] + a[j * d + i]);
            a[i * d + j] = v;
            a[j * d + i] = v;
        }
    }
    let (vals, vecs) = symmetric_eigen(&a, d)?;
    // Descending order (ties: lower original index first).
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]).then(i.cmp(&j)));
    let total: f64 = vals.iter().map(|v| v.max(0.0)).sum();
    let mut components = Vec::with_capacity(k * d);
    let mut eigenvalues = Vec::with_capacity(k);
    for &c in order.iter().take(k) {
        let mut v: Vec<f64> = vecs[c * d..(c + 1) * d].to_vec();
        fix_sign(&mut v);
        components.extend_from_slice(&v);
        eigenvalues.push(vals[c].max(0.0));
    }
    let explained_variance_ratio = eigenvalues
        .iter()
        .map(|v| if total > 0.0 { v / total } else { 0.0 })
        .collect();
    Ok(Pca {
        dim: d,
        mean: mean_t.flatten_all()?.to_vec1()?,
        components,
        eigenvalues,
        explained_variance_ratio,
    })
}

/// Makes the largest-magnitude entry positive (lowest index on ties).
fn fix_sign(v: &mut [f64]) {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if x.abs() > v[best].abs() {
            best = i;
        }
    }
    if v[best] < 0.0 {
        for x in v.iter_mut() {
            *x = -*x;
        }
    }
}

/// Eigen-decomposition of a symmetric `n x n` row-major matrix. Returns the
/// eigenvalues (unsorted) and the eigenvectors as rows (`vecs[i*n..(i+1)*n]`
/// belongs to `vals[i]`).
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        bail!(
            "symmetric_eigen: expected {} entries, got {}",
            n * n,
            a.len()
        );
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut v = a.to_vec(); // row-major V[i][j] = v[i*n+j]
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    tred2(n, &mut v, &mut d, &mut e);
    // tql2 works on columns of V; transpose so that they are contiguous rows.
    let mut w = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            w[j * n + i] = v[i * n + j];
        }
    }
    tql2(n, &mut w, &mut d, &mut e)?;
    Ok((d, w))
}

/// Householder reduction to tridiagonal form (JAMA `tred2`).
fn tred2(n: usize, v: &mut [f64], d: &mut [f64], e: &mut [f64]) {
    let idx = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = v[idx(n - 1, j)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for dk in d.iter().take(i) {
            scale += dk.abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[idx(i - 1, j)];
                v[idx(i, j)] = 0.0;
                v[idx(j, i)] = 0.0;
            }
        } else {
            for dk in d.iter_mut().take(i) {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v[idx(j, i)] = f;
                g = e[j] + v[idx(j, j)] * f;
                for k in (j + 1)..i {
                    g += v[idx(k, j)] * d[k];
                    e[k] += v[idx(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[idx(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[idx(i - 1, j)];
                v[idx(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        v[idx(n - 1, i)] = v[idx(i, i)];
        v[idx(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[idx(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[idx(k, i + 1)] * v[idx(k, j)];
                }
                for k in 0..=i {
                    v[idx(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[idx(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[idx(n - 1, j)];
        v[idx(n - 1, j)] = 0.0;
    }
    v[idx(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL on the tridiagonal matrix (JAMA `tql2`), with the eigenvector
/// matrix stored transposed (`w[col * n + row]`).
fn tql2(n: usize, w: &mut [f64], d: &mut [f64], e: &mut [f64]) -> Result<()> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0f64;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n {
            if e[m].abs() <= eps * tst1 {
                break;
            }
            m += 1;
        }
        if m >= n {
            m = n - 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 60 {
                    bail!("eigen-decomposition did not converge (tql2, index {l})");
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().take(n).skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = w.split_at_mut((i + 1) * n);
                    let col_i = &mut lo[i * n..(i + 1) * n];
                    let col_i1 = &mut hi[..n];
                    for k in 0..n {
                        let h = col_i1[k];
                        col_i1[k] = s * col_i[k] + c * h;
                        col_i[k] = c * col_i[k] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_decomposition_is_exact() {
        let n = 37;
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = rnd();
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        let (vals, vecs) = symmetric_eigen(&a, n).unwrap();
        for c in 0..n {
            let v = &vecs[c * n..(c + 1) * n];
            for i in 0..n {
                let av: f64 = (0..n).map(|j| a[i * n + j] * v[j]).sum();
                assert!((av - vals[c] * v[i]).abs() < 1e-10, "A v != lambda v");
            }
            for c2 in 0..n {
                let dot: f64 = (0..n).map(|j| v[j] * vecs[c2 * n + j]).sum();
                let want = if c == c2 { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-10, "not orthonormal");
            }
        }
        // Diagonal and repeated eigenvalues.
        let mut diag = vec![0f64; 9];
        diag[0] = 2.0;
        diag[4] = 2.0;
        diag[8] = -1.0;
        let (vals, _) = symmetric_eigen(&diag, 3).unwrap();
        let mut sorted = vals.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        assert_eq!(sorted, vec![-1.0, 2.0, 2.0]);
    }
}
