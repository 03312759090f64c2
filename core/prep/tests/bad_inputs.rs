//! Bad inputs give clear errors that name the file and the fix.

mod common;

use std::path::Path;

use llm_esr_prep::artifacts::{embed, EmbedConfig};
use llm_esr_prep::encoder::SentenceEncoder;
use llm_esr_prep::import::{import_matrix, ImportSpec};
use llm_esr_prep::prepare::{prepare, PrepareConfig};
use llm_esr_runtime::candle::{Device, Tensor};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn prepared_tiny() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let cfg = PrepareConfig {
        interactions: common::dataset("beauty5_tiny").join("inter.txt"),
        ..PrepareConfig::default()
    };
    prepare(&cfg, out.path()).unwrap();
    out
}

#[test]
fn unknown_template_column_fails_before_any_work() {
    let data = prepared_tiny();
    let out = tempfile::tempdir().unwrap();
    let cfg = EmbedConfig {
        // A model path that does not exist: the template error must come first.
        model: "/nonexistent/model".into(),
        item_template: "name is {title}; brand is {brand}.".into(),
        ..EmbedConfig::default()
    };
    let m = common::msg(&embed(&cfg, data.path(), out.path(), false).unwrap_err());
    assert!(
        m.contains("{brand}")
            && m.contains("item_text.tsv")
            && m.contains("asin, title")
            && m.contains("item_template"),
        "{m}"
    );
    assert!(!out.path().join("manifest.json").exists());
}

#[test]
fn npy_of_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in 0..6 {
        bytes.extend_from_slice(&(v as f32).to_le_bytes());
    }
    let p = dir.path().join("items.npy");
    std::fs::write(&p, &bytes).unwrap();
    let spec = ImportSpec {
        path: p.clone(),
        tensor: None,
    };
    assert_eq!(import_matrix(&spec, &[3], "E_se").unwrap().dims(), &[3, 2]);
    let m = common::msg(&import_matrix(&spec, &[579, 580], "E_se (items)").unwrap_err());
    assert!(
        m.contains("items.npy") && m.contains("(3, 2)") && m.contains("579 or 580"),
        "{m}"
    );
    // Truncated data.
    std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    let m = common::msg(&import_matrix(&spec, &[3], "E_se").unwrap_err());
    assert!(m.contains("items.npy") && m.contains("truncated"), "{m}");
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("users.safetensors");
    let t = Tensor::zeros((10, 4), llm_esr_runtime::candle::DType::F32, &Device::Cpu).unwrap();
    t.save_safetensors("user_emb", &p).unwrap();
    let spec = ImportSpec {
        path: p.clone(),
        tensor: Some("user_emb".into()),
    };
    assert_eq!(
        import_matrix(&spec, &[10], "U_llm").unwrap().dims(),
        &[10, 4]
    );
    let wrong = ImportSpec {
        path: p.clone(),
        tensor: Some("emb".into()),
    };
    let m = common::msg(&import_matrix(&wrong, &[10], "U_llm").unwrap_err());
    assert!(
        m.contains("no tensor `emb`") && m.contains("user_emb"),
        "{m}"
    );
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 20]).unwrap();
    let m = common::msg(&import_matrix(&spec, &[10], "U_llm").unwrap_err());
    assert!(
        m.contains("users.safetensors") && m.contains("truncated or corrupt"),
        "{m}"
    );
}

#[test]
fn model_dir_without_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "config.json", "{}");
    write(dir.path(), "model.safetensors", "");
    let m = match SentenceEncoder::load(dir.path(), &Device::Cpu, None) {
        Ok(_) => panic!("loaded a model without tokenizer.json"),
        Err(e) => common::msg(&e),
    };
    assert!(
        m.contains("tokenizer.json") && m.contains(&dir.path().display().to_string()),
        "{m}"
    );
    assert!(
        m.contains("config.json, tokenizer.json, model.safetensors"),
        "{m}"
    );
}

#[test]
fn duplicate_and_non_numeric_ids() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // Non-numeric id (e.g. a header line) in inter.txt.
    let inter = write(dir.path(), "inter.txt", "user item\n1 2\n");
    let cfg = PrepareConfig {
        interactions: inter.clone(),
        ..PrepareConfig::default()
    };
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(
        m.contains("inter.txt:1") && m.contains("`user`") && m.contains("format: csv"),
        "{m}"
    );
    // Duplicate item id in the text file.
    std::fs::write(&inter, "1 2\n1 3\n2 2\n").unwrap();
    write(
        dir.path(),
        "item_text.tsv",
        "item_id\ttitle\n2\tA\n3\tB\n2\tC\n",
    );
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(
        m.contains("item_text.tsv:4") && m.contains("duplicate item id") && m.contains("line 2"),
        "{m}"
    );
    // Duplicate column in a header.
    write(
        dir.path(),
        "item_text.tsv",
        "item_id\ttitle\ttitle\n2\tA\tA\n",
    );
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(
        m.contains("item_text.tsv:1") && m.contains("duplicate column `title`"),
        "{m}"
    );
    // Repeated header inside the file.
    write(
        dir.path(),
        "item_text.tsv",
        "item_id\ttitle\n2\tA\nitem_id\ttitle\n3\tB\n",
    );
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(
        m.contains("item_text.tsv:3") && m.contains("header line appears again"),
        "{m}"
    );
    // Non-numeric id in the text file of an inter_txt dataset.
    write(dir.path(), "item_text.tsv", "item_id\ttitle\nB00X\tA\n");
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(m.contains("item_text.tsv:2") && m.contains("`B00X`"), "{m}");
    // Nothing was written by the failed runs.
    assert!(!out.path().join("inter.txt").exists());
}

#[test]
fn empty_dataset_after_filtering() {
    let out = tempfile::tempdir().unwrap();
    let cfg = PrepareConfig {
        interactions: common::dataset("beauty5_tiny").join("inter.txt"),
        user_min: 1000,
        ..PrepareConfig::default()
    };
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(
        m.contains("inter.txt") && m.contains("relax user_min (= 1000)"),
        "{m}"
    );
    let cfg = PrepareConfig {
        user_min: 0,
        min_seq_len: 500,
        ..cfg
    };
    let m = common::msg(&prepare(&cfg, out.path()).unwrap_err());
    assert!(m.contains("relax min_seq_len (= 500)"), "{m}");
}

#[test]
fn artifacts_of_another_dataset_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m =
        common::msg(&llm_esr_prep::Artifacts::load(dir.path(), 10, 5, &Device::Cpu).unwrap_err());
    assert!(
        m.contains("manifest.json") && m.contains("llm-esr-orch embed CONFIG"),
        "{m}"
    );
}
