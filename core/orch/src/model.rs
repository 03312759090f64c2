//! Model assembly: item tables, the backbone plugin and, for LLM-ESR, the
//! semantic view, the fusion and the retrieval plugins, put together per variant.
//!
//! - `plain`: collaborative table (random) -> backbone.
//! - `llminit`: the same with the table initialised from the PCA of `E_se`.
//! - `llmesr`: collaborative table (PCA init, trainable) and semantic table
//!   (frozen `E_se` through a two-layer adapter without activation); each view
//!   goes through the backbone's input layer, the fusion plugin's sequence-level
//!   cross-attention, then the shared backbone (or one per view without
//!   `share_encoder`); user and item vectors are the fusion's concatenations.
//!
//! Items are rows of tables indexed by id: row 0 is padding (zero), rows
//! 1..=num_items the items, and row num_items + 1 the cloze mask token when the
//! backbone needs one.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use llm_esr_prep::Artifacts;
use llm_esr_runtime::candle::{DType, Device, Module, Tensor, Var, D};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::ops;
use llm_esr_runtime::params::{xavier_normal, ParamStore};
use llm_esr_runtime::{
    Backbone, BackboneSpec, ForwardCtx, Fusion, FusionSpec, PluginKind, Retrieval, RetrievalSpec,
};

use crate::config::{config_error, is_config_error, plugin_section, Config, Variant};
use crate::plugin_host::{
    self, BuildRefused, GuardedBackbone, GuardedFusion, GuardedObjective, GuardedRetrieval,
};
use crate::step::StepSettings;

/// A plugin section as JSON, with errors naming the section's key.
fn section(key: &str, value: &serde_yaml::Value) -> Result<serde_json::Value> {
    plugin_section(value).map_err(|e| config_error(format!("config key `{key}`: {e:#}")))
}

/// Loading the plugin named by config key `key`: no plugin of that name is an
/// error of the key.
fn named(key: &str, e: anyhow::Error) -> anyhow::Error {
    if is_config_error(&e) {
        config_error(format!("config key `{key}`: {e:#}"))
    } else {
        e
    }
}

/// A plugin's `build` that refused its section `key` is an error of that key
/// (exit status 2), naming the plugin; a panic stays an ordinary error.
fn refused(key: &str, kind: &str, plugin: &str, e: anyhow::Error) -> anyhow::Error {
    let Some(b) = e.downcast_ref::<BuildRefused>() else {
        return e;
    };
    let msg = b.message.trim();
    if msg.starts_with("config key `") {
        config_error(format!("{msg} ({kind} plugin `{plugin}`)"))
    } else {
        config_error(format!(
            "config key `{key}` ({kind} plugin `{plugin}`): {msg}"
        ))
    }
}

/// Frozen `E_se` and the trainable adapter that maps it to the hidden size.
struct SemanticView {
    table: Tensor,
    fc1: ops::Linear,
    fc2: ops::Linear,
}

impl SemanticView {
    fn load(vb: VarBuilder, table: Tensor, hidden: usize) -> Result<Self> {
        let dim = table.dim(1)?;
        let mid = dim / 2;
        let linear = |name: &str, i: usize, o: usize| ops::linear_torch_bias(vb.pp(name), i, o);
        Ok(SemanticView {
            fc1: linear("fc1", dim, mid)?,
            fc2: linear("fc2", mid, hidden)?,
            table,
        })
    }

