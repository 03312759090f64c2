//! Progress bars for long work: rank 0 only, and only on a terminal. The bar
//! itself is `llm_esr_prep::fsutil::progress_bar` (the one `embed`'s encoder
//! shows); this adds the rank gate and the loss as its message.

use llm_esr_prep::fsutil::{progress_bar, ProgressBar};

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar of `len` steps labelled `label`, shown when `show` (rank 0) and
    /// stderr is a terminal.
    pub fn new(show: bool, len: u64, label: &str) -> Self {
        let bar = show
            .then(|| progress_bar(len, label))
            .filter(|bar| !bar.is_hidden());
        Progress { bar }
    }

    /// One step done, with its loss.
    pub fn inc(&self, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
