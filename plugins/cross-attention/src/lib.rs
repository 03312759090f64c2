//! The two-level fusion of LLM-ESR as an llm-esr-orch fusion plugin, written to
//! match `Multi_CrossAttention` in the official `models/utils.py` and its use in
//! `models/DualLLMSRS.py`.
//!
//! Sequence level: cross-attention both ways. The new collaborative sequence is
//! `llm2id(query = se, key/value = co)` and the new semantic sequence is
//! `id2llm(query = co, key/value = se)`, each with its own weights: bias-free
//! query/key/value projections, `heads` heads (official 2) of width d / heads,
//! scores `Q K^T` with padding KEYS filled with -1e9 before the division by
//! sqrt(d_head) (the official order), softmax, `@ V`, an output Linear with bias.
//! As in the official code there is no dropout, no residual and no norm, and
//! the rows of padding queries are not zeroed (they attend to the items like any
//! other query; the backbones ignore padding rows). With
//! `FusionSpec::cross_attention` false (`model.cross_attention: false`, the
//! "w/o CA" ablation) both views pass unchanged and no weights are created.
//!
//! Logit level: user vector `[u_co : u_se]`, item vector `[e_co : e_se]` on the
//! last dimension, so score = <u_co, e_co> + <u_se, e_se>.
//!
//! Initialisation as the official `_init_weights`: Xavier-normal weights; the
//! output bias keeps torch's Linear default, uniform in +-1/sqrt(d).

use llm_esr_runtime::candle::{Module, Result, Tensor, D};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::params::xavier_normal;
use llm_esr_runtime::serde::Deserialize;
use llm_esr_runtime::{export_plugin, ops, ForwardCtx, Fusion, FusionSpec};

/// `model.fusion_config` for the cross-attention fusion.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "llm_esr_runtime::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Attention heads of each direction (official 2); must divide the hidden size.
    pub heads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { heads: 2 }
    }
}

/// One direction: queries from one view, keys and values from the other.
pub struct CrossAttention {
    linear_q: Tensor,
    linear_k: Tensor,
    linear_v: Tensor,
    linear_output: ops::Linear,
    heads: usize,
}

impl CrossAttention {
    pub fn load(vb: VarBuilder, hidden: usize, heads: usize) -> Result<Self> {
        let weight = |name: &str| {
            vb.pp(name)
                .get_with_hints((hidden, hidden), "weight", xavier_normal(hidden, hidden))
        };
        let linear_q = weight("linear_q")?;
        let linear_k = weight("linear_k")?;
        let linear_v = weight("linear_v")?;
        let linear_output = ops::linear_torch_bias(vb.pp("linear_output"), hidden, hidden)?;
        Ok(CrossAttention {
            linear_q,
            linear_k,
            linear_v,
            linear_output,
            heads,
        })
    }

