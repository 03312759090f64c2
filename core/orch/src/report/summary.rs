//! The summary of a report: one row per variant, mean +- standard deviation
//! over its seeds of HR@10 and NDCG@10 for each long-tail group (the layout
//! of the paper's Table 1), and against the baseline a paired t-test and a
//! Wilcoxon signed-rank test over the test users of each group.
//!
//! A variant's per-user metric is averaged over its seeds before pairing
//! (users are the unit of the test; seeds are averaged, not treated as
//! independent samples), so the tests need every run's `test_ranks` table
//! and the same test users in all of them.

use std::fmt::Write;

use anyhow::Result;
use statrs::statistics::Statistics;

use super::stats::Paired;
use super::{Collection, Variant};
use crate::eval::{Group, Metric};
use crate::user_ranks::{self, UserRanks};

/// The metrics of the table.
pub const METRICS: [Metric; 2] = [Metric::Hr(10), Metric::Ndcg(10)];

/// p-values below this mark a cell.
pub const LEVEL: f64 = 0.05;

/// A column: one metric of one group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Column {
    pub group: Group,
    pub metric: Metric,
}

impl Column {
    /// `test.<group>.<metric>`, as in `results.json`.
    pub fn key(&self) -> String {
        format!("test.{}.{}", self.group.name(), self.metric)
    }
}

/// One variant's value in one column.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub mean: f64,
    /// Sample standard deviation over seeds (`None` with one seed).
    pub std: Option<f64>,
    /// Against the baseline (`None` for the baseline itself, or without
    /// per-user tables).
    pub paired: Option<Paired>,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub params: Vec<(String, String)>,
    pub seeds: Vec<Option<u64>>,
    pub cells: Vec<Option<Cell>>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
    pub baseline: Option<String>,
    /// Test users of each column's group (of the first run that has it).
    pub users: Vec<Option<u64>>,
    /// Why some tests are missing.
    pub notes: Vec<String>,
}

/// Every seed's per-user table of a variant, or why there are none.
fn tables(v: &Variant) -> Result<Vec<UserRanks>, String> {
    let mut out = Vec::new();
    for run in &v.runs {
        let path = run.dir.join(user_ranks::FILE);
        if !path.is_file() {
            return Err(format!(
                "{} has no per-user results ({}): no paired tests for `{}`",
                run.dir.display(),
                user_ranks::FILE,
                v.name
            ));
        }
        let t = UserRanks::load(&path).map_err(|e| format!("{e:#}"))?;
        if let Some(first) = out.first() {
            user_ranks::check_same_users(first, &v.runs[0].name, &t, &run.name)
                .map_err(|e| format!("{e:#}"))?;
        }
        out.push(t);
    }
    Ok(out)
}

/// Per-user `metric` averaged over the seeds' tables.
fn seed_mean(tables: &[UserRanks], metric: Metric) -> Vec<f64> {
    let mut sum = vec![0.0; tables[0].len()];
    for t in tables {
        for (s, v) in sum.iter_mut().zip(t.values(metric)) {
            *s += v;
        }
    }
    sum.iter().map(|s| s / tables.len() as f64).collect()
}

/// The values of `keep`'s true entries.
fn select(values: &[f64], keep: &[bool]) -> Vec<f64> {
    values
        .iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(v, _)| *v)
        .collect()
}

/// A test of `col` between two variants' tables, or why there is none.
fn paired(a: &[UserRanks], b: &[UserRanks], col: Column) -> Result<Paired, String> {
    let (ma, mb) = (a[0].members(col.group), b[0].members(col.group));
    let (Some(ma), Some(mb)) = (ma, mb) else {
        return Err(format!(
            "no {} grouping in the per-user tables",
            col.group.title()
        ));
    };
    if ma != mb {
        return Err(format!(
            "the runs put different users in {} (another long-tail split?)",
            col.group.title()
        ));
    }
    let x = select(&seed_mean(a, col.metric), &ma);
    let y = select(&seed_mean(b, col.metric), &mb);
    Ok(Paired::test(&x, &y))
}

