//! The one error type of this crate.

use std::fmt;

/// What went wrong, for callers that want to react differently (most just print
/// the error: its message says what to do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommErrorKind {
    /// The launcher started N ranks but the MPI library reports another world
    /// size: the binary is linked against a different MPI than the launcher's.
    LaunchMismatch,
    /// MPI was already initialised (or finalised) in this process.
    AlreadyInitialized,
    /// A backend was asked for that this build or this process cannot provide.
    Unavailable,
    /// A bad argument (root out of range, unknown backend name, ...).
    InvalidArgument,
    /// CUDA or NCCL reported an error (only with the `nccl` feature).
    Device,
    /// Some other rank failed during a collective set-up step.
    RemoteFailure,
}

/// An error from initialising or using a [`Communicator`](crate::Communicator).
///
/// The message is meant to be shown to a person as is: it names the numbers and
/// variables involved and says what to change.
#[derive(Debug, Clone)]
pub struct CommError {
    kind: CommErrorKind,
    message: String,
}

impl CommError {
    /// An error of `kind` with a message for people.
    pub fn new(kind: CommErrorKind, message: impl Into<String>) -> Self {
        CommError {
            kind,
            message: message.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> CommErrorKind {
        self.kind
    }

    /// The message (the same text that `Display` prints).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(CommErrorKind::InvalidArgument, message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(CommErrorKind::Unavailable, message)
    }
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommError {}

/// Checks `root` against the world size before a rooted collective, so that a
/// bad root is an error on every rank instead of an MPI abort.
pub(crate) fn check_root(root: usize, size: usize) -> Result<(), CommError> {
    if root < size {
        Ok(())
    } else {
        Err(CommError::invalid(format!(
            "broadcast root {root} is out of range: the communicator has {size} rank(s) (0..{size})"
        )))
    }
}
