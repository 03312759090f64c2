//! The pre-LN transformer encoder of the official SASRec / BERT4Rec code, with
//! the attention masking made switchable. Shared by the backbone plugins that
//! need it, so that each of them stays a thin input-processing layer.
//!
//! Block: `Q = LN(x)`, `x = Q + MHA(Q, x, x)`, `x = LN(x)`, `x = FFN(x) + x`
//! (FFN = Linear, dropout, ReLU, Linear, dropout); padding rows are zeroed after
//! each block; a final LayerNorm closes the stack.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use crate::ops::{self, LayerNorm};
use crate::params::xavier_normal;
use crate::ForwardCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attention {
    /// Query i sees keys 0..=i (the correct next-item encoder).
    Causal,
    /// Every query sees every key.
    Bidirectional,
}

/// Shape and masking of an encoder stack.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub dropout: f32,
    pub attention: Attention,
    pub key_padding_mask: bool,
    pub layer_norm_eps: f64,
}

/// torch-style multi-head attention (packed in-projection, out-projection).
pub struct MultiHeadAttention {
    in_proj: ops::Linear,
    out_proj: ops::Linear,
    heads: usize,
    hidden: usize,
    dropout: f32,
}

impl MultiHeadAttention {
    pub fn load(vb: VarBuilder, hidden: usize, heads: usize, dropout: f32) -> Result<Self> {
        let w = vb.get_with_hints(
            (3 * hidden, hidden),
            "in_proj.weight",
            xavier_normal(3 * hidden, hidden),
        )?;
        let b = vb.get_with_hints(3 * hidden, "in_proj.bias", Init::Const(0.0))?;
        Ok(MultiHeadAttention {
            in_proj: ops::Linear::new(w, Some(b)),
            out_proj: ops::linear_xavier(vb.pp("out_proj"), hidden, hidden, true)?,
            heads,
            hidden,
            dropout,
        })
    }

    /// `query` and `kv` are (b, l, d).
    pub fn forward(
        &self,
        query: &Tensor,
        kv: &Tensor,
        mask: ops::AttentionMask,
        ctx: &mut ForwardCtx,
    ) -> Result<Tensor> {
        let dh = query.dim(2)? / self.heads;
        let w = self.in_proj.weight();
        let bias_in = self.in_proj.bias().expect("in_proj has a bias");
        let project = |x: &Tensor, i: usize| -> Result<Tensor> {
            let wi = w.narrow(0, i * self.hidden, self.hidden)?;
            let bi = bias_in.narrow(0, i * self.hidden, self.hidden)?;
            ops::bias_add(&ops::matmul_t(x, &wi)?, &bi)
        };
        let q = project(query, 0)?;
        let k = project(kv, 1)?;
        let v = project(kv, 2)?;
        // Scale, mask, softmax, dropout and the weighted sum in one kernel.
        let scale = 1.0 / (dh as f64).sqrt();
        let out = ops::attention(&q, &k, &v, self.heads, scale, mask, self.dropout, ctx)?;
        self.out_proj.forward(&out)
    }
}

pub struct FeedForward {
    fc1: ops::Linear,
    fc2: ops::Linear,
    dropout: f32,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, hidden: usize, dropout: f32) -> Result<Self> {
        // torch's Conv1d(k=1) biases start uniform in +-1/sqrt(fan_in).
        let layer = |name: &str| ops::linear_torch_bias(vb.pp(name), hidden, hidden);
        Ok(FeedForward {
            fc1: layer("fc1")?,
            fc2: layer("fc2")?,
            dropout,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let h = ops::dropout_relu(&self.fc1.forward(x)?, self.dropout, ctx)?;
        let h = ops::dropout(&self.fc2.forward(&h)?, self.dropout, ctx)?;
        h + x
    }
}

struct Block {
    attn_norm: LayerNorm,
    attn: MultiHeadAttention,
    ffn_norm: LayerNorm,
    ffn: FeedForward,
}

/// A stack of blocks plus the final LayerNorm.
pub struct TransformerEncoder {
    blocks: Vec<Block>,
    last_norm: LayerNorm,
    cfg: EncoderConfig,
}

impl TransformerEncoder {
    pub fn load(vb: VarBuilder, cfg: EncoderConfig) -> Result<Self> {
        let d = cfg.hidden;
        if d.checked_rem(cfg.heads) != Some(0) {
            candle_core::bail!(
                "hidden size {d} is not divisible by {} attention heads",
                cfg.heads
            );
        }
        let eps = cfg.layer_norm_eps;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let vb = vb.pp(format!("blocks.{i}"));
            blocks.push(Block {
                attn_norm: LayerNorm::load(vb.pp("attn_norm"), d, eps)?,
                attn: MultiHeadAttention::load(vb.pp("attn"), d, cfg.heads, cfg.dropout)?,
                ffn_norm: LayerNorm::load(vb.pp("ffn_norm"), d, eps)?,
                ffn: FeedForward::load(vb.pp("ffn"), d, cfg.dropout)?,
            });
        }
        Ok(TransformerEncoder {
            blocks,
            last_norm: LayerNorm::load(vb.pp("last_norm"), d, eps)?,
            cfg,
        })
    }

    /// `x` (b, l, d) already embedded; `mask` (b, l) 1 at items, 0 at padding.
    pub fn forward(&self, x: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let attention = ops::AttentionMask {
            causal: self.cfg.attention == Attention::Causal,
            keys: self.cfg.key_padding_mask.then_some(mask),
            // Padding rows are zeroed after each block: skip them.
            queries: Some(mask),
        };
        let mut x = ops::mask_rows(x, mask)?;
        for block in &self.blocks {
            let q = block.attn_norm.forward(&x)?;
            let a = block.attn.forward(&q, &x, attention, ctx)?;
            x = block.ffn_norm.forward(&(q + a)?)?;
            x = ops::mask_rows(&block.ffn.forward(&x, ctx)?, mask)?;
        }
        ops::mask_rows(&self.last_norm.forward(&x)?, mask)
    }
}
