//! End to end on the first 30 users of beauty5_tiny: prepare, embed (MiniLM),
//! rerun without work, load and check shapes; forced recompute; imports.

mod common;

use llm_esr_prep::artifacts::{embed, Artifacts, EmbedConfig, StageStatus};
use llm_esr_prep::import::ImportSpec;
use llm_esr_prep::prepare::{prepare, PrepareConfig};
use llm_esr_runtime::candle::{DType, Device};

#[test]
fn embed_tiny_end_to_end() {
    // A small raw dataset: the first 30 users, with the full item text file.
    let tiny = common::dataset("beauty5_tiny");
    let raw = tempfile::tempdir().unwrap();
    let inter = std::fs::read_to_string(tiny.join("inter.txt")).unwrap();
    let subset: String = inter
        .lines()
        .filter(|l| l.split(' ').next().unwrap().parse::<u32>().unwrap() <= 30)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(raw.path().join("inter.txt"), subset).unwrap();
    std::fs::copy(tiny.join("item_text.tsv"), raw.path().join("item_text.tsv")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let cfg = PrepareConfig {
        interactions: raw.path().join("inter.txt"),
        ..PrepareConfig::default()
    };
    let summary = prepare(&cfg, data.path()).unwrap();
    let (n_items, n_users) = (summary.items, summary.users);
    assert_eq!(n_users, 30);
    assert!(n_items > 100);
    let out = tempfile::tempdir().unwrap();
    let ecfg = EmbedConfig {
        model: common::minilm(),
        max_tokens: Some(64),
        pca_dim: 16,
        neighbours: 10,
        knn_block: 128,
        ..EmbedConfig::default()
    };
    let s = embed(&ecfg, data.path(), out.path(), false).unwrap();
    assert_eq!(
        (s.items, s.users, s.item_dim, s.user_dim),
        (n_items, n_users, 384, 384)
    );
    assert!(
        s.stages.iter().all(|st| st.status == StageStatus::Computed),
        "{:?}",
        s.stages
    );
    assert!(s.explained_variance > 0.0 && s.explained_variance < 1.0);

    // Second run: nothing to do.
    let s2 = embed(&ecfg, data.path(), out.path(), false).unwrap();
    assert!(
        s2.stages
            .iter()
            .all(|st| st.status == StageStatus::UpToDate),
        "{:?}",
        s2.stages
    );
    assert!((s2.explained_variance - s.explained_variance).abs() < 1e-12);

    let a = Artifacts::load(out.path(), n_items, n_users, &Device::Cpu).unwrap();
    assert_eq!(a.item_emb.dims(), &[n_items + 1, 384]);
    assert_eq!(a.pca.dims(), &[n_items + 1, 16]);
    assert_eq!(a.user_emb.as_ref().unwrap().dims(), &[n_users, 384]);
    assert_eq!(a.neighbours.dims(), &[n_users, 10]);
    assert_eq!(a.neighbours.dtype(), DType::U32);
    let row0: Vec<f32> = a.item_emb.get(0).unwrap().to_vec1().unwrap();
    assert!(row0.iter().all(|&v| v == 0.0));
    let p0: Vec<f32> = a.pca.get(0).unwrap().to_vec1().unwrap();
    assert!(p0.iter().all(|&v| v == 0.0));
    let m = a.manifest;
    assert_eq!(m.model.as_ref().unwrap().name, "all-MiniLM-L6-v2");
    assert_eq!(m.model.as_ref().unwrap().sha256.len(), 64);
    assert_eq!(m.dataset.inter_sha256.len(), 64);
    assert!(m.stages.contains_key("neighbours"));

    // Wrong expectations are refused with the rerun hint.
    let e = format!(
        "{:#}",
        Artifacts::load(out.path(), n_items - 1, n_users, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("rerun `llm-esr-orch embed CONFIG`"), "{e}");

    // Changing only the neighbour count recomputes only that stage.
    let more = EmbedConfig {
        neighbours: 12,
        ..ecfg.clone()
    };
    let s3 = embed(&more, data.path(), out.path(), false).unwrap();
    let st: Vec<StageStatus> = s3.stages.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        vec![
            StageStatus::UpToDate,
            StageStatus::UpToDate,
            StageStatus::UpToDate,
            StageStatus::Computed
        ]
    );

    // Import the computed tables back (items without the padding row) into a new
    // directory: same PCA and neighbours.
    let imp = tempfile::tempdir().unwrap();
    let items = a.item_emb.narrow(0, 1, n_items).unwrap();
    items
        .save_safetensors("e", imp.path().join("items.safetensors"))
        .unwrap();
    a.user_emb
        .as_ref()
        .unwrap()
        .save_safetensors("u", imp.path().join("users.safetensors"))
        .unwrap();
    let icfg = EmbedConfig {
        model: "/nonexistent".into(),
        item_import: Some(ImportSpec {
            path: imp.path().join("items.safetensors"),
            tensor: None,
        }),
        user_import: Some(ImportSpec {
            path: imp.path().join("users.safetensors"),
            tensor: Some("u".into()),
        }),
        ..ecfg.clone()
    };
    let out2 = tempfile::tempdir().unwrap();
    let s4 = embed(&icfg, data.path(), out2.path(), false).unwrap();
    assert_eq!(s4.stages[0].status, StageStatus::Imported);
    let b = Artifacts::load(out2.path(), n_items, n_users, &Device::Cpu).unwrap();
    let diff = llm_esr_runtime::testing::max_abs_diff(&b.pca, &a.pca).unwrap();
    assert!(diff < 1e-5, "pca differs by {diff}");
    let ai: Vec<u32> = a.neighbours.flatten_all().unwrap().to_vec1().unwrap();
    let bi: Vec<u32> = b.neighbours.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ai, bi);

    // Force: recompute everything.
    let s5 = embed(&icfg, data.path(), out2.path(), true).unwrap();
    assert!(s5
        .stages
        .iter()
        .all(|st| st.status != StageStatus::UpToDate));

    // A damaged artifact is refused by the loader (its sha256 no longer
    // matches the manifest), then detected by the next run and rebuilt.
    let p = out2.path().join("pca.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!(
        "{:#}",
        Artifacts::load(out2.path(), n_items, n_users, &Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("pca.safetensors has changed since `embed` wrote it") && e.contains("rerun"),
        "{e}"
    );
    let s6 = embed(&icfg, data.path(), out2.path(), false).unwrap();
    assert_eq!(s6.stages[2].status, StageStatus::Computed);
}
