//! Experiment configuration: built-in defaults < YAML file < `--set` overrides.
//!
//! Every section rejects unknown keys, and a YAML error carries the line and
//! column, so a typo is caught before any work starts. `${VAR}` in path values
//! expands from the environment; `LLM_ESR_DATA` and `LLM_ESR_MODELS` default to
//! `../shared/datasets` and `../shared/models` when those exist, and
//! `LLM_ESR_CACHE` to `~/.cache/llm-esr-orch`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use llm_esr_prep::{EmbedConfig, LongTailConfig, PrepareConfig};

/// An error in the user's configuration or command line: exit code 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

pub fn config_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ConfigError(msg.into()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A config this one builds on (path relative to this file); only its
    /// keys that this file does not set are used.
    #[serde(skip_serializing)]
    pub base: Option<String>,
    /// Experiment name; the run directory is `<output_dir>/<name>`.
    pub name: String,
    pub output_dir: String,
    /// Fixes initialisation, data order, negatives and dropout.
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub plugins: PluginsConfig,
    pub distributed: DistributedConfig,
    /// Raw data -> prepared dataset (`llm-esr-orch prepare`).
    pub prepare: PrepareConfig,
    /// Prepared dataset -> semantic artifacts (`llm-esr-orch embed`).
    pub embed: EmbedConfig,
    /// Optional experiment tracking.
    pub tracking: TrackingConfig,
}

/// Where a run also reports its progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// TensorBoard log directory: each run writes an event file into
    /// `<dir>/<name>/` (training loss and validation metrics per epoch, test
    /// metrics, the resolved config as text). `${VAR}` is expanded.
    pub tensorboard: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base: None,
            name: "experiment".into(),
            output_dir: "runs".into(),
            seed: 42,
            data: DataConfig::default(),
            model: ModelConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
            plugins: PluginsConfig::default(),
            distributed: DistributedConfig::default(),
            prepare: PrepareConfig::default(),
            embed: EmbedConfig::default(),
            tracking: TrackingConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A prepared dataset directory: `inter.txt` (+ optional `item_text.tsv`).
    pub dir: String,
    /// Inputs keep their last `max_len` items.
    pub max_len: usize,
    /// Pad every batch to `max_len` instead of its longest sequence. Results are
    /// identical under the masked encoder; only the unmasked (faithful) encoder
    /// sees the difference.
    pub pad_to_max_len: bool,
    pub long_tail: LongTailConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: "${LLM_ESR_DATA}/beauty5_tiny".into(),
            max_len: 200,
            pad_to_max_len: false,
            long_tail: LongTailConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Collaborative view only, random initialisation.
    Plain,
    /// Collaborative view only, initialised from the PCA of the LLM embeddings.
    Llminit,
    /// The full dual-view model with self-distillation.
    Llmesr,
}

/// Where the distillation student `[u_co : u_se]` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudentPass {
    /// The last position of the ranking pass (one forward pass, shared masks).
    Shared,
    /// A second forward pass of the same input with fresh dropout masks, as
    /// the official `LLMESR_*.forward`.
    Second,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub variant: Variant,
    /// Backbone plugin name.
    pub backbone: String,
    /// Hidden size d.
    pub hidden: usize,
    pub dropout: f32,
    /// The backbone plugin's own settings (free-form; the plugin checks them).
    pub encoder: serde_yaml::Value,
    /// Fusion plugin name and settings (LLM-ESR only).
    pub fusion: String,
    pub fusion_config: serde_yaml::Value,
    /// Retrieval plugin name and settings (LLM-ESR only).
    pub retrieval: String,
    pub retrieval_config: serde_yaml::Value,
    /// Directory of the semantic artifacts (`llm-esr-orch embed`).
    pub artifacts: String,
    /// Weight of the self-distillation loss.
    pub alpha: f32,
    /// Source of the distillation student.
    pub student: StudentPass,
    /// Ablation switches (LLM-ESR only).
    pub co_view: bool,
    pub se_view: bool,
    pub distill: bool,
    pub share_encoder: bool,
    pub cross_attention: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            variant: Variant::Plain,
            backbone: "sasrec".into(),
            hidden: 64,
            dropout: 0.5,
            encoder: serde_yaml::Value::Mapping(Default::default()),
            fusion: "cross-attention".into(),
            fusion_config: serde_yaml::Value::Mapping(Default::default()),
            retrieval: "semantic-knn".into(),
            retrieval_config: serde_yaml::Value::Mapping(Default::default()),
            artifacts: String::new(),
            alpha: 0.1,
            student: StudentPass::Shared,
            co_view: true,
            se_view: true,
            distill: true,
            share_encoder: true,
            cross_attention: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Global batch size (split across ranks).
    pub batch_size: usize,
    pub lr: f64,
    pub adam_betas: [f64; 2],
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Stop after this many epochs without strict improvement of the
    /// validation metric; 0 disables early stopping.
    pub patience: usize,
    /// `cpu`, or `cuda` / `cuda:N` with the `cuda` build feature.
    pub device: String,
    /// Write a checkpoint every epoch (needed for `--resume`).
    pub checkpoint: bool,
    /// Stop after this many training steps in total (benchmarks); 0 = no limit.
    pub max_steps: usize,
    /// What a step whose loss or gradient is NaN or infinite does.
    pub nan_policy: NanPolicy,
}

