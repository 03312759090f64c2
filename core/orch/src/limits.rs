//! Valid ranges of the configuration, and limits that keep a bad input from
//! exhausting memory or time.
//!
//! Every numeric key has a range ([`RANGES`], and [`PLUGIN_RANGES`] for the
//! sections of the built-in plugins), checked when a config is loaded; the
//! README lists the same ranges (a unit test compares them). Ranges are
//! generous but bounded where a value sizes memory (hidden size, sequence
//! length, batch sizes); NaN and infinities are never accepted. Config and
//! sweep files are capped at [`MAX_CONFIG_BYTES`] before parsing, and YAML
//! aliases may not expand a document beyond [`MAX_YAML_VALUES`] values.

use std::cell::Cell;
use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::Result;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use crate::config::{config_error, Config, EvalMode, Variant};

/// Largest config or sweep file read (1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Most values (scalars, lists, mappings) a YAML document may expand to.
pub const MAX_YAML_VALUES: usize = 100_000;
/// Largest `data.max_len`.
pub const MAX_LEN: f64 = 4096.0;
/// Largest `model.hidden` (= largest `embed.pca_dim`).
pub const MAX_HIDDEN: f64 = llm_esr_prep::artifacts::MAX_PCA_DIM as f64;
/// Largest `train.batch_size` and `eval.batch_size`.
pub const MAX_BATCH: f64 = 65_536.0;
/// Largest `eval.negatives`.
pub const MAX_NEGATIVES: f64 = 1_000_000.0;
/// Most cut-offs in `eval.ks`.
pub const MAX_KS: usize = 64;
/// Most layers of a built-in backbone.
pub const MAX_LAYERS: f64 = 64.0;
/// Most runs of one sweep.
pub const MAX_SWEEP_RUNS: usize = 10_000;

/// An interval of valid values; values must also be finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    lo: f64,
    lo_open: bool,
    hi: f64,
    hi_open: bool,
}

impl Range {
    /// `[lo, hi]`.
    pub const fn closed(lo: f64, hi: f64) -> Range {
        Range {
            lo,
            lo_open: false,
            hi,
            hi_open: false,
        }
    }

    /// `[lo, hi)`.
    pub const fn below(lo: f64, hi: f64) -> Range {
        Range {
            lo,
            lo_open: false,
            hi,
            hi_open: true,
        }
    }

    /// `(lo, hi]`.
    pub const fn above_to(lo: f64, hi: f64) -> Range {
        Range {
            lo,
            lo_open: true,
            hi,
            hi_open: false,
        }
    }

    /// `[lo, inf)`: any finite value from `lo` on.
    pub const fn at_least(lo: f64) -> Range {
        Range::below(lo, f64::INFINITY)
    }

    /// `(lo, inf)`: any finite value above `lo`.
    pub const fn positive_from(lo: f64) -> Range {
        Range {
            lo,
            lo_open: true,
            hi: f64::INFINITY,
            hi_open: true,
        }
    }

    /// Whether `v` is finite and inside.
    pub fn contains(&self, v: f64) -> bool {
        let lo_ok = if self.lo_open {
            v > self.lo
        } else {
            v >= self.lo
        };
        let hi_ok = if self.hi_open {
            v < self.hi
        } else {
            v <= self.hi
        };
        v.is_finite() && lo_ok && hi_ok
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}, {}{}",
            if self.lo_open { "(" } else { "[" },
            show(self.lo),
            show(self.hi),
            if self.hi_open { ")" } else { "]" }
        )
    }
}

/// A number for people: integers without a fraction, small or huge values in
/// exponent form, values that came from an `f32` without the widening digits.
pub fn show(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    if v != 0.0 && (v.abs() < 1e-4 || v.abs() >= 1e15) {
        return format!("{v:e}");
    }
    let narrow = v as f32;
    if narrow as f64 == v {
        return format!("{narrow}");
    }
    format!("{v}")
}

/// A numeric key of the configuration and its valid range.
#[derive(Debug, Clone, Copy)]
pub struct KeyRange {
    /// Dotted key; list values are checked element by element, null skipped.
    pub key: &'static str,
    pub range: Range,
    /// Said after the range in errors (a tighter bound checked elsewhere).
    pub note: &'static str,
}

const fn key(key: &'static str, range: Range) -> KeyRange {
    KeyRange {
        key,
        range,
        note: "",
    }
}