    /// `x` gives the queries, `y` the keys and values, both (b, l, d); `mask`
    /// (b, l) is 1 at items and 0 at padding (of `y`'s positions).
    pub fn forward(&self, x: &Tensor, y: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dh = d / self.heads;
        let split = |t: &Tensor, w: &Tensor| -> Result<Tensor> {
            ops::matmul_t(t, w)?
                .reshape((b, l, self.heads, dh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(x, &self.linear_q)?;
        let k = split(y, &self.linear_k)?;
        let v = split(y, &self.linear_v)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?; // (b, h, l, l)
                                                       // masked_fill(key is padding, -1e9), exactly: s * 1 + 0 or s * 0 - 1e9.
        let keep = mask.to_dtype(scores.dtype())?.reshape((b, 1, 1, l))?;
        let fill = ((&keep - 1.0)? * 1e9)?;
        let scores = scores.broadcast_mul(&keep)?.broadcast_add(&fill)?;
        let weights = ops::softmax_last_dim(&(scores / (dh as f64).sqrt())?)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        self.linear_output.forward(&out)
    }
}

pub struct CrossAttentionFusion {
    /// (llm2id, id2llm) when `spec.cross_attention`.
    attention: Option<(CrossAttention, CrossAttention)>,
}

impl CrossAttentionFusion {
    pub fn load(vb: VarBuilder, spec: &FusionSpec, cfg: Config) -> Result<Self> {
        let d = spec.hidden;
        if !spec.cross_attention {
            return Ok(CrossAttentionFusion { attention: None });
        }
        if d.checked_rem(cfg.heads) != Some(0) {
            llm_esr_runtime::candle::bail!(
                "config key `model.fusion_config.heads`: {} heads do not divide the hidden size {d}",
                cfg.heads
            );
        }
        let llm2id = CrossAttention::load(vb.pp("llm2id"), d, cfg.heads)?;
        let id2llm = CrossAttention::load(vb.pp("id2llm"), d, cfg.heads)?;
        Ok(CrossAttentionFusion {
            attention: Some((llm2id, id2llm)),
        })
    }
}

fn check_same(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() {
        llm_esr_runtime::candle::bail!(
            "cross-attention: {what} have shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    Ok(())
}

impl Fusion for CrossAttentionFusion {
    fn fuse_sequences(
        &self,
        co: &Tensor,
        se: &Tensor,
        mask: &Tensor,
        _ctx: &mut ForwardCtx,
    ) -> Result<(Tensor, Tensor)> {
        check_same(co, se, "the two views")?;
        let (b, l, _) = co.dims3()?;
        if mask.dims() != [b, l] {
            llm_esr_runtime::candle::bail!(
                "cross-attention: mask has shape {:?}, expected ({b}, {l})",
                mask.dims()
            );
        }
        match &self.attention {
            None => Ok((co.clone(), se.clone())),
            Some((llm2id, id2llm)) => {
                Ok((llm2id.forward(se, co, mask)?, id2llm.forward(co, se, mask)?))
            }
        }
    }

    fn user_vector(&self, u_co: &Tensor, u_se: &Tensor) -> Result<Tensor> {
        check_same(u_co, u_se, "the user vectors")?;
        Tensor::cat(&[u_co, u_se], D::Minus1)
    }

    fn item_vector(&self, e_co: &Tensor, e_se: &Tensor) -> Result<Tensor> {
        check_same(e_co, e_se, "the item tables")?;
        Tensor::cat(&[e_co, e_se], D::Minus1)
    }
}

export_plugin!(fusion, "cross-attention", load = CrossAttentionFusion::load);

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::candle::{DType, Device};
    use llm_esr_runtime::params::{params_without_gradient, ParamStore};
    use llm_esr_runtime::serde_json::{json, Value};
    use llm_esr_runtime::{FusionFactory, FusionPlugin, Rng};

    fn spec(hidden: usize, config: Value) -> FusionSpec {
        FusionSpec {
            hidden,
            dropout: 0.5,
            cross_attention: true,
            config,
        }
    }

    fn build_spec(seed: u64, spec: &FusionSpec) -> (ParamStore, Box<dyn Fusion>) {
        let store = ParamStore::new(seed);
        let fusion = FusionFactory::new(CrossAttentionFusion::load)
            .build(store.var_builder(&Device::Cpu), spec)
            .unwrap();
        (store, fusion)
    }

    fn build(seed: u64, hidden: usize, config: Value) -> (ParamStore, Box<dyn Fusion>) {
        build_spec(seed, &spec(hidden, config))
    }

    /// The "w/o CA" ablation: `model.cross_attention: false`.
    fn build_without_cross_attention(seed: u64, hidden: usize) -> (ParamStore, Box<dyn Fusion>) {
        let spec = FusionSpec {
            cross_attention: false,
            ..spec(hidden, json!(null))
        };
        build_spec(seed, &spec)
    }

    fn randn(shape: (usize, usize, usize), rng: &mut Rng) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn fuse(f: &dyn Fusion, co: &Tensor, se: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        let mut rng = Rng::new(0);
        let mut ctx = ForwardCtx::new(false, &mut rng);
        f.fuse_sequences(co, se, mask, &mut ctx).unwrap()
    }

    fn mat(store: &ParamStore, name: &str) -> Vec<Vec<f32>> {
        store
            .get(name)
            .unwrap()
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap()
    }

    /// The official Multi_CrossAttention, in plain f32 loops, for one sequence.
    fn reference(
        store: &ParamStore,
        prefix: &str,
        heads: usize,
        x: &[Vec<f32>],
        y: &[Vec<f32>],
        mask: &[f32],
    ) -> Vec<Vec<f32>> {
        let (wq, wk, wv, wo) = (
            mat(store, &format!("{prefix}.linear_q.weight")),
            mat(store, &format!("{prefix}.linear_k.weight")),
            mat(store, &format!("{prefix}.linear_v.weight")),
            mat(store, &format!("{prefix}.linear_output.weight")),
        );
        let bo = store
            .get(&format!("{prefix}.linear_output.bias"))
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        let lin = |w: &[Vec<f32>], v: &[f32]| -> Vec<f32> {
            w.iter()
                .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
                .collect()
        };
        let l = x.len();
        let d = x[0].len();
        let dh = d / heads;
        let q: Vec<Vec<f32>> = x.iter().map(|r| lin(&wq, r)).collect();
        let k: Vec<Vec<f32>> = y.iter().map(|r| lin(&wk, r)).collect();
        let v: Vec<Vec<f32>> = y.iter().map(|r| lin(&wv, r)).collect();
        let mut out = Vec::new();
        for qi in &q {
            let mut concat = vec![0f32; d];
            for h in 0..heads {
                let cols = h * dh..(h + 1) * dh;
                let mut s: Vec<f32> = (0..l)
                    .map(|j| {
                        let raw: f32 = cols.clone().map(|c| qi[c] * k[j][c]).sum();
                        let filled = if mask[j] == 0.0 { -1e9 } else { raw };
                        filled / (dh as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                s.iter_mut().for_each(|e| *e = (*e - m).exp());
                let z: f32 = s.iter().sum();
                for c in cols {
                    concat[c] = (0..l).map(|j| s[j] / z * v[j][c]).sum();
                }
            }
            let o = lin(&wo, &concat);
            out.push(o.iter().zip(&bo).map(|(a, b)| a + b).collect());
        }
        out
    }

    #[test]
    fn config_defaults_and_errors() {
        let cfg: Config =
            llm_esr_runtime::parse_plugin_config("model.fusion_config", &json!(null)).unwrap();
        assert_eq!(cfg.heads, 2);
        // The ablation switch is `FusionSpec::cross_attention`, not a key.
        let err = llm_esr_runtime::parse_plugin_config::<Config>(
            "model.fusion_config",
            &json!({"enabled": false}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("enabled"), "{err}");
        let err = llm_esr_runtime::parse_plugin_config::<Config>(
            "model.fusion_config",
            &json!({"residual": true}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model.fusion_config") && err.contains("residual"),
            "{err}"
        );
        let store = ParamStore::new(0);
        let err = FusionFactory::new(CrossAttentionFusion::load)
            .build(
                store.var_builder(&Device::Cpu),
                &spec(6, json!({"heads": 4})),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.fusion_config.heads"), "{err}");
    }

    #[test]
    fn parameters_are_named_like_the_official_modules() {
        let (store, _) = build(1, 4, json!(null));
        let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
        let mut want = Vec::new();
        for p in ["llm2id", "id2llm"] {
            for w in ["linear_q.weight", "linear_k.weight", "linear_v.weight"] {
                want.push(format!("{p}.{w}"));
            }
            want.push(format!("{p}.linear_output.weight"));
            want.push(format!("{p}.linear_output.bias"));
        }
        assert_eq!(names, want);
        let (store, _) = build_without_cross_attention(1, 4);
        assert!(store.vars().is_empty());
    }

    #[test]
    fn matches_a_hand_computation() {
        let (b, l, d) = (2, 3, 4);
        let (store, fusion) = build(2, d, json!(null));
        let mut rng = Rng::new(3);
        let co = randn((b, l, d), &mut rng);
        let se = randn((b, l, d), &mut rng);
        let mask = Tensor::new(&[[0f32, 1.0, 1.0], [1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let (co2, se2) = fuse(fusion.as_ref(), &co, &se, &mask);
        let (co_v, se_v) = (co.to_vec3::<f32>().unwrap(), se.to_vec3::<f32>().unwrap());
        let (co2, se2) = (co2.to_vec3::<f32>().unwrap(), se2.to_vec3::<f32>().unwrap());
        let m = mask.to_vec2::<f32>().unwrap();
        for i in 0..b {
            // co' = llm2id(query = se, kv = co); se' = id2llm(query = co, kv = se).
            let want_co = reference(&store, "llm2id", 2, &se_v[i], &co_v[i], &m[i]);
            let want_se = reference(&store, "id2llm", 2, &co_v[i], &se_v[i], &m[i]);
            for t in 0..l {
                for c in 0..d {
                    assert!(
                        (co2[i][t][c] - want_co[t][c]).abs() < 1e-5,
                        "co {i} {t} {c}"
                    );
                    assert!(
                        (se2[i][t][c] - want_se[t][c]).abs() < 1e-5,
                        "se {i} {t} {c}"
                    );
                }
            }
        }
        // The padding key of row 0 carries no weight: changing it changes nothing.
        let bump = Tensor::new(
            &[[[5f32; 4], [0.0; 4], [0.0; 4]], [[0.0; 4]; 3]],
            &Device::Cpu,
        )
        .unwrap();
        let (co3, se3) = fuse(fusion.as_ref(), &(&co + &bump).unwrap(), &se, &mask);
        let co3 = co3.to_vec3::<f32>().unwrap();
        let se3 = se3.to_vec3::<f32>().unwrap();
        for t in 1..l {
            for c in 0..d {
                assert!((co3[0][t][c] - co2[0][t][c]).abs() < 1e-6);
            }
        }
        // ... but as a query (se' = id2llm(query = co)) the padding row changes.
        assert!((se3[0][0][0] - se2[0][0][0]).abs() > 1e-6);
    }

    #[test]
    fn padding_invariance() {
        let (b, l, d) = (3, 4, 8);
        let (_, fusion) = build(4, d, json!(null));
        let mut rng = Rng::new(5);
        let co = randn((b, l, d), &mut rng);
        let se = randn((b, l, d), &mut rng);
        let mask = Tensor::new(
            &[
                [0f32, 0.0, 1.0, 1.0],
                [1.0, 1.0, 1.0, 1.0],
                [0.0, 1.0, 1.0, 1.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let (co1, se1) = fuse(fusion.as_ref(), &co, &se, &mask);
        for k in [1, 5] {
            let pad = randn((b, k, d), &mut rng);
            let pad_m = Tensor::zeros((b, k), DType::F32, &Device::Cpu).unwrap();
            let co_p = Tensor::cat(&[&pad, &co], 1).unwrap();
            let se_p = Tensor::cat(&[&(&pad * 2.0).unwrap(), &se], 1).unwrap();
            let mask_p = Tensor::cat(&[&pad_m, &mask], 1).unwrap();
            let (co2, se2) = fuse(fusion.as_ref(), &co_p, &se_p, &mask_p);
            let m = mask.to_vec2::<f32>().unwrap();
            for (one, two) in [(&co1, &co2), (&se1, &se2)] {
                let one = one.to_vec3::<f32>().unwrap();
                let two = two.narrow(1, k, l).unwrap().to_vec3::<f32>().unwrap();
                for i in 0..b {
                    for t in 0..l {
                        if m[i][t] == 0.0 {
                            continue;
                        }
                        for c in 0..d {
                            assert!((one[i][t][c] - two[i][t][c]).abs() < 1e-5, "k {k}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn disabled_passes_views_through() {
        let (_, fusion) = build_without_cross_attention(6, 4);
        let mut rng = Rng::new(7);
        let co = randn((2, 3, 4), &mut rng);
        let se = randn((2, 3, 4), &mut rng);
        let mask = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let (a, b) = fuse(fusion.as_ref(), &co, &se, &mask);
        assert_eq!(a.to_vec3::<f32>().unwrap(), co.to_vec3::<f32>().unwrap());
        assert_eq!(b.to_vec3::<f32>().unwrap(), se.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn logit_fusion_concatenates_the_views() {
        let (_, fusion) = build(8, 2, json!(null));
        let u_co = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let u_se = Tensor::new(&[[5f32, 6.0], [7.0, 8.0]], &Device::Cpu).unwrap();
        let e_co = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let e_se = Tensor::new(&[[1f32, 0.0], [0.0, -1.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        let u = fusion.user_vector(&u_co, &u_se).unwrap();
        let e = fusion.item_vector(&e_co, &e_se).unwrap();
        assert_eq!(
            u.to_vec2::<f32>().unwrap(),
            [[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0]]
        );
        let scores = u.matmul(&e.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let (uc, us) = (
            u_co.to_vec2::<f32>().unwrap(),
            u_se.to_vec2::<f32>().unwrap(),
        );
        let (ec, es) = (
            e_co.to_vec2::<f32>().unwrap(),
            e_se.to_vec2::<f32>().unwrap(),
        );
        for i in 0..2 {
            for j in 0..3 {
                let want = uc[i][0] * ec[j][0]
                    + uc[i][1] * ec[j][1]
                    + us[i][0] * es[j][0]
                    + us[i][1] * es[j][1];
                assert!((scores[i][j] - want).abs() < 1e-6);
            }
        }
        assert!(fusion.user_vector(&u_co, &e_co).is_err());
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let (b, l, d) = (2, 4, 8);
        let (store, fusion) = build(9, d, json!(null));
        let mut rng = Rng::new(10);
        let co = randn((b, l, d), &mut rng);
        let se = randn((b, l, d), &mut rng);
        let mask =
            Tensor::new(&[[0f32, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let mut ctx = ForwardCtx::new(true, &mut rng);
        let (co2, se2) = fusion.fuse_sequences(&co, &se, &mask, &mut ctx).unwrap();
        let loss = (co2.sqr().unwrap().sum_all().unwrap() + se2.sqr().unwrap().sum_all().unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = store.vars();
        assert_eq!(vars.len(), 10);
        assert_eq!(
            params_without_gradient(&vars, &grads).unwrap(),
            Vec::<String>::new()
        );
    }
}
