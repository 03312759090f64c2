//! Retrieval: the similar users that teach a user in self-distillation.

use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct RetrievalSpec {
    /// Precomputed neighbours, (num_users, k_stored) u32 of 0-based user
    /// indices, best first, never the user itself.
    pub neighbours: Tensor,
    /// The retrieval's own section of the config (`model.retrieval_config`).
    pub config: serde_json::Value,
}

pub trait Retrieval: Send + Sync {
    /// The teachers of each user (0-based indices), best first.
    fn teachers(&self, users: &[u32]) -> Result<Vec<Vec<u32>>>;

    /// The distillation loss between the students' representations (b, h) and
    /// their teachers' aggregated representations (b, h).
    fn distill_loss(&self, student: &Tensor, teacher: &Tensor) -> Result<Tensor>;
}

pub trait RetrievalPlugin: Send + Sync {
    fn build(&self, spec: &RetrievalSpec) -> Result<Box<dyn Retrieval>>;
}

impl RetrievalSpec {
    /// The config key of a retrieval's own section.
    pub const SECTION: &'static str = "model.retrieval_config";
}

/// The factory of a retrieval that is a `Config` and a `load` (see
/// [`crate::backbone::BackboneFactory`]; a retrieval has no parameters, so
/// no `VarBuilder`); errors name `model.retrieval_config`.
pub struct RetrievalFactory<C, R> {
    load: fn(&RetrievalSpec, C) -> Result<R>,
}

impl<C, R> RetrievalFactory<C, R> {
    pub const fn new(load: fn(&RetrievalSpec, C) -> Result<R>) -> Self {
        RetrievalFactory { load }
    }
}

impl<C, R> RetrievalPlugin for RetrievalFactory<C, R>
where
    C: serde::de::DeserializeOwned,
    R: Retrieval + 'static,
{
    fn build(&self, spec: &RetrievalSpec) -> Result<Box<dyn Retrieval>> {
        let cfg = crate::parse_plugin_config(RetrievalSpec::SECTION, &spec.config)?;
        Ok(Box::new((self.load)(spec, cfg)?))
    }
}
