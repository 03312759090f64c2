//! `manifest.json` and the bookkeeping of an [`embed`](super::embed) run: which
//! stages are up to date (their recorded inputs and output hash unchanged),
//! and the manifest saved after every stage so that an interrupted run resumes
//! where it stopped.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::MANIFEST_FILE;
use crate::fsutil::{sha256_file, write_json_atomic};

/// The model recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Directory name, e.g. `all-MiniLM-L6-v2`.
    pub name: String,
    /// Directory as configured.
    pub dir: String,
    /// sha256 of `model.safetensors`.
    pub sha256: String,
    /// sha256 of `tokenizer.json`.
    pub tokenizer_sha256: String,
}

/// The dataset recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Directory as given.
    pub dir: String,
    /// Users.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// sha256 of `inter.txt`.
    pub inter_sha256: String,
    /// sha256 of `item_text.tsv`, when present.
    pub item_text_sha256: Option<String>,
}

/// One produced file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEntry {
    /// Every input that determines the output; a stage is up to date when this is
    /// unchanged.
    pub key: serde_json::Value,
    /// The output file name.
    pub file: String,
    /// sha256 of the output file.
    pub output_sha256: String,
    /// Rows of the main tensor.
    pub rows: usize,
    /// Columns of the main tensor.
    pub cols: usize,
    /// Seconds it took.
    pub seconds: f64,
    /// Stage-specific facts (e.g. texts per second, explained variance).
    pub info: serde_json::Value,
}

impl StageEntry {
    /// The entry of a stage that began at `started` and wrote `file` (hash
    /// `output_sha256`) whose main tensor is `rows` x `cols`.
    pub(super) fn written(
        key: serde_json::Value,
        file: &str,
        output_sha256: String,
        (rows, cols): (usize, usize),
        started: std::time::Instant,
        info: serde_json::Value,
    ) -> StageEntry {
        StageEntry {
            key,
            file: file.into(),
            output_sha256,
            rows,
            cols,
            seconds: started.elapsed().as_secs_f64(),
            info,
        }
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of this crate that wrote it.
    pub crate_version: String,
    /// The dataset.
    pub dataset: DatasetInfo,
    /// The model, when a stage encoded text.
    pub model: Option<ModelInfo>,
    /// Item template used.
    pub item_template: String,
    /// User template used.
    pub user_template: String,
    /// Stages by name: `item_emb`, `user_emb`, `pca`, `neighbours`.
    pub stages: BTreeMap<String, StageEntry>,
}

impl Manifest {
    /// Reads `manifest.json` from an artifact directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: no artifacts here; run `llm-esr-orch embed CONFIG`",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "parsing {}; rerun `llm-esr-orch embed CONFIG` (with --force if needed)",
                path.display()
            )
        })
    }
}

/// What happened to a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Computed now.
    Computed,
    /// Imported from a file now.
    Imported,
    /// Inputs unchanged; nothing done.
    UpToDate,
}

/// One stage of an [`embed`](super::embed) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// `item_emb`, `user_emb`, `pca` or `neighbours`.
    pub name: String,
    /// What happened.
    pub status: StageStatus,
    /// Seconds spent now (0 when up to date).
    pub seconds: f64,
    /// Rows x columns of the output.
    pub shape: (usize, usize),
}

/// What a stage function produced: the manifest entry of its file, whether it
/// was computed or imported, and its result for the later stages.
pub(super) struct Produced<T> {
    pub entry: StageEntry,
    pub status: StageStatus,
    pub value: T,
}

/// The manifest and report of an [`embed`](super::embed) run, stage by stage.
pub(super) struct Stages<'a> {
    out_dir: &'a Path,
    previous: Option<Manifest>,
    manifest: Manifest,
    reports: Vec<StageReport>,
}

