//! The declaration every plugin exports, and the checks that make loading it safe.
//!
//! A plugin is a `cdylib` that exports one static, [`PluginDeclaration`], under
//! the symbol [`DECLARATION_SYMBOL`]. Its first fields are plain C data, so the
//! host can read them from any build of the same ABI version. The version, a
//! `u32` at offset 0, is read first and alone ([`DeclarationInfo::read`]): a
//! declaration of another layout is refused without following its other fields.
//! Only when the ABI version, the compiler and the runtime fingerprint all match
//! does the host call `create`, which returns Rust trait objects (sound only
//! because both sides share this very runtime).

use std::ffi::{c_char, CStr};

use crate::{BackbonePlugin, FusionPlugin, RetrievalPlugin};

/// Bumped whenever [`PluginDeclaration`]'s layout or the plugin API (the
/// traits and specs that cross the boundary) changes incompatibly. Every
/// layout must keep this version as a `u32` at offset 0. The history is in
/// docs/plugins.md: 1 the first; 2 objectives as `TrainingObjective` trait
/// objects instead of the `Objective` enum, `FusionSpec::cross_attention`.
pub const ABI_VERSION: u32 = 2;

/// Hash of this runtime's sources, lock file, compiler, flags, profile and features.
pub const FINGERPRINT: &str = env!("LLM_ESR_RUNTIME_FINGERPRINT");

/// `rustc -V` of the compiler that built this runtime.
pub const RUSTC_VERSION: &str = env!("LLM_ESR_RUSTC_VERSION");

/// NUL-terminated copies, inlined into each plugin when the plugin is compiled.
#[doc(hidden)]
pub const FINGERPRINT_C: &str = concat!(env!("LLM_ESR_RUNTIME_FINGERPRINT"), "\0");
#[doc(hidden)]
pub const RUSTC_VERSION_C: &str = concat!(env!("LLM_ESR_RUSTC_VERSION"), "\0");

/// The exported symbol's name, NUL-terminated for `dlsym`.
pub const DECLARATION_SYMBOL: &[u8] = b"llm_esr_plugin_declaration\0";

/// What a plugin provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Backbone,
    Fusion,
    Retrieval,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Backbone => "backbone",
            PluginKind::Fusion => "fusion",
            PluginKind::Retrieval => "retrieval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "backbone" => Some(PluginKind::Backbone),
            "fusion" => Some(PluginKind::Fusion),
            "retrieval" => Some(PluginKind::Retrieval),
            _ => None,
        }
    }
}

/// The factory a plugin hands to the host.
pub enum Plugin {
    Backbone(Box<dyn BackbonePlugin>),
    Fusion(Box<dyn FusionPlugin>),
    Retrieval(Box<dyn RetrievalPlugin>),
}

impl Plugin {
    pub fn kind(&self) -> PluginKind {
        match self {
            Plugin::Backbone(_) => PluginKind::Backbone,
            Plugin::Fusion(_) => PluginKind::Fusion,
            Plugin::Retrieval(_) => PluginKind::Retrieval,
        }
    }
}

/// The exported static. All strings are NUL-terminated and `'static`.
#[repr(C)]
pub struct PluginDeclaration {
    pub abi_version: u32,
    pub rustc_version: *const c_char,
    pub fingerprint: *const c_char,
    pub kind: *const c_char,
    pub name: *const c_char,
    pub version: *const c_char,
    /// Only called after every check above has passed.
    pub create: fn() -> Plugin,
}

// The pointers refer to string literals baked into the plugin.
unsafe impl Sync for PluginDeclaration {}

/// The C-level fields of a declaration, read without trusting the Rust ABI.
#[derive(Debug, Clone)]
pub struct DeclarationInfo {
    pub abi_version: u32,
    pub rustc_version: String,
    pub fingerprint: String,
    pub kind: String,
    pub name: String,
    pub version: String,
}

impl DeclarationInfo {
    /// Reads the plain fields of the declaration at `decl`, the ABI version
    /// first: a declaration of another ABI version is refused without reading
    /// anything else, since its other fields may not be pointers at all.
    ///
    /// Returns `Err(version)` for a foreign ABI version.
    ///
    /// # Safety
    /// `decl` must be the address of the exported `llm_esr_plugin_declaration`
    /// symbol, readable for 4 bytes. Only when its first `u32` equals
    /// [`ABI_VERSION`] is it read as a [`PluginDeclaration`], whose string
    /// fields must then be null or NUL-terminated strings.
    pub unsafe fn read(decl: *const PluginDeclaration) -> Result<DeclarationInfo, u32> {
        // Offset 0 holds the ABI version in every version of the layout.
        let abi_version = std::ptr::read_unaligned(decl.cast::<u32>());
        if abi_version != ABI_VERSION {
            return Err(abi_version);
        }
        // Same version, so this is our layout. The fields are read through the
        // raw pointer, one by one, without asserting that the whole struct
        // (its `create` in particular) is valid.
        let s = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Ok(DeclarationInfo {
            abi_version,
            rustc_version: s((*decl).rustc_version),
            fingerprint: s((*decl).fingerprint),
            kind: s((*decl).kind),
            name: s((*decl).name),
            version: s((*decl).version),
        })
    }

