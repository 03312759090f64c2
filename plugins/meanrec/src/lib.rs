//! MeanRec, a minimal llm-esr-orch backbone: position i is the mean of the
//! embedded items 1..=i (so it never sees later items), followed by a Linear
//! layer and a LayerNorm. Dropout on the inputs.

use llm_esr_runtime::candle::{Module, Result, Tensor, D};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::ops::{self, LayerNorm};
use llm_esr_runtime::serde::Deserialize;
use llm_esr_runtime::{
    export_plugin, Backbone, BackboneSpec, ForwardCtx, NextItem, TrainingObjective,
};

/// `model.encoder` for MeanRec.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", deny_unknown_fields, default)]
pub struct Config {
    pub layer_norm_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layer_norm_eps: 1e-8,
        }
    }
}

pub struct MeanRec {
    proj: ops::Linear,
    norm: LayerNorm,
    hidden: usize,
    dropout: f32,
}

impl MeanRec {
    pub fn load(vb: VarBuilder, spec: &BackboneSpec, cfg: Config) -> Result<Self> {
        let d = spec.hidden;
        Ok(MeanRec {
            // Xavier-normal weight, zero bias, drawn from the run's seed.
            proj: ops::linear_xavier(vb.pp("proj"), d, d, true)?,
            // Differentiable LayerNorm (weight 1, bias 0).
            norm: LayerNorm::load(vb.pp("norm"), d, cfg.layer_norm_eps)?,
            hidden: d,
            dropout: spec.dropout,
        })
    }
}

impl Backbone for MeanRec {
    fn embed(&self, items: &Tensor, _mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        // The mask comes from ctx.rng: seeded, reproducible.
        ops::dropout(items, self.dropout, ctx)
    }

    fn encode_embedded(&self, x: &Tensor, mask: &Tensor, _ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (_, _, d) = x.dims3()?;
        if d != self.hidden {
            llm_esr_runtime::candle::bail!("meanrec: input width {d}, expected {}", self.hidden);
        }
        let keep = mask.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?; // (b, l, 1)
        let sums = x.broadcast_mul(&keep)?.cumsum(1)?; // (b, l, d)
        let counts = keep.cumsum(1)?.maximum(1.0)?; // items so far, at least 1
        let mean = sums.broadcast_div(&counts)?;
        let h = self.norm.forward(&self.proj.forward(&mean)?)?;
        h.broadcast_mul(&keep) // zero rows at padding
    }

    fn objective(&self) -> Box<dyn TrainingObjective> {
        // Next item at every position, built into the runtime.
        Box::new(NextItem::all_positions())
    }
}

// The factory, `create` and the declaration: parses `model.encoder` into
// `Config` and calls `MeanRec::load`.
export_plugin!(backbone, "meanrec", load = MeanRec::load);

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::Device;
    use llm_esr_runtime::params::{params_without_gradient, ParamStore};
    use llm_esr_runtime::{testing, BackboneFactory, BackbonePlugin, Rng};

    fn build(store: &ParamStore) -> Result<Box<dyn Backbone>> {
        let spec = BackboneSpec {
            hidden: 8,
            max_len: 9,
            dropout: 0.1,
            config: llm_esr_runtime::serde_json::Value::Null, // = all defaults
        };
        BackboneFactory::new(MeanRec::load).build(store.var_builder(&Device::Cpu), &spec)
    }

    #[test]
    fn every_parameter_gets_a_gradient() -> Result<()> {
        let store = ParamStore::new(7);
        let model = build(&store)?;
        // Three left-padded sequences of lengths 3, 5 and 1, width 8.
        let (items, mask) = testing::left_padded(&[3, 5, 1], 5, 8, 0.0, 1)?;
        let mut rng = Rng::new(1);
        let out = model.encode(&items, &mask, &mut ForwardCtx::new(true, &mut rng))?;
        let grads = out.sqr()?.sum_all()?.backward()?;
        assert_eq!(
            params_without_gradient(&store.vars(), &grads)?,
            Vec::<String>::new()
        );
        Ok(())
    }

    #[test]
    fn extra_left_padding_changes_nothing() -> Result<()> {
        let model = build(&ParamStore::new(7))?;
        let (items, mask) = testing::left_padded(&[3, 5, 1], 5, 8, 0.0, 1)?;
        let (wider, wider_mask) = testing::pad_left(&items, &mask, 4)?;
        let mut rng = Rng::new(0);
        let a = model.encode(&items, &mask, &mut ForwardCtx::new(false, &mut rng))?;
        let b = model.encode(&wider, &wider_mask, &mut ForwardCtx::new(false, &mut rng))?;
        assert!(testing::max_abs_diff(&a, &b.narrow(1, 4, 5)?)? < 1e-5);
        Ok(())
    }
}
