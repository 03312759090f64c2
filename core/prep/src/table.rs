//! Reading delimited text files with a header (TSV, CSV, RecBole atomic files).
//!
//! Tab-separated fields are taken literally (RecBole and our own `.tsv` files do
//! not quote). For other delimiters, a field that starts with `"` is a quoted CSV
//! field (`""` inside it is one quote); quoted fields cannot span lines.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A whole delimited file in memory: header and rows with their line numbers.
#[derive(Debug, Clone)]
pub struct Table {
    /// The file, for error messages.
    pub path: PathBuf,
    /// Column names from the header (RecBole `name:type` suffixes removed when
    /// read with [`Table::read_recbole`]).
    pub columns: Vec<String>,
    /// Rows as `(1-based line number, fields)`; every row has `columns.len()`
    /// fields.
    pub rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    /// Reads a delimited file whose first line is a header.
    pub fn read(path: &Path, delimiter: u8) -> Result<Self> {
        Self::read_impl(path, delimiter, false)
    }

    /// Reads a RecBole atomic file: tab-separated, header fields `name:type`.
    pub fn read_recbole(path: &Path) -> Result<Self> {
        Self::read_impl(path, b'\t', true)
    }

    fn read_impl(path: &Path, delimiter: u8, recbole: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} (is the path right?)", path.display()))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut lines = text.lines().enumerate();
        let (header_line, header) = loop {
            match lines.next() {
                Some((_, l)) if l.trim().is_empty() => continue,
                Some((i, l)) => break (i + 1, l),
                None => bail!(
                    "{} is empty: expected a header line and at least one row",
                    path.display()
                ),
            }
        };
        let mut columns = split_fields(header, delimiter, path, header_line)?;
        if recbole {
            for c in columns.iter_mut() {
                if let Some((name, _ty)) = c.split_once(':') {
                    *c = name.to_string();
                } else {
                    bail!(
                        "{}:{}: RecBole header field `{c}` has no `:type` suffix (expected e.g. \
                         `user_id:token`); use `format: csv` for a plain header",
                        path.display(),
                        header_line
                    );
                }
            }
        }
        for c in columns.iter_mut() {
            *c = c.trim().to_string();
        }
        check_header(&columns, path, header_line)?;
        let mut rows = Vec::new();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let lineno = i + 1;
            let fields = split_fields(line, delimiter, path, lineno)?;
            if fields.len() != columns.len() {
                bail!(
                    "{}:{lineno}: expected {} fields (header: {}), found {}; check the \
                     delimiter ({}) and that text fields contain no {}",
                    path.display(),
                    columns.len(),
                    columns.join(", "),
                    fields.len(),
                    delimiter_name(delimiter),
                    delimiter_name(delimiter)
                );
            }
            rows.push((lineno, fields));
        }
        // A repeated header with the right number of fields.
        for (lineno, fields) in &rows {
            if fields.iter().zip(&columns).all(|(a, b)| {
                let a = if recbole {
                    a.split_once(':').map(|(n, _)| n).unwrap_or(a)
                } else {
                    a.as_str()
                };
                a.trim() == b
            }) {
                bail!(
                    "{}:{lineno}: the header line appears again; remove the repeated header",
                    path.display()
                );
            }
        }
        Ok(Table {
            path: path.to_path_buf(),
            columns,
            rows,
        })
    }

    /// Index of a column, or an error that names the file, the column, the
    /// available columns and the config key to fix.
    pub fn column(&self, name: &str, config_key: &str) -> Result<usize> {
        self.columns
            .iter()
            .position(|c| c == name)
            .with_context(|| {
                format!(
                    "{} has no column `{name}` (columns: {}); set `{config_key}` to one of them",
                    self.path.display(),
                    self.columns.join(", ")
                )
            })
    }
}

/// Rejects empty and duplicate column names.
pub fn check_header(columns: &[String], path: &Path, line: usize) -> Result<()> {
    for (i, c) in columns.iter().enumerate() {
        if c.is_empty() {
            bail!(
                "{}:{line}: header column {} has no name; give every column a name",
                path.display(),
                i + 1
            );
        }
        if let Some(j) = columns[..i].iter().position(|d| d == c) {
            bail!(
                "{}:{line}: duplicate column `{c}` in the header (columns {} and {}); rename \
                 or remove one of them",
                path.display(),
                j + 1,
                i + 1
            );
        }
    }
    Ok(())
}

fn delimiter_name(d: u8) -> String {
    match d {
        b'\t' => "tab".to_string(),
        b',' => "comma".to_string(),
        b';' => "semicolon".to_string(),
        b' ' => "space".to_string(),
        other => format!("`{}`", other as char),
    }
}

/// Splits one line into fields.
pub fn split_fields(line: &str, delimiter: u8, path: &Path, lineno: usize) -> Result<Vec<String>> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let delim = delimiter as char;
    if delimiter == b'\t' {
        return Ok(line.split(delim).map(|s| s.to_string()).collect());
    }
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        closed = true;
                        break;
                    }
                } else {
                    field.push(c);
                }
            }
            if !closed {
                bail!(
                    "{}:{lineno}: unterminated quoted field (quoted fields cannot span lines); \
                     close the quote or remove line breaks from the field",
                    path.display()
                );
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(c) if c == delim => fields.push(field),
                Some(c) => bail!(
                    "{}:{lineno}: unexpected `{c}` after a closing quote; quote the whole field \
                     and double inner quotes (`\"\"`)",
                    path.display()
                ),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(c) if c == delim => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

/// Picks the delimiter from the file name (`.tsv`/`.inter`/`.item`: tab,
/// otherwise comma) unless one is configured.
pub fn guess_delimiter(path: &Path, configured: Option<char>) -> Result<u8> {
    if let Some(c) = configured {
        if !c.is_ascii() {
            bail!("delimiter `{c}` is not an ASCII character; use e.g. \",\" or \"\\t\"");
        }
        return Ok(c as u8);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    Ok(match ext.as_str() {
        "tsv" | "tab" | "inter" | "item" | "txt" => b'\t',
        _ => b',',
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quoted_csv() {
        let p = Path::new("x.csv");
        let f = split_fields("a,\"b, c\",\"d \"\"e\"\"\",", b',', p, 1).unwrap();
        assert_eq!(f, vec!["a", "b, c", "d \"e\"", ""]);
        assert!(split_fields("a,\"b", b',', p, 1).is_err());
        let t = split_fields("1\t\"x\ty", b'\t', p, 1).unwrap();
        assert_eq!(t, vec!["1", "\"x", "y"]);
    }
}
