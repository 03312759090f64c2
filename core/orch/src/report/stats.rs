//! Paired significance tests over users: a variant's per-user metric against
//! the baseline's, user by user (the same users, the same split).
//!
//! The distributions come from `statrs`; the statistics are the textbook
//! ones, written to match SciPy (`scipy.stats.ttest_rel` and
//! `scipy.stats.wilcoxon(..., zero_method="wilcox", correction=False,
//! method="approx")`), against which the tests below were checked.
//!
//! The Wilcoxon p-value is the normal approximation with the tie
//! correction, never the exact distribution: per-user HR@K is 0 or 1 and
//! NDCG@K takes K values, so differences tie massively, and the number of
//! users (hundreds to tens of thousands) is far beyond where the exact
//! distribution differs from the approximation.

use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

/// Both tests of one comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// Users compared.
    pub users: usize,
    /// Two-sided p-value of the paired t-test; `None` when undefined (all
    /// differences zero, or fewer than two users).
    pub t_test: Option<f64>,
    /// Two-sided p-value of the Wilcoxon signed-rank test; `None` when every
    /// difference is zero.
    pub wilcoxon: Option<f64>,
}

impl Paired {
    /// Runs both tests on `a[i]` against `b[i]` (same length).
    pub fn test(a: &[f64], b: &[f64]) -> Paired {
        assert_eq!(a.len(), b.len(), "paired samples of unequal lengths");
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        Paired {
            users: d.len(),
            t_test: t_test(&d),
            wilcoxon: wilcoxon(&d),
        }
    }

    /// Whether both tests reject equality at `level`.
    pub fn significant(&self, level: f64) -> bool {
        matches!((self.t_test, self.wilcoxon), (Some(t), Some(w)) if t < level && w < level)
    }
}

/// Two-sided p-value of the one-sample t-test of the differences `d`
/// (mean 0): SciPy's `ttest_rel`.
fn t_test(d: &[f64]) -> Option<f64> {
    let n = d.len();
    if n < 2 {
        return None;
    }
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    if var == 0.0 {
        // Every difference equal: undefined when they are all zero, a
        // certain difference otherwise (SciPy: t = +-inf, p = 0).
        return (mean != 0.0).then_some(0.0);
    }
    let t = mean / (var / n as f64).sqrt();
    let dist = StudentsT::new(0.0, 1.0, (n - 1) as f64).ok()?;
    Some((2.0 * dist.sf(t.abs())).min(1.0))
}

/// Two-sided p-value of the Wilcoxon signed-rank test of `d`: zero
/// differences dropped, ranks of |d| with ties averaged, statistic
/// min(W+, W-), normal approximation with the tie correction, no continuity
/// correction.
fn wilcoxon(d: &[f64]) -> Option<f64> {
    let nonzero: Vec<f64> = d.iter().copied().filter(|x| *x != 0.0).collect();
    let n = nonzero.len() as f64;
    if nonzero.is_empty() {
        return None;
    }
    let (ranks, ties) = average_ranks(&nonzero);
    let plus: f64 = ranks
        .iter()
        .zip(&nonzero)
        .filter(|(_, x)| **x > 0.0)
        .map(|(r, _)| r)
        .sum();
    let minus = n * (n + 1.0) / 2.0 - plus;
    let statistic = plus.min(minus);
    let mean = n * (n + 1.0) / 4.0;
    let var = n * (n + 1.0) * (2.0 * n + 1.0) / 24.0 - ties / 48.0;
    if var <= 0.0 {
        return None;
    }
    let z = (statistic - mean) / var.sqrt();
    let normal = Normal::new(0.0, 1.0).ok()?;
    Some((2.0 * normal.sf(z.abs())).min(1.0))
}

/// Ranks (from 1) of |x|, ties given their average rank, and the tie term
/// sum(t^3 - t) over groups of t tied values.
fn average_ranks(x: &[f64]) -> (Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].abs().total_cmp(&x[j].abs()));
    let mut ranks = vec![0.0; x.len()];
    let mut ties = 0.0;
    let mut start = 0;
    while start < order.len() {
        let value = x[order[start]].abs();
        let end = start + order[start..].partition_point(|&i| x[i].abs() == value);
        let t = (end - start) as f64;
        // Ranks start+1 ..= end, averaged.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        ties += t * t * t - t;
        start = end;
    }
    (ranks, ties)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: Option<f64>, want: f64) {
        let got = got.expect("a p-value");
        assert!(
            (got - want).abs() <= 1e-9 * want.max(1e-300) + 1e-12,
            "{got} vs {want}"
        );
    }

    // Reference values: SciPy 1.17.1, `ttest_rel(a, b).pvalue` and
    // `wilcoxon(a, b, zero_method="wilcox", correction=False,
    // method="approx").pvalue`, printed with 17 significant digits.
    const A: [f64; 12] = [
        0.63, 0.0, 1.0, 0.5, 0.43, 0.0, 0.39, 1.0, 0.0, 0.63, 0.5, 0.36,
    ];
    const B: [f64; 12] = [
        0.5, 0.0, 0.63, 0.5, 0.0, 0.0, 0.43, 1.0, 0.0, 0.39, 0.0, 0.0,
    ];

    #[test]
    fn matches_scipy_on_per_user_ndcg_with_zeros_and_ties() {
        let p = Paired::test(&A, &B);
        assert_eq!(p.users, 12);
        close(p.t_test, T_REF);
        close(p.wilcoxon, W_REF);
    }

    #[test]
    fn matches_scipy_on_hit_rates() {
        // 0/1 per user: every non-zero difference ties with the others.
        let a = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        let b = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let p = Paired::test(&a, &b);
        close(p.t_test, T_HIT_REF);
        close(p.wilcoxon, W_HIT_REF);
    }

    #[test]
    fn equal_samples_have_no_p_value_and_constant_shifts_are_certain() {
        let p = Paired::test(&A, &A);
        assert_eq!((p.t_test, p.wilcoxon), (None, None));
        assert!(!p.significant(0.05));
        let (a, b) = ([1.0, 2.0, 4.0, 8.0, 0.0], [0.0, 1.0, 3.0, 7.0, -1.0]);
        let p = Paired::test(&a, &b);
        assert_eq!(p.t_test, Some(0.0));
        assert!(p.significant(0.05), "{p:?}");
    }

    #[test]
    fn ranks_average_ties_by_absolute_value() {
        let (ranks, ties) = average_ranks(&[0.5, -0.5, 0.1, 2.0]);
        assert_eq!(ranks, [2.5, 2.5, 1.0, 4.0]);
        assert_eq!(ties, 6.0);
    }

    const T_REF: f64 = 0.015848453455409223;
    const W_REF: f64 = 0.027991815485665747;
    const T_HIT_REF: f64 = 0.1934220596033322;
    const W_HIT_REF: f64 = 0.17971249487899976;
}
