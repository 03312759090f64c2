//! Data-parallel training under `mpirun -np 2`: same results as one process
//! with the same global batch, a launcher mismatch detected, and a killed rank
//! ends the job without hanging and without damaging the checkpoint.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llm_esr_tests::{assert_same_training, binary, mpirun, results, text, tiny_train_args};

fn common(out: &str, name: &str) -> Vec<String> {
    // With dropout (0.5): masks are keyed by sample, so the only difference
    // between 1 and 2 ranks is the order of floating-point sums.
    tiny_train_args(out, name, &["model.dropout=0.5", "train.epochs=3"])
}

#[test]
fn two_ranks_match_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let single = common(&out, "single");
    let s: Vec<&str> = single.iter().map(String::as_str).collect();
    let o = Command::new(binary())
        .args(&s)
        .current_dir(llm_esr_tests::workspace_root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let double = common(&out, "double");
    let d: Vec<&str> = double.iter().map(String::as_str).collect();
    let o = mpirun(2, &d).output().unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );

    assert_same_training(&tmp.path().join("single"), &tmp.path().join("double"));
}

#[test]
fn a_foreign_launcher_is_detected() {
    // A launcher that says 2 ranks while MPI sees 1: what an mpirun of another
    // MPI implementation produces.
    let tmp = tempfile::tempdir().unwrap();
    let args = common(&tmp.path().display().to_string(), "mismatch");
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = Command::new(binary())
        .args(&a)
        .current_dir(llm_esr_tests::workspace_root())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "0")
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("OMPI_COMM_WORLD_SIZE") && err.contains('2') && err.contains('1'),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_killed_rank_ends_the_job_and_the_checkpoint_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let mut args = common(&out, "killed");
    args.extend([
        "--set".into(),
        "train.epochs=1000".into(),
        "--set".into(),
        "train.patience=0".into(),
    ]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = mpirun(2, &a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = tmp.path().join("killed").join("checkpoint.safetensors");
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Kill one rank (a child of mpirun running our binary) with SIGKILL.
    let pids = Command::new("pgrep")
        .args(["-f", "-P", &child.id().to_string(), "llm-esr-orch"])
        .output()
        .unwrap();
    let pid = text(&pids.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .expect("a rank process");
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("the job hung for 60 s after a rank was killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    // The checkpoint is whole: resume under mpirun continues to a result.
    let mut resume = common(&out, "killed");
    resume.extend(["--set".into(), "train.patience=0".into(), "--resume".into()]);
    let epochs_done = {
        let lines = std::fs::read_to_string(tmp.path().join("killed/metrics.jsonl")).unwrap();
        lines.lines().count()
    };
    resume.extend(["--set".into(), format!("train.epochs={}", epochs_done + 1)]);
    let r: Vec<&str> = resume.iter().map(String::as_str).collect();
    let o = mpirun(2, &r).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        results(&tmp.path().join("killed"))["epochs_run"],
        epochs_done as u64 + 1
    );
}

/// The communicator's own checks (all-reduce, broadcasts, split, and the
/// NCCL bootstrap's exchange of an opaque 128-byte unique id over MPI, with
/// its failure path) on two ranks and in one process.
#[test]
fn comm_selftest_passes_on_two_ranks_and_alone() {
    let selftest = llm_esr_tests::artifact("comm-selftest");
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .arg(&selftest)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{out}");
    assert_eq!(out.matches("all checks passed").count(), 2, "{out}");
    let o = Command::new(&selftest).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}