impl Summary {
    pub fn of(c: &Collection) -> Result<Summary> {
        let columns: Vec<Column> = Group::ALL
            .into_iter()
            .flat_map(|group| METRICS.map(|metric| Column { group, metric }))
            .filter(|col| {
                c.variants
                    .iter()
                    .any(|v| v.runs.iter().any(|r| value(&r.results, *col).is_some()))
            })
            .collect();
        let users = columns
            .iter()
            .map(|col| {
                c.variants
                    .iter()
                    .flat_map(|v| &v.runs)
                    .find_map(|r| r.results["test"][col.group.name()]["users"].as_f64())
                    .map(|u| u as u64)
            })
            .collect();
        let mut notes = Vec::new();
        let base_tables = match c.baseline() {
            Some(b) => tables(b).map_err(|e| notes.push(e)).ok(),
            None => None,
        };
        let mut rows = Vec::new();
        for (i, v) in c.variants.iter().enumerate() {
            let own = match (&base_tables, Some(i) == c.baseline) {
                (Some(_), false) => tables(v).map_err(|e| notes.push(e)).ok(),
                _ => None,
            };
            let mut cells = Vec::new();
            for &col in &columns {
                let values: Vec<f64> = v
                    .runs
                    .iter()
                    .filter_map(|r| value(&r.results, col))
                    .collect();
                if values.len() < v.runs.len() {
                    cells.push(None);
                    continue;
                }
                let test = match (&own, &base_tables) {
                    (Some(a), Some(b)) => match paired(a, b, col) {
                        Ok(p) => Some(p),
                        Err(why) => {
                            let note = format!("`{}` {}: {why}", v.name, col.key());
                            notes.push(note);
                            None
                        }
                    },
                    _ => None,
                };
                cells.push(Some(Cell {
                    mean: values.as_slice().mean(),
                    std: (values.len() > 1).then(|| values.as_slice().std_dev()),
                    paired: test,
                }));
            }
            rows.push(Row {
                name: v.name.clone(),
                params: v
                    .params
                    .iter()
                    .map(|(k, x)| (k.clone(), x.clone()))
                    .collect(),
                seeds: v.runs.iter().map(|r| r.seed).collect(),
                cells,
            });
        }
        Ok(Summary {
            columns,
            rows,
            baseline: c.baseline().map(|b| b.name.clone()),
            users,
            notes,
        })
    }

    /// Distinct groups of the columns, in order, with their column count.
    fn group_spans(&self) -> Vec<(Group, usize)> {
        let mut spans: Vec<(Group, usize)> = Vec::new();
        for col in &self.columns {
            match spans.last_mut() {
                Some((g, n)) if *g == col.group => *n += 1,
                _ => spans.push((col.group, 1)),
            }
        }
        spans
    }

    fn is_baseline(&self, row: &Row) -> bool {
        self.baseline.as_deref() == Some(row.name.as_str())
    }

    /// Users of `group`, for headings.
    fn users_of(&self, group: Group) -> Option<u64> {
        self.columns
            .iter()
            .zip(&self.users)
            .find(|(c, _)| c.group == group)
            .and_then(|(_, u)| *u)
    }

    /// The table in Markdown, and what its marks mean.
    pub fn markdown(&self) -> String {
        let mut out = String::from("| variant | seeds |");
        for col in &self.columns {
            let _ = write!(out, " {} {} |", col.group.title(), short(col.metric));
        }
        out.push_str("\n|---|---|");
        out.push_str(&"---|".repeat(self.columns.len()));
        out.push('\n');
        for row in &self.rows {
            let name = if self.is_baseline(row) {
                format!("{} (baseline)", row.name)
            } else {
                row.name.clone()
            };
            let _ = write!(out, "| {name} | {} |", row.seeds.len());
            for cell in &row.cells {
                let _ = write!(out, " {} |", cell_text(cell.as_ref(), "±", "*"));
            }
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.legend());
        out
    }

    /// What the numbers are, the test, and the notes.
    fn legend(&self) -> String {
        let mut out = String::from(
            "Test metrics, mean ± sample standard deviation over seeds (no ± with one seed).",
        );
        if let Some(b) = &self.baseline {
            let _ = write!(
                out,
                " `*`: p < {LEVEL} against `{b}` in both a paired t-test and a Wilcoxon \
                 signed-rank test (normal approximation) over the test users of the column's \
                 group, each user's metric averaged over seeds; p-values in the CSV."
            );
        }
        let users: Vec<String> = self
            .group_spans()
            .iter()
            .filter_map(|(g, _)| self.users_of(*g).map(|u| format!("{} {u}", g.title())))
            .collect();
        if !users.is_empty() {
            let _ = write!(out, " Test users: {}.", users.join(", "));
        }
        out.push('\n');
        for n in &self.notes {
            let _ = writeln!(out, "- {n}");
        }
        out
    }