/// What training does when a step's loss or gradient is not finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// Stop the run with an error naming the epoch and step; nothing of that
    /// epoch is saved and no `results.json` is written.
    Error,
    /// Skip the update (parameters and Adam state unchanged) and count the
    /// step; an epoch whose every step is skipped is an error.
    SkipStep,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 200,
            batch_size: 128,
            lr: 1e-3,
            adam_betas: [0.9, 0.999],
            adam_eps: 1e-8,
            weight_decay: 0.0,
            patience: 20,
            device: "cpu".into(),
            checkpoint: true,
            max_steps: 0,
            nan_policy: NanPolicy::Error,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// The target among `negatives` uniformly sampled items (official protocol).
    Sampled,
    /// The target among all items the user has not interacted with.
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub mode: EvalMode,
    pub negatives: usize,
    pub ks: Vec<usize>,
    /// Validation metric for early stopping and best-model selection.
    pub metric: String,
    /// Users per evaluation batch.
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            mode: EvalMode::Sampled,
            negatives: 100,
            ks: vec![5, 10, 20],
            metric: "NDCG@10".into(),
            batch_size: 256,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Extra directories searched for plugins (before LLM_ESR_PLUGIN_PATH and
    /// the binary's own directory).
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// `auto` (MPI under a launcher, single otherwise), `single`, `mpi`, `nccl`.
    pub backend: String,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            backend: "auto".into(),
        }
    }
}

impl Config {
    /// Defaults < base configs < `path` < `overrides` (`a.b=value`, value
    /// parsed as YAML). A config may name a `base:` config (relative to its own
    /// directory) whose values it overrides key by key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let tree = load_tree(path, 0)?;
        let mut cfg: Config = serde_yaml::from_value(tree)
            .map_err(|e| config_error(format!("config {}: {e}", path.display())))?;
        for ov in overrides {
            cfg = cfg.with_override(ov)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies one `a.b.c=value` override.
    pub fn with_override(&self, ov: &str) -> Result<Config> {
        let (key, value) = ov.split_once('=').ok_or_else(|| {
            config_error(format!(
                "--set {ov}: expected KEY=VALUE, e.g. train.epochs=5"
            ))
        })?;
        if value.len() as u64 > crate::limits::MAX_CONFIG_BYTES {
            return Err(config_error(format!(
                "--set {key}: the value is longer than {} KiB, the cap for configuration",
                crate::limits::MAX_CONFIG_BYTES / 1024
            )));
        }
        let value: serde_yaml::Value = crate::limits::parse_yaml(value)
            .map_err(|e| config_error(format!("--set {key}: value is not valid YAML: {e}")))?;
        let mut tree = serde_yaml::to_value(self)?;
        let mut node = &mut tree;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let map = node.as_mapping_mut().ok_or_else(|| {
                config_error(format!(
                    "--set {key}: `{}` is not a section",
                    parts[..i].join(".")
                ))
            })?;
            let k = serde_yaml::Value::String(part.to_string());
            if i + 1 == parts.len() {
                map.insert(k, value.clone());
                break;
            }
            if !map.contains_key(&k) {
                map.insert(k.clone(), serde_yaml::Value::Mapping(Default::default()));
            }
            node = map.get_mut(&k).expect("inserted above");
        }
        serde_yaml::from_value(tree).map_err(|e| config_error(format!("--set {key}: {e}")))
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(config_error(format!("config key `{key}`: {why}")));
        if let Some(why) = crate::run_dir::name_problem(&self.name) {
            return bad(
                "name",
                &format!(
                    "`{}` {why}; a run name is one directory name inside `output_dir`",
                    self.name.escape_debug()
                ),
            );
        }
        // The range of every numeric key (README), the built-in plugins'
        // sections, and relations between keys (see `limits`).
        crate::limits::check(self)?;
        if self.eval.ks.is_empty() {
            return bad("eval.ks", "must list positive cut-offs, e.g. [5, 10, 20]");
        }
        let metric_ok = self.eval.metric.split_once('@').is_some_and(|(m, k)| {
            (m == "NDCG" || m == "HR")
                && k.parse::<usize>().is_ok_and(|k| self.eval.ks.contains(&k))
        });
        if !metric_ok {
            return bad(
                "eval.metric",
                "must be HR@K or NDCG@K with K listed in eval.ks",
            );
        }
        if !["auto", "single", "mpi", "nccl"].contains(&self.distributed.backend.as_str()) {
            return bad(
                "distributed.backend",
                "must be one of auto, single, mpi, nccl",
            );
        }
        Ok(())
    }