    /// The refusal of a declaration of another ABI version.
    pub fn foreign_abi(abi_version: u32) -> String {
        format!(
            "plugin ABI version {abi_version} but the host expects {ABI_VERSION}; rebuild the plugin against this host"
        )
    }

    /// Why this plugin cannot be used with this host, if it cannot.
    pub fn incompatibility(&self) -> Option<String> {
        if self.abi_version != ABI_VERSION {
            return Some(Self::foreign_abi(self.abi_version));
        }
        if self.rustc_version != RUSTC_VERSION {
            return Some(format!(
                "built by `{}` but the host by `{RUSTC_VERSION}`",
                self.rustc_version
            ));
        }
        if self.fingerprint != FINGERPRINT {
            return Some(format!(
                "built against runtime fingerprint {} but the host has {FINGERPRINT}",
                self.fingerprint
            ));
        }
        if PluginKind::parse(&self.kind).is_none() {
            return Some(format!("unknown plugin kind `{}`", self.kind));
        }
        None
    }
}

/// Exports a plugin. Two forms:
///
/// - `export_plugin!(backbone, "meanrec", load = MeanRec::load)`: the plugin
///   is a `Config` (serde) and a `load`; the macro writes the factory
///   ([`BackboneFactory`](crate::BackboneFactory), [`FusionFactory`](crate::FusionFactory)
///   or [`RetrievalFactory`](crate::RetrievalFactory)), which parses the
///   plugin's section into the `Config` that `load` takes and calls it, the
///   `create` function and the declaration. `load` is
///   `fn(VarBuilder, &BackboneSpec, Config) -> Result<Model>` for a backbone,
///   `fn(VarBuilder, &FusionSpec, Config) -> Result<Model>` for a fusion and
///   `fn(&RetrievalSpec, Config) -> Result<Model>` for a retrieval.
/// - `export_plugin!(backbone, "name", create)` with `create` a
///   `fn() -> Plugin` of your own: only the declaration.
///
/// The name must be the crate's name after `llm-esr-plugin-`.
#[macro_export]
macro_rules! export_plugin {
    (backbone, $name:literal, load = $load:path) => {
        fn __llm_esr_plugin_create() -> $crate::Plugin {
            $crate::Plugin::Backbone(::std::boxed::Box::new($crate::BackboneFactory::new($load)))
        }
        $crate::export_plugin!(backbone, $name, __llm_esr_plugin_create);
    };
    (fusion, $name:literal, load = $load:path) => {
        fn __llm_esr_plugin_create() -> $crate::Plugin {
            $crate::Plugin::Fusion(::std::boxed::Box::new($crate::FusionFactory::new($load)))
        }
        $crate::export_plugin!(fusion, $name, __llm_esr_plugin_create);
    };
    (retrieval, $name:literal, load = $load:path) => {
        fn __llm_esr_plugin_create() -> $crate::Plugin {
            $crate::Plugin::Retrieval(::std::boxed::Box::new($crate::RetrievalFactory::new($load)))
        }
        $crate::export_plugin!(retrieval, $name, __llm_esr_plugin_create);
    };
    ($kind:ident, $name:literal, $create:path) => {
        #[no_mangle]
        #[used]
        pub static llm_esr_plugin_declaration: $crate::abi::PluginDeclaration =
            $crate::abi::PluginDeclaration {
                abi_version: $crate::abi::ABI_VERSION,
                rustc_version: $crate::abi::RUSTC_VERSION_C.as_ptr() as *const ::std::ffi::c_char,
                fingerprint: $crate::abi::FINGERPRINT_C.as_ptr() as *const ::std::ffi::c_char,
                kind: concat!(stringify!($kind), "\0").as_ptr() as *const ::std::ffi::c_char,
                name: concat!($name, "\0").as_ptr() as *const ::std::ffi::c_char,
                version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr()
                    as *const ::std::ffi::c_char,
                create: $create,
            };
    };
}