    /// One row per variant: its parameters, seeds, and per column the mean,
    /// std, both p-values and the users.
    pub fn csv(&self) -> Result<String> {
        let mut keys: Vec<&str> = self
            .rows
            .iter()
            .flat_map(|r| r.params.iter().map(|(k, _)| k.as_str()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut w = csv::Writer::from_writer(Vec::new());
        let mut header = vec!["variant".to_string(), "baseline".into(), "seeds".into()];
        header.extend(keys.iter().map(|k| format!("param.{k}")));
        for col in &self.columns {
            for part in ["mean", "std", "p_ttest", "p_wilcoxon", "users"] {
                header.push(format!("{}.{part}", col.key()));
            }
        }
        w.write_record(&header)?;
        for row in &self.rows {
            let seeds: Vec<String> = row
                .seeds
                .iter()
                .map(|s| s.map_or("-".into(), |s| s.to_string()))
                .collect();
            let mut record = vec![
                row.name.clone(),
                self.is_baseline(row).to_string(),
                seeds.join(" "),
            ];
            for k in &keys {
                let v = row.params.iter().find(|(p, _)| p == k);
                record.push(v.map_or(String::new(), |(_, x)| x.clone()));
            }
            for (cell, users) in row.cells.iter().zip(&self.users) {
                let num = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.6e}"));
                let p = cell.as_ref().and_then(|c| c.paired);
                record.push(num(cell.as_ref().map(|c| c.mean)));
                record.push(num(cell.as_ref().and_then(|c| c.std)));
                record.push(num(p.and_then(|p| p.t_test)));
                record.push(num(p.and_then(|p| p.wilcoxon)));
                let n = p.map(|p| p.users as u64).or(*users);
                record.push(n.map_or(String::new(), |n| n.to_string()));
            }
            w.write_record(&record)?;
        }
        Ok(String::from_utf8(w.into_inner()?)?)
    }

    /// A booktabs tabular, the paper's layout: groups over H@10 / N@10.
    pub fn latex(&self) -> String {
        let spans = self.group_spans();
        let mut out = format!(
            "% {}\n\\begin{{tabular}}{{lc{}}}\n\\toprule\n &",
            self.legend().lines().next().unwrap_or_default(),
            "c".repeat(self.columns.len())
        );
        let mut first = 3;
        let mut rules = String::new();
        for (g, n) in &spans {
            let _ = write!(out, " & \\multicolumn{{{n}}}{{c}}{{{}}}", g.title());
            let _ = write!(rules, "\\cmidrule(lr){{{first}-{}}}", first + n - 1);
            first += n;
        }
        let _ = write!(out, " \\\\\n{rules}\nVariant & Seeds");
        for col in &self.columns {
            let _ = write!(out, " & {}", short(col.metric));
        }
        out.push_str(" \\\\\n\\midrule\n");
        for row in &self.rows {
            let name = match self.is_baseline(row) {
                true => format!("{} (baseline)", latex_escape(&row.name)),
                false => latex_escape(&row.name),
            };
            let _ = write!(out, "{name} & {}", row.seeds.len());
            for cell in &row.cells {
                let text = cell_text(cell.as_ref(), "\\pm", "^{*}");
                let text = if text == "-" {
                    text
                } else {
                    format!("${text}$")
                };
                let _ = write!(out, " & {text}");
            }
            out.push_str(" \\\\\n");
        }
        out.push_str("\\bottomrule\n\\end{tabular}\n");
        out
    }
}

/// `results.json`'s `test.<group>.<metric>`.
pub fn value(results: &serde_json::Value, col: Column) -> Option<f64> {
    results["test"][col.group.name()][col.metric.to_string()].as_f64()
}

/// "H@10" / "N@10", the paper's headings.
fn short(m: Metric) -> String {
    match m {
        Metric::Hr(k) => format!("H@{k}"),
        Metric::Ndcg(k) => format!("N@{k}"),
    }
}

/// "0.1234 ± 0.0056*", "-" when missing.
fn cell_text(cell: Option<&Cell>, pm: &str, mark: &str) -> String {
    let Some(c) = cell else {
        return "-".into();
    };
    let mut s = format!("{:.4}", c.mean);
    if let Some(sd) = c.std {
        let _ = write!(s, " {pm} {sd:.4}");
    }
    if c.paired.is_some_and(|p| p.significant(LEVEL)) {
        s.push_str(mark);
    }
    s
}

fn latex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '_' | '%' | '&' | '#' | '$' | '{' | '}' => {
                out.push('\\');
                out.push(ch);
            }
            _ => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::fake_run;
    use crate::report::Variant;

    fn variant(name: &str, runs: Vec<crate::report::Run>) -> Variant {
        Variant {
            name: name.into(),
            params: [("model.alpha".to_string(), name.len().to_string())].into(),
            runs,
        }
    }

    /// A baseline and a better variant, two seeds each, over 8 users of
    /// whom the first 3 have head targets.
    fn collection(dir: &std::path::Path) -> Collection {
        let base = [9, 12, 30, 4, 15, 0, 11, 40];
        let base2 = [8, 14, 25, 5, 11, 2, 10, 33];
        let good = [0, 1, 12, 0, 2, 0, 3, 20];
        let good2 = [1, 0, 9, 2, 1, 0, 5, 11];
        let run = |n: &str, seed, r: &[u32]| fake_run(&dir.join(n), n, seed, r, 3);
        Collection {
            variants: vec![
                variant(
                    "base",
                    vec![run("base_s1", 1, &base), run("base_s2", 2, &base2)],
                ),
                variant(
                    "better",
                    vec![run("better_s1", 1, &good), run("better_s2", 2, &good2)],
                ),
            ],
            baseline: Some(0),
        }
    }

