//! SASRec (Kang & McAuley, 2018) as an llm-esr-orch backbone plugin, written to
//! match the encoder of the official LLM-ESR code: inputs scaled by sqrt(d), plus
//! a learned positional embedding, then dropout, then the pre-LN transformer
//! stack of [`llm_esr_runtime::transformer`] (eps 1e-8, Xavier-normal weights).
//!
//! The official code applies no causal mask and no key padding mask. Here both
//! are switches (`attention: causal | bidirectional`, `key_padding_mask`); the
//! default is the correct causal, masked encoder.
//!
//! Positions count from the left as in the official code: the first item of a
//! sequence has position 1 (row 0 of the table), whatever the padding, so a
//! batch padded to its own longest sequence encodes exactly like one padded to
//! `max_len`. The table is Xavier-normal with the official (max_len + 100, d)
//! fan.

use llm_esr_runtime::backbone::check_input;
use llm_esr_runtime::candle::{Result, Tensor};
use llm_esr_runtime::candle_nn::{Init, VarBuilder};
use llm_esr_runtime::ops;
use llm_esr_runtime::serde::Deserialize;
use llm_esr_runtime::transformer::{Attention, EncoderConfig, TransformerEncoder};
use llm_esr_runtime::{
    export_plugin, Backbone, BackboneSpec, ForwardCtx, NextItem, TrainingObjective,
};

/// `model.encoder` for SASRec.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", deny_unknown_fields, default)]
pub struct Config {
    pub layers: usize,
    pub heads: usize,
    pub attention: Attention,
    pub key_padding_mask: bool,
    pub layer_norm_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layers: 2,
            heads: 1,
            attention: Attention::Causal,
            key_padding_mask: true,
            layer_norm_eps: 1e-8,
        }
    }
}

pub struct SasRec {
    pos_emb: Tensor,
    encoder: TransformerEncoder,
    hidden: usize,
    max_len: usize,
    dropout: f32,
}

impl SasRec {
    pub fn load(vb: VarBuilder, spec: &BackboneSpec, cfg: Config) -> Result<Self> {
        let d = spec.hidden;
        let std = (2.0 / (spec.max_len + 100 + d) as f64).sqrt();
        let pos_emb = vb.get_with_hints(
            (spec.max_len, d),
            "pos_emb",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let encoder = TransformerEncoder::load(
            vb.pp("encoder"),
            EncoderConfig {
                hidden: d,
                layers: cfg.layers,
                heads: cfg.heads,
                dropout: spec.dropout,
                attention: cfg.attention,
                key_padding_mask: cfg.key_padding_mask,
                layer_norm_eps: cfg.layer_norm_eps,
            },
        )
        .map_err(|e| {
            llm_esr_runtime::candle::Error::Msg(format!("config key `model.encoder`: {e}"))
        })?;
        Ok(SasRec {
            pos_emb,
            encoder,
            hidden: d,
            max_len: spec.max_len,
            dropout: spec.dropout,
        })
    }
}

impl Backbone for SasRec {
    fn embed(&self, items: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (_, _, d) = check_input("sasrec", items, mask, self.hidden, self.max_len)?;
        let x = ((items * (d as f64).sqrt())? + ops::left_positions(&self.pos_emb, mask)?)?;
        ops::dropout(&x, self.dropout, ctx)
    }

    fn encode_embedded(&self, x: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.encoder.forward(x, mask, ctx)
    }

    /// Next item at every position (the encoder is causal by default).
    fn objective(&self) -> Box<dyn TrainingObjective> {
        Box::new(NextItem::all_positions())
    }
}

export_plugin!(backbone, "sasrec", load = SasRec::load);
