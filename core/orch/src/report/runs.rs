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

/// Test HR@10 / NDCG@10 of one group of a results.json, four decimals.
fn metric(r: &serde_json::Value, group: &str, key: &str) -> String {
    r["test"][group][key]
        .as_f64()
        .map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "-".into())
}

/// The same table in Markdown, with every group's columns, the best epoch and
/// the wall time, for docs such as `docs/results.md`.
pub fn markdown(rows: &[(String, serde_json::Value)]) -> String {
    let mut out = String::from("| run |");
    for (g, _) in GROUPS {
        let _ = write!(out, " {g} H@10 | {g} N@10 |");
    }
    out.push_str(" best epoch | minutes |\n|---|");
    out.push_str(&"---|".repeat(2 * GROUPS.len() + 2));
    out.push('\n');
    for (name, r) in rows {
        let _ = write!(out, "| {name} |");
        for (g, _) in GROUPS {
            let _ = write!(
                out,
                " {} | {} |",
                metric(r, g, "HR@10"),
                metric(r, g, "NDCG@10")
            );
        }
        let best = r["best_epoch"]
            .as_u64()
            .map_or("-".into(), |e| e.to_string());
        let minutes = r["seconds"]
            .as_f64()
            .map_or("-".into(), |s| format!("{:.1}", s / 60.0));
        let _ = writeln!(out, " {best} | {minutes} |");
    }
    out
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
            let (h, n) = (metric(r, g, "HR@10"), metric(r, g, "NDCG@10"));
            let _ = write!(out, " | {h:>7} {n:>7}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_one_row_per_run_and_dashes_for_missing_groups() {
        let r = serde_json::json!({
            "best_epoch": 3, "seconds": 90.0,
            "test": {"overall": {"HR@10": 0.5, "NDCG@10": 0.25}}
        });
        let md = markdown(&[("a".into(), r)]);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("| run | overall H@10 | overall N@10 | tail_item H@10"));
        assert_eq!(lines[1], format!("|---|{}", "---|".repeat(12)));
        assert_eq!(
            lines[2],
            "| a | 0.5000 | 0.2500 | - | - | - | - | - | - | - | - | 3 | 1.5 |"
        );
    }
}