    #[test]
    fn means_stds_and_paired_tests_over_seed_averaged_users() {
        let tmp = tempfile::tempdir().unwrap();
        let c = collection(tmp.path());
        let s = Summary::of(&c).unwrap();
        assert!(s.notes.is_empty(), "{:?}", s.notes);
        let col = Column {
            group: Group::Overall,
            metric: Metric::Ndcg(10),
        };
        let i = s.columns.iter().position(|c| *c == col).unwrap();
        let runs = &c.variants[1].runs;
        let (x, y) = (
            value(&runs[0].results, col).unwrap(),
            value(&runs[1].results, col).unwrap(),
        );
        let cell = s.rows[1].cells[i].clone().unwrap();
        assert!((cell.mean - (x + y) / 2.0).abs() < 1e-12);
        let sd = ((x - y).abs()) / 2f64.sqrt();
        assert!((cell.std.unwrap() - sd).abs() < 1e-12);

        // The test pairs each user's metric averaged over the two seeds.
        let per_user = |v: &Variant| -> Vec<f64> {
            let t: Vec<UserRanks> = v
                .runs
                .iter()
                .map(|r| UserRanks::load(&r.dir.join(user_ranks::FILE)).unwrap())
                .collect();
            seed_mean(&t, Metric::Ndcg(10))
        };
        let want = Paired::test(&per_user(&c.variants[1]), &per_user(&c.variants[0]));
        assert_eq!(cell.paired, Some(want));
        assert_eq!(want.users, 8);
        assert!(s.rows[0].cells[i].as_ref().unwrap().paired.is_none());

        // Head Item pairs only the 3 users with head targets.
        let head = Column {
            group: Group::HeadItem,
            metric: Metric::Hr(10),
        };
        let j = s.columns.iter().position(|c| *c == head).unwrap();
        let p = s.rows[1].cells[j].as_ref().unwrap().paired.unwrap();
        assert_eq!(p.users, 3);
    }

    #[test]
    fn markdown_csv_and_latex_have_a_row_per_variant_and_the_p_values() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Summary::of(&collection(tmp.path())).unwrap();
        let md = s.markdown();
        assert!(md.contains("| base (baseline) | 2 |"), "{md}");
        assert!(md.contains("| better | 2 |"), "{md}");
        assert!(
            md.contains("Test users: Overall 8, Tail Item 5, Head Item 3."),
            "{md}"
        );
        let csv = s.csv().unwrap();
        let mut r = csv::Reader::from_reader(csv.as_bytes());
        let header = r.headers().unwrap().clone();
        let rows: Vec<csv::StringRecord> = r.records().map(|x| x.unwrap()).collect();
        assert_eq!(rows.len(), 2);
        let at = |k: &str| header.iter().position(|h| h == k).unwrap();
        let p = &rows[1][at("test.tail_item.NDCG@10.p_ttest")];
        let want = s.rows[1].cells[s
            .columns
            .iter()
            .position(|c| c.key() == "test.tail_item.NDCG@10")
            .unwrap()]
        .as_ref()
        .unwrap()
        .paired
        .unwrap()
        .t_test
        .unwrap();
        assert!((p.parse::<f64>().unwrap() - want).abs() <= 1e-6 * want);
        assert_eq!(&rows[0][at("test.tail_item.NDCG@10.p_ttest")], "");
        assert_eq!(&rows[1][at("param.model.alpha")], "6");
        assert_eq!(&rows[0][at("seeds")], "1 2");
        let tex = s.latex();
        assert!(
            tex.contains("\\multicolumn{2}{c}{Tail Item}") && tex.contains("\\pm"),
            "{tex}"
        );
        assert_eq!(tex.matches(" \\\\\n").count(), 4, "{tex}");
    }

    #[test]
    fn a_variant_without_per_user_tables_is_reported_without_tests() {
        let tmp = tempfile::tempdir().unwrap();
        let c = collection(tmp.path());
        std::fs::remove_file(c.variants[1].runs[1].dir.join(user_ranks::FILE)).unwrap();
        let s = Summary::of(&c).unwrap();
        assert!(s.rows[1].cells.iter().flatten().all(|c| c.paired.is_none()));
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(s.notes[0].contains("better_s2") && s.notes[0].contains("no paired tests"));
        assert!(s.markdown().contains("no paired tests"));
    }
}
