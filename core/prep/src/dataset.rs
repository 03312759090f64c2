//! Reading a prepared dataset directory (`inter.txt`, `item_text.tsv`,
//! `dataset.json`). The leave-one-out split convention is [`crate::split`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::long_tail::LongTailSummary;
use crate::table::Table;

/// File names inside a prepared dataset directory.
pub const INTER_FILE: &str = "inter.txt";
/// Item text table (header `item_id` + text columns).
pub const ITEM_TEXT_FILE: &str = "item_text.tsv";
/// Dataset statistics written by [`crate::prepare::prepare`].
pub const SUMMARY_FILE: &str = "dataset.json";
/// `new id \t original id` for users.
pub const USER_MAP_FILE: &str = "user_map.tsv";
/// `new id \t original id` for items.
pub const ITEM_MAP_FILE: &str = "item_map.tsv";

/// Statistics of a prepared dataset, saved as `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Number of users (ids 1..=users).
    pub users: usize,
    /// Number of items (ids 1..=items).
    pub items: usize,
    /// Number of interactions (lines of `inter.txt`).
    pub interactions: usize,
    /// Mean sequence length.
    pub avg_seq_len: f64,
    /// Shortest sequence.
    pub min_seq_len: usize,
    /// Longest sequence.
    pub max_seq_len: usize,
    /// `1 - interactions / (users * items)`.
    pub sparsity: f64,
    /// Text columns of `item_text.tsv` (empty when the dataset has no item text).
    pub text_columns: Vec<String>,
    /// Long-tail thresholds and group sizes (see [`crate::long_tail`]).
    pub long_tail: LongTailSummary,
    /// The interaction file the dataset was prepared from.
    pub source: String,
    /// Version of this crate that wrote the file.
    pub crate_version: String,
}

impl DatasetSummary {
    /// Reads `dataset.json` from a prepared dataset directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(SUMMARY_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: not a prepared dataset directory; run `llm-esr-orch prepare CONFIG` \
                 first",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "parsing {}; rerun `llm-esr-orch prepare CONFIG` to rewrite it",
                path.display()
            )
        })
    }
}

/// Item text keyed by item id.
#[derive(Debug, Clone)]
pub struct ItemText {
    /// The file, for error messages.
    pub path: PathBuf,
    /// Text column names (the id column excluded).
    pub columns: Vec<String>,
    /// `rows[id]`: the text fields of item `id` in `columns` order; `None` for
    /// items without a row (and for index 0, the padding id).
    pub rows: Vec<Option<Vec<String>>>,
}

impl ItemText {
    /// One field of one item, `None` when the item has no row or the field is
    /// empty.
    pub fn field(&self, item: u32, column: usize) -> Option<&str> {
        self.rows
            .get(item as usize)
            .and_then(|r| r.as_ref())
            .and_then(|r| r.get(column))
            .map(|s| s.as_str())
            .filter(|s| !s.trim().is_empty())
    }

    /// Index of a text column.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// A prepared dataset in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Its directory.
    pub dir: PathBuf,
    /// `sequences[u - 1]`: the items of user `u` in time order.
    pub sequences: Vec<Vec<u32>>,
    /// Number of items (ids 1..=num_items).
    pub num_items: usize,
    /// `item_text.tsv`, when present.
    pub item_text: Option<ItemText>,
}

impl Dataset {
    /// Loads a prepared dataset directory. The item count comes from
    /// `dataset.json` when present, else from the largest item id.
    pub fn load(dir: &Path) -> Result<Self> {
        let inter = dir.join(INTER_FILE);
        let (sequences, ids) = read_sequences_with_ids(&inter)?;
        let max_item = ids.max_item as usize;
        let num_items = if dir.join(SUMMARY_FILE).exists() {
            let summary = DatasetSummary::load(dir)?;
            let limit = item_id_limit(ids.distinct_items);
            if summary.items as u64 > limit {
                bail!(
                    "{} says {} items, far more than the {} distinct item ids of {} (at most \
                     {limit} are accepted, to keep the item tables in memory); run \
                     `llm-esr-orch prepare CONFIG` to renumber the dataset",
                    dir.join(SUMMARY_FILE).display(),
                    summary.items,
                    ids.distinct_items,
                    inter.display()
                );
            }
            if summary.users != sequences.len() || summary.items < max_item {
                bail!(
                    "{} says {} users and {} items but {} has {} users and item ids up to {}; \
                     rerun `llm-esr-orch prepare CONFIG`",
                    dir.join(SUMMARY_FILE).display(),
                    summary.users,
                    summary.items,
                    inter.display(),
                    sequences.len(),
                    max_item
                );
            }
            summary.items
        } else {
            max_item
        };
        let text_path = dir.join(ITEM_TEXT_FILE);
        let item_text = if text_path.exists() {
            Some(read_item_text(&text_path, "item_id", num_items)?)
        } else {
            None
        };
        Ok(Dataset {
            dir: dir.to_path_buf(),
            sequences,
            num_items,
            item_text,
        })
    }

