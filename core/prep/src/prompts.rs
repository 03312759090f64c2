//! Item and user prompts for the text encoder.
//!
//! Item prompts fill a template whose `{column}` placeholders name columns of
//! `item_text.tsv` (`{{` and `}}` are literal braces). A missing or empty field
//! becomes `unknown` (as the official `get_attri`). A placeholder naming a column
//! the file lacks is an error, raised before any encoding work.
//!
//! The official beauty item prompt is `The beauty item has following attributes:
//! \n name is <TITLE>; brand is <BRAND>; price is <PRICE>. \n` followed by
//! category and description sentences. Our datasets carry titles only, so the
//! shipped default is [`DEFAULT_ITEM_TEMPLATE`]: `The item has following
//! attributes: name is {title}.` (a brand/price sentence would read `unknown` for
//! every item and carries no information).
//!
//! User prompts follow the official `get_user_prompt`: the history string is
//! each title of the user's **training** items (`seq[:-2]`, never the validation
//! item `seq[-2]` nor the test item `seq[-1]`) followed by `", "`, items without
//! a title skipped; when longer than 8,000 characters only its **last** 8,000
//! characters are kept; it replaces `{history}` in [`DEFAULT_USER_TEMPLATE`],
//! the official wording (`The user has visited following fashions: \n<HISTORY>
//! \nplease conclude the user's perference.`, misspelling kept) with "fashions"
//! replaced by "items". Whitespace and line breaks do not change WordPiece tokens.

use anyhow::{bail, Result};

use crate::dataset::ItemText;
use crate::split::train_part;

/// Default item template (see the module docs).
pub const DEFAULT_ITEM_TEMPLATE: &str = "The item has following attributes: name is {title}.";
/// Default user template (official wording, see the module docs).
pub const DEFAULT_USER_TEMPLATE: &str =
    "The user has visited following items: \n{history} \nplease conclude the user's perference.";
/// The user history keeps this many trailing characters (official: 8000).
pub const USER_HISTORY_MAX_CHARS: usize = 8000;
/// The value of a missing or empty field.
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Lit(String),
    Field(String),
}

/// A parsed `{column}` template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses a template. `key` names the config key in errors.
    pub fn parse(source: &str, key: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    let name = name.trim().to_string();
                    if !closed || name.is_empty() {
                        bail!(
                            "`{key}`: unclosed or empty placeholder in `{source}`; write \
                             `{{column}}` (and `{{{{` / `}}}}` for literal braces)"
                        );
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => {
                    bail!("`{key}`: unmatched `}}` in `{source}`; write `}}}}` for a literal brace")
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Placeholder names in order of appearance.
    pub fn fields(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Field(f) => Some(f.as_str()),
                Part::Lit(_) => None,
            })
            .collect()
    }

    /// Fills the placeholders.
    pub fn render<'a>(&self, mut value: impl FnMut(&str) -> &'a str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(f) => out.push_str(value(f)),
            }
        }
        out
    }
}

/// Checks an item template against the text columns (before any encoding work)
/// and returns, per placeholder, the column index.
pub fn check_item_template(template: &Template, text: &ItemText, key: &str) -> Result<Vec<usize>> {
    let mut cols = Vec::new();
    for f in template.fields() {
        match text.column(f) {
            Some(c) => cols.push(c),
            None => bail!(
                "`{key}` names column `{{{f}}}`, which {} does not have (columns: {}); use one of \
                 them in `{key}`",
                text.path.display(),
                text.columns.join(", ")
            ),
        }
    }
    Ok(cols)
}

/// Checks a user template: exactly the `{history}` placeholder.
pub fn check_user_template(template: &Template, key: &str) -> Result<()> {
    let fields = template.fields();
    if !fields.contains(&"history") {
        bail!(
            "`{key}` = `{}` has no `{{history}}` placeholder; the user prompt needs the titles of \
             the user's training items",
            template.source()
        );
    }
    if let Some(f) = fields.iter().find(|f| **f != "history") {
        bail!("`{key}` names `{{{f}}}`; user templates know only `{{history}}`");
    }
    Ok(())
}