    /// The adapted table (rows, d). The adapter acts row by row, so applying it
    /// once to the table and gathering equals applying it per position.
    ///
    /// With `items` (sorted, distinct ids) only those rows are adapted and
    /// the other rows are zero: a training step reads a few thousand of the
    /// table's rows, and the adapter (d_llm x d_llm / 2 + d_llm / 2 x d
    /// multiply-adds a row, forward and backward) was most of its cost. The
    /// rows it adapts get the same values as in the whole table.
    fn adapted(&self, items: Option<&[u32]>) -> Result<Tensor> {
        let adapt = |x: &Tensor| -> Result<Tensor> { Ok(self.fc2.forward(&self.fc1.forward(x)?)?) };
        let Some(items) = items else {
            return adapt(&self.table);
        };
        let rows = self.table.dim(0)?;
        let dev = self.table.device();
        let mut slot = vec![items.len() as u32; rows];
        for (k, &i) in items.iter().enumerate() {
            let Some(s) = slot.get_mut(i as usize) else {
                bail!("item {i} is outside the semantic table's {rows} rows");
            };
            *s = k as u32;
        }
        let picked = self
            .table
            .index_select(&Tensor::from_vec(items.to_vec(), items.len(), dev)?, 0)?;
        let compact = adapt(&picked)?;
        // Row r of the result: compact row slot[r], the zero row where r is unused.
        let zero = Tensor::zeros((1, compact.dim(1)?), compact.dtype(), dev)?;
        let with_zero = Tensor::cat(&[&compact, &zero], 0)?;
        Ok(with_zero.index_select(&Tensor::from_vec(slot, rows, dev)?, 0)?)
    }
}

pub struct Recommender {
    pub store: ParamStore,
    pub variant: Variant,
    pub hidden: usize,
    /// Number of real items; ids run 1..=num_items.
    pub num_items: usize,
    /// Id of the mask token (num_items + 1) when the backbone's objective
    /// needs one (BERT4Rec's cloze).
    pub mask_token: Option<u32>,
    /// Weight of the distillation loss.
    pub alpha: f32,
    backbone: GuardedBackbone,
    /// How the backbone trains (from the backbone plugin).
    objective: GuardedObjective,
    /// The semantic view's own encoder (ablation "w/o Share").
    backbone_se: Option<GuardedBackbone>,
    co_table: Option<Var>,
    semantic: Option<SemanticView>,
    fusion: Option<GuardedFusion>,
    retrieval: Option<GuardedRetrieval>,
    /// Where the model's tensors live.
    pub device: Device,
    backbone_name: String,
    /// What the training step takes from the config (see [`crate::step`]).
    pub settings: StepSettings,
}

/// The item representations of one step.
pub struct Tables {
    co: Option<Tensor>,
    se: Option<Tensor>,
    /// Rows scored against user vectors.
    pub output: Tensor,
}

