//! Fusion: how the semantic and the collaborative views are combined.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::ForwardCtx;

/// What the host tells a fusion when building it.
#[derive(Debug, Clone)]
pub struct FusionSpec {
    /// Hidden size d of each view.
    pub hidden: usize,
    pub dropout: f32,
    /// Sequence-level fusion on (default) or off: `model.cross_attention:
    /// false`, the "w/o CA" ablation. Off, `fuse_sequences` must return the
    /// views unchanged (and need create no weights); the logit-level fusion
    /// stays.
    pub cross_attention: bool,
    /// The fusion's own section of the config (`model.fusion_config`).
    pub config: serde_json::Value,
}

/// Both levels of LLM-ESR's fusion. The host calls `fuse_sequences` between
/// the backbone's `embed` and `encode_embedded`, `user_vector` on the two
/// encoder outputs, and `item_vector` on the two item tables; a score is
/// `<user_vector, item_vector>`, so both must have the same width.
pub trait Fusion: Send + Sync {
    /// Sequence-level fusion of the collaborative `co` and semantic `se` item
    /// sequences (b, l, d), each after the backbone's `embed`, under the 0/1
    /// `mask` (b, l), left padded. Returns (co', se'), (b, l, d) each.
    fn fuse_sequences(
        &self,
        co: &Tensor,
        se: &Tensor,
        mask: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<(Tensor, Tensor)>;

    /// Logit-level fusion of the user states: the two views' encoder outputs
    /// at every position, (b, l, d) each (the host takes the last position
    /// afterwards), to (b, l, h). Work on the last dimension.
    fn user_vector(&self, u_co: &Tensor, u_se: &Tensor) -> Result<Tensor>;

    /// Logit-level fusion of the item tables, (rows, d) each, to (rows, h).
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
