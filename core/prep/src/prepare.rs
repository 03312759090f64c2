//! Dataset preparation: raw interactions -> filtered, id-remapped, time-ordered
//! sequences plus item text and statistics.
//!
//! Input layouts ([`InputFormat`]):
//! - `inter_txt`: `user item` per line, numeric ids, each user's lines in time
//!   order (the layout the official LLM-ESR code reads). Item text from
//!   `item_text` (default: `item_text.tsv` next to the interaction file when it
//!   exists), a TSV with a header whose id column holds the same numeric ids.
//! - `recbole`: RecBole atomic files. `X.inter` has a header like
//!   `user_id:token\titem_id:token\trating:float\ttimestamp:float`; each user's
//!   interactions are sorted by timestamp (stable: equal timestamps keep file
//!   order). Item text from `X.item` next to it when present; a column whose name
//!   contains `title` (e.g. `movie_title:token_seq`) is renamed `title` when no
//!   column is called `title`.
//! - `csv`: a CSV/TSV with a header; user, item and (optional) timestamp columns
//!   named in the config; optional item-text file and columns.
//!
//! Filters: k-core with `user_min` / `item_min` (interaction counts), either
//! `iterative` (repeat until every remaining user and item satisfies both) or
//! `single_pass` (the official `filter_common`: count once on the raw data, drop
//! every interaction whose user or item is under its minimum), then
//! `min_seq_len` (the official code drops users with fewer than 3 interactions).
//!
//! Ids: users are numbered 1..U in the order of their first remaining
//! interaction in the file; items 1..I in the order they first appear when
//! reading the users' sequences in that order (the official `id_map`). The maps
//! are saved as `user_map.tsv` / `item_map.tsv` (`new_id\toriginal_id`, header).
//!
//! Output directory: `inter.txt` (`user item`, grouped by user, time order),
//! `item_text.tsv` (`item_id` + text columns, one row per item, empty fields for
//! items without text) when there is text, the two maps and `dataset.json`
//! ([`DatasetSummary`]). Every file is written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::dataset::{
    parse_id, read_inter_pairs, DatasetSummary, INTER_FILE, ITEM_MAP_FILE, ITEM_TEXT_FILE,
    SUMMARY_FILE, USER_MAP_FILE,
};
use crate::fsutil::write_atomic;
use crate::long_tail::{long_tail, LongTailConfig, TestUserLength};
use crate::table::{guess_delimiter, Table};

/// Layout of the raw interaction file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// `user item` per line, numeric ids, time order (official layout).
    #[default]
    InterTxt,
    /// RecBole atomic files (`X.inter`, optional `X.item`).
    Recbole,
    /// CSV/TSV with a header and named columns.
    Csv,
}

/// The k-core variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KCore {
    /// Repeat until every remaining user has `>= user_min` and every item
    /// `>= item_min` interactions.
    #[default]
    Iterative,
    /// The official single pass (`filter_common` in `data/data_process.py`).
    SinglePass,
}

/// Configuration of [`prepare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    /// Layout of `interactions` (default `inter_txt`).
    pub format: InputFormat,
    /// The raw interaction file (default `inter.txt`). Relative paths are taken
    /// from the working directory.
    pub interactions: PathBuf,
    /// Item text table. Default: `item_text.tsv` (inter_txt) or `X.item`
    /// (recbole) next to the interaction file when it exists; none for csv.
    pub item_text: Option<PathBuf>,
    /// Field delimiter of a csv-format file (default: tab for `.tsv`, comma
    /// otherwise).
    pub delimiter: Option<char>,
    /// User column (recbole, csv).
    pub user_column: String,
    /// Item column (recbole, csv).
    pub item_column: String,
    /// Timestamp column (recbole, csv); `null` keeps file order.
    pub timestamp_column: Option<String>,
    /// Id column of the item text file.
    pub item_text_id_column: String,
    /// Text columns to keep (empty: every column but the id).
    pub item_text_columns: Vec<String>,
    /// Delimiter of the item text file (default: from its extension).
    pub item_text_delimiter: Option<char>,
    /// k-core: minimum interactions per user (0 = no filter).
    pub user_min: usize,
    /// k-core: minimum interactions per item (0 = no filter).
    pub item_min: usize,
    /// k-core variant.
    pub kcore: KCore,
    /// Drop users with fewer interactions after the k-core (official: 3).
    pub min_seq_len: usize,
    /// Long-tail thresholds recorded in `dataset.json`.
    pub long_tail: LongTailConfig,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            format: InputFormat::InterTxt,
            interactions: PathBuf::from(INTER_FILE),
            item_text: None,
            delimiter: None,
            user_column: "user_id".to_string(),
            item_column: "item_id".to_string(),
            timestamp_column: Some("timestamp".to_string()),
            item_text_id_column: "item_id".to_string(),
            item_text_columns: Vec::new(),
            item_text_delimiter: None,
            user_min: 0,
            item_min: 0,
            kcore: KCore::Iterative,
            min_seq_len: 0,
            long_tail: LongTailConfig::default(),
        }
    }
}