impl Recommender {
    pub fn build(
        cfg: &Config,
        num_items: usize,
        artifacts: Option<&Artifacts>,
        plugin_dirs: &[PathBuf],
        device: &Device,
    ) -> Result<Recommender> {
        let m = &cfg.model;
        let llmesr = m.variant == Variant::Llmesr;
        let co_view = !llmesr || m.co_view;
        let se_view = llmesr && m.se_view;
        if !co_view && !se_view {
            return Err(config_error(
                "config keys `model.co_view` and `model.se_view` are both false: keep at least one view",
            ));
        }
        let store = ParamStore::new(cfg.seed);
        let vb = store.var_builder(device);
        let spec = BackboneSpec {
            hidden: m.hidden,
            max_len: cfg.data.max_len,
            dropout: m.dropout,
            config: section("model.encoder", &m.encoder)?,
        };
        let load_backbone = |prefix: &str| -> Result<GuardedBackbone> {
            let plugin = plugin_host::load(plugin_dirs, PluginKind::Backbone, &m.backbone)
                .map_err(|e| named("model.backbone", e))?;
            plugin_host::build_backbone(plugin, &m.backbone, vb.pp(prefix), &spec)
                .map_err(|e| refused("model.encoder", "backbone", &m.backbone, e))
        };
        let backbone = load_backbone("backbone")?;
        let backbone_se = if llmesr && co_view && se_view && !m.share_encoder {
            Some(load_backbone("backbone_se")?)
        } else {
            None
        };
        let objective = backbone.training_objective()?;
        let mask_token = objective.needs_mask_token().then_some(num_items as u32 + 1);
        let rows = num_items + 1 + mask_token.is_some() as usize;
        let artifacts = match (m.variant, artifacts) {
            (Variant::Plain, _) => None,
            (_, Some(a)) => Some(a),
            (_, None) => bail!(
                "variant `{:?}` needs semantic artifacts (`model.artifacts`)",
                m.variant
            ),
        };

        let co_table = if co_view {
            Some(match artifacts {
                None => random_table(&store, "item_emb", rows, m.hidden, device)?,
                Some(a) => pca_table(&store, a, rows, m.hidden, device)?,
            })
        } else {
            None
        };
        let semantic = match (se_view, artifacts) {
            (true, Some(a)) => {
                // Frozen: a detached constant, never a parameter.
                let table = pad_rows(&a.item_emb.to_device(device)?, rows)?.detach();
                Some(SemanticView::load(vb.pp("adapter"), table, m.hidden)?)
            }
            _ => None,
        };
        let fusion = if co_view && se_view {
            let spec = FusionSpec {
                hidden: m.hidden,
                dropout: m.dropout,
                cross_attention: m.cross_attention,
                config: section("model.fusion_config", &m.fusion_config)?,
            };
            let plugin = plugin_host::load(plugin_dirs, PluginKind::Fusion, &m.fusion)
                .map_err(|e| named("model.fusion", e))?;
            Some(
                plugin_host::build_fusion(plugin, &m.fusion, vb.pp("fusion"), &spec)
                    .map_err(|e| refused("model.fusion_config", "fusion", &m.fusion, e))?,
            )
        } else {
            None
        };
        let retrieval = match (llmesr && m.distill, artifacts) {
            (true, Some(a)) => {
                let spec = RetrievalSpec {
                    neighbours: a.neighbours.to_device(&Device::Cpu)?,
                    config: section("model.retrieval_config", &m.retrieval_config)?,
                };
                let plugin = plugin_host::load(plugin_dirs, PluginKind::Retrieval, &m.retrieval)
                    .map_err(|e| named("model.retrieval", e))?;
                Some(
                    plugin_host::build_retrieval(plugin, &m.retrieval, &spec).map_err(|e| {
                        refused("model.retrieval_config", "retrieval", &m.retrieval, e)
                    })?,
                )
            }
            _ => None,
        };
        Ok(Recommender {
            store,
            variant: m.variant,
            hidden: m.hidden,
            num_items,
            mask_token,
            alpha: m.alpha,
            backbone,
            objective,
            backbone_se,
            co_table,
            semantic,
            fusion,
            retrieval,
            device: device.clone(),
            backbone_name: m.backbone.clone(),
            settings: StepSettings {
                seed: cfg.seed,
                max_len: cfg.data.max_len,
                pad_to_max_len: cfg.data.pad_to_max_len,
                alpha: m.alpha,
                student: m.student,
            },
        })
    }

    /// The method in a few words, for logs: `sasrec, plain`.
    pub fn describe(&self) -> String {
        format!("{}, {:?}", self.backbone_name, self.variant).to_lowercase()
    }

    /// The backbone's training objective.
    pub fn objective(&self) -> &GuardedObjective {
        &self.objective
    }

    /// The input that predicts the item after `history` (evaluation and
    /// `recommend`): the history, or for cloze models the history and the
    /// mask token.
    pub fn inference_input(&self, history: &[u32]) -> Result<Vec<u32>> {
        self.objective
            .inference_input(history, self.num_items, self.mask_token)
    }

    pub fn retrieval(&self) -> Option<&dyn Retrieval> {
        self.retrieval.as_ref().map(|r| r as &dyn Retrieval)
    }

    /// The item tables, every row.
    pub fn tables(&self) -> Result<Tables> {
        self.tables_for(None)
    }

