//! GRU4Rec (Hidasi et al., 2016) as an llm-esr-orch backbone plugin, written to
//! match the official LLM-ESR code (`models/GRU4Rec.py`): the item embeddings go
//! in as they are (no scaling, no positional embedding, no dropout anywhere; the
//! official model defines an embedding dropout but never applies it), through a
//! torch-style `nn.GRU` without bias (`bias=False`, gate order r, z, n):
//!
//! ```text
//! r = sigmoid(W_ir x + W_hr h)      z = sigmoid(W_iz x + W_hz h)
//! n = tanh(W_in x + r * (W_hn h))   h' = (1 - z) * n + z * h
//! ```
//!
//! with `layers` stacked layers (official `num_layers`, default 1, no dropout
//! between layers). Weights are `gru.weight_ih_l{k}` and `gru.weight_hh_l{k}`,
//! (3d, d) each like torch's, Xavier-normal over the whole (3d, d) matrix as the
//! official `_init_weights` does. The objective is the last position only.
//!
//! Difference from the official code: by default (`mask_inputs: true`) input
//! rows at padding positions are zeroed. With zero inputs, no bias and h0 = 0
//! the state stays exactly 0 through the left padding, so the result does not
//! depend on the padding. The official model feeds the padding rows as given;
//! in LLM-ESR those are not zero (the semantic view's padding row is the
//! adapter's bias, and cross-attention gives padding queries a non-zero output),
//! so its state at the first item depends on the 200 - len padding steps.
//! `mask_inputs: false` reproduces that (the host must then pad to `max_len`).
//! Output rows at padding positions are zero in both modes (the official code
//! only reads the last position).

use llm_esr_runtime::backbone::check_input;
use llm_esr_runtime::candle::{Result, Tensor, D};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::ops;
use llm_esr_runtime::params::xavier_normal;
use llm_esr_runtime::serde::Deserialize;
use llm_esr_runtime::{
    export_plugin, Backbone, BackboneSpec, ForwardCtx, NextItem, TrainingObjective,
};

/// `model.encoder` for GRU4Rec.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Stacked GRU layers (official `--num_layers`, default 1).
    pub layers: usize,
    /// Zero the input rows at padding positions (default); `false` feeds them
    /// as given, like the official code.
    pub mask_inputs: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layers: 1,
            mask_inputs: true,
        }
    }
}

/// One bias-free GRU layer, torch layout: rows [r; z; n] of the (3d, d) weights.
struct GruLayer {
    weight_ih: Tensor,
    weight_hh: Tensor,
}

/// The logistic function. candle_nn's sigmoid is a custom op that, unlike its
/// fused layer norm and softmax, has a backward (from its saved output, so it is
/// stable for any input); the finite-difference test below checks it.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    llm_esr_runtime::candle_nn::ops::sigmoid(x)
}

impl GruLayer {
    fn load(vb: VarBuilder, k: usize, d: usize) -> Result<Self> {
        let init = xavier_normal(3 * d, d);
        Ok(GruLayer {
            weight_ih: vb.get_with_hints((3 * d, d), &format!("weight_ih_l{k}"), init)?,
            weight_hh: vb.get_with_hints((3 * d, d), &format!("weight_hh_l{k}"), init)?,
        })
    }

