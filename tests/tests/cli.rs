//! The command line as a user meets it: listing plugins, training on real
//! data, and clear errors for bad input.

use std::path::Path;

use llm_esr_tests::{dataset, plugin_file, run_cli, text};

fn write_config(dir: &Path, body: &str) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn plugins_lists_sasrec() {
    let out = run_cli(&["plugins", "--inspect"], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.contains("sasrec"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.starts_with("backbone") && line.contains(" ok "),
        "{line}"
    );
}

#[test]
fn plugins_shows_a_refused_plugin_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        plugin_file("llm_esr_fixture_stale"),
        tmp.path().join("libllm_esr_plugin_stale.so"),
    )
    .unwrap();
    let out = run_cli(
        &["plugins", "--inspect"],
        &[("LLM_ESR_PLUGIN_PATH", tmp.path().to_str().unwrap())],
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("stale") && stdout.contains("refused"),
        "{stdout}"
    );
    assert!(stdout.contains("rebuild the workspace"), "{stdout}");
}

#[test]
fn a_misspelled_key_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "name: typo\ntrain:\n  epochs: 2\n  bacth_size: 64\n",
    );
    let out = run_cli(&["train", &cfg], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown field `bacth_size`"), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn a_bad_override_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        &format!("name: x\noutput_dir: {}\n", tmp.path().display()),
    );
    let out = run_cli(&["train", &cfg, "--set", "train.epochz=3"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("train.epochz") && stderr.contains("unknown field"),
        "{stderr}"
    );
}

#[test]
fn a_missing_data_file_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no_such_dataset");
    let cfg = write_config(
        tmp.path(),
        &format!(
            "name: missing\noutput_dir: {}\ndata:\n  dir: {}\n",
            tmp.path().display(),
            missing.display()
        ),
    );
    let out = run_cli(&["train", &cfg], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&missing.join("inter.txt").display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unset_variable_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        &format!(
            "name: x\noutput_dir: {}\ndata:\n  dir: ${{NO_SUCH_VARIABLE_XYZ}}/d\n",
            tmp.path().display()
        ),
    );
    let out = run_cli(&["train", &cfg], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("NO_SUCH_VARIABLE_XYZ") && stderr.contains("not set"),
        "{stderr}"
    );
}

