//! The real plugin-api's root module, except that `manifest` returns a string.

pub mod abi {
    use abi_stable::{
        declare_root_module_statics, library::RootModule, package_version_strings,
        sabi_types::VersionStrings, std_types::RString, StableAbi,
    };

    /// The root module, with a field of the wrong type.
    #[repr(C)]
    #[derive(StableAbi, Debug)]
    #[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
    #[sabi(missing_field(panic))]
    pub struct PluginMod {
        /// Returns a string where the host expects a manifest.
        #[sabi(last_prefix_field)]
        pub manifest: extern "C" fn() -> RString,
    }

    impl RootModule for PluginModRef {
        declare_root_module_statics! {PluginModRef}
        const BASE_NAME: &'static str = "microkernel_plugin";
        const NAME: &'static str = "microkernel_plugin";
        const VERSION_STRINGS: VersionStrings = package_version_strings!();
    }
}
