//! Plugin objects whose every call runs under `catch_unwind`: a panic in a
//! plugin becomes an error naming it.

use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{anyhow, bail, Result};
use llm_esr_runtime::candle::{self, Tensor};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::{
    Backbone, BackbonePlugin, BackboneSpec, Example, ExampleCtx, ForwardCtx, Fusion, FusionPlugin,
    FusionSpec, Plugin, Retrieval, RetrievalPlugin, RetrievalSpec, TrainingObjective,
};

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Runs `f`, turning a panic inside a plugin into an error.
pub(super) fn guarded<T>(plugin: &str, f: impl FnOnce() -> candle::Result<T>) -> candle::Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| candle::Error::Msg(format!("plugin `{plugin}`: {e}"))),
        Err(payload) => Err(candle::Error::Msg(format!(
            "plugin `{plugin}` panicked: {}",
            panic_message(payload)
        ))),
    }
}

/// A plugin's `build` returned an error: it refused its specification (its
/// configuration section, or the sizes the host gave it). The host reports it
/// as an error of the plugin's config section (exit status 2); a panic in
/// `build` stays an ordinary error.
#[derive(Debug)]
pub struct BuildRefused {
    pub plugin: String,
    pub message: String,
}

impl std::fmt::Display for BuildRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugin `{}`: {}", self.plugin, self.message)
    }
}

impl std::error::Error for BuildRefused {}

/// Runs a plugin's `build` under the panic guard: an error it returns becomes
/// [`BuildRefused`].
fn build_guarded<T>(plugin: &str, f: impl FnOnce() -> candle::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow::Error::new(BuildRefused {
            plugin: plugin.to_string(),
            message: e.to_string(),
        })),
        Err(payload) => Err(anyhow!(
            "plugin `{plugin}` panicked: {}",
            panic_message(payload)
        )),
    }
}

/// A backbone whose calls are protected against panics.
pub struct GuardedBackbone {
    name: String,
    inner: Box<dyn Backbone>,
}

impl Backbone for GuardedBackbone {
    fn embed(&self, items: &Tensor, mask: &Tensor, ctx: &mut ForwardCtx) -> candle::Result<Tensor> {
        guarded(&self.name, || self.inner.embed(items, mask, ctx))
    }

