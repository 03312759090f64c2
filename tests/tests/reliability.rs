//! What the tool guarantees when things go wrong (docs/reliability.md): a
//! diverged run stops instead of being scored, corrupt inputs are refused,
//! run names stay inside `output_dir`, one run directory has one writer, and
//! a refused command changes nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llm_esr_tests::{
    binary, dataset, embed_random_artifacts, epoch_lines, poke_safetensors, results, run_cli,
    snapshot, text, tiny_train_args, workspace_root,
};

fn train(out: &Path, name: &str, sets: &[&str], extra: &[&str]) -> std::process::Output {
    let mut args = tiny_train_args(&out.display().to_string(), name, sets);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&args, &[])
}

#[test]
fn a_diverging_run_stops_with_an_error_and_writes_no_results() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "nan", &["train.lr=1000000"], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("training diverged at epoch 1") && err.contains("is NaN"),
        "{err}"
    );
    assert!(err.contains("train.nan_policy: skip_step"), "{err}");
    let run = tmp.path().join("nan");
    assert!(!run.join("results.json").exists());
    assert!(!run.join("metrics.jsonl").exists(), "an epoch was logged");
    assert!(!run.join("best.safetensors").exists());
}

#[test]
fn skip_step_counts_the_skipped_steps_in_the_results() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        "train.lr=1000000",
        "train.nan_policy=skip_step",
        "train.epochs=1",
    ];
    let out = train(tmp.path(), "skip", &sets, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = results(&tmp.path().join("skip"));
    let skipped = r["skipped_steps"].as_u64().unwrap();
    // beauty5_tiny has 13 steps per epoch; the first updates are finite.
    assert!((1..13).contains(&skipped), "skipped {skipped}");
    let ndcg = r["test"]["overall"]["NDCG@10"].as_f64().unwrap();
    assert!(ndcg < 1.0, "a diverged model scored {ndcg}");
}

#[test]
fn run_names_cannot_leave_output_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("runs");
    for name in ["..", ".", "a/b", "x\ty"] {
        let before = snapshot(tmp.path());
        let out = train(&out_dir, name, &["train.epochs=1"], &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name:?}: {err}");
        assert!(err.contains("config key `name`"), "{err}");
        assert_eq!(snapshot(tmp.path()), before, "{name:?} wrote files");
    }
}

#[test]
fn nan_in_artifacts_is_refused_by_hash_then_by_value() {
    let tmp = tempfile::tempdir().unwrap();
    let artifacts = tmp.path().join("artifacts");
    embed_random_artifacts(tmp.path(), &artifacts);
    let pca = artifacts.join("pca.safetensors");
    poke_safetensors(&pca, "pca", f32::NAN);
    let args = |name: &str| {
        vec![
            "train".to_string(),
            "configs/beauty5_tiny_llmesr.yaml".into(),
            "--set".into(),
            format!("data.dir={}", dataset("beauty5_tiny").display()),
            "--set".into(),
            format!("model.artifacts={}", artifacts.display()),
            "--set".into(),
            format!("output_dir={}", tmp.path().join("runs").display()),
            "--set".into(),
            format!("name={name}"),
            "--set".into(),
            "train.epochs=1".into(),
        ]
    };
    let run = |name: &str| {
        let a = args(name);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_cli(&a, &[])
    };
    // The file no longer has the sha256 that embed recorded.
    let out = run("changed");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pca.safetensors has changed since `embed` wrote it") && err.contains("embed"),
        "{err}"
    );
    // The same NaN with the manifest rewritten to match: caught by value.
    let manifest_path = artifacts.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["stages"]["pca"]["output_sha256"] = sha256(&pca).into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let out = run("nan");
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tensor `pca` holds NaN at row 0, column 0"),
        "{err}"
    );
    assert!(!tmp.path().join("runs/nan/results.json").exists());
    assert!(
        !tmp.path().join("runs/nan").exists(),
        "left a run directory"
    );
}

#[test]
fn nan_in_an_imported_matrix_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let items = tmp.path().join("items.npy");
    llm_esr_tests::write_npy(&items, 579, 8, 1);
    // The last 4 bytes are the last value of the matrix.
    let mut bytes = std::fs::read(&items).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&items, bytes).unwrap();
    let sets = [
        format!("data.dir={}", dataset("beauty5_tiny").display()),
        format!("model.artifacts={}", tmp.path().join("a").display()),
        format!("embed.item_import={{path: {}}}", items.display()),
    ];
    let mut args = vec!["embed", "configs/beauty5_tiny_llmesr.yaml"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let out = run_cli(&args, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("items.npy holds inf at row 578, column 7"),
        "{err}"
    );
}