/// Every numeric key of [`Config`] (and of the `prepare` and `embed` sections)
/// with its range. A unit test checks that no numeric key is missing.
pub const RANGES: &[KeyRange] = &[
    key("seed", Range::at_least(0.0)),
    key("data.max_len", Range::closed(1.0, MAX_LEN)),
    key("data.long_tail.pareto", Range::above_to(0.0, 1.0)),
    key("data.long_tail.ts_user", Range::at_least(0.0)),
    key("data.long_tail.ts_item", Range::at_least(0.0)),
    key("model.hidden", Range::closed(1.0, MAX_HIDDEN)),
    key("model.dropout", Range::below(0.0, 1.0)),
    key("model.alpha", Range::at_least(0.0)),
    key("train.epochs", Range::at_least(1.0)),
    key("train.batch_size", Range::closed(1.0, MAX_BATCH)),
    key("train.lr", Range::positive_from(0.0)),
    key("train.adam_betas", Range::below(0.0, 1.0)),
    // Adam runs in f32: a smaller epsilon would round to 0 and divide 0 by 0.
    key("train.adam_eps", Range::at_least(1e-38)),
    key("train.weight_decay", Range::at_least(0.0)),
    key("train.patience", Range::at_least(0.0)),
    key("train.max_steps", Range::at_least(0.0)),
    KeyRange {
        key: "eval.negatives",
        range: Range::closed(1.0, MAX_NEGATIVES),
        note: " (with `eval.mode: sampled`; at most the items a user has not seen)",
    },
    KeyRange {
        key: "eval.ks",
        range: Range::closed(1.0, MAX_NEGATIVES + 1.0),
        note: " (and at most the number of candidates)",
    },
    key("eval.batch_size", Range::closed(1.0, MAX_BATCH)),
    key("prepare.user_min", Range::at_least(0.0)),
    key("prepare.item_min", Range::at_least(0.0)),
    key("prepare.min_seq_len", Range::at_least(0.0)),
    key("prepare.long_tail.pareto", Range::above_to(0.0, 1.0)),
    key("prepare.long_tail.ts_user", Range::at_least(0.0)),
    key("prepare.long_tail.ts_item", Range::at_least(0.0)),
    key(
        "embed.batch_size",
        Range::closed(1.0, llm_esr_prep::artifacts::MAX_EMBED_BATCH as f64),
    ),
    key(
        "embed.max_batch_tokens",
        Range::closed(1.0, llm_esr_prep::artifacts::MAX_BATCH_TOKENS as f64),
    ),
    key(
        "embed.max_tokens",
        Range::closed(
            llm_esr_prep::artifacts::MIN_MAX_TOKENS as f64,
            llm_esr_prep::artifacts::MAX_MAX_TOKENS as f64,
        ),
    ),
    key("embed.pca_dim", Range::closed(1.0, MAX_HIDDEN)),
    KeyRange {
        key: "embed.neighbours",
        range: Range::closed(1.0, llm_esr_prep::artifacts::MAX_NEIGHBOURS as f64),
        note: " (and fewer than the users of the dataset)",
    },
    key(
        "embed.knn_block",
        Range::closed(1.0, llm_esr_prep::artifacts::MAX_KNN_BLOCK as f64),
    ),
];

/// A numeric key of a built-in plugin's section.
#[derive(Debug, Clone, Copy)]
pub struct PluginKeyRange {
    /// `model.encoder`, `model.fusion_config` or `model.retrieval_config`.
    pub section: &'static str,
    /// The plugins (by name) whose section has this key.
    pub plugins: &'static [&'static str],
    pub key: &'static str,
    pub range: Range,
}

/// The numeric keys of the built-in plugins' sections. Sections of other
/// plugins are checked by those plugins (and must hold finite numbers).
pub const PLUGIN_RANGES: &[PluginKeyRange] = &[
    PluginKeyRange {
        section: "model.encoder",
        plugins: &["sasrec", "bert4rec"],
        key: "layers",
        range: Range::closed(0.0, MAX_LAYERS),
    },
    PluginKeyRange {
        section: "model.encoder",
        plugins: &["gru4rec"],
        key: "layers",
        range: Range::closed(1.0, MAX_LAYERS),
    },
    PluginKeyRange {
        section: "model.encoder",
        plugins: &["sasrec", "bert4rec"],
        key: "heads",
        range: Range::closed(1.0, MAX_HIDDEN),
    },
    PluginKeyRange {
        section: "model.encoder",
        plugins: &["sasrec", "bert4rec", "meanrec"],
        key: "layer_norm_eps",
        range: Range::above_to(0.0, 1.0),
    },
    PluginKeyRange {
        section: "model.encoder",
        plugins: &["bert4rec"],
        key: "mask_prob",
        range: Range::above_to(0.0, 1.0),
    },
    PluginKeyRange {
        section: "model.fusion_config",
        plugins: &["cross-attention"],
        key: "heads",
        range: Range::closed(1.0, MAX_HIDDEN),
    },
    PluginKeyRange {
        section: "model.retrieval_config",
        plugins: &["semantic-knn"],
        key: "n",
        range: Range::closed(1.0, llm_esr_prep::artifacts::MAX_NEIGHBOURS as f64),
    },
];

