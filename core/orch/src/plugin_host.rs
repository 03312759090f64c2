//! Finding, checking and loading plugins.
//!
//! A plugin called `<name>` lives in a shared library named
//! `libllm_esr_plugin_<name with - as _>.so` (`.dylib` on macOS) that exports a
//! [`PluginDeclaration`]. Loading a plugin by name opens only the files of that
//! name on the search path, never the other plugin files. Opening a library runs
//! its constructors, so:
//!
//! - [`discover`] only lists files; nothing is opened;
//! - [`probe`] opens one file in a child process (this binary re-executed with
//!   the hidden subcommand [`INSPECT_COMMAND`], see [`inspector_main`]), which
//!   reads the declaration, checks it and calls the plugin's `create`; a crash
//!   there (a signal) becomes a refusal of that plugin instead of the end of
//!   this process. [`load`] probes first when [`probe_with`] was called (the
//!   command-line binary does);
//! - in this process the declaration's ABI version is read before any other
//!   field ([`DeclarationInfo::read`]), then the compiler and the runtime
//!   fingerprint are compared with the host's; a mismatch is refused with the
//!   reason and the fix. Only then is `create` called.
//!
//! Libraries are opened with immediate binding (an outdated plugin fails to load
//! instead of crashing later), at most once per process, and are never
//! unloaded; every call into a plugin runs under `catch_unwind`, so a panic
//! becomes an error.

use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use llm_esr_runtime::abi::{DeclarationInfo, DECLARATION_SYMBOL};
use llm_esr_runtime::candle::{self, Tensor};
use llm_esr_runtime::candle_nn::VarBuilder;
use llm_esr_runtime::{
    Backbone, BackbonePlugin, BackboneSpec, Example, ExampleCtx, ForwardCtx, Fusion, FusionPlugin,
    FusionSpec, Plugin, PluginDeclaration, PluginKind, Retrieval, RetrievalPlugin, RetrievalSpec,
    TrainingObjective,
};

const FIX: &str = "rebuild the workspace (`cargo build --release --workspace`) so that the host and its plugins come from one build";

/// Environment variable with extra plugin directories (`:`-separated).
pub const PLUGIN_PATH_ENV: &str = "LLM_ESR_PLUGIN_PATH";

/// The hidden subcommand of `llm-esr-orch` that inspects one plugin file in a
/// child process: `llm-esr-orch __inspect-plugin PATH` (see [`inspector_main`]).
pub const INSPECT_COMMAND: &str = "__inspect-plugin";

/// How long a child inspecting one plugin may take before it is killed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Every plugin file name starts with this after the platform's `lib`.
const FILE_STEM: &str = "llm_esr_plugin_";

/// One shared library found on the plugin path.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    /// The plugin's name as its file name gives it (`_` shown as `-`), or the
    /// declared name once inspected.
    pub name: String,
    /// Whether the file was opened (in this process or a child) and checked.
    pub inspected: bool,
    /// The declaration, when it could be read.
    pub info: Option<DeclarationInfo>,
    /// Why it cannot be used, if it cannot.
    pub refused: Option<String>,
}

impl Found {
    fn new(path: &Path) -> Found {
        let name = name_from_file(path).unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        Found {
            path: path.to_path_buf(),
            name,
            inspected: false,
            info: None,
            refused: None,
        }
    }

    fn refuse(mut self, why: impl Into<String>) -> Found {
        self.inspected = true;
        self.refused = Some(why.into());
        self
    }
}

/// The file that holds the plugin `name`: `cross-attention` ->
/// `libllm_esr_plugin_cross_attention.so`.
pub fn file_name(name: &str) -> String {
    format!(
        "{DLL_PREFIX}{FILE_STEM}{}{DLL_SUFFIX}",
        name.replace('-', "_")
    )
}

/// The plugin name a file name stands for (`_` read as `-`), or `None` when the
/// file is not named like a plugin.
pub fn name_from_file(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_prefix(DLL_PREFIX)?
        .strip_prefix(FILE_STEM)?
        .strip_suffix(DLL_SUFFIX)?;
    (!stem.is_empty()).then(|| stem.replace('_', "-"))
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

/// Every plugin file on the search path, in search order, **not opened**: the
/// names come from the file names ([`Found::inspected`] is false).
pub fn discover(dirs: &[PathBuf]) -> Vec<Found> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if path.is_file() && name_from_file(&path).is_some() {
                found.push(Found::new(&path));
            }
        }
    }
    found
}

