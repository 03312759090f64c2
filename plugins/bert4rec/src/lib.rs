//! BERT4Rec (Sun et al., 2019) as an llm-esr-orch backbone plugin, written to
//! match the encoder of the official LLM-ESR code (`models/Bert4Rec.py`): inputs
//! scaled by sqrt(d), plus a learned positional embedding, then dropout, then the
//! pre-LN transformer stack of [`llm_esr_runtime::transformer`] (eps 1e-8,
//! Xavier-normal weights) attending in both directions. Its objective is the
//! cloze task ([`Cloze`], built into the runtime): items are replaced by the
//! mask token with probability `mask_prob` and the loss is computed at the
//! masked positions; this crate only encodes.
//!
//! Differences from the official code, all switchable:
//! - the official encoder applies no key padding mask (padding keys take part in
//!   attention); here `key_padding_mask` defaults to `true`, so that the result
//!   does not depend on how much padding a batch carries. `false` is official.
//! - positions count from the left by default, as in the official code and the
//!   `sasrec` plugin (the first item of a sequence gets position 1, the last one
//!   position len); `positions: right` numbers them from the last item instead.
//!   Both are independent of the padding.
//!
//! The positional table is initialised like the official one: Xavier-normal over
//! a torch table of `max_len + 100` rows (std sqrt(2 / (max_len + 100 + d))); it
//! stores the `max_len` rows that can be reached.

use llm_esr_runtime::backbone::check_input;
use llm_esr_runtime::candle::{DType, Result, Tensor};
use llm_esr_runtime::candle_nn::{Init, VarBuilder};
use llm_esr_runtime::ops;
use llm_esr_runtime::serde::Deserialize;
use llm_esr_runtime::transformer::{Attention, EncoderConfig, TransformerEncoder};
use llm_esr_runtime::{
    export_plugin, Backbone, BackboneSpec, Cloze, ForwardCtx, TrainingObjective,
};

/// How positions are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", rename_all = "lowercase")]
pub enum Positions {
    /// The last item gets row `max_len - 1`, the one before it `max_len - 2`, ...
    Right,
    /// The first item gets row 0, the second row 1, ... (official numbering).
    Left,
}

/// `model.encoder` for BERT4Rec.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", deny_unknown_fields, default)]
pub struct Config {
    pub layers: usize,
    pub heads: usize,
    pub key_padding_mask: bool,
    pub layer_norm_eps: f64,
    /// Probability with which the host masks each training item (official 0.6
    /// in the LLM-ESR scripts).
    pub mask_prob: f32,
    pub positions: Positions,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layers: 2,
            heads: 1,
            key_padding_mask: true,
            layer_norm_eps: 1e-8,
            mask_prob: 0.6,
            positions: Positions::Left,
        }
    }
}

pub struct Bert4Rec {
    pos_emb: Tensor,
    encoder: TransformerEncoder,
    hidden: usize,
    max_len: usize,
    dropout: f32,
    mask_prob: f32,
    positions: Positions,
}

fn config_error(e: impl std::fmt::Display) -> llm_esr_runtime::candle::Error {
    llm_esr_runtime::candle::Error::Msg(format!("config key `model.encoder`: {e}"))
}

impl Bert4Rec {
    pub fn load(vb: VarBuilder, spec: &BackboneSpec, cfg: Config) -> Result<Self> {
        let d = spec.hidden;
        if !(cfg.mask_prob > 0.0 && cfg.mask_prob <= 1.0) {
            return Err(config_error(format!(
                "mask_prob must lie in (0, 1], got {}",
                cfg.mask_prob
            )));
        }
        if spec.max_len == 0 {
            return Err(config_error("max_len must be positive"));
        }
        // torch's xavier_normal_ on the official (max_len + 100, d) table.
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
                attention: Attention::Bidirectional,
                key_padding_mask: cfg.key_padding_mask,
                layer_norm_eps: cfg.layer_norm_eps,
            },
        )
        .map_err(config_error)?;
        Ok(Bert4Rec {
            pos_emb,
            encoder,
            hidden: d,
            max_len: spec.max_len,
            dropout: spec.dropout,
            mask_prob: cfg.mask_prob,
            positions: cfg.positions,
        })
    }

    /// The positional embeddings (b, l, d) or (l, d) to add to the items.
    fn positional(&self, mask: &Tensor, l: usize) -> Result<Tensor> {
        match self.positions {
            Positions::Right => self.pos_emb.narrow(0, self.max_len - l, l),
            Positions::Left => {
                // Row of the k-th item (k from 1) is k - 1; padding takes row 0
                // (the encoder zeroes padding rows anyway).
                let (b, l) = mask.dims2()?;
                let rows = (mask.to_dtype(DType::F32)?.cumsum(1)? - 1.0)?
                    .relu()?
                    .to_dtype(DType::U32)?
                    .flatten_all()?;
                self.pos_emb
                    .index_select(&rows, 0)?
                    .reshape((b, l, self.hidden))
            }
        }
    }
}