    /// The item tables of a step that reads only `items` (sorted, distinct
    /// ids; `None`: every item): the semantic view adapts only those rows
    /// (the others are zero), which is where most of a training step went.
    pub fn tables_for(&self, items: Option<&[u32]>) -> Result<Tables> {
        let co = self.co_table.as_ref().map(|v| v.as_tensor().clone());
        let se = self
            .semantic
            .as_ref()
            .map(|s| s.adapted(items))
            .transpose()?;
        let output = match (&co, &se, &self.fusion) {
            (Some(c), Some(s), Some(f)) => f.item_vector(c, s)?,
            (Some(c), None, _) => c.clone(),
            (None, Some(s), _) => s.clone(),
            _ => bail!("model has no item table"),
        };
        Ok(Tables { co, se, output })
    }

    /// Encodes left-padded `ids` (b, l) under `mask` (b, l) into user states
    /// (b, l, h) whose dot product with `tables.output` rows scores items.
    pub fn encode(
        &self,
        tables: &Tables,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let gather =
            |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&flat, 0)?.reshape((b, l, ()))?) };
        let se_backbone = self.backbone_se.as_ref().unwrap_or(&self.backbone);
        let x_co = tables
            .co
            .as_ref()
            .map(|t| -> Result<Tensor> { Ok(self.backbone.embed(&gather(t)?, mask, ctx)?) });
        let x_co = x_co.transpose()?;
        let x_se = tables
            .se
            .as_ref()
            .map(|t| -> Result<Tensor> { Ok(se_backbone.embed(&gather(t)?, mask, ctx)?) });
        let x_se = x_se.transpose()?;
        match (x_co, x_se, &self.fusion) {
            (Some(co), Some(se), Some(f)) => {
                let (co, se) = f.fuse_sequences(&co, &se, mask, ctx)?;
                let h_co = self.backbone.encode_embedded(&co, mask, ctx)?;
                let h_se = se_backbone.encode_embedded(&se, mask, ctx)?;
                Ok(f.user_vector(&h_co, &h_se)?)
            }
            (Some(co), None, _) => Ok(self.backbone.encode_embedded(&co, mask, ctx)?),
            (None, Some(se), _) => Ok(se_backbone.encode_embedded(&se, mask, ctx)?),
            _ => bail!("model has no view to encode"),
        }
    }

    /// Scores of user vectors (b, h) against candidate items (b, c): (b, c).
    pub fn score_candidates(
        &self,
        tables: &Tables,
        user_vecs: &Tensor,
        items: &Tensor,
    ) -> Result<Tensor> {
        let (b, c) = items.dims2()?;
        let e = tables
            .output
            .index_select(&items.flatten_all()?, 0)?
            .reshape((b, c, ()))?;
        Ok(e.matmul(&user_vecs.unsqueeze(D::Minus1)?)?
            .squeeze(D::Minus1)?)
    }

    /// Scores against every item: (b, num_items + 1), column = item id.
    pub fn score_all(&self, tables: &Tables, user_vecs: &Tensor) -> Result<Tensor> {
        let out = tables.output.narrow(0, 0, self.num_items + 1)?;
        Ok(user_vecs.matmul(&out.t()?)?)
    }

    /// The frozen semantic table `E_se`, when the model has a semantic view.
    pub fn semantic_table(&self) -> Option<&Tensor> {
        self.semantic.as_ref().map(|s| &s.table)
    }

    /// The trainable variables in creation order (the frozen `E_se` is not one).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.store.vars()
    }
}

/// A random item table: Xavier-normal (see docs/faithfulness.md) with the
/// padding row zeroed (candle's `Embedding` has no padding index).
fn random_table(
    store: &ParamStore,
    name: &str,
    rows: usize,
    d: usize,
    device: &Device,
) -> Result<Var> {
    let vb = store.var_builder(device);
    let t = vb.get_with_hints((rows, d), name, xavier_normal(rows, d))?;
    let var = store.get(name).context("item table")?;
    let zero = Tensor::zeros((1, d), DType::F32, device)?;
    var.set(&Tensor::cat(&[&zero, &t.narrow(0, 1, rows - 1)?], 0)?)?;
    Ok(var)
}