    fn encode_embedded(
        &self,
        x: &Tensor,
        mask: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> candle::Result<Tensor> {
        guarded(&self.name, || self.inner.encode_embedded(x, mask, ctx))
    }

    /// Unguarded; the host uses [`GuardedBackbone::training_objective`].
    fn objective(&self) -> Box<dyn TrainingObjective> {
        self.inner.objective()
    }
}

impl GuardedBackbone {
    /// The backbone's training objective, its calls protected against panics.
    pub fn training_objective(&self) -> Result<GuardedObjective> {
        let inner = guarded(&self.name, || Ok(self.inner.objective()))?;
        GuardedObjective::new(&self.name, inner)
    }
}

/// A backbone's training objective whose calls are protected against panics
/// and whose examples are checked (ids in range, positions inside the
/// input) before the host uses them. `describe`, `copies` and
/// `needs_mask_token` are read once.
pub struct GuardedObjective {
    name: String,
    inner: Box<dyn TrainingObjective>,
    describe: String,
    copies: usize,
    needs_mask_token: bool,
}

impl GuardedObjective {
    /// Wraps the objective of the plugin `name`; refuses one without copies.
    pub fn new(name: &str, inner: Box<dyn TrainingObjective>) -> Result<GuardedObjective> {
        let describe = guarded(name, || Ok(inner.describe()))?;
        let copies = guarded(name, || Ok(inner.copies()))?;
        let needs_mask_token = guarded(name, || Ok(inner.needs_mask_token()))?;
        if copies == 0 {
            bail!("plugin `{name}`: its objective `{describe}` has 0 training copies per epoch");
        }
        Ok(GuardedObjective {
            name: name.to_string(),
            inner,
            describe,
            copies,
            needs_mask_token,
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Training copies of each user per epoch (at least 1).
    pub fn copies(&self) -> usize {
        self.copies
    }

    pub fn needs_mask_token(&self) -> bool {
        self.needs_mask_token
    }

    pub fn qualifies(&self, train: &[u32]) -> Result<bool> {
        Ok(guarded(&self.name, || Ok(self.inner.qualifies(train)))?)
    }

    /// Copy `copy` of a user with training sequence `train`, checked.
    pub fn example(&self, copy: usize, train: &[u32], ctx: &mut ExampleCtx) -> Result<Example> {
        let (num_items, mask_token) = (ctx.num_items, ctx.mask_token);
        let ex = guarded(&self.name, || self.inner.example(copy, train, ctx))?;
        let item = |v: u32| v >= 1 && v as usize <= num_items;
        let token = |v: u32| item(v) || Some(v) == mask_token;
        let problem = if let Some(t) = ex.input.iter().find(|&&t| !token(t)) {
            Some(format!("input token {t}"))
        } else if let Some(t) = ex.targets.iter().find(|t| t.position >= ex.input.len()) {
            Some(format!(
                "target position {} for an input of {} tokens",
                t.position,
                ex.input.len()
            ))
        } else if let Some(t) = ex.targets.iter().find(|t| !item(t.item)) {
            Some(format!("target item {}", t.item))
        } else {
            ex.targets
                .iter()
                .find(|t| !item(t.negative))
                .map(|t| format!("negative item {}", t.negative))
        };
        if let Some(problem) = problem {
            bail!(
                "plugin `{}`: objective `{}` built an invalid training example ({problem}; items \
                 are 1..={num_items}{})",
                self.name,
                self.describe,
                mask_token.map_or(String::new(), |m| format!(", the mask token {m}"))
            );
        }
        Ok(ex)
    }

    /// The input that predicts the item after `history`, checked: its tokens
    /// are items (`1..=num_items`) or the mask token.
    pub fn inference_input(
        &self,
        history: &[u32],
        num_items: usize,
        mask_token: Option<u32>,
    ) -> Result<Vec<u32>> {
        let input = guarded(&self.name, || {
            self.inner.inference_input(history, mask_token)
        })?;
        let token = |t: u32| (t >= 1 && t as usize <= num_items) || Some(t) == mask_token;
        if let Some(t) = input.iter().find(|&&t| !token(t)) {
            bail!(
                "plugin `{}`: objective `{}` gave an inference input with token {t} (items are \
                 1..={num_items}{})",
                self.name,
                self.describe,
                mask_token.map_or(String::new(), |m| format!(", the mask token {m}"))
            );
        }
        Ok(input)
    }
}

pub fn build_backbone(
    plugin: Plugin,
    name: &str,
    vb: VarBuilder,
    spec: &BackboneSpec,
) -> Result<GuardedBackbone> {
    let Plugin::Backbone(factory) = plugin else {
        bail!("`{name}` is not a backbone plugin")
    };
    let factory: &dyn BackbonePlugin = factory.as_ref();
    let inner = build_guarded(name, || factory.build(vb, spec))?;
    Ok(GuardedBackbone {
        name: name.to_string(),
        inner,
    })
}

/// A fusion whose calls are protected against panics.
pub struct GuardedFusion {
    name: String,
    inner: Box<dyn Fusion>,
}

impl Fusion for GuardedFusion {
    fn fuse_sequences(
        &self,
        co: &Tensor,
        se: &Tensor,
        mask: &Tensor,
        ctx: &mut ForwardCtx,
    ) -> candle::Result<(Tensor, Tensor)> {
        guarded(&self.name, || self.inner.fuse_sequences(co, se, mask, ctx))
    }

    fn user_vector(&self, u_co: &Tensor, u_se: &Tensor) -> candle::Result<Tensor> {
        guarded(&self.name, || self.inner.user_vector(u_co, u_se))
    }

    fn item_vector(&self, e_co: &Tensor, e_se: &Tensor) -> candle::Result<Tensor> {
        guarded(&self.name, || self.inner.item_vector(e_co, e_se))
    }
}

pub fn build_fusion(
    plugin: Plugin,
    name: &str,
    vb: VarBuilder,
    spec: &FusionSpec,
) -> Result<GuardedFusion> {
    let Plugin::Fusion(factory) = plugin else {
        bail!("`{name}` is not a fusion plugin")
    };
    let factory: &dyn FusionPlugin = factory.as_ref();
    let inner = build_guarded(name, || factory.build(vb, spec))?;
    Ok(GuardedFusion {
        name: name.to_string(),
        inner,
    })
}

/// A retrieval whose calls are protected against panics.
pub struct GuardedRetrieval {
    name: String,
    inner: Box<dyn Retrieval>,
}

impl Retrieval for GuardedRetrieval {
    fn teachers(&self, users: &[u32]) -> candle::Result<Vec<Vec<u32>>> {
        guarded(&self.name, || self.inner.teachers(users))
    }

    fn distill_loss(&self, student: &Tensor, teacher: &Tensor) -> candle::Result<Tensor> {
        guarded(&self.name, || self.inner.distill_loss(student, teacher))
    }
}

pub fn build_retrieval(
    plugin: Plugin,
    name: &str,
    spec: &RetrievalSpec,
) -> Result<GuardedRetrieval> {
    let Plugin::Retrieval(factory) = plugin else {
        bail!("`{name}` is not a retrieval plugin")
    };
    let factory: &dyn RetrievalPlugin = factory.as_ref();
    let inner = build_guarded(name, || factory.build(spec))?;
    Ok(GuardedRetrieval {
        name: name.to_string(),
        inner,
    })
}
