//! Helpers shared by the integration tests: where the built binary, plugins
//! and the shared data live. The tests expect `cargo build --release
//! --workspace` to have run (the README's test command does it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// target/<profile>, found from the test executable (target/<profile>/deps/...).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// A built artifact of the workspace; panics with the fix when it is missing.
pub fn artifact(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace` before the tests",
        path.display()
    );
    path
}

pub fn binary() -> PathBuf {
    artifact("llm-esr-orch")
}

pub fn plugin_file(crate_name: &str) -> PathBuf {
    artifact(&format!("lib{}.so", crate_name.replace('-', "_")))
}

/// The workspace root (this crate lives in <root>/tests).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A dataset directory from LLM_ESR_DATA or ../shared/datasets.
pub fn dataset(name: &str) -> PathBuf {
    let base = std::env::var_os("LLM_ESR_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/datasets"));
    let dir = base.join(name);
    assert!(
        dir.join("inter.txt").exists(),
        "dataset {} not found: set LLM_ESR_DATA to the directory holding it",
        dir.display()
    );
    dir
}

/// Runs the binary with `args` in the workspace root.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args).current_dir(workspace_root());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn llm-esr-orch")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `mpirun` with the flags CI needs (root allowed, oversubscription).
pub fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(binary())
    .args(args)
    .current_dir(workspace_root())
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// Reads a run's results.json.
pub fn results(run_dir: &Path) -> serde_json::Value {
    let path = run_dir.join("results.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("results.json is JSON")
}

/// The epoch lines of metrics.jsonl without their timings.
pub fn epoch_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("metrics line");
            let obj = v.as_object_mut().expect("object");
            obj.remove("seconds");
            obj.remove("train_seconds");
            v
        })
        .collect()
}

/// `train configs/beauty5_tiny_sasrec.yaml` into `out/<name>` on the shared
/// beauty5_tiny data, plus one `--set` per entry of `overrides`.
pub fn tiny_train_args(out: &str, name: &str, overrides: &[&str]) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "configs/beauty5_tiny_sasrec.yaml".into(),
    ];
    let data = format!("data.dir={}", dataset("beauty5_tiny").display());
    let fixed = [format!("output_dir={out}"), data, format!("name={name}")];
    for set in fixed
        .iter()
        .map(String::as_str)
        .chain(overrides.iter().copied())
    {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    args
}

/// Asserts that an N-rank run (`many`) trained like a one-process run (`one`)
/// with the same global batch and seed: losses equal up to the order of
/// floating-point sums, validation and test metrics within 5e-3.
pub fn assert_same_training(one: &Path, many: &Path) {
    assert!(results(many)["world_size"].as_u64().unwrap() > 1);
    let (a, b) = (epoch_lines(one), epoch_lines(many));
    assert_eq!(a.len(), b.len(), "number of epochs");
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (lx - ly).abs() < 1e-4 * lx.abs().max(1.0),
            "loss {lx} vs {ly}"
        );
        let (nx, ny) = (
            x["valid"]["overall"]["NDCG@10"].as_f64().unwrap(),
            y["valid"]["overall"]["NDCG@10"].as_f64().unwrap(),
        );
        assert!((nx - ny).abs() < 5e-3, "valid NDCG@10 {nx} vs {ny}");
        assert_eq!(
            x["valid"]["overall"]["users"],
            y["valid"]["overall"]["users"]
        );
    }
    let (ta, tb) = (
        results(one)["test"]["overall"].clone(),
        results(many)["test"]["overall"].clone(),
    );
    for m in ["HR@10", "NDCG@10"] {
        let (p, q) = (ta[m].as_f64().unwrap(), tb[m].as_f64().unwrap());
        assert!((p - q).abs() < 5e-3, "test {m}: {p} vs {q}");
    }
}
