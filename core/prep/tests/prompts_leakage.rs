//! User prompts are built from training items only (no validation or test
//! title), on beauty5_tiny.

mod common;

use llm_esr_prep::dataset::Dataset;
use llm_esr_prep::prompts::{
    user_prompts, Template, DEFAULT_USER_TEMPLATE, USER_HISTORY_MAX_CHARS,
};

#[test]
fn user_prompts_contain_no_validation_or_test_title() {
    let data = Dataset::load(&common::dataset("beauty5_tiny")).unwrap();
    let text = data
        .item_text
        .as_ref()
        .expect("beauty5_tiny has item_text.tsv");
    let title = text.column("title").unwrap();
    let tpl = Template::parse(DEFAULT_USER_TEMPLATE, "user_template").unwrap();
    let prompts = user_prompts(&tpl, &data.sequences, text, "title", "user_template").unwrap();
    assert_eq!(prompts.len(), 400);
    let mut checked = 0;
    for (u, seq) in data.sequences.iter().enumerate() {
        assert!(seq.len() >= 3);
        let train = &seq[..seq.len() - 2];
        // Independent construction of the expected history.
        let mut hist = String::new();
        for &i in train {
            if let Some(t) = text.field(i, title) {
                hist.push_str(t);
                hist.push_str(", ");
            }
        }
        let n = hist.chars().count();
        if n > USER_HISTORY_MAX_CHARS {
            hist = hist.chars().skip(n - USER_HISTORY_MAX_CHARS).collect();
        }
        assert_eq!(
            prompts[u],
            DEFAULT_USER_TEMPLATE.replace("{history}", &hist),
            "user {}",
            u + 1
        );
        // No title of the validation / test item, unless it is also (a substring
        // of) a training title.
        let train_titles: Vec<&str> = train.iter().filter_map(|&i| text.field(i, title)).collect();
        for &held_out in &seq[seq.len() - 2..] {
            let Some(t) = text.field(held_out, title) else {
                continue;
            };
            if train_titles.iter().any(|tt| tt.contains(t)) {
                continue;
            }
            assert!(
                !prompts[u].contains(t),
                "user {} prompt leaks held-out title `{t}`",
                u + 1
            );
            checked += 1;
        }
    }
    assert!(checked > 600, "too few held-out titles checked: {checked}");
}
