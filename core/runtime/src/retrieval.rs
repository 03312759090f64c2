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