/// The collaborative table initialised from the PCA artifact (mask row zero).
fn pca_table(
    store: &ParamStore,
    a: &Artifacts,
    rows: usize,
    d: usize,
    device: &Device,
) -> Result<Var> {
    let pca = a.pca.to_device(device)?;
    if pca.dim(1)? != d {
        bail!(
            "the PCA artifact has width {} but `model.hidden` is {d}: rerun `llm-esr-orch embed` with `embed.pca_dim: {d}`",
            pca.dim(1)?
        );
    }
    Ok(store.insert("item_emb", &pad_rows(&pca, rows)?)?)
}

/// Appends zero rows up to `rows` (the mask token's row).
fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let have = t.dim(0)?;
    if have >= rows {
        return Ok(t.narrow(0, 0, rows)?);
    }
    let zeros = Tensor::zeros((rows - have, t.dim(1)?), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], 0)?)
}

/// The last position of each encoded sequence: (b, l, h) -> (b, h).
pub fn last_position(encoded: &Tensor) -> Result<Tensor> {
    let l = encoded.dim(1)?;
    Ok(encoded.narrow(1, l - 1, 1)?.squeeze(1)?)
}

/// BCE with one negative per target, as the official code: the mean log-loss
/// of the positives plus the mean log-loss of the negatives, each over the
/// `count` positions where `weight` is 1. The runtime's fused kernel (softplus
/// form, one graph node); `ops::composed::bce_with_logits` is the reference.
pub fn bce_loss(
    pos_logits: &Tensor,
    neg_logits: &Tensor,
    weight: &Tensor,
    count: f64,
) -> Result<Tensor> {
    Ok(ops::bce_with_logits(pos_logits, neg_logits, weight, count)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_esr_runtime::testing::{max_abs_diff, randn};
    use llm_esr_runtime::Rng;

    /// The step's sub-table: the rows it adapts equal the whole table's
    /// (within rounding: the products are blocked by their sizes), the others
    /// are zero, and the adapter's weights get the same gradient.
    #[test]
    fn the_adapter_on_the_rows_a_step_reads_matches_the_whole_table() -> Result<()> {
        let dev = Device::Cpu;
        let table = randn(&[40, 24], 1.0, &mut Rng::new(5))?;
        let store = ParamStore::new(3);
        let view = SemanticView::load(store.var_builder(&dev).pp("adapter"), table, 8)?;
        let items = [0u32, 3, 4, 17, 39];
        let whole = view.adapted(None)?;
        let sub = view.adapted(Some(&items))?;
        let idx = Tensor::new(&items, &dev)?;
        let (a, b) = (sub.index_select(&idx, 0)?, whole.index_select(&idx, 0)?);
        assert!(max_abs_diff(&a, &b)? < 1e-6);
        let others = Tensor::new(&[1u32, 2, 5, 38], &dev)?;
        assert_eq!(
            sub.index_select(&others, 0)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        // Gradients of a loss that reads only those rows.
        let r = randn(&[items.len(), 8], 1.0, &mut Rng::new(6))?;
        let gw = (&b * &r)?.sum_all()?.backward()?;
        let gs = (&a * &r)?.sum_all()?.backward()?;
        for (name, var) in store.vars() {
            let (x, y) = (gs.get(var.as_tensor()), gw.get(var.as_tensor()));
            let (x, y) = (x.expect("a gradient"), y.expect("a gradient"));
            assert!(max_abs_diff(x, y)? < 1e-5, "{name}");
        }
        let err = view.adapted(Some(&[40])).unwrap_err().to_string();
        assert!(
            err.contains("item 40 is outside the semantic table's 40 rows"),
            "{err}"
        );
        Ok(())
    }
}
