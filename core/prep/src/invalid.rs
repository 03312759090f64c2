//! Errors in the user's configuration found by this crate (a value out of
//! range, a template naming a missing column, more neighbours than users).
//! The orchestrator exits with status 2 for them, as for its own
//! configuration errors; everything else (unreadable or inconsistent files) is
//! an ordinary error.

/// A configuration error: the message names the config key and the fix.
#[derive(Debug)]
pub struct InvalidConfig(pub String);

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidConfig {}

/// An [`InvalidConfig`] error.
pub fn invalid_config(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InvalidConfig(msg.into()))
}

/// Whether `e` (or an error it wraps) is an [`InvalidConfig`].
pub fn is_invalid_config(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<InvalidConfig>().is_some())
}