impl PrepareConfig {
    fn item_text_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.item_text {
            return Some(p.clone());
        }
        let dir = self.interactions.parent().unwrap_or(Path::new("."));
        let candidate = match self.format {
            InputFormat::InterTxt => dir.join(ITEM_TEXT_FILE),
            InputFormat::Recbole => self.interactions.with_extension("item"),
            InputFormat::Csv => return None,
        };
        candidate.exists().then_some(candidate)
    }
}

/// One raw interaction (interned ids).
struct Raw {
    user: u32,
    item: u32,
    ts: f64,
}

/// Interns raw id strings.
#[derive(Default)]
struct Interner {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Interner {
    fn get(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// Prepares a dataset into `out_dir` (created if needed) and returns its summary.
pub fn prepare(cfg: &PrepareConfig, out_dir: &Path) -> Result<DatasetSummary> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    if let (Ok(a), Ok(b)) = (
        cfg.interactions.canonicalize(),
        out_dir.join(INTER_FILE).canonicalize(),
    ) {
        if a == b {
            bail!(
                "the output directory {} holds the input file {}; choose another output \
                 directory so that the raw data is not overwritten",
                out_dir.display(),
                cfg.interactions.display()
            );
        }
    }

    if cfg.long_tail.test_users_by != TestUserLength::TrainLength {
        return Err(crate::invalid::invalid_config(
            "config key `prepare.long_tail.test_users_by`: has no effect on `prepare` \
             (dataset.json records training-length thresholds); set \
             `data.long_tail.test_users_by` for the test report of `train`",
        ));
    }

    // 1. Raw interactions, in file order.
    let mut users = Interner::default();
    let mut items = Interner::default();
    let raw = read_raw(cfg, &mut users, &mut items)?;
    if raw.is_empty() {
        bail!(
            "{} has no interactions; check the path and format",
            cfg.interactions.display()
        );
    }
    let n_raw = raw.len();

    // 2. Filters.
    let keep = filter(cfg, &raw, users.names.len(), items.names.len());

    // 3. Sequences: users in order of their first remaining interaction, each
    //    sorted by timestamp (stable).
    let mut user_slot: Vec<u32> = vec![u32::MAX; users.names.len()];
    let mut order: Vec<u32> = Vec::new();
    let mut seqs: Vec<Vec<(f64, u32)>> = Vec::new();
    for (r, k) in raw.iter().zip(&keep) {
        if !k {
            continue;
        }
        let slot = &mut user_slot[r.user as usize];
        if *slot == u32::MAX {
            *slot = seqs.len() as u32;
            seqs.push(Vec::new());
            order.push(r.user);
        }
        seqs[*slot as usize].push((r.ts, r.item));
    }
    for s in seqs.iter_mut() {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    // min_seq_len
    let mut kept_users = Vec::new();
    let mut kept_seqs = Vec::new();
    for (u, s) in order.into_iter().zip(seqs) {
        if s.len() >= cfg.min_seq_len {
            kept_users.push(u);
            kept_seqs.push(s);
        }
    }
    if kept_seqs.is_empty() {
        let mut relax = Vec::new();
        if cfg.user_min > 0 {
            relax.push(format!("user_min (= {})", cfg.user_min));
        }
        if cfg.item_min > 0 {
            relax.push(format!("item_min (= {})", cfg.item_min));
        }
        if cfg.min_seq_len > 0 {
            relax.push(format!("min_seq_len (= {})", cfg.min_seq_len));
        }
        bail!(
            "no interaction of {} ({n_raw} read) is left after filtering with kcore: {:?}; \
             relax {}",
            cfg.interactions.display(),
            cfg.kcore,
            relax.join(" or ")
        );
    }

    // 4. Item ids in order of first appearance.
    let mut item_new: Vec<u32> = vec![0; items.names.len()];
    let mut item_orig: Vec<u32> = Vec::new();
    let mut sequences: Vec<Vec<u32>> = Vec::with_capacity(kept_seqs.len());
    for s in &kept_seqs {
        let mut seq = Vec::with_capacity(s.len());
        for &(_, it) in s {
            let slot = &mut item_new[it as usize];
            if *slot == 0 {
                item_orig.push(it);
                *slot = item_orig.len() as u32;
            }
            seq.push(*slot);
        }
        sequences.push(seq);
    }
    let n_users = sequences.len();
    let n_items = item_orig.len();
    let n_inter: usize = sequences.iter().map(|s| s.len()).sum();

    // 5. Item text (read and checked before anything is written).
    let text = match cfg.item_text_path() {
        Some(path) => Some(read_text(cfg, &path, &items, &item_new, n_items)?),
        None => None,
    };

    // 6. Outputs.
    write_atomic(&out_dir.join(INTER_FILE), |w| {
        for (u, seq) in sequences.iter().enumerate() {
            for i in seq {
                writeln!(w, "{} {}", u + 1, i)?;
            }
        }
        Ok(())
    })?;
    write_atomic(&out_dir.join(USER_MAP_FILE), |w| {
        writeln!(w, "user_id\toriginal_id")?;
        for (k, &u) in kept_users.iter().enumerate() {
            writeln!(w, "{}\t{}", k + 1, sanitize(&users.names[u as usize]))?;
        }
        Ok(())
    })?;
    write_atomic(&out_dir.join(ITEM_MAP_FILE), |w| {
        writeln!(w, "item_id\toriginal_id")?;
        for (k, &i) in item_orig.iter().enumerate() {
            writeln!(w, "{}\t{}", k + 1, sanitize(&items.names[i as usize]))?;
        }
        Ok(())
    })?;
    let mut text_columns = Vec::new();
    if let Some((columns, rows)) = &text {
        text_columns = columns.clone();
        write_atomic(&out_dir.join(ITEM_TEXT_FILE), |w| {
            writeln!(w, "item_id\t{}", columns.join("\t"))?;
            for (id, row) in rows.iter().enumerate().skip(1) {
                write!(w, "{id}")?;
                match row {
                    Some(fields) => {
                        for f in fields {
                            write!(w, "\t{}", sanitize(f))?;
                        }
                    }
                    None => {
                        for _ in columns {
                            write!(w, "\t")?;
                        }
                    }
                }
                writeln!(w)?;
            }
            Ok(())
        })?;
    } else {
        // A stale item_text.tsv from an earlier run would not match the new ids.
        let stale = out_dir.join(ITEM_TEXT_FILE);
        if stale.exists() {
            std::fs::remove_file(&stale)
                .with_context(|| format!("removing stale {}", stale.display()))?;
        }
    }

    let lt = long_tail(&sequences, n_items, &cfg.long_tail)?;
    let lens: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
    let summary = DatasetSummary {
        users: n_users,
        items: n_items,
        interactions: n_inter,
        avg_seq_len: n_inter as f64 / n_users as f64,
        min_seq_len: lens.iter().copied().min().unwrap_or(0),
        max_seq_len: lens.iter().copied().max().unwrap_or(0),
        sparsity: 1.0 - n_inter as f64 / (n_users as f64 * n_items as f64),
        text_columns,
        long_tail: lt.summary,
        source: cfg.interactions.display().to_string(),
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    crate::fsutil::write_json_atomic(&out_dir.join(SUMMARY_FILE), &summary)?;
    tracing::info!(
        users = n_users,
        items = n_items,
        interactions = n_inter,
        raw = n_raw,
        "prepared dataset in {}",
        out_dir.display()
    );
    Ok(summary)
}

/// Replaces characters that would break a TSV row.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '\t' || c == '\n' || c == '\r' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn read_raw(cfg: &PrepareConfig, users: &mut Interner, items: &mut Interner) -> Result<Vec<Raw>> {
    match cfg.format {
        InputFormat::InterTxt => {
            let pairs = read_inter_pairs(&cfg.interactions)?;
            Ok(pairs
                .into_iter()
                .enumerate()
                .map(|(k, (u, i, _))| Raw {
                    user: users.get(&u.to_string()),
                    item: items.get(&i.to_string()),
                    ts: k as f64,
                })
                .collect())
        }
        InputFormat::Recbole | InputFormat::Csv => {
            let table = if cfg.format == InputFormat::Recbole {
                Table::read_recbole(&cfg.interactions)?
            } else {
                let d = guess_delimiter(&cfg.interactions, cfg.delimiter)?;
                Table::read(&cfg.interactions, d)?
            };
            let uc = table.column(&cfg.user_column, "user_column")?;
            let ic = table.column(&cfg.item_column, "item_column")?;
            let tc = match &cfg.timestamp_column {
                Some(name) => Some(table.column(
                    name,
                    "timestamp_column (or set it to null to keep file order)",
                )?),
                None => None,
            };
            let mut out = Vec::with_capacity(table.rows.len());
            for (k, (line, fields)) in table.rows.iter().enumerate() {
                let u = fields[uc].trim();
                let i = fields[ic].trim();
                if u.is_empty() || i.is_empty() {
                    bail!(
                        "{}:{line}: empty user or item id; remove the line or fill in the id",
                        table.path.display()
                    );
                }
                let ts = match tc {
                    Some(c) => {
                        let f = fields[c].trim();
                        let v: f64 = f.parse().map_err(|_| {
                            anyhow::anyhow!(
                                "{}:{line}: timestamp `{f}` in column `{}` is not a number; fix \
                                 the value or set `timestamp_column` to a numeric column",
                                table.path.display(),
                                table.columns[c]
                            )
                        })?;
                        if !v.is_finite() {
                            bail!(
                                "{}:{line}: timestamp `{f}` is not finite; fix the value",
                                table.path.display()
                            );
                        }
                        v
                    }
                    None => k as f64,
                };
                out.push(Raw {
                    user: users.get(u),
                    item: items.get(i),
                    ts,
                });
            }
            Ok(out)
        }
    }
}

fn filter(cfg: &PrepareConfig, raw: &[Raw], n_users: usize, n_items: usize) -> Vec<bool> {
    let mut keep = vec![true; raw.len()];
    if cfg.user_min == 0 && cfg.item_min == 0 {
        return keep;
    }
    loop {
        let mut uc = vec![0usize; n_users];
        let mut ic = vec![0usize; n_items];
        for (r, k) in raw.iter().zip(&keep) {
            if *k {
                uc[r.user as usize] += 1;
                ic[r.item as usize] += 1;
            }
        }
        let mut changed = false;
        for (r, k) in raw.iter().zip(keep.iter_mut()) {
            if *k && (uc[r.user as usize] < cfg.user_min || ic[r.item as usize] < cfg.item_min) {
                *k = false;
                changed = true;
            }
        }
        if !changed || cfg.kcore == KCore::SinglePass {
            return keep;
        }
    }
}

type TextRows = (Vec<String>, Vec<Option<Vec<String>>>);

/// Reads the item text file and maps it to the new item ids. Rows of items that
/// were filtered out are dropped.
fn read_text(
    cfg: &PrepareConfig,
    path: &Path,
    items: &Interner,
    item_new: &[u32],
    n_items: usize,
) -> Result<TextRows> {
    let table = if path.extension().is_some_and(|e| e == "item") {
        Table::read_recbole(path)?
    } else {
        let d = guess_delimiter(path, cfg.item_text_delimiter)?;
        Table::read(path, d)?
    };
    let id_col = table.column(&cfg.item_text_id_column, "item_text_id_column")?;
    let columns: Vec<usize> = if cfg.item_text_columns.is_empty() {
        (0..table.columns.len()).filter(|&c| c != id_col).collect()
    } else {
        let mut v = Vec::new();
        for name in &cfg.item_text_columns {
            v.push(table.column(name, "item_text_columns")?);
        }
        v
    };
    let mut names: Vec<String> = columns.iter().map(|&c| table.columns[c].clone()).collect();
    // RecBole names the title e.g. `movie_title`; templates and user prompts
    // expect `title`.
    if cfg.format == InputFormat::Recbole && !names.iter().any(|c| c == "title") {
        if let Some(c) = names.iter_mut().find(|c| c.contains("title")) {
            *c = "title".to_string();
        }
    }
    let mut rows: Vec<Option<Vec<String>>> = vec![None; n_items + 1];
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, fields) in &table.rows {
        let raw_id = fields[id_col].trim();
        let key = if cfg.format == InputFormat::InterTxt {
            parse_id(raw_id, "item", path, *line)?.to_string()
        } else {
            raw_id.to_string()
        };
        if let Some(first) = seen.insert(key.clone(), *line) {
            bail!(
                "{}:{line}: duplicate item id `{raw_id}` (first at line {first}); keep one row \
                 per item",
                path.display()
            );
        }
        let Some(&idx) = items.index.get(&key) else {
            continue; // an item without interactions
        };
        let new = item_new[idx as usize] as usize;
        if new == 0 {
            continue; // filtered out
        }
        rows[new] = Some(columns.iter().map(|&c| fields[c].clone()).collect());
    }
    let with_text = rows.iter().filter(|r| r.is_some()).count();
    if with_text == 0 {
        bail!(
            "{}: none of its ids matches an item of {}; check `item_text_id_column` (now `{}`)",
            path.display(),
            cfg.interactions.display(),
            cfg.item_text_id_column
        );
    }
    if with_text < n_items {
        tracing::warn!(
            "{}: {} of {n_items} items have no text row (their fields become `unknown` in prompts)",
            path.display(),
            n_items - with_text
        );
    }
    Ok((names, rows))
}