    /// The run directory `<output_dir>/<name>`, with `${VAR}` expanded.
    pub fn run_dir(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(expand_env("output_dir", &self.output_dir)?).join(&self.name))
    }

    pub fn data_dir(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(expand_env("data.dir", &self.data.dir)?))
    }

    pub fn artifacts_dir(&self) -> Result<PathBuf> {
        if self.model.artifacts.is_empty() {
            return Err(config_error(
                "config key `model.artifacts` is empty: set it to the directory written by `llm-esr-orch embed`",
            ));
        }
        Ok(PathBuf::from(expand_env(
            "model.artifacts",
            &self.model.artifacts,
        )?))
    }

    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

/// Reads `path` as a YAML mapping, checks its keys (with line numbers), and
/// merges it over its `base:` chain.
fn load_tree(path: &Path, depth: usize) -> Result<serde_yaml::Value> {
    if depth > 8 {
        return Err(config_error(format!(
            "config {}: `base:` chain too deep (a cycle?)",
            path.display()
        )));
    }
    let text = crate::limits::read_capped(path, "config")?;
    let mut tree: serde_yaml::Value = crate::limits::parse_yaml(&text)
        .map_err(|e| config_error(format!("config {}: {e}", path.display())))?;
    if tree.is_null() {
        tree = serde_yaml::Value::Mapping(Default::default());
    }
    // Check this file's own keys first, while line numbers still mean something.
    serde_yaml::from_str::<Config>(&text)
        .map_err(|e| config_error(format!("config {}: {e}", path.display())))?;
    let base = tree.as_mapping_mut().and_then(|m| m.remove("base"));
    match base {
        None => Ok(tree),
        Some(serde_yaml::Value::String(b)) => {
            let base_path = path
                .parent()
                .unwrap_or(Path::new("."))
                .join(expand_env("base", &b)?);
            let mut merged = load_tree(&base_path, depth + 1)
                .map_err(|e| config_error(format!("{e:#} (the `base:` of {})", path.display())))?;
            merge(&mut merged, tree);
            Ok(merged)
        }
        Some(_) => Err(config_error(format!(
            "config {}: `base` must be a path",
            path.display()
        ))),
    }
}

