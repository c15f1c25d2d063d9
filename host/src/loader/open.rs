//! Opening a library and checking it: `dlopen`, the ABI version, the layouts, the root
//! module and the manifest. All that a probe does in its child process.

use std::{path::Path, sync::atomic::Ordering};

use abi_stable::{
    abi_stability::abi_checking::{
        check_layout_compatibility_with_globals, AbiInstability, AbiInstabilityError,
        CheckingGlobals,
    },
    library::{AbiHeaderRef, LibHeader, RootModule, ROOT_MODULE_LOADER_NAME_WITH_NUL},
    sabi_types::{VersionNumber, VersionStrings},
    type_layout::TLFieldOrFunction,
    StableAbi,
};
use libloading::os::unix::{Library as RawLibrary, RTLD_LOCAL, RTLD_NOW};
use plugin_api::abi::PluginModRef;

use super::{
    error::libloading_reason,
    library::{Library, DEFAULT_CLOSE_TIMEOUT, NEXT_LIBRARY_ID},
    manifest::lossy,
    threads::Census,
    LoadError, Manifest,
};

/// Opens the library at `open_path` (named `path` in errors) and checks it, with no shadow
/// copy: the loader's last step, and all that a probe does in its child process.
pub(super) fn open(path: &Path, open_path: &Path, sha256: &[u8; 32]) -> Result<Library, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    // Threads alive before the library's code first runs: any other thread found alive
    // when it is closed may be running its code (see `threads`).
    let baseline = Census::take().map_err(read_err)?;
    // SAFETY: opening a library runs its initializers. Plugin files are code the operator
    // chose to run in this process (and that a probe, when configured, ran first in a
    // child process); Rust cdylibs built with `export_service!` have no initializers beyond
    // the standard library's.
    let opened = unsafe { RawLibrary::open(Some(open_path), RTLD_NOW | RTLD_LOCAL) };
    let raw = opened.map_err(|e| LoadError::Open {
        path: path.to_owned(),
        reason: libloading_reason(&e),
    })?;

    // From here on, errors are turned into strings before `raw` is closed: the library
    // below closes it when dropped, as safely as any other.
    let mut library = Library {
        path: path.to_owned(),
        shadow: open_path.to_owned(),
        sha256: *sha256,
        manifest: Manifest::placeholder(),
        module: None,
        raw: Some(raw),
        baseline,
        id: NEXT_LIBRARY_ID.fetch_add(1, Ordering::Relaxed),
        close_timeout: DEFAULT_CLOSE_TIMEOUT,
    };
    let module = check_and_init(path, library.raw.as_ref().expect("just opened"))?;
    library.module = Some(module);
    library.manifest = Manifest::from_raw(&(module.manifest())()).map_err(|reason| {
        LoadError::InvalidManifest {
            path: path.to_owned(),
            reason,
        }
    })?;
    Ok(library)
}

fn version_string(strings: VersionStrings) -> String {
    match VersionNumber::new(strings) {
        Ok(v) => format!("{}.{}.{}", v.major, v.minor, v.patch),
        Err(_) => "(unparsable)".to_owned(),
    }
}

/// Whether a plugin built against `plugin` can be used by a host built against `host`:
/// same `0.x` minor, or same major from 1.0 on.
fn api_compatible(host: VersionNumber, plugin: VersionNumber) -> bool {
    host.major == plugin.major && (host.major != 0 || host.minor == plugin.minor)
}

fn check_and_init(path: &Path, raw: &RawLibrary) -> Result<PluginModRef, LoadError> {
    let symbol = ROOT_MODULE_LOADER_NAME_WITH_NUL;
    // SAFETY: a plugin exports its `LibHeader` static under this name; the symbol's address
    // is read as a reference to it (which is what `AbiHeaderRef` is), and `upgrade` checks
    // abi_stable's magic bytes and version before reading further. The reference does not
    // outlive `raw`: it is used in this function only.
    let header: AbiHeaderRef = match unsafe { raw.get::<AbiHeaderRef>(symbol.as_bytes()) } {
        Ok(symbol) => *symbol,
        Err(_) => {
            return Err(LoadError::NotAPlugin {
                path: path.to_owned(),
                symbol: symbol.trim_end_matches('\0').to_owned(),
            })
        }
    };
    let lib_header: &LibHeader = header.upgrade().map_err(|e| LoadError::AbiMismatch {
        path: path.to_owned(),
        summary: lossy(format!("incompatible abi_stable: {e}").as_bytes()),
        report: lossy(format!("{e:#?}").as_bytes()),
    })?;

    let host_abi = <PluginModRef as RootModule>::VERSION_STRINGS;
    let plugin_abi = lib_header.version_strings();
    match (VersionNumber::new(host_abi), VersionNumber::new(plugin_abi)) {
        (Ok(host), Ok(plugin)) if api_compatible(host, plugin) => {}
        _ => {
            return Err(LoadError::VersionMismatch {
                path: path.to_owned(),
                host: version_string(host_abi),
                plugin: version_string(plugin_abi),
            })
        }
    }

    let Some(found) = lib_header.layout() else {
        return Err(LoadError::AbiMismatch {
            path: path.to_owned(),
            summary: "the plugin exports no layout information".to_owned(),
            report: String::new(),
        });
    };
    // A fresh checker every time: the process-wide one keeps pointers into every library it
    // has checked, which dangle once a library is closed.
    let checker = CheckingGlobals::new();
    if let Err(errors) = check_layout_compatibility_with_globals(
        <PluginModRef as StableAbi>::LAYOUT,
        found,
        &checker,
    ) {
        let summary = errors
            .errors
            .last()
            .map(summarize_mismatch)
            .unwrap_or_else(|| "the layouts differ".to_owned());
        // abi_stable formats names read from the library: a corrupt one's are any bytes.
        return Err(LoadError::AbiMismatch {
            path: path.to_owned(),
            summary: lossy(summary.as_bytes()),
            report: lossy(errors.to_string().as_bytes()),
        });
    }

    // SAFETY: the layout of the plugin's root module was checked against `PluginModRef` just
    // above, with the same checker abi_stable itself would use.
    unsafe { lib_header.init_root_module_with_unchecked_layout::<PluginModRef>() }.map_err(|e| {
        LoadError::Init {
            path: path.to_owned(),
            reason: lossy(e.to_string().as_bytes()),
        }
    })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The innermost mismatch in one line: where (`PluginMod.manifest.__returns`) and what.
fn summarize_mismatch(error: &AbiInstabilityError) -> String {
    let at = error
        .stack_trace
        .iter()
        .map(|step| match &step.expected {
            TLFieldOrFunction::Field(field) => field.name(),
            TLFieldOrFunction::Function(function) => function.name.as_str(),
        })
        .filter(|name| !name.is_empty() && *name != "0")
        .collect();
    let mut at: Vec<&str> = at;
    // A function pointer is named after its field: `manifest.manifest` says it twice.
    at.dedup();
    let returns = at.last() == Some(&"__returns");
    if returns {
        at.pop();
    }
    let what: Vec<String> = error
        .errs
        .iter()
        .map(|e| match e {
            AbiInstability::Name(types) => {
                format!(
                    "expected type `{}`, found `{}`",
                    types.expected, types.found
                )
            }
            other => one_line(&format!("{other:?}")),
        })
        .collect();
    let at = match (at.is_empty(), returns) {
        (true, _) => "the root module".to_owned(),
        (false, false) => format!("field `{}`", at.join(".")),
        (false, true) => format!("the return type of `{}`", at.join(".")),
    };
    format!("{at}: {}", what.join("; "))
}
