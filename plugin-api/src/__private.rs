//! Items used by the code that [`crate::export_service!`] generates. Not a public API.

pub use abi_stable::library::{
    __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
};
pub use abi_stable::prefix_type::WithMetadata;