    /// `x` (b, l, d) -> all hidden states (b, l, d), starting from h = 0.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        if l == 0 {
            return Ok(x.clone());
        }
        // Input projections of all steps in one matmul, time-major: (l, b, 3d).
        let gi = ops::matmul_t(x, &self.weight_ih)?
            .transpose(0, 1)?
            .contiguous()?;
        let w_hh_t = self.weight_hh.t()?;
        let mut h = Tensor::zeros((b, d), x.dtype(), x.device())?;
        let mut outputs = Vec::with_capacity(l);
        // The backward of every `narrow` materialises a gradient as large as
        // its source, so slicing l steps straight out of `gi` would cost
        // O(l^2) memory traffic. Slicing chunks of ~sqrt(l) steps first, then
        // steps out of the chunks, costs O(l^1.5).
        let chunk = (l as f64).sqrt().ceil().max(1.0) as usize;
        for start in (0..l).step_by(chunk) {
            let len = chunk.min(l - start);
            let gi_chunk = gi.narrow(0, start, len)?;
            for t in 0..len {
                let gi_t = gi_chunk.narrow(0, t, 1)?.squeeze(0)?; // (b, 3d)
                let gh = h.matmul(&w_hh_t)?; // (b, 3d)
                let rz = sigmoid(&(gi_t.narrow(1, 0, 2 * d)? + gh.narrow(1, 0, 2 * d)?)?)?;
                let r = rz.narrow(1, 0, d)?;
                let z = rz.narrow(1, d, d)?;
                let n = (gi_t.narrow(1, 2 * d, d)? + (r * gh.narrow(1, 2 * d, d)?)?)?.tanh()?;
                // (1 - z) * n + z * h
                h = (&n + (z * (&h - &n)?)?)?;
                outputs.push(h.clone());
            }
        }
        Tensor::stack(&outputs, 1)
    }
}

pub struct Gru4Rec {
    layers: Vec<GruLayer>,
    hidden: usize,
    max_len: usize,
    mask_inputs: bool,
}

impl Gru4Rec {
    pub fn load(vb: VarBuilder, spec: &BackboneSpec, cfg: Config) -> Result<Self> {
        let d = spec.hidden;
        if cfg.layers == 0 {
            llm_esr_runtime::candle::bail!("config key `model.encoder.layers`: must be at least 1");
        }
        let vb = vb.pp("gru");
        let layers = (0..cfg.layers)
            .map(|k| GruLayer::load(vb.clone(), k, d))
            .collect::<Result<Vec<_>>>()?;
        Ok(Gru4Rec {
            layers,
            hidden: d,
            max_len: spec.max_len,
            mask_inputs: cfg.mask_inputs,
        })
    }
}

impl Backbone for Gru4Rec {
    // No input layer: the official GRU4Rec feeds raw embeddings.
    fn encode_embedded(
        &self,
        items: &Tensor,
        mask: &Tensor,
        _ctx: &mut ForwardCtx,
    ) -> Result<Tensor> {
        check_input("gru4rec", items, mask, self.hidden, self.max_len)?;
        let keep = mask.to_dtype(items.dtype())?.unsqueeze(D::Minus1)?;
        let mut x = if self.mask_inputs {
            items.broadcast_mul(&keep)?
        } else {
            items.clone()
        };
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        x.broadcast_mul(&keep)
    }

    /// Next item at the last position only, as the official GRU4Rec.
    fn objective(&self) -> Box<dyn TrainingObjective> {
        Box::new(NextItem::last_position())
    }
}

