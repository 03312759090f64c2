//! `prepare` on the real tiny dataset and on small synthetic files in each
//! layout.

mod common;

use std::path::Path;

use llm_esr_prep::dataset::{read_sequences, Dataset};
use llm_esr_prep::prepare::{prepare, InputFormat, KCore, PrepareConfig};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn beauty5_tiny_counts_without_filter() {
    let src = common::dataset("beauty5_tiny");
    let out = tempfile::tempdir().unwrap();
    let cfg = PrepareConfig {
        interactions: src.join("inter.txt"),
        ..PrepareConfig::default()
    };
    let s = prepare(&cfg, out.path()).unwrap();
    assert_eq!((s.users, s.items, s.interactions), (400, 579, 4591));
    assert!((s.avg_seq_len - 4591.0 / 400.0).abs() < 1e-12);
    assert_eq!(
        s.text_columns,
        vec!["asin".to_string(), "title".to_string()]
    );
    // The source is already numbered in first-appearance order: ids unchanged.
    assert_eq!(
        std::fs::read_to_string(out.path().join("inter.txt")).unwrap(),
        std::fs::read_to_string(src.join("inter.txt")).unwrap()
    );
    let d = Dataset::load(out.path()).unwrap();
    assert_eq!(d.num_users(), 400);
    assert_eq!(d.num_items, 579);
    let t = d.item_text.as_ref().unwrap();
    let orig = std::fs::read_to_string(src.join("item_text.tsv")).unwrap();
    let line2: Vec<&str> = orig.lines().nth(1).unwrap().split('\t').collect();
    assert_eq!(t.field(1, 1), Some(line2[2]));
    // Long tail recorded: head items at least 20%.
    assert!(s.long_tail.head_items * 5 >= 579);
    assert!(s.long_tail.head_users * 5 >= 400);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("dataset.json")).unwrap())
            .unwrap();
    assert_eq!(json["users"], 400);
    assert!(json["sparsity"].as_f64().unwrap() > 0.9);
    let maps = std::fs::read_to_string(out.path().join("item_map.tsv")).unwrap();
    assert_eq!(maps.lines().count(), 580);
}

#[test]
fn kcore_iterative_and_single_pass() {
    let dir = tempfile::tempdir().unwrap();
    // user 1: a b c; user 2: a b; user 3: a c d ; item d appears once.
    let inter = write(
        dir.path(),
        "raw.txt",
        "10 1\n10 2\n10 3\n20 1\n20 2\n30 1\n30 3\n30 4\n",
    );
    let base = PrepareConfig {
        interactions: inter,
        user_min: 3,
        item_min: 2,
        ..PrepareConfig::default()
    };
    // single pass: counts once: users 10 (3), 20 (2 -> dropped), 30 (3); item 4 (1 -> dropped).
    let single = PrepareConfig {
        kcore: KCore::SinglePass,
        ..base.clone()
    };
    let out = tempfile::tempdir().unwrap();
    let s = prepare(&single, out.path()).unwrap();
    assert_eq!((s.users, s.items, s.interactions), (2, 3, 5));
    // iterative: after dropping user 20 and item 4, user 30 has 2 < 3 -> dropped,
    // then items 2, 3 have 1 < 2 ... -> everything goes.
    let out2 = tempfile::tempdir().unwrap();
    let e = prepare(&base, out2.path()).unwrap_err();
    let m = common::msg(&e);
    assert!(
        m.contains("user_min") && m.contains("item_min") && m.contains("relax"),
        "{m}"
    );
    // Looser: item_min 1 keeps users 10 and 30 (3 each) after iterating.
    let loose = PrepareConfig {
        item_min: 1,
        ..base.clone()
    };
    let s = prepare(&loose, out2.path()).unwrap();
    assert_eq!((s.users, s.interactions), (2, 6));
    let seqs = read_sequences(&out2.path().join("inter.txt")).unwrap();
    assert_eq!(seqs, vec![vec![1, 2, 3], vec![1, 3, 4]]);
    let umap = std::fs::read_to_string(out2.path().join("user_map.tsv")).unwrap();
    assert_eq!(umap, "user_id\toriginal_id\n1\t10\n2\t30\n");
}