/// The files on the search path that can hold the plugin `name`, in search order.
pub fn candidates(dirs: &[PathBuf], name: &str) -> Vec<PathBuf> {
    let file = file_name(name);
    dirs.iter()
        .map(|d| d.join(&file))
        .filter(|p| p.is_file())
        .collect()
}

/// Opens a library **in this process** (running its constructors) and reads
/// its declaration, ABI version first, without calling into the plugin.
pub fn inspect(path: &Path) -> Found {
    open_checked(path).0
}

/// Opens `path` here and checks its declaration; the declaration comes back
/// only when the plugin passed every check.
fn open_checked(path: &Path) -> (Found, Option<&'static PluginDeclaration>) {
    let found = Found::new(path);
    let decl = match open_declaration(path) {
        Ok(decl) => decl,
        Err(e) => return (found.refuse(format!("{e:#}")), None),
    };
    // SAFETY: `decl` is the address of the exported declaration symbol. Only
    // its first u32 is read unless that is our ABI version, in which case the
    // plugin was built from this very struct definition.
    let info = match unsafe { DeclarationInfo::read(decl) } {
        Ok(info) => info,
        Err(version) => return (found.refuse(DeclarationInfo::foreign_abi(version)), None),
    };
    let mut found = Found {
        name: info.name.clone(),
        inspected: true,
        info: Some(info.clone()),
        ..found
    };
    if let Some(why) = info.incompatibility() {
        found.refused = Some(format!("{why}; {FIX}"));
        return (found, None);
    }
    if let Some(why) = name_mismatch(path, &info.name) {
        found.refused = Some(why);
        return (found, None);
    }
    // SAFETY: every check passed: same ABI, compiler and runtime, so the
    // symbol is a `PluginDeclaration` of this very layout, a static that lives
    // as long as the (never unloaded) library.
    (found, Some(unsafe { &*decl }))
}

/// A plugin's declared name must be the one its file name stands for. Files
/// not named like plugins (test fixtures loaded by path) are not checked.
fn name_mismatch(path: &Path, declared: &str) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    name_from_file(path)?;
    let expected = file_name(declared);
    (file != expected).then(|| {
        format!(
            "declares the name `{declared}`, whose file is `{expected}`, but the file is `{file}`; a plugin's file name must be its name with `-` as `_`: rename the file or the plugin"
        )
    })
}

/// Opens the library (immediate binding, never unloaded) and returns the
/// address of its declaration symbol, without reading it.
fn open_declaration(path: &Path) -> Result<*const PluginDeclaration> {
    // SAFETY (both branches): opening a library runs its constructors; that is
    // the risk this module keeps to the one requested file, or to a child
    // process ([`probe`]).
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
    // SAFETY: `get::<*const T>` of a static yields the static's address; the
    // type is not trusted until `DeclarationInfo::read` has checked the ABI.
    let symbol =
        unsafe { lib.get::<*const PluginDeclaration>(DECLARATION_SYMBOL) }.map_err(|_| {
            anyhow!("not an llm-esr-orch plugin: no `llm_esr_plugin_declaration` symbol")
        })?;
    let ptr: *const PluginDeclaration = *symbol;
    if ptr.is_null() {
        bail!("the plugin declaration is a null pointer");
    }
    Ok(ptr)
}

