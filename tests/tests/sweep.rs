//! Sweeps: every run once, resumable, a changed run refused, groups of ranks
//! under `mpirun` giving the sequential metrics, and bad sweep files refused
//! before any run.

use std::path::{Path, PathBuf};
use std::process::Output;

use llm_esr_tests::{dataset, mpirun, results, run_cli, text, workspace_root};

/// The tiny sweep of configs/sweeps with 1 epoch, into `out`, optionally
/// with extra lines (e.g. `set:`) replacing the file's own.
fn write_sweep(dir: &Path, extra: &str) -> PathBuf {
    let src =
        std::fs::read_to_string(workspace_root().join("configs/sweeps/beauty5_tiny.yaml")).unwrap();
    let body: String = src
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with("config:") {
                format!(
                    "config: {}\n",
                    workspace_root()
                        .join("configs/beauty5_tiny_sasrec.yaml")
                        .display()
                )
            } else if l.starts_with("set:") && !extra.is_empty() {
                format!("{extra}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let path = dir.join("sweep.yaml");
    std::fs::write(&path, body).unwrap();
    path
}

fn sets(out: &Path) -> Vec<String> {
    vec![
        "--set".into(),
        format!("output_dir={}", out.display()),
        "--set".into(),
        format!("data.dir={}", dataset("beauty5_tiny").display()),
        "--set".into(),
        "train.epochs=1".into(),
    ]
}

fn sweep(file: &Path, out: &Path, more: &[&str]) -> Output {
    let mut args = vec!["sweep".to_string(), file.display().to_string()];
    args.extend(sets(out));
    args.extend(more.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&args, &[])
}

fn run_names(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("tiny/runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn every_run_once_then_resume_then_a_changed_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_sweep(tmp.path(), "");
    let out = tmp.path().join("out");
    let o = sweep(&file, &out, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let names = run_names(&out);
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(names.contains(&"tiny_0.2_64_s43".to_string()), "{names:?}");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tiny/sweep.json")).unwrap())
            .unwrap();
    assert_eq!(plan["baseline"], "tiny_0.2_64");
    assert_eq!(plan["runs"].as_array().unwrap().len(), 8);
    for name in &names {
        let dir = out.join("tiny/runs").join(name);
        for f in ["results.json", "test_ranks.safetensors", "config.sha256"] {
            assert!(dir.join(f).is_file(), "{name}: no {f}");
        }
    }
    assert_sweep_report(&out.join("tiny/report"));
    let run = |n: &str| out.join("tiny/runs").join(n).join("results.json");
    let before: Vec<_> = names.iter().map(|n| modified(&run(n))).collect();

    // A second invocation trains nothing.
    let o = sweep(&file, &out, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let after: Vec<_> = names.iter().map(|n| modified(&run(n))).collect();
    assert_eq!(before, after);

    // A run whose results are gone, and only it, is trained again.
    let lost = &names[3];
    let kept = results(&out.join("tiny/runs").join(lost));
    std::fs::remove_file(run(lost)).unwrap();
    let o = sweep(&file, &out, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for (n, t) in names.iter().zip(&before) {
        if n != lost {
            assert_eq!(modified(&run(n)), *t, "{n} was retrained");
        }
    }
    assert_eq!(
        results(&out.join("tiny/runs").join(lost))["test"],
        kept["test"],
        "the rerun of {lost} gives its numbers again"
    );

    // A changed key of finished runs stops the sweep, naming a run and the key.
    let changed = write_sweep(tmp.path(), "set: {train.lr: 0.002}");
    let o = sweep(&changed, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let stderr = text(&o.stderr);
    assert!(
        stderr.contains("tiny_0.2_32_s42") && stderr.contains("train.lr: 0.001 -> 0.002"),
        "{stderr}"
    );
    assert!(stderr.contains("--rerun-changed"), "{stderr}");
}

/// The metrics of every run of a sweep directory, by run name.
fn test_metrics(out: &Path) -> Vec<(String, serde_json::Value)> {
    run_names(out)
        .into_iter()
        .map(|n| {
            let r = results(&out.join("tiny/runs").join(&n));
            (n, r["test"].clone())
        })
        .collect()
}

/// Two groups of one rank train the runs of a 2-run sweep between them and
/// give the sequential numbers; one group of two ranks gives them too (up
/// to the order of floating-point sums).
#[test]
fn groups_of_ranks_give_the_sequential_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_sweep(tmp.path(), "");
    // 2 points x 1 seed: keep the sweep short.
    let small = std::fs::read_to_string(&file)
        .unwrap()
        .replace("model.hidden: [32, 64]", "model.hidden: [32]")
        .replace("seeds: [42, 43]", "seeds: [42]")
        .replace("baseline: 0.2_64", "baseline: 0.2_32");
    std::fs::write(&file, small).unwrap();
    let seq = tmp.path().join("seq");
    let o = sweep(&file, &seq, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let expected = test_metrics(&seq);
    assert_eq!(expected.len(), 2);

    for (k, name) in [("1", "groups"), ("2", "pairs")] {
        let out = tmp.path().join(name);
        let mut args = vec!["sweep".to_string(), file.display().to_string()];
        args.extend(sets(&out));
        args.extend(["--ranks-per-run".to_string(), k.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = mpirun(2, &args).output().unwrap();
        assert!(
            o.status.success(),
            "{}\n{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        let got = test_metrics(&out);
        assert_eq!(got.len(), 2);
        for ((n1, a), (n2, b)) in expected.iter().zip(&got) {
            assert_eq!(n1, n2);
            let world = results(&out.join("tiny/runs").join(n2))["world_size"].as_u64();
            assert_eq!(world, Some(k.parse().unwrap()), "{n2}");
            for group in ["overall", "tail_item", "head_user"] {
                let (x, y) = (
                    a[group]["NDCG@10"].as_f64().unwrap(),
                    b[group]["NDCG@10"].as_f64().unwrap(),
                );
                let tol = if k == "1" { 1e-9 } else { 5e-3 };
                assert!((x - y).abs() <= tol, "{n1} {group}: {x} vs {y} (k = {k})");
            }
        }
    }
}

fn assert_refused(yaml: &str, more: &[&str], wanted: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sweep.yaml");
    let base = workspace_root().join("configs/beauty5_tiny_sasrec.yaml");
    std::fs::write(
        &path,
        format!("config: {}\nname: bad\n{yaml}", base.display()),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = sweep(&path, &out, more);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{yaml}: {stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{yaml}: wanted `{w}` in: {stderr}");
    }
    assert!(
        !out.join("bad/runs").exists(),
        "{yaml}: a run directory was made"
    );
}

#[test]
fn bad_sweep_files_are_refused_before_any_run() {
    assert_refused("grid: {model.nope: [1, 2]}\n", &[], &["model.nope"]);
    assert_refused(
        "grid: {model.dropout: []}\n",
        &[],
        &["`grid.model.dropout` has no values"],
    );
    assert_refused("grid: {train.lr: [fast]}\n", &[], &["train.lr"]);
    assert_refused(
        "random: {n: 2, space: {train.lr: {normal: [0, 1]}}}\n",
        &[],
        &["random.space", "normal"],
    );
    assert_refused(
        "grid: {model.dropout: [0.2]}\nbaseline: nothing\n",
        &[],
        &["`baseline` names `nothing`", "bad_0.2"],
    );
    assert_refused(
        "grid: {model.dropout: [0.2]}\nseeds: [1]\nset: {seed: 3}\n",
        &[],
        &["`seed` is set by key `seeds`"],
    );
    assert_refused(
        "grid: {model.dropout: [0.2]}\n",
        &["--ranks-per-run", "2"],
        &["--ranks-per-run 2 does not divide the job's 1 ranks"],
    );
}

#[test]
fn dry_run_lists_every_run_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_sweep(tmp.path(), "");
    let out = tmp.path().join("out");
    let o = sweep(&file, &out, &["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert_eq!(stdout.lines().count(), 9, "{stdout}");
    assert!(
        stdout.contains("tiny_0.5_64_s43")
            && stdout.contains("model.dropout=0.5 model.hidden=64 seed=43"),
        "{stdout}"
    );
    assert!(!out.exists());
}

/// The rows of a summary CSV as (header, records); fields hold no commas.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text
        .lines()
        .map(|l| l.split(',').map(String::from).collect::<Vec<_>>());
    let header = lines.next().unwrap();
    (header, lines.collect())
}

fn assert_png_and_svg(dir: &Path, stem: &str) {
    let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "{stem}.png"
    );
    let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
    assert!(svg.contains("<svg"), "{stem}.svg");
}

/// The sweep's report: a row per grid point with mean and std over the two
/// seeds of every metric, p-values against the baseline, and the plots.
fn assert_sweep_report(dir: &Path) {
    let (header, rows) = read_csv(&dir.join("summary.csv"));
    assert_eq!(rows.len(), 4, "{rows:?}");
    let at = |k: &str| {
        header
            .iter()
            .position(|h| h == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let key = "test.tail_item.NDCG@10";
    for row in &rows {
        assert_eq!(row[at("seeds")], "42 43");
        let mean: f64 = row[at(&format!("{key}.mean"))].parse().unwrap();
        let std: f64 = row[at(&format!("{key}.std"))].parse().unwrap();
        assert!((0.0..=1.0).contains(&mean) && std >= 0.0, "{row:?}");
        let p = &row[at(&format!("{key}.p_ttest"))];
        let w = &row[at(&format!("{key}.p_wilcoxon"))];
        if row[at("variant")] == "tiny_0.2_64" {
            assert_eq!(row[at("baseline")], "true");
            assert!(p.is_empty() && w.is_empty(), "{row:?}");
        } else {
            for v in [p, w] {
                let v: f64 = v
                    .parse()
                    .unwrap_or_else(|_| panic!("p-value `{v}`: {row:?}"));
                assert!((0.0..=1.0).contains(&v), "{row:?}");
            }
        }
    }
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(md.contains("| tiny_0.2_64 (baseline) | 2 |"), "{md}");
    let tex = std::fs::read_to_string(dir.join("summary.tex")).unwrap();
    assert!(tex.contains("\\begin{tabular}"), "{tex}");
    let plots = dir.join("plots");
    for stem in [
        "learning_curves",
        "head_tail_NDCG10",
        "head_tail_HR10",
        "param_model_dropout",
        "param_model_hidden",
    ] {
        assert_png_and_svg(&plots, stem);
    }
}

#[test]
fn report_summarises_sweeps_and_run_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_sweep(tmp.path(), "");
    let small = std::fs::read_to_string(&file)
        .unwrap()
        .replace("model.hidden: [32, 64]", "model.hidden: [32]")
        .replace("baseline: 0.2_64", "baseline: 0.2_32");
    std::fs::write(&file, small).unwrap();
    let out = tmp.path().join("out");
    let o = sweep(&file, &out, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let sweep_dir = out.join("tiny");
    let (csv, tex, plots) = (
        tmp.path().join("t.csv"),
        tmp.path().join("t.tex"),
        tmp.path().join("p"),
    );
    let (csv_s, tex_s, plots_s) = (
        csv.display().to_string(),
        tex.display().to_string(),
        plots.display().to_string(),
    );
    let o = run_cli(
        &[
            "report",
            &sweep_dir.display().to_string(),
            "--baseline",
            "tiny_0.5_32",
            "--csv",
            &csv_s,
            "--latex",
            &tex_s,
            "--plots",
            &plots_s,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("| tiny_0.5_32 (baseline) | 2 |"),
        "{stdout}"
    );
    let (header, rows) = read_csv(&csv);
    let base = header.iter().position(|h| h == "baseline").unwrap();
    let flags: Vec<&str> = rows.iter().map(|r| r[base].as_str()).collect();
    assert_eq!(flags, ["false", "true"]);
    assert!(tex.is_file());
    assert_png_and_svg(&plots, "learning_curves");

    // Run directories: the two seeds of one point make one variant.
    let runs = sweep_dir.join("runs");
    let dirs = [
        runs.join("tiny_0.2_32_s42"),
        runs.join("tiny_0.2_32_s43"),
        runs.join("tiny_0.5_32_s42"),
    ];
    let mut args = vec!["report".to_string()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_cli(&args, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("| tiny_0.2_32 | 2 |") && stdout.contains("| tiny_0.5_32 | 1 |"),
        "{stdout}"
    );

    let mut per_run = args.clone();
    per_run.push("--per-run");
    let o = run_cli(&per_run, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 5, "{}", text(&o.stdout));

    let o = run_cli(&["report", &tmp.path().display().to_string()], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("neither a finished run"),
        "{}",
        text(&o.stderr)
    );
}