#[test]
fn recbole_sorts_by_timestamp_and_reads_titles() {
    let dir = tempfile::tempdir().unwrap();
    let inter = write(
        dir.path(),
        "ml.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
         u1\tm9\t4\t300\nu2\tm1\t5\t100\nu1\tm1\t3\t100\nu1\tm2\t3\t100\nu2\tm9\t1\t50\n",
    );
    write(
        dir.path(),
        "ml.item",
        "item_id:token\tmovie_title:token_seq\tclass:token_seq\nm1\tToy Story\tAnimation\nm9\tHeat\tAction\n",
    );
    let cfg = PrepareConfig {
        format: InputFormat::Recbole,
        interactions: inter,
        ..PrepareConfig::default()
    };
    let out = tempfile::tempdir().unwrap();
    let s = prepare(&cfg, out.path()).unwrap();
    assert_eq!((s.users, s.items, s.interactions), (2, 3, 5));
    assert_eq!(
        s.text_columns,
        vec!["title".to_string(), "class".to_string()]
    );
    // u1 sorted (stable on ties): m1(100) m2(100) m9(300) -> items 1 2 3; u2: m9(50) m1(100).
    let seqs = read_sequences(&out.path().join("inter.txt")).unwrap();
    assert_eq!(seqs, vec![vec![1, 2, 3], vec![3, 1]]);
    let text = std::fs::read_to_string(out.path().join("item_text.tsv")).unwrap();
    assert_eq!(
        text,
        "item_id\ttitle\tclass\n1\tToy Story\tAnimation\n2\t\t\n3\tHeat\tAction\n"
    );
    // Selecting the original column name still yields `title`.
    let only = PrepareConfig {
        item_text_columns: vec!["movie_title".into()],
        ..cfg.clone()
    };
    let s = prepare(&only, out.path()).unwrap();
    assert_eq!(s.text_columns, vec!["title".to_string()]);
}

#[test]
fn csv_with_named_columns_and_quotes() {
    let dir = tempfile::tempdir().unwrap();
    let inter = write(
        dir.path(),
        "log.csv",
        "ts,who,what\n5,alice,X\n1,bob,Y\n2,alice,Y\n",
    );
    let text = write(
        dir.path(),
        "items.csv",
        "sku,name,price\nX,\"Lip, gloss\",3\nY,\"12\"\" brush\",\n",
    );
    let cfg = PrepareConfig {
        format: InputFormat::Csv,
        interactions: inter,
        user_column: "who".into(),
        item_column: "what".into(),
        timestamp_column: Some("ts".into()),
        item_text: Some(text),
        item_text_id_column: "sku".into(),
        item_text_columns: vec!["name".into()],
        ..PrepareConfig::default()
    };
    let out = tempfile::tempdir().unwrap();
    let s = prepare(&cfg, out.path()).unwrap();
    assert_eq!((s.users, s.items), (2, 2));
    let seqs = read_sequences(&out.path().join("inter.txt")).unwrap();
    // alice first (line 2): Y(2) X(5); bob: Y.
    assert_eq!(seqs, vec![vec![1, 2], vec![1]]);
    let t = std::fs::read_to_string(out.path().join("item_text.tsv")).unwrap();
    assert_eq!(t, "item_id\tname\n1\t12\" brush\n2\tLip, gloss\n");
    // A missing column names the file, the column, the columns and the key.
    let bad = PrepareConfig {
        user_column: "user".into(),
        ..cfg.clone()
    };
    let m = common::msg(&prepare(&bad, out.path()).unwrap_err());
    assert!(
        m.contains("log.csv")
            && m.contains("`user`")
            && m.contains("ts, who, what")
            && m.contains("user_column"),
        "{m}"
    );
    // Config keys are checked.
    let e = serde_json::from_str::<PrepareConfig>(r#"{"user_colum": "x"}"#).unwrap_err();
    assert!(e.to_string().contains("user_colum"));
    let ok: PrepareConfig = serde_json::from_str(
        r#"{"kcore": "single_pass", "user_min": 5, "long_tail": {"ts_user": 9, "ts_item": 4}}"#,
    )
    .unwrap();
    assert_eq!(ok.kcore, KCore::SinglePass);
    assert_eq!(ok.long_tail.ts_item, Some(4));
}