export_plugin!(backbone, "gru4rec", load = Gru4Rec::load);

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::{DType, Device};
    use llm_esr_runtime::params::{params_without_gradient, ParamStore};
    use llm_esr_runtime::serde_json::{json, Value};
    use llm_esr_runtime::{testing, BackboneFactory, BackbonePlugin, Rng};

    const D_MODEL: usize = 6;
    const MAX_LEN: usize = 12;

    fn spec(config: Value) -> BackboneSpec {
        BackboneSpec {
            hidden: D_MODEL,
            max_len: MAX_LEN,
            dropout: 0.5,
            config,
        }
    }

    fn build(seed: u64, config: Value) -> (ParamStore, Box<dyn Backbone>) {
        let store = ParamStore::new(seed);
        let model = BackboneFactory::new(Gru4Rec::load)
            .build(store.var_builder(&Device::Cpu), &spec(config))
            .unwrap();
        (store, model)
    }

    fn batch(lens: &[usize], l: usize, seed: u64, pad: f32) -> (Tensor, Tensor) {
        testing::left_padded(lens, l, D_MODEL, pad, seed).unwrap()
    }

    fn eval(model: &dyn Backbone, items: &Tensor, mask: &Tensor) -> Tensor {
        let mut rng = Rng::new(0);
        let mut ctx = ForwardCtx::new(false, &mut rng);
        model.encode(items, mask, &mut ctx).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        testing::max_abs_diff(a, b).unwrap()
    }

    /// torch's GRU cell without bias, in plain f32 loops.
    fn reference_gru(w_ih: &[Vec<f32>], w_hh: &[Vec<f32>], xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let d = w_ih[0].len();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let dot = |w: &[f32], v: &[f32]| w.iter().zip(v).map(|(a, b)| a * b).sum::<f32>();
        let mut h = vec![0f32; d];
        let mut out = Vec::new();
        for x in xs {
            let mut next = vec![0f32; d];
            for j in 0..d {
                let r = sig(dot(&w_ih[j], x) + dot(&w_hh[j], &h));
                let z = sig(dot(&w_ih[d + j], x) + dot(&w_hh[d + j], &h));
                let n = (dot(&w_ih[2 * d + j], x) + r * dot(&w_hh[2 * d + j], &h)).tanh();
                next[j] = (1.0 - z) * n + z * h[j];
            }
            h = next;
            out.push(h.clone());
        }
        out
    }

    #[test]
    fn config_defaults_and_errors() {
        let cfg: Config =
            llm_esr_runtime::parse_plugin_config("model.encoder", &json!(null)).unwrap();
        assert_eq!(cfg.layers, 1);
        assert!(cfg.mask_inputs);
        let err =
            llm_esr_runtime::parse_plugin_config::<Config>("model.encoder", &json!({"heads": 2}))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("model.encoder") && err.contains("heads"),
            "{err}"
        );
        let store = ParamStore::new(0);
        let err = BackboneFactory::new(Gru4Rec::load)
            .build(store.var_builder(&Device::Cpu), &spec(json!({"layers": 0})))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.encoder.layers"), "{err}");
    }

    #[test]
    fn objective_and_parameters() {
        let (store, model) = build(1, json!({"layers": 2}));
        assert_eq!(
            model.objective().describe(),
            NextItem::last_position().describe()
        );
        let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "gru.weight_ih_l0",
                "gru.weight_hh_l0",
                "gru.weight_ih_l1",
                "gru.weight_hh_l1"
            ]
        );
        for (_, v) in store.vars() {
            assert_eq!(v.dims(), &[3 * D_MODEL, D_MODEL]);
            // Xavier normal over (3d, d): std sqrt(2 / 4d).
            let std = v
                .as_tensor()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            let want = (2.0 / (4 * D_MODEL) as f32).sqrt();
            assert!((std / want - 1.0).abs() < 0.35, "{std} vs {want}");
        }
    }

    #[test]
    fn matches_a_plain_gru_and_zeroes_padding_rows() {
        for layers in [1usize, 2] {
            let (store, model) = build(2, json!({ "layers": layers }));
            let (items, mask) = batch(&[4, 2], 5, 3, 0.0);
            let out = eval(model.as_ref(), &items, &mask);
            assert_eq!(out.dims(), &[2, 5, D_MODEL]);
            let out = out.to_vec3::<f32>().unwrap();
            let xs = items.to_vec3::<f32>().unwrap();
            let m = mask.to_vec2::<f32>().unwrap();
            for (i, seq) in xs.iter().enumerate() {
                let mut h: Vec<Vec<f32>> = seq.clone();
                for k in 0..layers {
                    let w_ih = store.get(&format!("gru.weight_ih_l{k}")).unwrap();
                    let w_hh = store.get(&format!("gru.weight_hh_l{k}")).unwrap();
                    h = reference_gru(
                        &w_ih.as_tensor().to_vec2::<f32>().unwrap(),
                        &w_hh.as_tensor().to_vec2::<f32>().unwrap(),
                        &h,
                    );
                }
                for t in 0..5 {
                    for j in 0..D_MODEL {
                        let want = if m[i][t] == 0.0 { 0.0 } else { h[t][j] };
                        assert!((out[i][t][j] - want).abs() < 1e-5, "{layers} {i} {t} {j}");
                    }
                    if m[i][t] == 0.0 {
                        // Zero input, no bias, zero state: the state stays exactly 0.
                        assert!(h[t].iter().all(|v| *v == 0.0));
                    }
                }
            }
        }
    }

    #[test]
    fn padding_invariance() {
        // Padding rows hold garbage; with the default masking it must not matter.
        for config in [json!(null), json!({"layers": 2})] {
            let (_, model) = build(3, config);
            let l = 5;
            let (items, mask) = batch(&[5, 2, 4], l, 11, 0.7);
            let a = eval(model.as_ref(), &items, &mask);
            for k in [1, 3, MAX_LEN - l] {
                let (b, _, d) = items.dims3().unwrap();
                let pad_i =
                    (Tensor::ones((b, k, d), DType::F32, &Device::Cpu).unwrap() * -1.3).unwrap();
                let pad_m = Tensor::zeros((b, k), DType::F32, &Device::Cpu).unwrap();
                let items2 = Tensor::cat(&[&pad_i, &items], 1).unwrap();
                let mask2 = Tensor::cat(&[&pad_m, &mask], 1).unwrap();
                let out = eval(model.as_ref(), &items2, &mask2);
                let diff = max_diff(&a, &out.narrow(1, k, l).unwrap());
                assert!(diff < 1e-5, "k = {k}: {diff}");
                let head = out
                    .narrow(1, 0, k)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert_eq!(head.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn unmasked_inputs_follow_the_official_code() {
        // mask_inputs: false feeds padding rows as given, so non-zero padding
        // changes the state; zero padding still leaves it untouched.
        let (_, model) = build(4, json!({"mask_inputs": false}));
        let (_, masked) = build(4, json!(null));
        let (zero_pad, mask) = batch(&[2, 4], 4, 5, 0.0);
        let (junk_pad, _) = batch(&[2, 4], 4, 5, 0.5);
        let a = eval(model.as_ref(), &zero_pad, &mask);
        let b = eval(masked.as_ref(), &junk_pad, &mask);
        let c = eval(model.as_ref(), &junk_pad, &mask);
        assert!(max_diff(&a, &b) < 1e-6);
        assert!(max_diff(&a, &c) > 1e-3);
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let (store, model) = build(5, json!({"layers": 2}));
        let (items, mask) = batch(&[4, 2, 6], 6, 13, 0.0);
        let mut rng = Rng::new(9);
        let mut ctx = ForwardCtx::new(true, &mut rng);
        let out = model.encode(&items, &mask, &mut ctx).unwrap();
        let loss = out
            .narrow(1, 5, 1)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = store.vars();
        assert_eq!(vars.len(), 4);
        assert_eq!(
            params_without_gradient(&vars, &grads).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (store, model) = build(6, json!(null));
        let (items, mask) = batch(&[3, 4], 4, 15, 0.0);
        let loss_of = |m: &dyn Backbone| {
            eval(m, &items, &mask)
                .narrow(1, 3, 1)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let loss = loss_of(model.as_ref());
        let grads = loss.backward().unwrap();
        let var = store.get("gru.weight_hh_l0").unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let w0 = var.as_tensor().to_vec2::<f32>().unwrap();
        let to_tensor = |w: &Vec<Vec<f32>>| {
            let flat: Vec<f32> = w.iter().flatten().copied().collect();
            Tensor::from_vec(flat, (w.len(), w[0].len()), &Device::Cpu).unwrap()
        };
        let eps = 1e-2f32;
        for (i, j) in [(0usize, 0usize), (D_MODEL + 1, 2), (2 * D_MODEL + 3, 5)] {
            let shifted = |delta: f32| {
                let mut w = w0.clone();
                w[i][j] += delta;
                var.set(&to_tensor(&w)).unwrap();
                loss_of(model.as_ref()).to_scalar::<f32>().unwrap()
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            var.set(&to_tensor(&w0)).unwrap();
            assert!(
                (fd - g[i][j]).abs() < 2e-3,
                "({i}, {j}): {fd} vs {}",
                g[i][j]
            );
        }
    }
}
