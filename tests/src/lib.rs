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

/// Writes a C-order f32 `.npy` matrix of seeded standard normals.
pub fn write_npy(path: &Path, rows: usize, cols: usize, seed: u64) {
    let mut rng = llm_esr_runtime::Rng::new(seed);
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for _ in 0..rows * cols {
        bytes.extend((rng.normal() as f32).to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Semantic artifacts for beauty5_tiny in `artifacts` from random 80-d
/// vectors (`items.npy`, `users.npy` written into `scratch`), through `embed`
/// with imports: no encoder runs.
pub fn embed_random_artifacts(scratch: &Path, artifacts: &Path) {
    let (items, users) = (scratch.join("items.npy"), scratch.join("users.npy"));
    write_npy(&items, 579, 80, 1);
    write_npy(&users, 400, 80, 2);
    let sets = [
        format!("data.dir={}", dataset("beauty5_tiny").display()),
        format!("model.artifacts={}", artifacts.display()),
        format!("embed.item_import={{path: {}}}", items.display()),
        format!("embed.user_import={{path: {}}}", users.display()),
    ];
    let mut args = vec!["embed", "configs/beauty5_tiny_llmesr.yaml"];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let out = run_cli(&args, &[]);
    assert!(out.status.success(), "embed failed: {}", text(&out.stderr));
}

/// Overwrites the first element of tensor `name` in a safetensors file with
/// `value` (f32), leaving everything else as it was.
pub fn poke_safetensors(path: &Path, name: &str, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[name]["data_offsets"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("no tensor {name} in {}", path.display()))
        as usize;
    let at = 8 + n + start;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Every file under `dir` (relative path) with its bytes: a snapshot to show
/// that a refused command changed nothing.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                out.push((rel, Vec::new()));
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