/// libloading's message plus the loader's own (`dlerror`), which names the
/// missing symbol or library.
fn describe(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// Calls a checked plugin's factory (panics caught) and checks the kind it
/// provides against the declared one.
fn create_checked(
    path: &Path,
    info: &DeclarationInfo,
    decl: &'static PluginDeclaration,
) -> Result<Plugin> {
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
    Ok(plugin)
}

/// Loads the plugin at `path` in this process (no child probe), checks it, and
/// calls its factory.
pub fn load_path(path: &Path) -> Result<(DeclarationInfo, Plugin)> {
    let (found, decl) = open_checked(path);
    let (Some(info), Some(decl)) = (found.info, decl) else {
        let why = found.refused.unwrap_or_default();
        bail!("plugin {} refused: {why}", path.display());
    };
    let plugin = create_checked(path, &info, decl)?;
    Ok((info, plugin))
}

/// The executable that [`load`] re-executes to probe a plugin, when set.
static INSPECTOR: OnceLock<PathBuf> = OnceLock::new();

/// Libraries already opened and checked in this process, by path.
static OPENED: Mutex<Vec<(PathBuf, DeclarationInfo, &'static PluginDeclaration)>> =
    Mutex::new(Vec::new());

/// Makes [`load`] probe each plugin file in a child process `exe
/// __inspect-plugin PATH` before opening it here, so that a crash in its
/// library constructors or its `create` is reported as that plugin's failure.
/// `exe` must dispatch [`INSPECT_COMMAND`] to [`inspector_main`], as
/// `llm-esr-orch` does. The first call wins.
pub fn probe_with(exe: PathBuf) {
    let _ = INSPECTOR.set(exe);
}

/// Finds the plugin of `kind` called `name` on the search path and loads it.
///
/// Only files named [`file_name`]`(name)` are considered, in search order; the
/// first that passes every check (and the probe, when enabled) is used. Each
/// is opened at most once per process.
pub fn load(dirs: &[PathBuf], kind: PluginKind, name: &str) -> Result<Plugin> {
    let mut refusals = Vec::new();
    for path in candidates(dirs, name) {
        let key = path.canonicalize().unwrap_or_else(|_| path.clone());
        let cached = OPENED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(p, _, _)| *p == key)
            .map(|(_, info, decl)| (info.clone(), *decl));
        let (info, decl) = match cached {
            Some(hit) => hit,
            None => {
                if let Some(exe) = INSPECTOR.get() {
                    let probed = probe(exe, &path);
                    if let Some(why) = probed.refused {
                        refusals.push(format!("{}: {why}", path.display()));
                        continue;
                    }
                }
                let (found, decl) = open_checked(&path);
                let (Some(info), Some(decl)) = (found.info, decl) else {
                    let why = found.refused.unwrap_or_default();
                    refusals.push(format!("{}: {why}", path.display()));
                    continue;
                };
                OPENED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((key, info.clone(), decl));
                (info, decl)
            }
        };
        if info.name != name {
            refusals.push(format!(
                "{}: the plugin is called `{}`, not `{name}`; use that name",
                path.display(),
                info.name
            ));
            continue;
        }
        if info.kind != kind.as_str() {
            refusals.push(format!(
                "{}: `{name}` is a {} plugin, not a {}",
                path.display(),
                info.kind,
                kind.as_str()
            ));
            continue;
        }
        return create_checked(&path, &info, decl);
    }
    if !refusals.is_empty() {
        bail!(
            "{} plugin `{name}` was found but refused:\n  {}",
            kind.as_str(),
            refusals.join("\n  ")
        );
    }
    let mut available: Vec<String> = discover(dirs).into_iter().map(|f| f.name).collect();
    available.sort();
    available.dedup();
    // A name no plugin file has is an error of the configuration (exit 2).
    Err(crate::config::config_error(format!(
        "no {} plugin named `{name}`: no file {} in {} (plugin files there: {}). Build it with `cargo build --release --workspace`, or add its directory to `plugins.paths` or {PLUGIN_PATH_ENV}",
        kind.as_str(),
        file_name(name),
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
        if available.is_empty() { "none".to_string() } else { available.join(", ") },
    )))
}

/// Inspects one plugin file in a child process: `exe __inspect-plugin PATH`
/// opens it, checks its declaration and calls its `create`. A child that dies
/// by a signal (a crash in the library's constructors or in `create`), fails
/// otherwise or takes longer than a minute gives a refusal; this process never
/// opens the file. See [`inspector_main`] for the child's side.
pub fn probe(exe: &Path, path: &Path) -> Found {
    let found = Found::new(path);
    let child = Command::new(exe)
        .arg(INSPECT_COMMAND)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return found.refuse(format!(
                "cannot start the plugin inspector {}: {e}",
                exe.display()
            ))
        }
    };
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > PROBE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "did not finish loading within {} s (killed)",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => break Err(format!("cannot wait for the plugin inspector: {e}")),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let status = match status {
        Ok(s) => s,
        Err(why) => return found.refuse(why),
    };
    read_report(found, &stdout, &stderr, status)
}

