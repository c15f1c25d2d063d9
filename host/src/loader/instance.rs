use std::sync::Arc;

use abi_stable::std_types::{ROption, RString};
use plugin_api::{
    abi::{RMessage, RawService},
    Reply,
};

use super::{host_handle, threads::CallCensus, Library};
use crate::instance::{CreateError, HostServices, InstanceSource, Message, ServiceInstance};

/// One live service instance, created by a [`Library`]: the [`ServiceInstance`] of a
/// plugin file opened in this process, or of a linked service.
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
        let raw = library.new_raw_service(handle, config);
        census.attribute(library.attribution());
        let raw = raw?;
        Ok(Instance { raw, library })
    }
}

/// Lends a host message to the plugin as the ABI's borrowed view of it (no copy).
fn lend<'a>(message: Message<'a>) -> RMessage<'a> {
    RMessage {
        from: message.from.into(),
        to: message.to.into(),
        kind: message.kind.into(),
        payload: message.payload.into(),
    }
}

impl ServiceInstance for Instance {
    fn start(&mut self) -> Result<(), String> {
        let census = CallCensus::before();
        // SAFETY: `raw.this` is live until `drop`, and `&mut self` makes this the only call.
        let result = into_result(unsafe { (self.raw.vtable().start)(self.raw.this()) });
        census.attribute(self.library.attribution());
        result
    }

    fn stop(&mut self) -> Result<(), String> {
        let census = CallCensus::before();
        // SAFETY: as in `start`.
        let result = into_result(unsafe { (self.raw.vtable().stop)(self.raw.this()) });
        census.attribute(self.library.attribution());
        result
    }

    fn handle(&mut self, request: Message<'_>) -> Reply {
        // SAFETY: as in `start`; what the request borrows outlives the call, and the reply
        // is copied into host memory at once.
        Reply::from_raw(unsafe { (self.raw.vtable().handle)(self.raw.this(), lend(request)) })
    }

    fn on_event(&mut self, event: Message<'_>) -> Result<(), String> {
        // SAFETY: as in `start`; what the event borrows outlives the call.
        into_result(unsafe { (self.raw.vtable().on_event)(self.raw.this(), lend(event)) })
    }

    fn export_state(&mut self) -> Result<Vec<u8>, String> {
        // SAFETY: as in `start`; the bytes are copied into host memory at once.
        let result = unsafe { (self.raw.vtable().export_state)(self.raw.this()) };
        result
            .into_result()
            .map(|bytes| bytes.to_vec())
            .map_err(RString::into_string)
    }

    fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String> {
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

impl InstanceSource for Library {
    fn create(
        self: Arc<Self>,
        services: Arc<dyn HostServices>,
        config: Option<&str>,
    ) -> Result<Box<dyn ServiceInstance>, CreateError> {
        Ok(Box::new(Instance::new(self, services, config)?))
    }
}
