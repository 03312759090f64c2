//! PCA and kNN against independent brute force on small random data.

use llm_esr_prep::knn::knn;
use llm_esr_prep::pca;
use llm_esr_runtime::candle::{Device, Tensor};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

/// n x d data with decreasing variance per latent direction.
fn data(n: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut r = Lcg(seed);
    let mut x = vec![0f64; n * d];
    // a random rotation-ish mix of scaled coordinates + offset
    let mix: Vec<f64> = (0..d * d).map(|_| r.next()).collect();
    for i in 0..n {
        let z: Vec<f64> = (0..d).map(|j| r.next() * (d - j) as f64).collect();
        for c in 0..d {
            x[i * d + c] = 3.0 + (0..d).map(|j| z[j] * mix[j * d + c]).sum::<f64>();
        }
    }
    x
}

fn covariance(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mean: Vec<f64> = (0..d)
        .map(|c| (0..n).map(|i| x[i * d + c]).sum::<f64>() / n as f64)
        .collect();
    let mut cov = vec![0f64; d * d];
    for i in 0..n {
        for a in 0..d {
            for b in 0..d {
                cov[a * d + b] += (x[i * d + a] - mean[a]) * (x[i * d + b] - mean[b]);
            }
        }
    }
    for v in cov.iter_mut() {
        *v /= (n - 1) as f64;
    }
    cov
}

/// Top-k eigenvectors by power iteration with deflation (independent method).
fn power_iteration(cov: &[f64], d: usize, k: usize) -> Vec<(f64, Vec<f64>)> {
    let mut a = cov.to_vec();
    let mut out = Vec::new();
    let mut r = Lcg(99);
    for _ in 0..k {
        let mut v: Vec<f64> = (0..d).map(|_| r.next()).collect();
        let mut lambda = 0.0;
        for _ in 0..5000 {
            let w: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| a[i * d + j] * v[j]).sum())
                .collect();
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            lambda = norm;
            v = w.iter().map(|x| x / norm).collect();
        }
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] -= lambda * v[i] * v[j];
            }
        }
        out.push((lambda, v));
    }
    out
}

#[test]
fn pca_matches_power_iteration() {
    let (n, d, k) = (300, 12, 4);
    let x = data(n, d, 7);
    let t = Tensor::from_vec(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (n, d),
        &Device::Cpu,
    )
    .unwrap();
    let p = pca::fit(&t, k).unwrap();
    // Same data in f32 for the reference.
    let xf: Vec<f64> = x.iter().map(|&v| v as f32 as f64).collect();
    let cov = covariance(&xf, n, d);
    let reference = power_iteration(&cov, d, k);
    let trace: f64 = (0..d).map(|i| cov[i * d + i]).sum();
    for (c, (lambda, v)) in reference.iter().enumerate() {
        let comp = &p.components[c * d..(c + 1) * d];
        let dot: f64 = comp.iter().zip(v).map(|(a, b)| a * b).sum();
        assert!(dot.abs() > 0.999999, "component {c}: |cos| = {}", dot.abs());
        assert!(
            (p.eigenvalues[c] - lambda).abs() < 1e-6 * lambda,
            "eigenvalue {c}"
        );
        assert!((p.explained_variance_ratio[c] - lambda / trace).abs() < 1e-9);
        // Sign rule: the largest-magnitude entry is positive.
        let big = comp
            .iter()
            .cloned()
            .fold(0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        assert!(big > 0.0);
    }
    // Projection = centred data times components; its variance = eigenvalues.
    let y: Vec<Vec<f32>> = p.transform(&t).unwrap().to_vec2().unwrap();
    for c in 0..k {
        let mean: f64 = y.iter().map(|r| r[c] as f64).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-3, "projection not centred");
        let var: f64 = y.iter().map(|r| (r[c] as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!(
            (var - p.eigenvalues[c]).abs() < 1e-3 * p.eigenvalues[c],
            "projected variance {c}"
        );
    }
    // Deterministic: fitting again gives identical numbers.
    assert_eq!(pca::fit(&t, k).unwrap(), p);
}

#[test]
fn knn_matches_brute_force() {
    let (n, d, k) = (203, 9, 17);
    let mut r = Lcg(3);
    let mut x: Vec<f32> = (0..n * d).map(|_| r.next() as f32).collect();
    // A duplicate row (tie) and a zero row.
    for c in 0..d {
        x[5 * d + c] = x[9 * d + c];
        x[11 * d + c] = 0.0;
    }
    let t = Tensor::from_vec(x.clone(), (n, d), &Device::Cpu).unwrap();
    // Block smaller than n and not dividing it.
    let nb = knn(&t, k, 50).unwrap();
    let nb_one_block = knn(&t, k, 4096).unwrap();
    assert_eq!(nb.indices, nb_one_block.indices);
    let norm = |i: usize| {
        (0..d)
            .map(|c| (x[i * d + c] as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    for i in 0..n {
        let mut all: Vec<(f64, usize)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                let dot: f64 = (0..d)
                    .map(|c| x[i * d + c] as f64 * x[j * d + c] as f64)
                    .sum();
                let den = norm(i) * norm(j);
                (if den == 0.0 { 0.0 } else { dot / den }, j)
            })
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for c in 0..k {
            let got_j = nb.indices[i * k + c] as usize;
            let got_s = nb.scores[i * k + c] as f64;
            assert_ne!(got_j, i, "row {i} lists itself");
            assert!(
                (got_s - all[c].0).abs() < 1e-5,
                "row {i} rank {c}: score {got_s} vs {}",
                all[c].0
            );
            if got_j != all[c].1 {
                // Only allowed for (near-)ties.
                assert!((all[c].0 - all.iter().find(|p| p.1 == got_j).unwrap().0).abs() < 1e-5);
            }
        }
    }
    // The duplicate pair are each other's best neighbour, with cosine 1.
    assert_eq!(nb.indices[5 * k], 9);
    assert_eq!(nb.indices[9 * k], 5);
    // The zero row scores 0 against everyone: ties broken by the lower index.
    assert_eq!(&nb.indices[11 * k..11 * k + 3], &[0, 1, 2]);
    assert!(knn(&t, n, 50).is_err());
}
