//! A plugin whose root module has another layout than the host's.

use abi_stable::{export_root_module, prefix_type::WithMetadata, std_types::RString};
use plugin_api::abi::{PluginMod, PluginModRef};

extern "C" fn manifest() -> RString {
    "not a manifest".into()
}

static MODULE: WithMetadata<PluginMod> = WithMetadata::new(PluginMod { manifest });

/// Exports the mismatching root module.
#[export_root_module]
pub fn root_module() -> PluginModRef {
    PluginModRef(MODULE.static_as_prefix())
}