/// Heads that must divide `model.hidden`: (section, plugins, default heads).
const HEADS_DIVIDE_HIDDEN: &[(&str, &[&str], u64)] = &[
    ("model.encoder", &["sasrec", "bert4rec"], 1),
    ("model.fusion_config", &["cross-attention"], 2),
];

fn out_of_range(key: &str, shown: &str, range: Range, note: &str, finite: bool) -> anyhow::Error {
    let never = if finite {
        ""
    } else {
        "; NaN and infinite values are never accepted"
    };
    config_error(format!(
        "config key `{key}`: {shown} is outside {range}{note}{never}"
    ))
}

fn number(v: &Value) -> Option<(f64, String)> {
    let Value::Number(n) = v else { return None };
    if let Some(u) = n.as_u64() {
        return Some((u as f64, u.to_string()));
    }
    if let Some(i) = n.as_i64() {
        return Some((i as f64, i.to_string()));
    }
    let f = n.as_f64()?;
    Some((f, show(f)))
}

fn lookup<'a>(tree: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(tree, |node, part| node.get(part))
}

/// Checks every key of [`RANGES`], the built-in plugin sections and the
/// relations between keys that need no dataset.
pub fn check(cfg: &Config) -> Result<()> {
    check_ranges(cfg)?;
    check_plugin_sections(cfg)?;
    check_relations(cfg)
}

