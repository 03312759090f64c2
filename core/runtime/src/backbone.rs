//! Backbones: the sequence encoder f_theta shared by both views.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::objective::TrainingObjective;
use crate::ForwardCtx;

/// What the host tells a backbone when building it.
#[derive(Debug, Clone)]
pub struct BackboneSpec {
    /// Hidden size d of the item representations it encodes.
    pub hidden: usize,
    /// The longest input sequence. Batches are left padded to their own
    /// longest sequence (or to `max_len` with `data.pad_to_max_len`), so a
    /// backbone numbers positions from the first item, as the built-in ones
    /// do (a cumulative sum of the mask), or from the last one, never from
    /// the padded edge: then a batch encodes exactly as if padded to `max_len`.
    pub max_len: usize,
    /// Dropout probability for the backbone's own layers.
    pub dropout: f32,
    /// The backbone's own section of the config (`model.encoder`), free-form.
    pub config: serde_json::Value,
}

/// A built encoder, in two stages so that LLM-ESR can fuse the two views
/// between them (as the official code does): `embed` is the input layer
/// applied to each view's item sequence (e.g. scaling, positions, dropout),
/// `encode_embedded` the sequence encoder. All tensors are left padded: `mask`
/// (b, l) is f32 with 1 at items and 0 at padding. Implementations take the
/// device from their inputs.
pub trait Backbone: Send + Sync {
    /// The input layer over item embeddings (b, l, d). Default: identity.
    fn embed(&self, items: &Tensor, _mask: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        Ok(items.clone())
    }

    /// Encodes embedded inputs (b, l, d) into (b, l, d); rows at padding
    /// positions are zero.
    fn encode_embedded(&self, x: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor>;

    /// `embed` then `encode_embedded`. The orchestrator calls the two stages
    /// itself (it fuses views between them), so overriding this has no effect
    /// on training.
    fn encode(&self, items: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let x = self.embed(items, mask, ctx)?;
        self.encode_embedded(&x, mask, ctx)
    }

    /// How the backbone is trained: which inputs and targets the host builds
    /// from a user's sequence, and the input at inference. The built-in
    /// [`NextItem`](crate::objective::NextItem) and
    /// [`Cloze`](crate::objective::Cloze) cover SASRec, GRU4Rec and BERT4Rec.
    fn objective(&self) -> Box<dyn TrainingObjective>;
}

/// The factory a backbone plugin exports.
pub trait BackbonePlugin: Send + Sync {
    /// Builds the encoder; every weight is created through `vb`.
    fn build(&self, vb: VarBuilder, spec: &BackboneSpec) -> Result<Box<dyn Backbone>>;
}

impl BackboneSpec {
    /// The config key of a backbone's own section.
    pub const SECTION: &'static str = "model.encoder";
}

/// The factory of a backbone that is a `Config` and a `load`: parses
/// [`BackboneSpec::config`] into `C` (errors name `model.encoder`), then calls
/// `load`. `export_plugin!(backbone, "name", load = Model::load)` exports one.
pub struct BackboneFactory<C, B> {
    load: fn(VarBuilder, &BackboneSpec, C) -> Result<B>,
}

impl<C, B> BackboneFactory<C, B> {
    pub const fn new(load: fn(VarBuilder, &BackboneSpec, C) -> Result<B>) -> Self {
        BackboneFactory { load }
    }
}

impl<C, B> BackbonePlugin for BackboneFactory<C, B>
where
    C: serde::de::DeserializeOwned,
    B: Backbone + 'static,
{
    fn build(&self, vb: VarBuilder, spec: &BackboneSpec) -> Result<Box<dyn Backbone>> {
        let cfg = crate::parse_plugin_config(BackboneSpec::SECTION, &spec.config)?;
        Ok(Box::new((self.load)(vb, spec, cfg)?))
    }
}

/// Checks a backbone's inputs: `items` (b, l, `hidden`) with l <= `max_len`
/// and `mask` (b, l). Returns (b, l, d); errors name the plugin.
pub fn check_input(
    plugin: &str,
    items: &Tensor,
    mask: &Tensor,
    hidden: usize,
    max_len: usize,
) -> Result<(usize, usize, usize)> {
    let (b, l, d) = items.dims3()?;
    if d != hidden {
        candle_core::bail!("{plugin}: input width {d}, expected {hidden}");
    }
    if l > max_len {
        candle_core::bail!("{plugin}: sequence length {l} exceeds max_len {max_len}");
    }
    if mask.dims() != [b, l] {
        candle_core::bail!(
            "{plugin}: mask has shape {:?}, expected ({b}, {l})",
            mask.dims()
        );
    }
    Ok((b, l, d))
}