impl Backbone for Bert4Rec {
    fn embed(&self, items: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        let (_, l, d) = check_input("bert4rec", items, mask, self.hidden, self.max_len)?;
        let pos = self.positional(mask, l)?;
        let x = (items * (d as f64).sqrt())?.broadcast_add(&pos)?;
        ops::dropout(&x, self.dropout, ctx)
    }

    fn encode_embedded(&self, x: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> Result<Tensor> {
        self.encoder.forward(x, mask, ctx)
    }

    fn objective(&self) -> Box<dyn TrainingObjective> {
        Box::new(Cloze {
            mask_prob: self.mask_prob,
        })
    }
}

export_plugin!(backbone, "bert4rec", load = Bert4Rec::load);

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::{Device, D};
    use llm_esr_runtime::params::{params_without_gradient, ParamStore};
    use llm_esr_runtime::serde_json::json;
    use llm_esr_runtime::{testing, BackboneFactory, BackbonePlugin, Rng};

    const D_MODEL: usize = 8;
    const MAX_LEN: usize = 12;

    fn spec(config: llm_esr_runtime::serde_json::Value) -> BackboneSpec {
        BackboneSpec {
            hidden: D_MODEL,
            max_len: MAX_LEN,
            dropout: 0.5,
            config,
        }
    }

    fn build(
        seed: u64,
        config: llm_esr_runtime::serde_json::Value,
    ) -> (ParamStore, Box<dyn Backbone>) {
        let store = ParamStore::new(seed);
        let model = BackboneFactory::new(Bert4Rec::load)
            .build(store.var_builder(&Device::Cpu), &spec(config))
            .unwrap();
        (store, model)
    }

    fn batch(lens: &[usize], l: usize, seed: u64) -> (Tensor, Tensor) {
        testing::left_padded(lens, l, D_MODEL, 0.0, seed).unwrap()
    }

    fn repad(items: &Tensor, mask: &Tensor, k: usize) -> (Tensor, Tensor) {
        testing::pad_left(items, mask, k).unwrap()
    }