/// Plain SASRec on beauty5_tiny for a few epochs beats a random ranker
/// (expected HR@10 = 10/101 ~ 0.099) clearly, and writes the results contract.
#[test]
fn training_on_beauty5_tiny_beats_random() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset("beauty5_tiny");
    let out_dir = tmp.path().display().to_string();
    let out = run_cli(
        &[
            "train",
            "configs/beauty5_tiny_sasrec.yaml",
            "--set",
            &format!("output_dir={out_dir}"),
            "--set",
            &format!("data.dir={}", data.display()),
            "--set",
            "train.epochs=20",
            "--set",
            "name=tiny_test",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = tmp.path().join("tiny_test");
    for f in [
        "config.resolved.yaml",
        "metrics.jsonl",
        "results.json",
        "best.safetensors",
        "checkpoint.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["name"], "tiny_test");
    assert!(r["best_epoch"].as_u64().unwrap() >= 1);
    assert!(r["epochs_run"].as_u64().unwrap() >= r["best_epoch"].as_u64().unwrap());
    for k in [5, 10, 20] {
        for m in ["HR", "NDCG"] {
            let v = r["test"]["overall"][format!("{m}@{k}")].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v));
        }
    }
    assert!(r["valid"]["overall"]["NDCG@10"].is_f64());
    let hr10 = r["test"]["overall"]["HR@10"].as_f64().unwrap();
    assert!(hr10 > 0.2, "HR@10 = {hr10}, random is 0.099");
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for key in ["epoch", "loss", "valid", "seconds"] {
        assert!(first.get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    // A second run into the same directory must not overwrite it.
    let again = run_cli(
        &[
            "train",
            "configs/beauty5_tiny_sasrec.yaml",
            "--set",
            &format!("output_dir={out_dir}"),
            "--set",
            "name=tiny_test",
        ],
        &[],
    );
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("--resume"));
}

/// Test users are grouped by the training length `seq[:-2]` by default and by
/// the test input `seq[:-1]` (cut to max_len) with `test_users_by:
/// test_input`, as the official report; validation groups do not change.
/// Group sizes are recounted here from inter.txt.
#[test]
fn test_user_groups_follow_test_users_by() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().display().to_string();
    let mut lens = std::collections::BTreeMap::<u32, usize>::new();
    let inter = std::fs::read_to_string(dataset("beauty5_tiny").join("inter.txt")).unwrap();
    for line in inter.lines().filter(|l| !l.trim().is_empty()) {
        let user: u32 = line.split_whitespace().next().unwrap().parse().unwrap();
        *lens.entry(user).or_default() += 1;
    }
    let run = |name: &str, by: &str| {
        let by = format!("data.long_tail.test_users_by={by}");
        let args = llm_esr_tests::tiny_train_args(&out, name, &["train.epochs=1", &by]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_cli(&a, &[]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        llm_esr_tests::results(&tmp.path().join(name))
    };
    let (train, input) = (
        run("by_train", "train_length"),
        run("by_input", "test_input"),
    );
    let threshold = train["long_tail"]["user_threshold"].as_u64().unwrap() as usize;
    assert_eq!(input["long_tail"]["test_users_by"], "test_input");
    let head = |shift: usize| {
        lens.values()
            .filter(|&&n| n >= 3 && (n - shift).min(50) >= threshold)
            .count() as f64
    };
    let users =
        |r: &serde_json::Value, split: &str| r[split]["head_user"]["users"].as_f64().unwrap();
    assert_eq!(users(&train, "test"), head(2));
    assert_eq!(users(&input, "test"), head(1));
    assert!(head(1) > head(2));
    assert_eq!(users(&train, "valid"), users(&input, "valid"));
    assert_eq!(users(&input, "valid"), head(2));
}

/// `bench --prompts-out` belongs to `--what embed`; elsewhere it is refused
/// as a usage error (exit 2) before anything runs.
#[test]
fn bench_prompts_out_needs_what_embed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "name: x\n");
    let out = run_cli(
        &["bench", &cfg, "--what", "eval", "--prompts-out", "p"],
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--prompts-out goes with --what embed"),
        "{stderr}"
    );
    let out = run_cli(&["bench", &cfg, "--what", "embed", "--users", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// `bench --what embed` needs the item titles; without `item_text.tsv` it
/// names the file.
#[test]
fn bench_embed_without_item_text_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("inter.txt"), "1 1\n1 2\n1 3\n2 2\n2 3\n2 1\n").unwrap();
    let cfg = write_config(
        tmp.path(),
        &format!("name: x\ndata:\n  dir: {}\n", data.display()),
    );
    let out = run_cli(&["bench", &cfg, "--what", "embed", "--users", "2"], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&data.join("item_text.tsv").display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `bench --what embed` encodes the first N user prompts, writes them, and
/// `--what eval` times a validation pass; both print their JSON.
#[test]
fn bench_times_embedding_and_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let models = std::env::var_os("LLM_ESR_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| llm_esr_tests::workspace_root().join("../shared/models"));
    let cfg = write_config(
        tmp.path(),
        &format!(
            "name: x\noutput_dir: {}\ndata:\n  dir: {}\n  max_len: 20\nembed:\n  model: {}\n",
            tmp.path().display(),
            dataset("beauty5_tiny").display(),
            models.join("all-MiniLM-L6-v2").display()
        ),
    );
    let prompts = tmp.path().join("prompts.jsonl");
    let out = run_cli(
        &[
            "bench", &cfg, "--what", "embed", "--users", "3", "--steps", "1", "--warmup", "0",
        ]
        .into_iter()
        .chain(["--prompts-out", prompts.to_str().unwrap()])
        .collect::<Vec<_>>(),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v["texts"], 3, "{v}");
    assert!(v["median_ms"].as_f64().unwrap() > 0.0, "{v}");
    let lines: Vec<String> = std::fs::read_to_string(&prompts)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|p| p.starts_with("The user")), "{lines:?}");

    let out = run_cli(
        &[
            "bench", &cfg, "--what", "eval", "--steps", "1", "--warmup", "0",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(v["users"].as_u64().unwrap() > 0, "{v}");
    assert!(v["median_pass_ms"].as_f64().unwrap() > 0.0, "{v}");
}