/// The parent's reading of a child inspector: its JSON lines, then its fate.
fn read_report(mut found: Found, stdout: &str, stderr: &str, status: ExitStatus) -> Found {
    // The first line comes once the declaration was read and checked; the
    // second, if any, once `create` returned.
    let mut declared = false;
    let mut created = false;
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(d) = v.get("declaration") {
            declared = true;
            found.info = info_from_json(d);
            if let Some(info) = &found.info {
                found.name = info.name.clone();
            }
        }
        if v.get("created").is_some() {
            created = true;
        }
        if let Some(why) = v.get("refused").and_then(|r| r.as_str()) {
            found.refused = Some(why.to_string());
        }
    }
    found.inspected = true;
    if status.success() {
        if !declared && found.refused.is_none() {
            found.refused = Some(format!(
                "the plugin inspector printed no declaration: {}",
                stderr.trim()
            ));
        }
        return found;
    }
    let stage = if !declared {
        "while loading"
    } else if found.refused.is_none() && !created {
        "in its `create()`"
    } else {
        "while unloading"
    };
    let why = match signal_of(status) {
        Some(sig) => format!("crashed {stage} ({})", describe_signal(sig)),
        None => {
            let last = stderr.trim().lines().last().unwrap_or("");
            let sep = if last.is_empty() { "" } else { ": " };
            format!("the plugin inspector failed ({status}) {stage}{sep}{last}")
        }
    };
    found.refused = Some(why);
    found
}

fn info_from_json(d: &serde_json::Value) -> Option<DeclarationInfo> {
    let s = |k: &str| d.get(k)?.as_str().map(str::to_string);
    Some(DeclarationInfo {
        abi_version: d.get("abi_version")?.as_u64()? as u32,
        rustc_version: s("rustc_version")?,
        fingerprint: s("fingerprint")?,
        kind: s("kind")?,
        name: s("name")?,
        version: s("version")?,
    })
}

fn info_to_json(i: &DeclarationInfo) -> serde_json::Value {
    serde_json::json!({
        "abi_version": i.abi_version,
        "rustc_version": i.rustc_version,
        "fingerprint": i.fingerprint,
        "kind": i.kind,
        "name": i.name,
        "version": i.version,
    })
}

#[cfg(unix)]
fn signal_of(status: ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(&status)
}

#[cfg(not(unix))]
fn signal_of(_status: ExitStatus) -> Option<i32> {
    None
}

/// `signal 11, SIGSEGV`.
fn describe_signal(sig: i32) -> String {
    #[cfg(target_os = "linux")]
    const BUS: i32 = 7;
    #[cfg(not(target_os = "linux"))]
    const BUS: i32 = 10;
    let name = match sig {
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        s if s == BUS => "SIGBUS",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig}, {name}")
}

/// The child's side of [`probe`] (`llm-esr-orch __inspect-plugin PATH`): opens
/// the file here, prints one JSON line `{"path", "declaration", "refused"}`
/// (`declaration` null when it could not be read), and, when the plugin passed
/// every check, calls its `create` and prints `{"created": kind}` or
/// `{"refused": why}`. Each line is flushed before the next step, so that the
/// parent can tell where a crash happened.
pub fn inspector_main(path: &Path) -> Result<()> {
    let (found, decl) = open_checked(path);
    let mut out = std::io::stdout().lock();
    let line = serde_json::json!({
        "path": path.display().to_string(),
        "declaration": found.info.as_ref().map(info_to_json),
        "refused": found.refused,
    });
    writeln!(out, "{line}")?;
    out.flush()?;
    if let (Some(info), Some(decl)) = (&found.info, decl) {
        // A panic is caught (and becomes the refusal); its message goes to
        // stderr, which the parent keeps to itself.
        let line = match create_checked(path, info, decl) {
            Ok(plugin) => serde_json::json!({ "created": plugin.kind().as_str() }),
            Err(e) => serde_json::json!({ "refused": format!("{e:#}") }),
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
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
