use std::sync::Arc;

use abi_stable::std_types::{ROption, RString};
use plugin_api::{
    abi::{RMessage, RawService},
    Reply,
};

use super::{host_handle, threads::CallCensus, HostServices, Library};

/// One live service instance, created by a [`Library`].
///
/// Owned by its service's executor thread: it is `!Send` (it holds the plugin's raw
/// pointer), so it is created, called and dropped on that thread, which is how the plugin
/// gets `&mut self` without locks. It keeps its library open until it is dropped.
pub struct Instance {
    raw: RawService,
    // Declared after `raw`: dropped after the instance is freed.
    library: Arc<Library>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("library", &self.library)
            .finish_non_exhaustive()
    }
}

fn into_result(result: abi_stable::std_types::RResult<(), RString>) -> Result<(), String> {
    result.into_result().map_err(RString::into_string)
}

impl Instance {
    /// Creates an instance of the library's service, handing it a host handle backed by
    /// `services` and its configuration text.
    pub fn new(
        library: Arc<Library>,
        services: Arc<dyn HostServices>,
        config: Option<&str>,
    ) -> Result<Self, String> {
        let handle = host_handle::new_handle(services);
        let config: ROption<RString> = config.map(RString::from).into();
        let census = CallCensus::before();
        let raw = (library.module().new_service())(handle, config).into_result();
        census.attribute(library.attribution());
        let raw = raw.map_err(RString::into_string)?;
        Ok(Instance { raw, library })
    }

    /// Calls the plugin's `start`.
    pub fn start(&mut self) -> Result<(), String> {
        let census = CallCensus::before();
        // SAFETY: `raw.this` is live until `drop`, and `&mut self` makes this the only call.
        let result = into_result(unsafe { (self.raw.vtable().start)(self.raw.this()) });
        census.attribute(self.library.attribution());
        result
    }

    /// Calls the plugin's `stop`.
    pub fn stop(&mut self) -> Result<(), String> {
        let census = CallCensus::before();
        // SAFETY: as in `start`.
        let result = into_result(unsafe { (self.raw.vtable().stop)(self.raw.this()) });
        census.attribute(self.library.attribution());
        result
    }

    /// Calls the plugin's `handle` (lending it the request); panics and errors come back as
    /// code 500.
    pub fn handle(&mut self, request: RMessage<'_>) -> Reply {
        // SAFETY: as in `start`; what the request borrows outlives the call, and the reply
        // is copied into host memory at once.
        Reply::from_raw(unsafe { (self.raw.vtable().handle)(self.raw.this(), request) })
    }

    /// Calls the plugin's `on_event` (lending it the event).
    pub fn on_event(&mut self, event: RMessage<'_>) -> Result<(), String> {
        // SAFETY: as in `start`; what the event borrows outlives the call.
        into_result(unsafe { (self.raw.vtable().on_event)(self.raw.this(), event) })
    }

    /// Calls the plugin's `export_state`.
    pub fn export_state(&mut self) -> Result<Vec<u8>, String> {
        // SAFETY: as in `start`; the bytes are copied into host memory at once.
        let result = unsafe { (self.raw.vtable().export_state)(self.raw.this()) };
        result
            .into_result()
            .map(|bytes| bytes.to_vec())
            .map_err(RString::into_string)
    }

    /// Calls the plugin's `import_state`.
    pub fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String> {
        let census = CallCensus::before();
        // SAFETY: as in `start`; the arguments outlive the call.
        let result = into_result(unsafe {
            (self.raw.vtable().import_state)(self.raw.this(), from_version.into(), state.into())
        });
        census.attribute(self.library.attribution());
        result
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let census = CallCensus::before();
        // SAFETY: `raw.this` was created by this library's `new_service` and is freed exactly
        // once, here, while `self.library` still keeps the library open.
        unsafe { (self.raw.vtable().drop)(self.raw.this()) }
        census.attribute(self.library.attribution());
    }
}
