//! The shared runtime of llm-esr-orch: the one copy of candle in the process and
//! the small API that plugins compile against.
//!
//! candle's autograd keys gradients by a process-global tensor id. A plugin that
//! linked its own copy of candle would restart that counter and silently mix up
//! gradients, so this crate is built as a Rust `dylib`, re-exports candle, and is
//! the only crate of the workspace that depends on candle. The host binary and
//! every plugin (`cdylib`) link it dynamically (`-C prefer-dynamic`).
//!
//! What lives here: the plugin traits ([`backbone`], [`fusion`], [`retrieval`])
//! with the generic factories that `export_plugin!` builds, the training
//! objectives backbones return and the built-in ones ([`objective`]), the ABI
//! declaration that the host checks before trusting a plugin ([`abi`]),
//! a seeded random number generator ([`rng`]), a seeded parameter store
//! ([`params`]) and differentiable building blocks ([`ops`]). What does not: data
//! handling, training, evaluation, distribution; those belong to the orchestrator.

pub use candle_core as candle;
pub use candle_nn;
pub use candle_transformers;
pub use serde;
pub use serde_json;

pub mod abi;
pub mod backbone;
pub mod fusion;
pub mod objective;
pub mod ops;
pub mod params;
pub mod retrieval;
pub mod rng;
pub mod testing;
pub mod transformer;

pub use abi::{Plugin, PluginDeclaration, PluginKind};
pub use backbone::{Backbone, BackboneFactory, BackbonePlugin, BackboneSpec};
pub use fusion::{Fusion, FusionFactory, FusionPlugin, FusionSpec};
pub use objective::{Cloze, Example, ExampleCtx, NextItem, Target, TrainingObjective};
pub use retrieval::{Retrieval, RetrievalFactory, RetrievalPlugin, RetrievalSpec};
pub use rng::Rng;

/// Everything a forward pass needs besides its inputs: the mode and the seeded
/// randomness for dropout.
pub struct ForwardCtx<'a> {
    /// Training mode: dropout active.
    pub train: bool,
    /// The only source of randomness a plugin may use.
    pub rng: &'a mut Rng,
    /// A key per batch row (the host passes each sample's global id). Dropout
    /// draws a row's mask from its key, the call and indices counted from the
    /// end of each dimension (for left-padded sequences: positions counted
    /// from the last item), so a sample gets the same mask in whichever batch,
    /// rank shard or padded length it lands. `None`: the row index is the key.
    pub rows: Option<&'a [u64]>,
}

impl<'a> ForwardCtx<'a> {
    pub fn new(train: bool, rng: &'a mut Rng) -> Self {
        ForwardCtx {
            train,
            rng,
            rows: None,
        }
    }

    /// The same context with one key per batch row.
    pub fn with_rows(self, rows: &'a [u64]) -> Self {
        ForwardCtx {
            rows: Some(rows),
            ..self
        }
    }
}

/// Parses a plugin's free-form configuration section, naming the section in the
/// error so that a user knows which key of the config to fix.
pub fn parse_plugin_config<T: serde::de::DeserializeOwned>(
    section: &str,
    value: &serde_json::Value,
) -> candle::Result<T> {
    let value = if value.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        value.clone()
    };
    serde_json::from_value(value)
        .map_err(|e| candle::Error::Msg(format!("config key `{section}`: {e}")))
}