    /// Number of users.
    pub fn num_users(&self) -> usize {
        self.sequences.len()
    }

    /// Number of interactions.
    pub fn num_interactions(&self) -> usize {
        self.sequences.iter().map(|s| s.len()).sum()
    }
}

/// Parses one positive integer id, naming file, line and what to do.
pub fn parse_id(field: &str, what: &str, path: &Path, line: usize) -> Result<u64> {
    let id: u64 = field.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "{}:{line}: {what} id `{field}` is not a non-negative integer; this file needs \
             numeric ids (for string ids or a header use `format: csv` with column names)",
            path.display()
        )
    })?;
    Ok(id)
}

/// Reads `user item` lines (whitespace separated, numeric ids) in file order.
/// Returns `(user, item, line)` triples.
pub fn read_inter_pairs(path: &Path) -> Result<Vec<(u64, u64, usize)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (is the path right?)", path.display()))?;
    // One (user, item, line) triple per line; refuse before allocating when
    // that cannot fit.
    let lines = text.lines().count();
    let triple = std::mem::size_of::<(u64, u64, usize)>() as f64;
    crate::memory::ensure_fits(
        &format!("reading the {lines} lines of {}", path.display()),
        lines as f64 * triple,
        "use a machine with more memory or a smaller file",
    )?;
    let mut out = Vec::new();
    crate::memory::try_reserve(&mut out, lines, &format!("the lines of {}", path.display()))?;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(u), Some(it)) = (parts.next(), parts.next()) else {
            bail!(
                "{}:{lineno}: expected `user item`, found `{line}`",
                path.display()
            );
        };
        if parts.next().is_some() {
            bail!(
                "{}:{lineno}: expected two fields `user item`, found more in `{line}`; for files \
                 with more columns use `format: csv`",
                path.display()
            );
        }
        let u = parse_id(u, "user", path, lineno)?;
        let it = parse_id(it, "item", path, lineno)?;
        out.push((u, it, lineno));
    }
    Ok(out)
}

/// The largest item id accepted in a dataset with `distinct` distinct item
/// ids: ids may leave gaps (an item table row per id up to the largest), but
/// not so many that the tables would be mostly empty rows.
pub fn item_id_limit(distinct: usize) -> u64 {
    8 * distinct as u64 + 1024
}

/// Facts about the ids of an `inter.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdStats {
    /// Number of distinct item ids.
    pub distinct_items: usize,
    /// The largest item id.
    pub max_item: u64,
}

/// Reads a prepared `inter.txt`: user ids must be exactly 1..=U, item ids >= 1.
///
/// Ids index tables, so ids far beyond the number of distinct ids are refused
/// before anything is sized by them: a user id above the number of lines (user
/// ids run 1..=U without gaps, each with a line), an item id above
/// [`item_id_limit`] of the distinct item ids. The error names the file and
/// line and says to renumber with `llm-esr-orch prepare`.
pub fn read_sequences(path: &Path) -> Result<Vec<Vec<u32>>> {
    Ok(read_sequences_with_ids(path)?.0)
}

