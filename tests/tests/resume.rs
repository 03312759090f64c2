//! `train --resume` continues from the last checkpoint and ends exactly where
//! an uninterrupted run ends.

use llm_esr_tests::{epoch_lines, results, run_cli, text, tiny_train_args};

fn train(out: &str, name: &str, epochs: usize, resume: bool) {
    let epochs = format!("train.epochs={epochs}");
    let mut args = tiny_train_args(out, name, &[&epochs]);
    if resume {
        args.push("--resume".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&args, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    train(&out, "straight", 4, false);
    train(&out, "interrupted", 2, false);
    train(&out, "interrupted", 4, true);
    let a = tmp.path().join("straight");
    let b = tmp.path().join("interrupted");
    assert_eq!(
        epoch_lines(&a),
        epoch_lines(&b),
        "per-epoch losses and metrics differ"
    );
    let (ra, rb) = (results(&a), results(&b));
    assert_eq!(ra["test"], rb["test"]);
    assert_eq!(ra["best_epoch"], rb["best_epoch"]);
    assert_eq!(rb["epochs_run"], 4);
}

#[test]
fn resume_without_a_checkpoint_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = "configs/beauty5_tiny_sasrec.yaml";
    let set = format!("output_dir={}", tmp.path().display());
    let out = run_cli(&["train", cfg, "--set", &set, "--resume"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no checkpoint"),
        "{}",
        text(&out.stderr)
    );
}