/// Item prompts for items `1..=num_items` (`out[0]` is item 1).
pub fn item_prompts(
    template: &Template,
    text: &ItemText,
    num_items: usize,
    key: &str,
) -> Result<Vec<String>> {
    let cols = check_item_template(template, text, key)?;
    let mut out = Vec::with_capacity(num_items);
    for item in 1..=num_items as u32 {
        let mut k = 0;
        out.push(template.render(|_| {
            let v = text.field(item, cols[k]).unwrap_or(UNKNOWN);
            k += 1;
            v
        }));
    }
    Ok(out)
}

/// The history string of one user: training-part titles, each followed by
/// `", "`, missing titles skipped, last [`USER_HISTORY_MAX_CHARS`] characters.
pub fn user_history(seq: &[u32], text: &ItemText, title_column: usize) -> String {
    let mut hist = String::new();
    for &item in train_part(seq) {
        if let Some(title) = text.field(item, title_column) {
            hist.push_str(title);
            hist.push_str(", ");
        }
    }
    let n = hist.chars().count();
    if n > USER_HISTORY_MAX_CHARS {
        hist = hist.chars().skip(n - USER_HISTORY_MAX_CHARS).collect();
    }
    hist
}

/// User prompts (`out[0]` is user 1) from the titles in `title_column`.
pub fn user_prompts(
    template: &Template,
    sequences: &[Vec<u32>],
    text: &ItemText,
    title_column: &str,
    key: &str,
) -> Result<Vec<String>> {
    check_user_template(template, key)?;
    let Some(col) = text.column(title_column) else {
        bail!(
            "user prompts need column `{title_column}` of {} (columns: {}); set \
             `user_history_column` to one of them",
            text.path.display(),
            text.columns.join(", ")
        );
    };
    Ok(sequences
        .iter()
        .map(|seq| {
            let hist = user_history(seq, text, col);
            template.render(|_| hist.as_str())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> ItemText {
        ItemText {
            path: "item_text.tsv".into(),
            columns: vec!["asin".into(), "title".into()],
            rows: vec![
                None,
                Some(vec!["A1".into(), "Red".into()]),
                Some(vec!["A2".into(), "".into()]),
                Some(vec!["A3".into(), "Blue".into()]),
                None,
                Some(vec!["A5".into(), "Green".into()]),
            ],
        }
    }

    #[test]
    fn templates() {
        let t = Template::parse("a {title} {{x}} {asin}", "k").unwrap();
        assert_eq!(t.fields(), vec!["title", "asin"]);
        let p = item_prompts(&t, &text(), 5, "k").unwrap();
        assert_eq!(p[0], "a Red {x} A1");
        assert_eq!(p[1], "a unknown {x} A2");
        assert_eq!(p[3], "a unknown {x} unknown");
        let bad = Template::parse("{brand}", "item_template").unwrap();
        let e = item_prompts(&bad, &text(), 5, "item_template").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("brand") && msg.contains("asin, title"),
            "{msg}"
        );
        assert!(Template::parse("a {title", "k").is_err());
        assert!(Template::parse("a }", "k").is_err());
    }

    #[test]
    fn user_history_uses_training_part_only() {
        let t = Template::parse(DEFAULT_USER_TEMPLATE, "k").unwrap();
        // train = [1, 2, 3]; validation 5, test 1.
        let p = user_prompts(&t, &[vec![1, 2, 3, 5, 1]], &text(), "title", "k").unwrap();
        assert_eq!(
            p[0],
            "The user has visited following items: \nRed, Blue,  \nplease conclude the user's \
             perference."
        );
        assert!(!p[0].contains("Green"));
        let long = ItemText {
            path: "x".into(),
            columns: vec!["title".into()],
            rows: vec![
                None,
                Some(vec!["x".repeat(5000)]),
                Some(vec!["y".repeat(5000)]),
            ],
        };
        let h = user_history(&[1, 2, 1, 2], &long, 0);
        assert_eq!(h.chars().count(), USER_HISTORY_MAX_CHARS);
        assert!(h.ends_with("y, "));
    }
}