/// [`read_sequences`] and the item id facts.
pub fn read_sequences_with_ids(path: &Path) -> Result<(Vec<Vec<u32>>, IdStats)> {
    let pairs = read_inter_pairs(path)?;
    if pairs.is_empty() {
        bail!("{} has no interactions", path.display());
    }
    let renumber = "run `llm-esr-orch prepare CONFIG` to renumber the ids to 1..N";
    let n = pairs.len() as u64;
    let mut max_user = 0u64;
    for &(u, i, line) in &pairs {
        if u == 0 || i == 0 || u > u32::MAX as u64 || i > u32::MAX as u64 {
            bail!(
                "{}:{line}: ids must be in 1..=4294967295 (0 is the padding id); {renumber}",
                path.display()
            );
        }
        if u > n {
            bail!(
                "{}:{line}: user id {u} is larger than the number of interactions ({n}), so \
                 user ids do not run 1..=U without gaps as a prepared dataset needs; {renumber}",
                path.display()
            );
        }
        max_user = max_user.max(u);
    }
    let mut items: Vec<u32> = Vec::new();
    crate::memory::try_reserve(&mut items, pairs.len(), "the item ids")?;
    items.extend(pairs.iter().map(|&(_, i, _)| i as u32));
    items.sort_unstable();
    items.dedup();
    let stats = IdStats {
        distinct_items: items.len(),
        max_item: items.last().copied().unwrap_or(0) as u64,
    };
    drop(items);
    let limit = item_id_limit(stats.distinct_items);
    if stats.max_item > limit {
        let line = pairs
            .iter()
            .find(|p| p.1 == stats.max_item)
            .map_or(0, |p| p.2);
        bail!(
            "{}:{line}: item id {} is far beyond the {} distinct item ids of the file (at most \
             {limit} are accepted: every id up to the largest gets a row of the item tables); \
             {renumber}",
            path.display(),
            stats.max_item,
            stats.distinct_items
        );
    }
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    crate::memory::try_reserve(&mut seqs, max_user as usize, "the user sequences")?;
    seqs.resize_with(max_user as usize, Vec::new);
    for (u, i, _) in pairs {
        seqs[u as usize - 1].push(i as u32);
    }
    if let Some(missing) = seqs.iter().position(|s| s.is_empty()) {
        bail!(
            "{}: user ids are not contiguous (user {} has no interaction but user {} does); run \
             `llm-esr-orch prepare` to remap ids to 1..N",
            path.display(),
            missing + 1,
            seqs.len()
        );
    }
    Ok((seqs, stats))
}

/// Reads an item text table keyed by numeric ids `1..=num_items`.
pub fn read_item_text(path: &Path, id_column: &str, num_items: usize) -> Result<ItemText> {
    let table = Table::read(path, b'\t')?;
    let id_col = table.column(id_column, "item id column")?;
    let columns: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != id_col)
        .map(|(_, c)| c.clone())
        .collect();
    let mut rows: Vec<Option<Vec<String>>> = vec![None; num_items + 1];
    let mut first_line = vec![0usize; num_items + 1];
    for (line, fields) in &table.rows {
        let id = parse_id(&fields[id_col], "item", path, *line)? as usize;
        if id == 0 || id > num_items {
            bail!(
                "{}:{line}: item id {id} is outside 1..={num_items} (the dataset's items); \
                 this text file does not belong to this dataset, rerun `llm-esr-orch prepare`",
                path.display()
            );
        }
        if rows[id].is_some() {
            bail!(
                "{}:{line}: duplicate item id {id} (first at line {}); keep one row per item",
                path.display(),
                first_line[id]
            );
        }
        first_line[id] = *line;
        rows[id] = Some(
            fields
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != id_col)
                .map(|(_, f)| f.clone())
                .collect(),
        );
    }
    Ok(ItemText {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join(INTER_FILE);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn ids_far_beyond_the_distinct_ids_are_refused_before_allocating() {
        let dir = std::env::temp_dir().join(format!("llm-esr-ids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = write(&dir, "1 1\n1 2\n2 3\n2 4000000000\n");
        let m = format!("{:#}", read_sequences(&p).unwrap_err());
        assert!(
            m.contains("inter.txt:4") && m.contains("item id 4000000000") && m.contains("prepare"),
            "{m}"
        );
        let p = write(&dir, "1 1\n4000000000 2\n");
        let m = format!("{:#}", read_sequences(&p).unwrap_err());
        assert!(
            m.contains("inter.txt:2") && m.contains("user id 4000000000"),
            "{m}"
        );
        // Gaps within the limit are accepted (items 1, 2 and 900 -> 900 rows).
        let p = write(&dir, "1 1\n1 2\n2 900\n2 1\n");
        let seqs = read_sequences(&p).unwrap();
        assert_eq!(seqs, vec![vec![1, 2], vec![900, 1]]);
        // dataset.json cannot claim far more items than the file has.
        std::fs::write(
            dir.join(SUMMARY_FILE),
            r#"{"users": 2, "items": 4000000000, "interactions": 4, "avg_seq_len": 2.0,
                "min_seq_len": 2, "max_seq_len": 2, "sparsity": 0.5, "text_columns": [],
                "long_tail": {"item_threshold": 1, "item_rule": "fixed", "user_threshold": 1,
                "user_rule": "fixed", "head_items": 1, "tail_items": 1, "head_users": 1,
                "tail_users": 1}, "source": "x", "crate_version": "0"}"#,
        )
        .unwrap();
        let m = format!("{:#}", Dataset::load(&dir).unwrap_err());
        assert!(
            m.contains("dataset.json") && m.contains("4000000000 items"),
            "{m}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
