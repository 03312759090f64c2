//! Finding, checking and loading plugins.
//!
//! A plugin is a shared library named `libllm_esr_plugin_<crate>.so` that
//! exports a [`PluginDeclaration`]. Before anything of Rust's ABI is trusted the
//! host compares the declaration's ABI version, compiler and runtime fingerprint
//! with its own; a mismatch is refused with the reason and the fix (rebuild the
//! workspace). Libraries are opened with immediate binding (an outdated plugin
//! fails to load instead of crashing later), are never unloaded, and every call
//! into a plugin runs under `catch_unwind`, so a panic becomes an error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use llm_esr_runtime::abi::{DeclarationInfo, DECLARATION_SYMBOL};
use llm_esr_runtime::candle::{self, Tensor};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::{
    Backbone, BackbonePlugin, BackboneSpec, ForwardCtx, Fusion, FusionPlugin, FusionSpec,
    Objective, Plugin, PluginDeclaration, PluginKind, Retrieval, RetrievalPlugin, RetrievalSpec,
};

const FIX: &str = "rebuild the workspace (`cargo build --release --workspace`) so that the host and its plugins come from one build";

/// Environment variable with extra plugin directories (`:`-separated).
pub const PLUGIN_PATH_ENV: &str = "LLM_ESR_PLUGIN_PATH";

/// One shared library found on the plugin path.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    /// The declaration, when it could be read.
    pub info: Option<DeclarationInfo>,
    /// Why it cannot be used, if it cannot.
    pub refused: Option<String>,
}

/// The directories searched, in order: configured, then `LLM_ESR_PLUGIN_PATH`,
/// then the directory of the running binary.
pub fn search_dirs(configured: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = configured.to_vec();
    if let Ok(var) = std::env::var(PLUGIN_PATH_ENV) {
        dirs.extend(var.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(dir.clone());
        // Test binaries live in target/<profile>/deps; plugins one level up.
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(parent) = dir.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    dirs
}

fn is_plugin_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("libllm_esr_plugin_") && (name.ends_with(".so") || name.ends_with(".dylib"))
}

/// Every plugin file on the search path, checked.
pub fn discover(dirs: &[PathBuf]) -> Vec<Found> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths.into_iter().filter(|p| is_plugin_file(p)) {
            found.push(inspect(&path));
        }
    }
    found
}

/// Opens a library and reads its declaration without calling into it.
pub fn inspect(path: &Path) -> Found {
    match open_declaration(path) {
        Ok(decl) => {
            let info = unsafe { decl.info() };
            let refused = info.incompatibility().map(|why| format!("{why}; {FIX}"));
            Found {
                path: path.to_path_buf(),
                info: Some(info),
                refused,
            }
        }
        Err(e) => Found {
            path: path.to_path_buf(),
            info: None,
            refused: Some(format!("{e:#}")),
        },
    }
}

fn open_declaration(path: &Path) -> Result<&'static PluginDeclaration> {
    #[cfg(unix)]
    let lib: libloading::Library = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map(Into::into)
    .map_err(|e| anyhow!("cannot load: {}; {FIX}", describe(&e)))?;
    #[cfg(not(unix))]
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| anyhow!("cannot load: {}; {FIX}", describe(&e)))?;
    // Plugins are never unloaded: trait objects and code they hand out live as
    // long as the process.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let symbol =
        unsafe { lib.get::<*const PluginDeclaration>(DECLARATION_SYMBOL) }.map_err(|_| {
            anyhow!("not an llm-esr-orch plugin: no `llm_esr_plugin_declaration` symbol")
        })?;
    let ptr: *const PluginDeclaration = *symbol;
    if ptr.is_null() {
        bail!("the plugin declaration is a null pointer");
    }
    // `get::<*const T>` of a static yields the static's address.
    Ok(unsafe { &*ptr })
}

/// libloading's message plus the loader's own (`dlerror`), which names the
/// missing symbol or library.
fn describe(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

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
fn guarded<T>(plugin: &str, f: impl FnOnce() -> candle::Result<T>) -> candle::Result<T> {
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

/// Loads the plugin at `path`, checks it, and calls its factory.
pub fn load_path(path: &Path) -> Result<(DeclarationInfo, Plugin)> {
    let decl = open_declaration(path).map_err(|e| anyhow!("plugin {}: {e:#}", path.display()))?;
    let info = unsafe { decl.info() };
    if let Some(why) = info.incompatibility() {
        bail!("plugin {} refused: {why}; {FIX}", path.display());
    }
    let create = decl.create;
    let plugin = guarded(&info.name, || Ok(create())).map_err(|e| anyhow!("{e}"))?;
    if plugin.kind().as_str() != info.kind {
        bail!(
            "plugin {} declares kind `{}` but provides a {}",
            path.display(),
            info.kind,
            plugin.kind().as_str()
        );
    }
    Ok((info, plugin))
}

/// Finds the plugin of `kind` called `name` on the search path and loads it.
pub fn load(dirs: &[PathBuf], kind: PluginKind, name: &str) -> Result<Plugin> {
    let found = discover(dirs);
    let mut refusals = Vec::new();
    for f in &found {
        let Some(info) = &f.info else { continue };
        if info.name != name || info.kind != kind.as_str() {
            continue;
        }
        if let Some(why) = &f.refused {
            refusals.push(format!("{}: {why}", f.path.display()));
            continue;
        }
        return Ok(load_path(&f.path)?.1);
    }
    if !refusals.is_empty() {
        bail!(
            "{} plugin `{name}` was found but refused:\n  {}",
            kind.as_str(),
            refusals.join("\n  ")
        );
    }
    let available: Vec<String> = found
        .iter()
        .filter_map(|f| f.info.as_ref())
        .filter(|i| i.kind == kind.as_str())
        .map(|i| i.name.clone())
        .collect();
    Err(crate::config::config_error(format!(
        "no {} plugin named `{name}` (available: {}); searched {}. Build it with `cargo build --release --workspace`, or add its directory to `plugins.paths` or {PLUGIN_PATH_ENV}",
        kind.as_str(),
        if available.is_empty() { "none".to_string() } else { available.join(", ") },
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
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

    fn objective(&self) -> Objective {
        self.inner.objective()
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
