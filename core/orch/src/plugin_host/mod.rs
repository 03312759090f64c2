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
//!
//! Modules: [`open`] (opening a library and checking its declaration),
//! [`probe`] (the same in a child process), [`guards`] (plugin objects whose
//! every call is guarded against panics).

mod guards;
mod open;
mod probe;

pub use guards::{
    build_backbone, build_fusion, build_retrieval, BuildRefused, GuardedBackbone, GuardedFusion,
    GuardedObjective, GuardedRetrieval,
};
pub use open::{inspect, load_path};
pub use probe::{inspector_main, probe};

use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Result};
use llm_esr_runtime::abi::DeclarationInfo;
use llm_esr_runtime::{Plugin, PluginDeclaration, PluginKind};

use open::{create_checked, open_checked};

const FIX: &str = "rebuild the workspace (`cargo build --release --workspace`) so that the host and its plugins come from one build";

/// Environment variable with extra plugin directories (`:`-separated).
pub const PLUGIN_PATH_ENV: &str = "LLM_ESR_PLUGIN_PATH";

/// The hidden subcommand of `llm-esr-orch` that inspects one plugin file in a
/// child process: `llm-esr-orch __inspect-plugin PATH` (see [`inspector_main`]).
pub const INSPECT_COMMAND: &str = "__inspect-plugin";

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
