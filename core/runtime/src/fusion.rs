//! Fusion: how the semantic and the collaborative views are combined.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::ForwardCtx;

#[derive(Debug, Clone)]
pub struct FusionSpec {
    pub hidden: usize,
    pub dropout: f32,
    /// The fusion's own section of the config (`model.fusion_config`).
    pub config: serde_json::Value,
}

pub trait Fusion: Send + Sync {
    /// Sequence-level fusion of the collaborative `co` and semantic `se` item
    /// sequences (b, l, d) under the 0/1 `mask` (b, l). Returns (co', se').
    fn fuse_sequences(
        &self,
        co: &Tensor,
        se: &Tensor,
        mask: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<(Tensor, Tensor)>;

    /// Logit-level fusion: the user states from the two views' encoder outputs
    /// (any leading shape, e.g. (b, l, d)), and the item vectors from the two
    /// item tables (n, d) each, so that score = <user, item>.
    fn user_vector(&self, u_co: &Tensor, u_se: &Tensor) -> Result<Tensor>;
    fn item_vector(&self, e_co: &Tensor, e_se: &Tensor) -> Result<Tensor>;
}

pub trait FusionPlugin: Send + Sync {
    fn build(&self, vb: VarBuilder, spec: &FusionSpec) -> Result<Box<dyn Fusion>>;
}

impl FusionSpec {
    /// The config key of a fusion's own section.
    pub const SECTION: &'static str = "model.fusion_config";
}

/// The factory of a fusion that is a `Config` and a `load` (see
/// [`crate::backbone::BackboneFactory`]); errors name `model.fusion_config`.
pub struct FusionFactory<C, F> {
    load: fn(VarBuilder, &FusionSpec, C) -> Result<F>,
}

impl<C, F> FusionFactory<C, F> {
    pub const fn new(load: fn(VarBuilder, &FusionSpec, C) -> Result<F>) -> Self {
        FusionFactory { load }
    }
}

impl<C, F> FusionPlugin for FusionFactory<C, F>
where
    C: serde::de::DeserializeOwned,
    F: Fusion + 'static,
{
    fn build(&self, vb: VarBuilder, spec: &FusionSpec) -> Result<Box<dyn Fusion>> {
        let cfg = crate::parse_plugin_config(FusionSpec::SECTION, &spec.config)?;
        Ok(Box::new((self.load)(vb, spec, cfg)?))
    }
}