impl<'a> Stages<'a> {
    /// Starts the bookkeeping of a run that writes `manifest` (its stages
    /// empty) into `out_dir`. The manifest already there tells which stages
    /// are up to date, unless `force`; an unreadable one is ignored (logged).
    pub fn start(out_dir: &'a Path, force: bool, manifest: Manifest) -> Self {
        let previous = if force || !out_dir.join(MANIFEST_FILE).exists() {
            None
        } else {
            match Manifest::load(out_dir) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("ignoring the old manifest: {e:#}");
                    None
                }
            }
        };
        Stages {
            out_dir,
            previous,
            manifest,
            reports: Vec::new(),
        }
    }

    /// Stage `name` with the inputs `key`: when the previous run recorded the
    /// same key and its output file still has the recorded hash, the stage is
    /// up to date (its entry kept, nothing computed; `None`). Otherwise
    /// `compute(key)` runs and its entry is recorded (its value returned).
    pub fn run<T>(
        &mut self,
        name: &str,
        key: serde_json::Value,
        compute: impl FnOnce(serde_json::Value) -> Result<Produced<T>>,
    ) -> Result<Option<T>> {
        if self.reuse(name, &key).is_some() {
            return Ok(None);
        }
        let produced = compute(key)?;
        self.record(name, produced.entry, produced.status)?;
        Ok(Some(produced.value))
    }

    /// The previous entry of stage `name` when its inputs (`key`) and output
    /// file are unchanged; it is then recorded as up to date.
    fn reuse(&mut self, name: &str, key: &serde_json::Value) -> Option<StageEntry> {
        if !up_to_date(self.previous.as_ref(), self.out_dir, name, key) {
            return None;
        }
        let entry = self.previous.as_ref()?.stages.get(name)?.clone();
        let path = self.out_dir.join(&entry.file);
        tracing::info!("{name}: up to date ({})", path.display());
        self.reports.push(StageReport {
            name: name.into(),
            status: StageStatus::UpToDate,
            seconds: 0.0,
            shape: (entry.rows, entry.cols),
        });
        self.manifest.stages.insert(name.into(), entry.clone());
        Some(entry)
    }

    /// Records a stage just done and saves the manifest, keeping the previous
    /// entries of the stages not reached yet (an interrupted run resumes).
    fn record(&mut self, name: &str, entry: StageEntry, status: StageStatus) -> Result<()> {
        self.reports.push(StageReport {
            name: name.into(),
            status,
            seconds: entry.seconds,
            shape: (entry.rows, entry.cols),
        });
        self.manifest.stages.insert(name.into(), entry);
        let merged = merge_previous(&self.manifest, self.previous.as_ref());
        write_json_atomic(&self.out_dir.join(MANIFEST_FILE), &merged)
    }

    /// The entry of stage `name` in this run.
    pub fn entry(&self, name: &str) -> Option<&StageEntry> {
        self.manifest.stages.get(name)
    }

    /// The output hash of stage `name` in this run (a later stage's input).
    pub fn output_sha256(&self, name: &str) -> Option<String> {
        self.entry(name).map(|e| e.output_sha256.clone())
    }

    /// Saves the manifest of this run's stages only (entries of stages that no
    /// longer exist go) and returns it with the stage reports.
    pub fn finish(self) -> Result<(Manifest, Vec<StageReport>)> {
        write_json_atomic(&self.out_dir.join(MANIFEST_FILE), &self.manifest)?;
        Ok((self.manifest, self.reports))
    }
}

fn up_to_date(
    manifest: Option<&Manifest>,
    out_dir: &Path,
    name: &str,
    key: &serde_json::Value,
) -> bool {
    let Some(entry) = manifest.and_then(|m| m.stages.get(name)) else {
        return false;
    };
    if &entry.key != key {
        return false;
    }
    let path = out_dir.join(&entry.file);
    matches!(sha256_file(&path), Ok(h) if h == entry.output_sha256)
}

/// While a run is in progress, keeps the previous entries of stages not yet
/// reached, so that an interrupted run can resume where it stopped.
fn merge_previous(current: &Manifest, previous: Option<&Manifest>) -> Manifest {
    let mut m = current.clone();
    if let Some(p) = previous {
        for (k, v) in &p.stages {
            m.stages.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    m
}