    fn eval_ctx(rng: &mut Rng) -> ForwardCtx<'_> {
        ForwardCtx::new(false, rng)
    }

    #[test]
    fn config_defaults_and_errors() {
        let cfg: Config =
            llm_esr_runtime::parse_plugin_config("model.encoder", &json!(null)).unwrap();
        assert_eq!(cfg.layers, 2);
        assert_eq!(cfg.heads, 1);
        assert!(cfg.key_padding_mask);
        assert_eq!(cfg.mask_prob, 0.6);
        assert_eq!(cfg.positions, Positions::Left);
        let err = llm_esr_runtime::parse_plugin_config::<Config>(
            "model.encoder",
            &json!({"mask_porb": 0.5}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model.encoder") && err.contains("mask_porb"),
            "{err}"
        );
        let store = ParamStore::new(0);
        let err = BackboneFactory::new(Bert4Rec::load)
            .build(
                store.var_builder(&Device::Cpu),
                &spec(json!({"mask_prob": 1.5})),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("mask_prob"), "{err}");
    }

    #[test]
    fn objective_is_cloze() {
        let (_, model) = build(1, json!({"mask_prob": 0.3}));
        assert_eq!(model.objective().describe(), "cloze (mask_prob 0.3)");
        assert_eq!(model.objective().copies(), 2);
        assert!(model.objective().needs_mask_token());
        let (_, model) = build(1, json!(null));
        assert_eq!(model.objective().describe(), "cloze (mask_prob 0.6)");
    }

    #[test]
    fn shapes_and_zero_padding_rows() {
        let (_, model) = build(2, json!(null));
        let (items, mask) = batch(&[3, 5, 1], 6, 10);
        let out = model
            .encode(&items, &mask, &mut eval_ctx(&mut Rng::new(0)))
            .unwrap();
        assert_eq!(out.dims(), &[3, 6, D_MODEL]);
        let rows = out
            .abs()
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let m = mask.to_vec2::<f32>().unwrap();
        for (r, mr) in rows.iter().zip(&m) {
            for (v, keep) in r.iter().zip(mr) {
                assert_eq!(*v == 0.0, *keep == 0.0, "{rows:?}");
            }
        }
        let too_long = batch(&[2], MAX_LEN + 1, 0);
        assert!(model
            .encode(&too_long.0, &too_long.1, &mut eval_ctx(&mut Rng::new(0)))
            .is_err());
    }

    fn check_padding_invariance(config: llm_esr_runtime::serde_json::Value) {
        let (_, model) = build(3, config);
        let l = 5;
        let (items, mask) = batch(&[5, 2, 4], l, 11);
        let a = model
            .encode(&items, &mask, &mut eval_ctx(&mut Rng::new(0)))
            .unwrap();
        for k in [1, 4, MAX_LEN - l] {
            let (items2, mask2) = repad(&items, &mask, k);
            let b = model
                .encode(&items2, &mask2, &mut eval_ctx(&mut Rng::new(0)))
                .unwrap();
            let b = b.narrow(1, k, l).unwrap();
            let diff = testing::max_abs_diff(&a, &b).unwrap();
            assert!(diff < 1e-5, "k = {k}: {diff}");
        }
    }

    #[test]
    fn padding_invariance_right_positions() {
        check_padding_invariance(json!(null));
    }

    #[test]
    fn padding_invariance_left_positions() {
        check_padding_invariance(json!({"positions": "left"}));
    }

    #[test]
    fn official_unmasked_keys_depend_on_padding() {
        // Documents the official behaviour (no key padding mask): padding keys
        // take part in attention, so extra padding changes the items' outputs.
        let (_, model) = build(3, json!({"key_padding_mask": false}));
        let (items, mask) = batch(&[5, 2, 4], 5, 11);
        let a = model
            .encode(&items, &mask, &mut eval_ctx(&mut Rng::new(0)))
            .unwrap();
        let (items2, mask2) = repad(&items, &mask, 3);
        let b = model
            .encode(&items2, &mask2, &mut eval_ctx(&mut Rng::new(0)))
            .unwrap();
        let b = b.narrow(1, 3, 5).unwrap();
        let diff = testing::max_abs_diff(&a, &b).unwrap();
        assert!(diff > 1e-4, "{diff}");
    }

    #[test]
    fn positions_follow_their_numbering() {
        // Left (official): the k-th item of a sequence gets row k - 1 wherever it
        // sits. Right: the item at column t of a batch of width l gets row
        // max_len - l + t.
        let (_, mask) = batch(&[1, 3], 4, 12);
        for positions in [Positions::Left, Positions::Right] {
            let store = ParamStore::new(4);
            let model = Bert4Rec::load(
                store.var_builder(&Device::Cpu),
                &spec(json!(null)),
                Config {
                    positions,
                    ..Config::default()
                },
            )
            .unwrap();
            let p = model.positional(&mask, 4).unwrap();
            let table = store
                .get("pos_emb")
                .unwrap()
                .as_tensor()
                .to_vec2::<f32>()
                .unwrap();
            match positions {
                Positions::Left => {
                    let p = p.to_vec3::<f32>().unwrap();
                    assert_eq!(p[0][3], table[0]);
                    assert_eq!(p[1][1], table[0]);
                    assert_eq!(p[1][2], table[1]);
                    assert_eq!(p[1][3], table[2]);
                }
                Positions::Right => {
                    let p = p.to_vec2::<f32>().unwrap();
                    for (t, row) in p.iter().enumerate() {
                        assert_eq!(row, &table[MAX_LEN - 4 + t]);
                    }
                }
            }
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for config in [json!(null), json!({"positions": "left", "heads": 2})] {
            let (store, model) = build(5, config);
            let (items, mask) = batch(&[4, 2, 6], 6, 13);
            let mut rng = Rng::new(9);
            let mut ctx = ForwardCtx::new(true, &mut rng);
            let out = model.encode(&items, &mask, &mut ctx).unwrap();
            let loss = out.sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let vars = store.vars();
            assert!(vars.len() >= 2 * 10 + 3, "{}", vars.len());
            assert_eq!(
                params_without_gradient(&vars, &grads).unwrap(),
                Vec::<String>::new()
            );
        }
    }

    #[test]
    fn same_seed_same_output_dropout_in_train_mode() {
        let (_, m1) = build(6, json!(null));
        let (_, m2) = build(6, json!(null));
        let (items, mask) = batch(&[3, 5], 5, 14);
        let run = |m: &dyn Backbone, train: bool| {
            let mut rng = Rng::new(21);
            let mut ctx = ForwardCtx::new(train, &mut rng);
            m.encode(&items, &mask, &mut ctx)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap()
        };
        assert_eq!(run(m1.as_ref(), true), run(m2.as_ref(), true));
        assert_ne!(run(m1.as_ref(), true), run(m1.as_ref(), false));
    }
}
