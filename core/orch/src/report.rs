//! Text tables of results, laid out like Table 1 of the paper (H@10 and N@10
//! per group).

use std::fmt::Write;

const GROUPS: [(&str, &str); 5] = [
    ("overall", "Overall"),
    ("tail_item", "Tail Item"),
    ("head_item", "Head Item"),
    ("tail_user", "Tail User"),
    ("head_user", "Head User"),
];

/// One row per run; columns H@10 / N@10 for each group present.
pub fn table(name: &str, results: &serde_json::Value) -> String {
    tables(&[(name.to_string(), results.clone())])
}

pub fn tables(rows: &[(String, serde_json::Value)]) -> String {
    let present: Vec<(&str, &str)> = GROUPS
        .iter()
        .copied()
        .filter(|(g, _)| rows.iter().any(|(_, r)| r["test"].get(*g).is_some()))
        .collect();
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = write!(out, "{:width$}", "test");
    for (_, title) in &present {
        let _ = write!(out, " | {title:^15}");
    }
    out.push('\n');
    let _ = write!(out, "{:width$}", "");
    for _ in &present {
        let _ = write!(out, " | {:>7} {:>7}", "H@10", "N@10");
    }
    out.push('\n');
    for (name, r) in rows {
        let _ = write!(out, "{name:width$}");
        for (g, _) in &present {
            let m = &r["test"][*g];
            let f = |k: &str| {
                m[k].as_f64()
                    .map(|x| format!("{x:.4}"))
                    .unwrap_or_else(|| "-".into())
            };
            let _ = write!(out, " | {:>7} {:>7}", f("HR@10"), f("NDCG@10"));
        }
        out.push('\n');
    }
    out
}