/// Deep merge of mappings: `over` wins; other values are replaced whole.
fn merge(into: &mut serde_yaml::Value, over: serde_yaml::Value) {
    match (into, over) {
        (serde_yaml::Value::Mapping(a), serde_yaml::Value::Mapping(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Default for a variable when unset: a directory beside the project, if present.
fn env_default(var: &str) -> Option<String> {
    if var == "LLM_ESR_CACHE" {
        let home = std::env::var("HOME").ok().filter(|h| !h.is_empty())?;
        return Some(format!("{home}/.cache/llm-esr-orch"));
    }
    let sub = match var {
        "LLM_ESR_DATA" => "datasets",
        "LLM_ESR_MODELS" => "models",
        _ => return None,
    };
    let candidates = [
        PathBuf::from("../shared").join(sub),
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared")
            .join(sub),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_dir())
        .map(|p| p.canonicalize().unwrap_or(p).display().to_string())
}

/// Expands `${VAR}` in the value of config key `key`.
pub fn expand_env(key: &str, value: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or_else(|| {
            config_error(format!("config key `{key}`: unclosed `${{` in `{value}`"))
        })?;
        let var = &rest[start + 2..start + end];
        let val = std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| env_default(var));
        match val {
            Some(v) => out.push_str(&v),
            None => {
                return Err(config_error(format!(
                    "config key `{key}` uses ${{{var}}}, which is not set: export {var}=<directory>"
                )))
            }
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The YAML of a free-form plugin section as JSON for the plugin.
pub fn plugin_section(value: &serde_yaml::Value) -> Result<serde_json::Value> {
    serde_json::to_value(value)
        .context("plugin configuration section is not representable as JSON (keys must be strings)")
}

/// Whether `e` is an error of the configuration (ours, or one found by the
/// data pipeline, `llm_esr_prep::InvalidConfig`): exit status 2.
pub fn is_config_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<ConfigError>().is_some())
        || llm_esr_prep::is_invalid_config(e)
}

pub fn ensure(cond: bool, msg: impl Into<String>) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(anyhow!(msg.into()))
    }
}

impl Config {
    /// Checks the keys whose valid range depends on the dataset (and on the
    /// artifact manifest, for the variants that read artifacts). Called where
    /// `train`, `bench` and `sweep` load the dataset, before any run directory
    /// is written; errors name the key, the value, the range and the dataset.
    pub fn validate_for(&self, ds: &crate::data::Dataset) -> Result<()> {
        let dir = ds.dir.display();
        let eval_users = ds.eval_users();
        if eval_users.is_empty() {
            return Err(config_error(format!(
                "config key `data.dir`: no user of {dir} has the 3 interactions that \
                 leave-one-out evaluation needs (training items, a validation and a test \
                 target): nothing could be evaluated"
            )));
        }
        let longest = eval_users
            .iter()
            .map(|&u| ds.history(u).len())
            .max()
            .unwrap_or(0);
        let unseen = ds.num_items.saturating_sub(longest);
        match self.eval.mode {
            EvalMode::Sampled => {
                if self.eval.negatives > unseen {
                    return Err(config_error(format!(
                        "config key `eval.negatives`: {} is outside [1, {unseen}] for the dataset \
                         {dir}: it has {} items and a user has interacted with {longest} of them, \
                         leaving {unseen} to draw negatives from; lower `eval.negatives` (or use \
                         `eval.mode: full`)",
                        self.eval.negatives, ds.num_items
                    )));
                }
            }
            EvalMode::Full => {
                let candidates = unseen + 1;
                if let Some(k) = self.eval.ks.iter().find(|&&k| k > candidates) {
                    return Err(config_error(format!(
                        "config key `eval.ks`: {k} is outside [1, {candidates}] for the dataset \
                         {dir}: with `eval.mode: full` a user with {longest} of its {} items ranks \
                         the target among {candidates} candidates",
                        ds.num_items
                    )));
                }
            }
        }
        let m = &self.model;
        if m.variant == Variant::Plain {
            return Ok(());
        }
        // The artifacts were made by `embed`, perhaps with another config:
        // compare with what they hold. A missing or unreadable manifest is
        // reported when the artifacts are loaded.
        let Ok(art) = self.artifacts_dir() else {
            return Ok(());
        };
        let Ok(manifest) = llm_esr_prep::Manifest::load(&art) else {
            return Ok(());
        };
        let uses_pca = m.variant == Variant::Llminit || m.co_view;
        if let Some(pca) = manifest.stages.get("pca").filter(|_| uses_pca) {
            if pca.cols != m.hidden {
                return Err(config_error(format!(
                    "config key `model.hidden`: {} differs from the width {} of the PCA artifact \
                     in {} (made with `embed.pca_dim: {}`); set `model.hidden: {}` or rerun \
                     `llm-esr-orch embed` with `embed.pca_dim: {}`",
                    m.hidden,
                    pca.cols,
                    art.display(),
                    pca.cols,
                    pca.cols,
                    m.hidden
                )));
            }
        }
        let distill = m.variant == Variant::Llmesr && m.distill;
        if let Some(nb) = manifest.stages.get("neighbours").filter(|_| distill) {
            if m.retrieval == "semantic-knn" {
                let n = m
                    .retrieval_config
                    .get("n")
                    .and_then(serde_yaml::Value::as_u64)
                    .unwrap_or(10);
                if n as usize > nb.cols {
                    return Err(config_error(format!(
                        "config key `model.retrieval_config.n`: {n} is outside [1, {}]: the \
                         artifacts in {} store {} similar users per user (`embed.neighbours`); \
                         lower n or rerun `llm-esr-orch embed` with `embed.neighbours: {n}`",
                        nb.cols,
                        art.display(),
                        nb.cols
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{PLUGIN_RANGES, RANGES};

    fn apply(sets: &[&str]) -> Result<Config> {
        let mut cfg = Config::default();
        for s in sets {
            cfg = cfg.with_override(s)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Each row: overrides -> a fragment of the error (empty: accepted).
    #[test]
    fn every_range_is_checked_with_key_value_and_range() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["train.adam_betas=[1.5,2]"],
                "config key `train.adam_betas`: 1.5 is outside [0, 1)",
            ),
            (
                &["train.adam_betas=[0.9,.nan]"],
                "`train.adam_betas`: NaN is outside [0, 1); NaN and infinite values are never",
            ),
            (
                &["train.adam_betas=[0.9,1]"],
                "`train.adam_betas`: 1 is outside [0, 1)",
            ),
            (&["train.lr=.inf"], "`train.lr`: inf is outside (0, inf)"),
            (&["train.lr=0"], "`train.lr`: 0 is outside (0, inf)"),
            (&["train.lr=-1e-3"], "`train.lr`: -0.001 is outside"),
            (&["train.lr=.nan"], "`train.lr`: NaN"),
            (&["train.lr=1000000"], ""),
            (&["train.lr=1e300"], ""),
            (
                &["train.adam_eps=0"],
                "`train.adam_eps`: 0 is outside [1e-38, inf)",
            ),
            (
                &["train.weight_decay=-0.1"],
                "`train.weight_decay`: -0.1 is outside [0, inf)",
            ),
            (&["train.weight_decay=.inf"], "`train.weight_decay`: inf"),
            (
                &["train.batch_size=0"],
                "`train.batch_size`: 0 is outside [1, 65536]",
            ),
            (
                &["train.batch_size=1000000"],
                "`train.batch_size`: 1000000 is outside",
            ),
            (
                &["data.max_len=0"],
                "`data.max_len`: 0 is outside [1, 4096]",
            ),
            (
                &["data.max_len=100000000"],
                "`data.max_len`: 100000000 is outside [1, 4096]",
            ),
            (
                &["model.hidden=0"],
                "`model.hidden`: 0 is outside [1, 4096]",
            ),
            (
                &["model.hidden=1000000"],
                "`model.hidden`: 1000000 is outside [1, 4096]",
            ),
            (&["model.dropout=1"], "`model.dropout`: 1 is outside [0, 1)"),
            (&["model.dropout=.nan"], "`model.dropout`: NaN"),
            (
                &["model.alpha=-0.5"],
                "`model.alpha`: -0.5 is outside [0, inf)",
            ),
            (&["model.alpha=1e40"], "`model.alpha`: inf"),
            (
                &["eval.negatives=0"],
                "`eval.negatives`: 0 is outside [1, 1000000]",
            ),
            (
                &["eval.negatives=2000000"],
                "`eval.negatives`: 2000000 is outside",
            ),
            (&["eval.mode=full", "eval.negatives=0"], ""),
            (
                &["eval.ks=[0,10]", "eval.metric=NDCG@10"],
                "`eval.ks`: 0 is outside",
            ),
            (&["eval.ks=[5,200]"], "`eval.ks`: 200 is outside [1, 101]"),
            (
                &["eval.batch_size=0"],
                "`eval.batch_size`: 0 is outside [1, 65536]",
            ),
            (
                &["data.long_tail.pareto=0"],
                "`data.long_tail.pareto`: 0 is outside (0, 1]",
            ),
            (
                &["data.long_tail.pareto=1.5"],
                "`data.long_tail.pareto`: 1.5 is outside",
            ),
            (
                &["data.long_tail.pareto=null"],
                "`data.long_tail.pareto`: is null",
            ),
            (
                &[
                    "data.long_tail.pareto=null",
                    "data.long_tail.ts_user=4",
                    "data.long_tail.ts_item=9",
                ],
                "",
            ),
            (
                &["prepare.long_tail.pareto=.nan"],
                "`prepare.long_tail.pareto`: NaN",
            ),
            (
                &["prepare.long_tail.test_users_by=test_input"],
                "`prepare.long_tail.test_users_by`",
            ),
            (
                &["embed.batch_size=0"],
                "`embed.batch_size`: 0 is outside [1, 65536]",
            ),
            (
                &["embed.max_batch_tokens=0"],
                "`embed.max_batch_tokens`: 0 is outside",
            ),
            (
                &["embed.max_tokens=2"],
                "`embed.max_tokens`: 2 is outside [3, 8192]",
            ),
            (
                &["embed.pca_dim=5000"],
                "`embed.pca_dim`: 5000 is outside [1, 4096]",
            ),
            (
                &["embed.neighbours=0"],
                "`embed.neighbours`: 0 is outside [1, 10000]",
            ),
            (
                &["embed.knn_block=0"],
                "`embed.knn_block`: 0 is outside [1, 65536]",
            ),
            (
                &["embed.device=tpu"],
                "`embed.device`: unknown device `tpu`",
            ),
            (&["embed.item_template='{title'"], "`embed.item_template`"),
            (
                &["train.device=gpu"],
                "`train.device`: unknown device `gpu`",
            ),
            (&["train.device=cuda:1"], ""),
            (&["prepare.delimiter=é"], "`prepare.delimiter`"),
            (
                &["model.encoder={layers: 1000}"],
                "`model.encoder.layers`: 1000 is outside [0, 64]",
            ),
            (
                &["model.encoder={heads: 3}"],
                "`model.encoder.heads`: 3 heads do not divide",
            ),
            (
                &["model.encoder={heads: 0}"],
                "`model.encoder.heads`: 0 is outside [1, 4096]",
            ),
            (
                &["model.encoder={layer_norm_eps: .nan}"],
                "`model.encoder.layer_norm_eps`: NaN",
            ),
            (
                &["model.backbone=bert4rec", "model.encoder={mask_prob: 0}"],
                "`model.encoder.mask_prob`: 0 is outside (0, 1]",
            ),
            (
                &["model.backbone=gru4rec", "model.encoder={layers: 0}"],
                "`model.encoder.layers`: 0 is outside [1, 64]",
            ),
            (
                &["model.backbone=myplugin", "model.encoder={x: .inf}"],
                "`model.encoder.x`: inf",
            ),
            (&["model.backbone=myplugin", "model.encoder={x: 1e9}"], ""),
            (&["model.encoder=5"], "`model.encoder`: must be a mapping"),
            (
                &["model.variant=llmesr", "model.fusion_config={heads: 3}"],
                "`model.fusion_config.heads`: 3 heads do not divide",
            ),
            // An unused section is not range-checked.
            (&["model.fusion_config={heads: 3}"], ""),
            (
                &["model.variant=llmesr", "model.retrieval_config={n: 0}"],
                "`model.retrieval_config.n`: 0 is outside [1, 10000]",
            ),
            (
                &["model.variant=llminit", "model.hidden=32"],
                "`model.hidden`: 32 differs from `embed.pca_dim` = 64",
            ),
            (
                &[
                    "model.variant=llminit",
                    "model.hidden=32",
                    "embed.pca_dim=32",
                ],
                "",
            ),
            (
                &[
                    "model.variant=llmesr",
                    "model.co_view=false",
                    "model.se_view=false",
                ],
                "both false",
            ),
            (&["distributed.backend=gloo"], "`distributed.backend`"),
        ];
        for (sets, want) in cases {
            match (apply(sets), want.is_empty()) {
                (Ok(_), true) => {}
                (Ok(_), false) => panic!("{sets:?} was accepted, expected `{want}`"),
                (Err(e), true) => panic!("{sets:?} was refused: {e:#}"),
                (Err(e), false) => {
                    let msg = format!("{e:#}");
                    assert!(msg.contains(want), "{sets:?}: `{msg}` lacks `{want}`");
                    assert!(is_config_error(&e), "{sets:?}: not a config error: {msg}");
                }
            }
        }
    }

    fn numeric_leaves(v: &serde_yaml::Value, path: &str, out: &mut Vec<String>) {
        match v {
            serde_yaml::Value::Number(_) => out.push(path.to_string()),
            serde_yaml::Value::Sequence(s) if s.iter().all(|x| x.is_number()) && !s.is_empty() => {
                out.push(path.to_string())
            }
            serde_yaml::Value::Mapping(m) => {
                for (k, x) in m {
                    let k = k.as_str().unwrap_or_default();
                    let p = if path.is_empty() {
                        k.to_string()
                    } else {
                        format!("{path}.{k}")
                    };
                    numeric_leaves(x, &p, out);
                }
            }
            _ => {}
        }
    }

    /// Every numeric key of the configuration has a range in `RANGES`, and
    /// the README's tables state the same range for it.
    #[test]
    fn every_numeric_key_has_a_documented_range() {
        let mut cfg = Config::default();
        // Optional numeric keys, null by default.
        cfg.data.long_tail.ts_user = Some(1);
        cfg.data.long_tail.ts_item = Some(1);
        cfg.prepare.long_tail.ts_user = Some(1);
        cfg.prepare.long_tail.ts_item = Some(1);
        cfg.embed.max_tokens = Some(256);
        let mut keys = Vec::new();
        numeric_leaves(&serde_yaml::to_value(&cfg).unwrap(), "", &mut keys);
        assert!(keys.len() > 20, "{keys:?}");
        for k in &keys {
            assert!(
                RANGES.iter().any(|r| r.key == k),
                "numeric key `{k}` has no range in limits::RANGES"
            );
        }
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        for r in RANGES {
            let row = format!("| `{}` |", r.key);
            let line = readme
                .lines()
                .find(|l| l.starts_with(&row))
                .unwrap_or_else(|| panic!("README has no row for `{}`", r.key));
            assert!(
                line.contains(&r.range.to_string()),
                "README row of `{}` does not state {}: {line}",
                r.key,
                r.range
            );
        }
        for r in PLUGIN_RANGES {
            let name = format!("`{}.{}` ({}", r.section, r.key, r.plugins[0]);
            let line = readme
                .lines()
                .find(|l| l.contains(&name))
                .unwrap_or_else(|| panic!("README has no row for {name}"));
            assert!(line.contains(&r.range.to_string()), "{name}: {line}");
        }
    }

    #[test]
    fn oversized_configs_and_alias_bombs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.yaml");
        let mut text = String::from("name: big\n");
        while text.len() <= crate::limits::MAX_CONFIG_BYTES as usize {
            text.push_str("# padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&big, &text).unwrap();
        let e = Config::load(&big, &[]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            is_config_error(&e) && msg.contains("larger than 1024 KiB"),
            "{msg}"
        );
        assert!(msg.contains("big.yaml"), "{msg}");

        let bomb = dir.path().join("bomb.yaml");
        let mut text = String::from("name: bomb\nmodel:\n  encoder:\n    a: &a [");
        text.push_str(&"1, ".repeat(2000));
        text.push_str("1]\n    b: [");
        text.push_str(&"*a, ".repeat(2000));
        text.push_str("*a]\n");
        std::fs::write(&bomb, &text).unwrap();
        let t = std::time::Instant::now();
        let e = Config::load(&bomb, &[]).unwrap_err();
        assert!(is_config_error(&e), "{e:#}");
        assert!(
            format!("{e:#}").contains("more than 100000 values"),
            "{e:#}"
        );
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }
}