#[test]
fn a_nan_in_a_checkpoint_is_refused_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "ck", &["train.epochs=1"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ckpt = tmp.path().join("ck/checkpoint.safetensors");
    poke_safetensors(&ckpt, "adam.v", f32::NAN);
    let before = snapshot(tmp.path());
    let out = train(tmp.path(), "ck", &["train.epochs=2"], &["--resume"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("optimizer state `adam.v` holds NaN"), "{err}");
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn two_trains_of_one_run_cannot_interleave() {
    let tmp = tempfile::tempdir().unwrap();
    let args = tiny_train_args(
        &tmp.path().display().to_string(),
        "one",
        &["train.epochs=3"],
    );
    let mut first = Command::new(binary())
        .args(&args)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The holder file appears once the first run has passed its checks.
    let holder = tmp.path().join("one/lock.json");
    let t0 = Instant::now();
    while !holder.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "first run never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = run_cli(&a, &[]);
    let err = text(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains(&format!("is in use by pid {}", first.id())),
        "{err}"
    );
    assert!(first.wait().unwrap().success());
    let epochs = logged_epochs(&tmp.path().join("one"));
    assert_eq!(epochs, vec![1, 2, 3]);
    assert!(!holder.exists(), "the holder file outlived the run");
}

#[test]
fn a_refused_resume_leaves_the_run_directory_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "r", &["train.epochs=1"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = snapshot(tmp.path());
    // Another learning rate and seed: refused, naming both keys.
    let sets = ["train.epochs=2", "train.lr=0.01", "seed=7"];
    let out = train(tmp.path(), "r", &sets, &["--resume"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("seed: 42 -> 7") && err.contains("train.lr: 0.001 -> 0.01"),
        "{err}"
    );
    assert!(err.contains("--force-config"), "{err}");
    assert_eq!(snapshot(tmp.path()), before);
    // Another model, even with --force-config: the checkpoint does not fit.
    let sets = ["train.epochs=2", "model.hidden=32"];
    let out = train(tmp.path(), "r", &sets, &["--resume", "--force-config"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("different parameters"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(snapshot(tmp.path()), before);
    // A longer schedule is the one change a resume may make.
    let out = train(tmp.path(), "r", &["train.epochs=2"], &["--resume"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(results(&tmp.path().join("r"))["epochs_run"], 2);
}

#[test]
fn a_new_run_keeps_nothing_of_a_dead_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("dead");
    std::fs::create_dir_all(&run).unwrap();
    // What a killed run with `train.checkpoint: false` leaves behind.
    std::fs::write(
        run.join("metrics.jsonl"),
        "{\"epoch\": 1, \"stale\": true}\n",
    )
    .unwrap();
    std::fs::write(run.join(".metrics.jsonl.1234.tmp"), "half").unwrap();
    let out = train(
        tmp.path(),
        "dead",
        &["train.epochs=1", "train.checkpoint=false"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    assert!(!metrics.contains("stale"), "{metrics}");
    assert!(!run.join(".metrics.jsonl.1234.tmp").exists());
}

#[test]
fn a_dataset_without_evaluable_users_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Five users with two interactions each: no validation and test target.
    let inter: String = (1..=5)
        .map(|u| format!("{u} {}\n{u} {}\n", u, u + 1))
        .collect();
    std::fs::write(data.join("inter.txt"), inter).unwrap();
    let set = format!("data.dir={}", data.display());
    let out = train(tmp.path(), "empty", &[&set], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no user of"), "{err}");
    assert!(!tmp.path().join("empty").exists());
}

/// The epoch numbers of a run's metrics.jsonl, in order.
fn logged_epochs(run: &Path) -> Vec<u64> {
    epoch_lines(run)
        .iter()
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_finished_run_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "done", &["train.epochs=1"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = snapshot(tmp.path());
    let out = train(tmp.path(), "done", &["train.epochs=1"], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("already holds a run"), "{err}");
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn a_resume_drops_epoch_lines_the_checkpoint_does_not_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "k", &["train.epochs=1"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Killed after logging epoch 2 but before its checkpoint was saved.
    let metrics = tmp.path().join("k/metrics.jsonl");
    let mut text_now = std::fs::read_to_string(&metrics).unwrap();
    text_now.push_str("{\"epoch\": 2, \"loss\": 9.0}\n");
    std::fs::write(&metrics, text_now).unwrap();
    let out = train(tmp.path(), "k", &["train.epochs=2"], &["--resume"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let epochs = logged_epochs(&tmp.path().join("k"));
    assert_eq!(epochs, vec![1, 2]);
    assert!(!std::fs::read_to_string(&metrics).unwrap().contains("9.0"));
}

#[test]
fn zero_epochs_is_an_error_not_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "zero", &["train.epochs=0"], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config key `train.epochs`"), "{err}");
    assert!(!tmp.path().join("zero").exists());
}