fn check_ranges(cfg: &Config) -> Result<()> {
    let tree = serde_yaml::to_value(cfg)?;
    for kr in RANGES {
        if kr.key == "eval.negatives" && cfg.eval.mode == EvalMode::Full {
            continue; // not used
        }
        let Some(node) = lookup(&tree, kr.key) else {
            continue;
        };
        let values: Vec<&Value> = match node {
            Value::Sequence(s) => s.iter().collect(),
            v => vec![v],
        };
        for v in values {
            if let Some((f, shown)) = number(v) {
                if !kr.range.contains(f) {
                    return Err(out_of_range(
                        kr.key,
                        &shown,
                        kr.range,
                        kr.note,
                        f.is_finite(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The plugin sections with the plugin each goes to and whether it is used.
fn plugin_sections(cfg: &Config) -> [(&'static str, &Value, &str, bool); 3] {
    let m = &cfg.model;
    let llmesr = m.variant == Variant::Llmesr;
    [
        ("model.encoder", &m.encoder, m.backbone.as_str(), true),
        (
            "model.fusion_config",
            &m.fusion_config,
            m.fusion.as_str(),
            llmesr && m.co_view && m.se_view,
        ),
        (
            "model.retrieval_config",
            &m.retrieval_config,
            m.retrieval.as_str(),
            llmesr && m.distill,
        ),
    ]
}

/// Every number in `v` is finite (`path` names `v` in errors).
fn finite_numbers(path: &str, v: &Value) -> Result<()> {
    match v {
        Value::Number(_) => {
            let (f, shown) = number(v).unwrap_or((f64::NAN, "NaN".into()));
            if !f.is_finite() {
                return Err(config_error(format!(
                    "config key `{path}`: {shown} is not accepted (values must be finite numbers)"
                )));
            }
        }
        Value::Sequence(s) => {
            for (i, x) in s.iter().enumerate() {
                finite_numbers(&format!("{path}[{i}]"), x)?;
            }
        }
        Value::Mapping(m) => {
            for (k, x) in m {
                let name = k.as_str().map(str::to_string).unwrap_or_else(|| {
                    serde_yaml::to_string(k)
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                });
                finite_numbers(&format!("{path}.{name}"), x)?;
            }
        }
        Value::Tagged(t) => finite_numbers(path, &t.value)?,
        _ => {}
    }
    Ok(())
}

fn check_plugin_sections(cfg: &Config) -> Result<()> {
    for (section, value, plugin, used) in plugin_sections(cfg) {
        if !matches!(value, Value::Mapping(_) | Value::Null) {
            return Err(config_error(format!(
                "config key `{section}`: must be a mapping of the `{plugin}` plugin's settings \
                 (or null), e.g. `{section}: {{}}`"
            )));
        }
        if !used {
            continue;
        }
        finite_numbers(section, value)?;
        crate::config::plugin_section(value)
            .map_err(|e| config_error(format!("config key `{section}`: {e:#}")))?;
        for r in PLUGIN_RANGES
            .iter()
            .filter(|r| r.section == section && r.plugins.contains(&plugin))
        {
            let Some(v) = value.get(r.key) else { continue };
            if let Some((f, shown)) = number(v) {
                if !r.range.contains(f) {
                    let key = format!("{section}.{}", r.key);
                    let note = format!(" (plugin `{plugin}`)");
                    return Err(out_of_range(&key, &shown, r.range, &note, f.is_finite()));
                }
            }
        }
        for (s, plugins, default) in HEADS_DIVIDE_HIDDEN {
            if *s != section || !plugins.contains(&plugin) {
                continue;
            }
            let heads = match value.get("heads") {
                None => *default,
                Some(v) => match v.as_u64() {
                    Some(h) => h,
                    None => continue, // the plugin reports the type
                },
            };
            let hidden = cfg.model.hidden as u64;
            if heads >= 1 && !hidden.is_multiple_of(heads) {
                return Err(config_error(format!(
                    "config key `{section}.heads`: {heads} heads do not divide `model.hidden` = \
                     {hidden} (plugin `{plugin}`); choose heads that divide it"
                )));
            }
        }
    }
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`.
fn device_ok(s: &str) -> bool {
    match s.strip_prefix("cuda:") {
        Some(n) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.len() <= 4,
        None => s == "cpu" || s == "cuda",
    }
}

fn check_relations(cfg: &Config) -> Result<()> {
    let bad = |key: &str, why: String| Err(config_error(format!("config key `{key}`: {why}")));
    if cfg.eval.ks.len() > MAX_KS {
        return bad(
            "eval.ks",
            format!(
                "{} cut-offs, at most {MAX_KS} are accepted",
                cfg.eval.ks.len()
            ),
        );
    }
    if cfg.eval.mode == EvalMode::Sampled {
        let candidates = cfg.eval.negatives + 1;
        if let Some(k) = cfg.eval.ks.iter().find(|&&k| k > candidates) {
            return bad(
                "eval.ks",
                format!(
                    "{k} is outside [1, {candidates}]: sampled evaluation ranks the target among \
                     `eval.negatives` + 1 = {candidates} candidates"
                ),
            );
        }
    }
    for (key, lt) in [
        ("data.long_tail", &cfg.data.long_tail),
        ("prepare.long_tail", &cfg.prepare.long_tail),
    ] {
        if lt.pareto.is_none() {
            for (side, fixed) in [("ts_user", lt.ts_user), ("ts_item", lt.ts_item)] {
                if fixed.is_none() {
                    return bad(
                        &format!("{key}.pareto"),
                        format!(
                            "is null, so `{key}.{side}` must be set (or set `pareto`, e.g. 0.2)"
                        ),
                    );
                }
            }
        }
    }
    if cfg.prepare.long_tail.test_users_by != llm_esr_prep::TestUserLength::TrainLength {
        return bad(
            "prepare.long_tail.test_users_by",
            "has no effect on `prepare` (dataset.json records training-length thresholds); set \
             `data.long_tail.test_users_by` for the test report of `train`"
                .into(),
        );
    }
    for (key, c) in [
        ("prepare.delimiter", cfg.prepare.delimiter),
        (
            "prepare.item_text_delimiter",
            cfg.prepare.item_text_delimiter,
        ),
    ] {
        if let Some(c) = c {
            if !c.is_ascii() || matches!(c, '"' | '\n' | '\r') {
                return bad(
                    key,
                    format!(
                        "{c:?} cannot separate fields: use one ASCII character other than a \
                         quote or a line break, e.g. \",\" or \"\\t\""
                    ),
                );
            }
        }
    }
    for (key, dev) in [
        ("train.device", cfg.train.device.as_str()),
        ("embed.device", cfg.embed.device.as_str()),
    ] {
        if !device_ok(dev) {
            return bad(
                key,
                format!("unknown device `{dev}` (use cpu, cuda or cuda:N)"),
            );
        }
    }
    for (key, template) in [
        ("embed.item_template", &cfg.embed.item_template),
        ("embed.user_template", &cfg.embed.user_template),
    ] {
        llm_esr_prep::prompts::Template::parse(template, key)
            .map_err(|e| config_error(format!("config key `{key}`: {e:#}")))?;
    }
    let m = &cfg.model;
    if m.variant == Variant::Llmesr && !m.co_view && !m.se_view {
        return bad(
            "model.co_view",
            "and `model.se_view` are both false: keep at least one view".into(),
        );
    }
    let uses_pca = m.variant == Variant::Llminit || (m.variant == Variant::Llmesr && m.co_view);
    if uses_pca && m.hidden != cfg.embed.pca_dim {
        return bad(
            "model.hidden",
            format!(
                "{} differs from `embed.pca_dim` = {}: variant `{}` starts the item table from \
                 the PCA of the semantic embeddings, so the two must be equal",
                m.hidden,
                cfg.embed.pca_dim,
                serde_yaml::to_string(&m.variant).unwrap_or_default().trim()
            ),
        );
    }
    Ok(())
}

/// Reads a config or sweep file of at most [`MAX_CONFIG_BYTES`].
pub fn read_capped(path: &Path, what: &str) -> Result<String> {
    let cannot =
        |e: std::io::Error| config_error(format!("cannot read {what} {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let too_big = || {
        config_error(format!(
            "{what} {} is larger than {} KiB, the cap for configuration files; is it the right \
             file?",
            path.display(),
            MAX_CONFIG_BYTES / 1024
        ))
    };
    if file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() > MAX_CONFIG_BYTES)
    {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes)
        .map_err(|_| config_error(format!("{what} {} is not UTF-8 text", path.display())))
}

/// Parses one YAML document into a value, refusing documents whose aliases
/// expand to more than [`MAX_YAML_VALUES`] values (which would take minutes and
/// gigabytes to build). Errors are plain strings for the caller to place.
pub fn parse_yaml(text: &str) -> std::result::Result<Value, String> {
    let budget = Cell::new(0usize);
    let de = serde_yaml::Deserializer::from_str(text);
    Limited(&budget).deserialize(de).map_err(|e| e.to_string())
}

/// A YAML value deserialiser that counts what it builds.
#[derive(Clone, Copy)]
struct Limited<'a>(&'a Cell<usize>);

impl Limited<'_> {
    fn tick<E: de::Error>(self) -> std::result::Result<(), E> {
        let n = self.0.get() + 1;
        self.0.set(n);
        if n > MAX_YAML_VALUES {
            return Err(E::custom(format!(
                "the document expands to more than {MAX_YAML_VALUES} values (YAML aliases that \
                 repeat large parts?); configs are much smaller"
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Limited<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Limited<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Value, E> {
        self.tick()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> std::result::Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        self.tick()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        self.tick()?;
        let mut out = serde_yaml::Mapping::new();
        while let Some(k) = map.next_key_seed(self)? {
            let v = map.next_value_seed(self)?;
            out.insert(k, v);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> std::result::Result<Value, A::Error> {
        Err(de::Error::custom(
            "YAML tags (`!name value`) are not accepted in configs",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_print_and_contain() {
        assert_eq!(Range::below(0.0, 1.0).to_string(), "[0, 1)");
        assert_eq!(Range::positive_from(0.0).to_string(), "(0, inf)");
        assert_eq!(Range::at_least(1e-38).to_string(), "[1e-38, inf)");
        assert_eq!(Range::above_to(0.0, 1.0).to_string(), "(0, 1]");
        assert!(!Range::at_least(0.0).contains(f64::INFINITY));
        assert!(!Range::at_least(0.0).contains(f64::NAN));
        assert!(Range::below(0.0, 1.0).contains(0.0) && !Range::below(0.0, 1.0).contains(1.0));
        assert_eq!(show(0.2f32 as f64), "0.2");
        assert_eq!(show(1e6), "1000000");
        assert_eq!(show(1.5), "1.5");
    }

    #[test]
    fn yaml_alias_bombs_are_refused_quickly() {
        let mut text = String::from("a: &a [");
        text.push_str(&"x, ".repeat(1000));
        text.push_str("x]\nb: [");
        text.push_str(&"*a, ".repeat(1000));
        text.push_str("*a]\n");
        let t = std::time::Instant::now();
        let e = parse_yaml(&text).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        assert!(t.elapsed().as_secs() < 5);
        let v = parse_yaml("a: {b: [1, 2.5, x, null, true]}\n").unwrap();
        let plain: Value = serde_yaml::from_str("a: {b: [1, 2.5, x, null, true]}\n").unwrap();
        assert_eq!(v, plain);
    }
}
