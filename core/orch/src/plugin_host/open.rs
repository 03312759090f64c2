//! Opening a plugin library in this process and checking its declaration.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use llm_esr_runtime::abi::{DeclarationInfo, DECLARATION_SYMBOL};
use llm_esr_runtime::{Plugin, PluginDeclaration};

use super::guards::guarded;
use super::{file_name, name_from_file, Found, FIX};

/// Opens a library **in this process** (running its constructors) and reads
/// its declaration, ABI version first, without calling into the plugin.
pub fn inspect(path: &Path) -> Found {
    open_checked(path).0
}

/// Opens `path` here and checks its declaration; the declaration comes back
/// only when the plugin passed every check.
pub(super) fn open_checked(path: &Path) -> (Found, Option<&'static PluginDeclaration>) {
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
pub(super) fn create_checked(
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
