//! Bad configurations and inputs as a user meets them: exit status 2 and the
//! key for configuration errors (also those found against the dataset and by
//! plugins), and a quick, clear refusal of inputs that would exhaust memory.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use llm_esr_tests::{dataset, run_cli, text, tiny_train_args};

fn train(out: &Path, name: &str, sets: &[&str]) -> (Output, Duration) {
    let args = tiny_train_args(&out.display().to_string(), name, sets);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let o = run_cli(&a, &[]);
    (o, t.elapsed())
}

fn assert_config_error(o: &Output, fragments: &[&str]) {
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    for f in fragments {
        assert!(stderr.contains(f), "stderr lacks `{f}`: {stderr}");
    }
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn out_of_range_values_name_key_value_and_range() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, want) in [
        (
            "train.adam_betas=[1.5,2]",
            "config key `train.adam_betas`: 1.5 is outside [0, 1)",
        ),
        (
            "train.lr=.nan",
            "config key `train.lr`: NaN is outside (0, inf)",
        ),
        (
            "model.hidden=1000000",
            "config key `model.hidden`: 1000000 is outside [1, 4096]",
        ),
        ("train.device=gpu", "config key `train.device`"),
    ] {
        let (o, _) = train(tmp.path(), "range", &[set]);
        assert_config_error(&o, &[want]);
    }
    assert!(
        !tmp.path().join("range").exists(),
        "a run directory was made"
    );
}

/// `model.encoder: {layerz: 2}` is refused by the SASRec plugin's own
/// configuration; the host reports it as an error of the section.
#[test]
fn a_plugin_refusing_its_section_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = train(tmp.path(), "plugin", &["model.encoder={layerz: 2}"]);
    assert_config_error(&o, &["config key `model.encoder`", "layerz", "`sasrec`"]);
    let (o, _) = train(tmp.path(), "plugin2", &["model.backbone=sasrecc"]);
    assert_config_error(&o, &["config key `model.backbone`", "sasrecc"]);
    assert!(!tmp.path().join("plugin2").exists());
}

/// beauty5_tiny has 579 items and a user with 146 of them: at most 433
/// sampled negatives. Refused before any run directory is written.
#[test]
fn more_negatives_than_unseen_items_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, _) = train(tmp.path(), "neg", &["eval.negatives=500", "eval.ks=[10]"]);
    assert_config_error(
        &o,
        &[
            "config key `eval.negatives`",
            "500",
            "[1, 433]",
            "beauty5_tiny",
        ],
    );
    assert!(!tmp.path().join("neg").exists(), "a run directory was made");
    let (o, _) = train(
        tmp.path(),
        "ks",
        &["eval.mode=full", "eval.ks=[10,1000]", "eval.metric=HR@10"],
    );
    assert_config_error(&o, &["config key `eval.ks`", "1000", "[1, 434]"]);
}

/// A copy of beauty5_tiny with one id of 4e9: refused at once, naming the
/// file and line and saying to run `prepare`, instead of sizing tables by it.
#[test]
fn a_sparse_id_asks_for_prepare_quickly() {
    let inter = std::fs::read_to_string(dataset("beauty5_tiny").join("inter.txt")).unwrap();
    for (column, what) in [(1, "item id 4000000000"), (0, "user id 4000000000")] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let lines: Vec<String> = inter
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let mut f: Vec<&str> = l.split_whitespace().collect();
                if i == 6 {
                    f[column] = "4000000000";
                }
                f.join(" ")
            })
            .collect();
        std::fs::write(data.join("inter.txt"), lines.join("\n") + "\n").unwrap();
        let dir = format!("data.dir={}", data.display());
        let (o, took) = train(tmp.path(), "sparse", &[&dir]);
        let stderr = text(&o.stderr);
        assert!(!o.status.success(), "{stderr}");
        assert!(
            stderr.contains(what)
                && stderr.contains("inter.txt:7")
                && stderr.contains("llm-esr-orch prepare"),
            "{stderr}"
        );
        assert!(!stderr.contains("memory allocation"), "{stderr}");
        assert!(took < Duration::from_secs(20), "took {took:?}");
    }
}

#[test]
fn an_oversized_config_file_is_refused_before_parsing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.yaml");
    let mut body = String::from("name: huge\n");
    while body.len() < 2 << 20 {
        body.push_str("# a comment that makes the file larger than the cap for configs\n");
    }
    std::fs::write(&path, body).unwrap();
    let o = run_cli(&["train", path.to_str().unwrap()], &[]);
    assert_config_error(&o, &["huge.yaml", "larger than 1024 KiB"]);
}

#[test]
fn a_yaml_alias_bomb_is_refused_quickly() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bomb.yaml");
    let mut body = String::from("name: bomb\nmodel:\n  encoder:\n    a: &a [");
    body.push_str(&"1, ".repeat(20_000));
    body.push_str("1]\n    b: [");
    body.push_str(&"*a, ".repeat(20_000));
    body.push_str("*a]\n");
    std::fs::write(&path, body).unwrap();
    let t = Instant::now();
    let o = run_cli(&["train", path.to_str().unwrap()], &[]);
    assert_config_error(&o, &["bomb.yaml", "more than 100000 values"]);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

/// Sizes within their ranges whose product cannot fit are refused by the
/// memory estimate with the keys to lower, not by an abort.
#[test]
fn a_run_that_cannot_fit_in_memory_is_refused() {
    if std::fs::read_to_string("/proc/meminfo").is_err() {
        return; // no estimate of the available memory here
    }
    let tmp = tempfile::tempdir().unwrap();
    let (o, took) = train(
        tmp.path(),
        "mem",
        &[
            "model.hidden=4096",
            "data.max_len=4096",
            "train.batch_size=65536",
        ],
    );
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not enough memory") && stderr.contains("train.batch_size"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(!tmp.path().join("mem").exists());
}

#[test]
fn a_sweep_with_too_many_runs_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sweep.yaml");
    let values: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
    let list = format!("[{}]", values.join(", "));
    std::fs::write(
        &path,
        format!(
            "config: {}/configs/beauty5_tiny_sasrec.yaml\nname: s\ngrid:\n  seed: {list}\n  \
             train.epochs: {list}\n  train.patience: {list}\n",
            llm_esr_tests::workspace_root().display()
        ),
    )
    .unwrap();
    let o = run_cli(&["sweep", path.to_str().unwrap()], &[]);
    assert_config_error(&o, &["1000000 runs", "more than the 10000"]);
}
