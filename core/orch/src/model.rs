//! Model assembly: item tables, the backbone plugin and (for LLM-ESR) the
//! semantic view, fusion and retrieval plugins, put together per variant.
//!
//! Items are represented by rows of tables indexed by item id (row 0 is
//! padding and stays zero). A forward pass first computes the item tables of
//! the step ([`Tables`]), then encodes sequences by gathering rows of them.

use std::path::PathBuf;

use anyhow::{Context, Result};
use llm_esr_runtime::candle::{DType, Device, Tensor, Var, D};
use llm_esr_runtime::params::ParamStore;
use llm_esr_runtime::{Backbone, BackboneSpec, ForwardCtx, Objective, PluginKind};

use crate::config::{plugin_section, Config, Variant};
use crate::plugin_host::{self, GuardedBackbone};

pub struct Recommender {
    pub store: ParamStore,
    pub variant: Variant,
    pub hidden: usize,
    /// Number of real items; ids run 1..=num_items.
    pub num_items: usize,
    /// Id of the cloze mask token (num_items + 1) when the backbone needs one.
    pub mask_token: Option<u32>,
    backbone: GuardedBackbone,
    /// Collaborative item table (num_items + 1 [+ 1], d), trainable.
    co_table: Var,
}

/// The item representations of one step.
pub struct Tables {
    /// Rows gathered for sequence inputs.
    pub input: Tensor,
    /// Rows scored against user vectors.
    pub output: Tensor,
}

impl Recommender {
    pub fn build(
        cfg: &Config,
        num_items: usize,
        plugin_dirs: &[PathBuf],
        device: &Device,
    ) -> Result<Recommender> {
        let store = ParamStore::new(cfg.seed);
        let vb = store.var_builder(device);
        let spec = BackboneSpec {
            hidden: cfg.model.hidden,
            max_len: cfg.data.max_len,
            dropout: cfg.model.dropout,
            config: plugin_section(&cfg.model.encoder)?,
        };
        let plugin = plugin_host::load(plugin_dirs, PluginKind::Backbone, &cfg.model.backbone)?;
        let backbone =
            plugin_host::build_backbone(plugin, &cfg.model.backbone, vb.pp("backbone"), &spec)
                .with_context(|| format!("building backbone `{}`", cfg.model.backbone))?;
        let mask_token = match backbone.objective() {
            Objective::Cloze { .. } => Some(num_items as u32 + 1),
            _ => None,
        };
        let rows = num_items + 1 + mask_token.is_some() as usize;
        let co_table = item_table(&store, "item_emb", rows, cfg.model.hidden, device)?;
        Ok(Recommender {
            store,
            variant: cfg.model.variant,
            hidden: cfg.model.hidden,
            num_items,
            mask_token,
            backbone,
            co_table,
        })
    }

    pub fn objective(&self) -> Objective {
        self.backbone.objective()
    }

    /// Replaces the collaborative table by given values (PCA initialisation).
    pub fn init_item_table(&self, values: &Tensor) -> Result<()> {
        Ok(self.co_table.set(values)?)
    }

    /// The item tables of this step.
    pub fn tables(&self) -> Result<Tables> {
        let t = self.co_table.as_tensor().clone();
        Ok(Tables {
            input: t.clone(),
            output: t,
        })
    }

    /// Encodes left-padded `ids` (b, l) under `mask` (b, l): (b, l, h).
    pub fn encode(
        &self,
        tables: &Tables,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let x = tables
            .input
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, ()))?;
        Ok(self.backbone.encode(&x, mask, ctx)?)
    }

    /// Scores of the last position of each sequence against `items` (b, c): (b, c).
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

    /// The trainable variables in a fixed order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.store.vars()
    }
}

/// An item table: N(0, 1) like torch's `nn.Embedding`, with the padding row 0
/// zeroed (candle's `Embedding` has no padding index).
fn item_table(
    store: &ParamStore,
    name: &str,
    rows: usize,
    d: usize,
    device: &Device,
) -> Result<Var> {
    let vb = store.var_builder(device);
    vb.get_with_hints(
        (rows, d),
        name,
        llm_esr_runtime::params::xavier_normal(rows, d),
    )?;
    let var = store.get(name).context("item table")?;
    let t = var.as_tensor();
    let zero = Tensor::zeros((1, d), DType::F32, device)?;
    var.set(&Tensor::cat(&[&zero, &t.narrow(0, 1, rows - 1)?], 0)?)?;
    Ok(var)
}

/// The last position of each encoded sequence: (b, l, h) -> (b, h).
pub fn last_position(encoded: &Tensor) -> Result<Tensor> {
    let l = encoded.dim(1)?;
    Ok(encoded.narrow(1, l - 1, 1)?.squeeze(1)?)
}

/// BCE with one negative per target, as the official code: the mean log-loss
/// of the positives plus the mean log-loss of the negatives, each over the
/// `count` positions where `weight` is 1. Uses softplus for stability.
pub fn bce_loss(
    pos_logits: &Tensor,
    neg_logits: &Tensor,
    weight: &Tensor,
    count: f64,
) -> Result<Tensor> {
    let softplus = |x: &Tensor| -> Result<Tensor> {
        Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
    };
    let pos = (softplus(&pos_logits.neg()?)? * weight)?.sum_all()?;
    let neg = (softplus(neg_logits)? * weight)?.sum_all()?;
    Ok(((pos + neg)? / count)?)
}
