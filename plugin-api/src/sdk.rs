//! The plugin author's SDK: a plain Rust trait, plain Rust types, and the glue that the
//! export macro instantiates for a service type.

use std::{
    any::Any,
    ffi::c_void,
    fmt,
    marker::PhantomData,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Mutex,
    time::Duration,
};

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use serde::{de::DeserializeOwned, Serialize};

use crate::abi::{
    HostHandle, LogLevel, RCallResult, RManifest, RMessage, RReply, RawService, ServiceVTable,
};

/// The error type of every fallible [`Service`] method: anything that implements
/// `std::error::Error`, so `?` works on I/O, serde and string errors alike.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long [`Host::request`] waits for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Reply codes with a meaning shared by the host and every service.
pub mod codes {
    /// Success.
    pub const OK: u32 = 0;
    /// The request was malformed (bad payload, unknown kind).
    pub const BAD_REQUEST: u32 = 400;
    /// No such service, or the service is not running.
    pub const NOT_FOUND: u32 = 404;
    /// No reply within the caller's timeout.
    pub const TIMEOUT: u32 = 408;
    /// The service runs on another host of the fleet, which the message names: send it
    /// there.
    pub const MISDIRECTED: u32 = 421;
    /// The service failed or panicked while handling the request.
    pub const FAILED: u32 = 500;
    /// The service's worker process died while it held the request (an isolated service):
    /// it is restarting from its last checkpoint, and a later request may succeed.
    pub const UNAVAILABLE: u32 = 503;
    /// The request would come back to a service that is already waiting in the same chain.
    pub const LOOP: u32 = 508;
}

/// Whether `name` is a valid service name: `[a-z0-9][a-z0-9_-]{0,63}`, and not `kernel`
/// (the host's own name: requests to it never reach a service).
///
/// Service names become file names (`<name>.state`), so nothing else is accepted.
pub fn is_valid_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    name != "kernel"
        && !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// A request or an event: who sent it, to whom, what kind, and an opaque payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The sending service, `kernel`, or `external` for requests from outside the host.
    pub from: String,
    /// The receiving service.
    pub to: String,
    /// What is asked or announced.
    pub kind: String,
    /// Opaque bytes; JSON by convention.
    pub payload: Vec<u8>,
}

/// A request, answered with a [`Reply`].
pub type Request = Message;
/// An event: one-way, queued, never answered.
pub type Event = Message;

/// An error that is the requester's fault: returned from [`Service::handle`] (directly or
/// as the source of another error), it is answered with code [`codes::BAD_REQUEST`] (400)
/// instead of [`codes::FAILED`] (500). [`Message::json`] and [`Message::text`] fail with it,
/// so `let body: MyRequest = request.json()?;` answers a malformed payload with 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadRequest {}

impl BadRequest {
    /// Whether `error`, or one of its sources, is a [`BadRequest`].
    pub fn is_in(error: &(dyn std::error::Error + 'static)) -> bool {
        std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<BadRequest>())
    }
}

impl Message {
    /// Parses the payload as JSON; a payload that does not parse is a [`BadRequest`].
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, BoxError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            BadRequest(format!(
                "payload of `{}` from `{}` is not the expected JSON: {e}",
                self.kind, self.from
            ))
            .into()
        })
    }

    /// The payload as UTF-8 text; a payload that is not is a [`BadRequest`].
    pub fn text(&self) -> Result<&str, BoxError> {
        std::str::from_utf8(&self.payload).map_err(|e| {
            BadRequest(format!(
                "payload of `{}` from `{}` is not UTF-8: {e}",
                self.kind, self.from
            ))
            .into()
        })
    }

    /// Copies a message the host lends for the length of a call.
    fn from_raw(raw: RMessage<'_>) -> Self {
        Message {
            from: raw.from.as_str().to_owned(),
            to: raw.to.as_str().to_owned(),
            kind: raw.kind.as_str().to_owned(),
            payload: raw.payload.as_slice().to_vec(),
        }
    }
}

/// The answer to a request: a code (see [`codes`]), a message and data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    /// `0` on success.
    pub code: u32,
    /// Why it failed; empty on success.
    pub message: String,
    /// Opaque bytes; JSON by convention.
    pub data: Vec<u8>,
}

impl Reply {
    /// A successful reply carrying `data`.
    pub fn ok(data: impl Into<Vec<u8>>) -> Self {
        Reply {
            code: codes::OK,
            message: String::new(),
            data: data.into(),
        }
    }

    /// A successful reply carrying `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(data) => Reply::ok(data),
            Err(e) => Reply::error(codes::FAILED, format!("reply is not serializable: {e}")),
        }
    }

    /// A failed reply.
    pub fn error(code: u32, message: impl Into<String>) -> Self {
        Reply {
            code,
            message: message.into(),
            data: Vec::new(),
        }
    }

    /// A reply with code [`codes::BAD_REQUEST`] (400): the request was malformed or not
    /// understood.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Reply::error(codes::BAD_REQUEST, message)
    }

    /// Whether the code is [`codes::OK`].
    pub fn is_ok(&self) -> bool {
        self.code == codes::OK
    }

    /// Parses the data as JSON.
    pub fn data_json<T: DeserializeOwned>(&self) -> Result<T, BoxError> {
        serde_json::from_slice(&self.data)
            .map_err(|e| format!("reply data is not the expected JSON: {e}").into())
    }

    /// Copies a reply that crossed the boundary into Rust types.
    pub fn from_raw(raw: RReply) -> Self {
        Reply {
            code: raw.code,
            message: raw.message.into_string(),
            data: raw.data.into_vec(),
        }
    }

    /// Converts the reply into the type that crosses the boundary.
    pub fn into_raw(self) -> RReply {
        RReply {
            code: self.code,
            message: self.message.into(),
            data: self.data.into(),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            write!(f, "ok ({} bytes)", self.data.len())
        } else {
            write!(f, "error {}: {}", self.code, self.message)
        }
    }
}

/// The plugin's handle to the host: logging, requests to other services, events.
///
/// Cheap to clone; may be kept in the service and used from any thread the service starts.
#[derive(Debug, Clone)]
pub struct Host {
    raw: HostHandle,
}

impl Host {
    /// The host behind `raw` (the test kit's).
    #[cfg(feature = "testing")]
    pub(crate) fn from_handle(raw: HostHandle) -> Host {
        Host { raw }
    }

    /// Writes a log line attributed to this service. The logging macros ([`crate::info!`]...)
    /// are usually more convenient.
    pub fn log(&self, level: LogLevel, target: &str, message: &str) {
        // SAFETY: the context is live while `self.raw` is; the strings outlive the call.
        unsafe { (self.raw.vtable().log)(self.raw.ctx(), level, target.into(), message.into()) }
    }

    /// Sends a request to `to` (a service, or `kernel`) and waits for the reply, at most
    /// [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn request(&self, to: &str, kind: &str, payload: &[u8]) -> Reply {
        self.request_timeout(to, kind, payload, DEFAULT_REQUEST_TIMEOUT)
    }

    /// Sends a request and waits at most `timeout` for the reply; a reply with code
    /// [`codes::TIMEOUT`] says it did not come in time.
    pub fn request_timeout(
        &self,
        to: &str,
        kind: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Reply {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: as in `log`; the reply is owned by us once returned.
        let raw = unsafe {
            (self.raw.vtable().request)(
                self.raw.ctx(),
                to.into(),
                kind.into(),
                payload.into(),
                timeout_ms,
            )
        };
        Reply::from_raw(raw)
    }

    /// Queues an event for `to` (a service, or `kernel`). Fails if `to` does not exist or its
    /// mailbox is full: events are never dropped silently.
    pub fn emit(&self, to: &str, kind: &str, payload: &[u8]) -> Result<(), BoxError> {
        // SAFETY: as in `log`.
        let result = unsafe {
            (self.raw.vtable().emit)(self.raw.ctx(), to.into(), kind.into(), payload.into())
        };
        result.into_result().map_err(|e| e.into_string().into())
    }
}

/// A service, as its author writes it: plain Rust, `&mut self`, no locks, no ABI types.
///
/// The host creates one instance at a time and calls every method from one thread that it
/// owns (the service's executor), so the instance needs to be neither `Send` nor `Sync`.
/// A panic in any method is caught and reported as an error; it never takes the host down.
/// After a panic in [`Service::handle`] (a 500 reply) the same instance goes on serving, with
/// its state as the panic left it.
///
/// Every method must return: the host waits for each at most its operation timeout, then
/// gives the instance up and leaves its thread, and the library, stuck for good.
pub trait Service: Sized + 'static {
    /// The service name, `[a-z0-9][a-z0-9_-]{0,63}`. Other services reach this one by it.
    const NAME: &'static str;
    /// The version of this implementation (semver), usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// Services that must be running before this one starts.
    const DEPENDENCIES: &'static [&'static str] = &[];

    /// Creates an instance. `config` is the content of the plugin's configuration file, if
    /// it has one (see the README).
    ///
    /// During a hot replace, `new` (and [`Service::import_state`]) run while the previous
    /// version still serves, so that requests are held as briefly as can be; only
    /// [`Service::start`] waits for the previous version's [`Service::stop`]. Take what only
    /// one instance may hold (a port, a lock file) in `start`, and release it in `stop`, not
    /// in `Drop`: the previous instance is dropped after the new one started.
    fn new(host: Host, config: Option<&str>) -> Result<Self, BoxError>;

    /// Called once before the first request. An error leaves the service failed.
    fn start(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    /// Called before the instance is dropped. Join every thread the service started here
    /// (and stop those of the C libraries it uses): the host does not unload a library while
    /// a thread that appeared since it was loaded still runs, so a thread left running keeps
    /// this version of the plugin in memory for good.
    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    /// Handles a request. An error becomes a reply with code [`codes::FAILED`] (500), or
    /// [`codes::BAD_REQUEST`] (400) when it is, or was caused by, a [`BadRequest`] (as the
    /// errors of [`Message::json`] and [`Message::text`] are).
    fn handle(&mut self, request: Request) -> Result<Reply, BoxError>;

    /// Handles an event.
    fn on_event(&mut self, _event: Event) -> Result<(), BoxError> {
        Ok(())
    }

    /// Serializes the state that must survive a restart or an upgrade. Called at every
    /// checkpoint (every 10 s by default, `--checkpoint-interval`), at every hot replace and
    /// at every stop. The host writes the state only when its bytes changed: make the
    /// output deterministic (a `BTreeMap`, not a `HashMap`, for maps), or every checkpoint
    /// rewrites it.
    fn export_state(&mut self) -> Result<Vec<u8>, BoxError> {
        Ok(Vec::new())
    }

    /// Replaces the state with one exported by version `from_version` of this service, which
    /// may be older or newer than this one (compare with [`crate::semver`]). Refuse what you
    /// cannot read: an error here keeps the previous version running.
    ///
    /// Called after [`Service::new`] and before [`Service::start`] when there is a saved
    /// state: at a start with a state file, and during a hot replace. Never on a fresh start
    /// (no state saved yet): the instance then starts as `new` made it.
    fn import_state(&mut self, _from_version: &str, _state: &[u8]) -> Result<(), BoxError> {
        Ok(())
    }
}

/// An error and its causes in one line, `error: cause: cause`, the way `anyhow` prints
/// `{:#}`. What the SDK sends the host when a method fails, and what the host shows
/// wherever an error leaves it.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The plugin-side destination of the logging macros: the host handle of the live instance.
///
/// One per loaded library (each copy of a plugin has its own statics). Holds no thread-local,
/// which would keep the library mapped after it is closed.
static LOG_SINK: Mutex<LogSink> = Mutex::new(LogSink {
    instances: 0,
    host: None,
});

struct LogSink {
    instances: usize,
    host: Option<Host>,
}

fn lock_sink() -> std::sync::MutexGuard<'static, LogSink> {
    LOG_SINK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[doc(hidden)]
pub fn __log(level: LogLevel, target: &str, args: fmt::Arguments<'_>) {
    // Above the level the host's environment asks for: not even formatted.
    if !crate::forward::enabled(level) {
        return;
    }
    let message = args.to_string();
    #[cfg(feature = "testing")]
    if crate::testing::log_to_caller(level, target, &message) {
        return;
    }
    // The host's log function never calls back into the plugin: logging under the lock is
    // safe, and spares a clone of the handle for every line.
    // With no live instance (a thread left running after `stop`), there is no host to log
    // to: the record is dropped (standard error may be a JSON log, and is the host's).
    if let Some(host) = &lock_sink().host {
        host.log(level, target, &message);
    }
}

/// Logs at a level through the host. Used by [`crate::info!`] and its siblings.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::export_parts::log($level, ::core::module_path!(), ::core::format_args!($($arg)+))
    };
}

/// Logs an error through the host, like `tracing::error!` with a format string.
#[macro_export]
macro_rules! error { ($($arg:tt)+) => { $crate::log!($crate::abi::LogLevel::Error, $($arg)+) }; }
/// Logs a warning through the host.
#[macro_export]
macro_rules! warn { ($($arg:tt)+) => { $crate::log!($crate::abi::LogLevel::Warn, $($arg)+) }; }
/// Logs information through the host.
#[macro_export]
macro_rules! info { ($($arg:tt)+) => { $crate::log!($crate::abi::LogLevel::Info, $($arg)+) }; }
/// Logs debug detail through the host.
#[macro_export]
macro_rules! debug { ($($arg:tt)+) => { $crate::log!($crate::abi::LogLevel::Debug, $($arg)+) }; }
/// Logs trace detail through the host.
#[macro_export]
macro_rules! trace { ($($arg:tt)+) => { $crate::log!($crate::abi::LogLevel::Trace, $($arg)+) }; }

/// Exports a [`Service`] implementation as this library's plugin.
///
/// Write it once, at the crate root of a `cdylib` crate:
///
/// ```text
/// plugin_api::export_service!(MyService);
/// ```
///
/// It generates the root module the host looks for, and the `extern "C"` glue that converts
/// every ABI type and catches every panic. When the host opens the library, the root
/// module also sets the library's `log` logger and `tracing` dispatcher, so that the records
/// of the plugin and of the libraries it uses reach the host's log (see
/// [`crate::LOG_LEVEL_VARIABLE`]): a plugin must not set its own.
#[macro_export]
macro_rules! export_service {
    ($service:ty) => {
        /// The root module of this plugin, read by the host when it loads the library.
        #[unsafe(no_mangle)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader = {
            fn __microkernel_root_module() -> $crate::abi::PluginModRef {
                // This library's `log` and `tracing` records go to the host from now on.
                $crate::export_parts::install_forwarding();
                static MODULE: $crate::__private::WithMetadata<$crate::abi::PluginMod> =
                    $crate::__private::WithMetadata::new($crate::abi::PluginMod {
                        manifest: $crate::export_parts::manifest::<$service>,
                        new_service: $crate::export_parts::new_service::<$service>,
                    });
                $crate::abi::PluginModRef(MODULE.static_as_prefix())
            }
            extern "C" fn __microkernel_root_module_loader() -> $crate::__private::RootModuleResult
            {
                $crate::__private::__call_root_module_loader(__microkernel_root_module)
            }
            // SAFETY: the constructor returns a `PluginModRef`, the type named here.
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::abi::PluginModRef>(
                    __microkernel_root_module_loader,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

/// The generic `extern "C"` functions that [`export_service!`] instantiates. Not for direct use:
/// they trust their arguments (they are called by the host, through the ABI).
#[doc(hidden)]
pub mod export_parts {
    use super::*;

    pub use super::__log as log;
    pub use crate::forward::install as install_forwarding;

    /// What a call reports when even describing its failure failed (an error whose
    /// `Display` panics, a panic payload whose `Drop` panics).
    pub const UNDESCRIBABLE: &str = "failed, and describing the failure panicked too";

    /// Runs `f`, turning an error or a panic into an error message.
    ///
    /// Everything done with the plugin's values happens under `catch_unwind`: formatting
    /// the error (its `Display` and its `source()` chain are plugin code), dropping it, and
    /// dropping the panic payload. If that panics too, the call fails with
    /// [`UNDESCRIBABLE`]; nothing unwinds out of the `extern "C"` function that calls this.
    pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, BoxError>) -> RCallResult<T> {
        let outcome = catch_unwind(AssertUnwindSafe(|| match f() {
            Ok(value) => Ok(value),
            // The error is formatted and dropped in here, under `catch_unwind`.
            Err(error) => Err(error_chain(&*error)),
        }));
        match outcome {
            Ok(Ok(value)) => RResult::ROk(value),
            Ok(Err(message)) => RResult::RErr(message.into()),
            Err(panic) => RResult::RErr(describe_panic(what, panic).into()),
        }
    }

    /// `<what> panicked: <message>`, computed (and the payload dropped) under `catch_unwind`.
    fn describe_panic(what: &str, panic: Box<dyn Any + Send>) -> String {
        let described = catch_unwind(AssertUnwindSafe(|| {
            let text = format!("{what} panicked: {}", panic_message(&*panic));
            drop(panic);
            text
        }));
        described.unwrap_or_else(|second| {
            // Dropping this payload could panic again: it is leaked instead.
            std::mem::forget(second);
            format!("{what} {UNDESCRIBABLE}")
        })
    }

    /// Runs `f`, which only cleans up; a panic in it is logged through the host (what
    /// panicked, never unwinding).
    fn contain(what: &str, f: impl FnOnce()) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
            let message = describe_panic(what, panic);
            let _ = catch_unwind(AssertUnwindSafe(|| crate::error!("{message}")));
        }
    }

    /// The message of a panic payload, when it has one.
    pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
        if let Some(s) = panic.downcast_ref::<&'static str>() {
            s
        } else if let Some(s) = panic.downcast_ref::<String>() {
            s
        } else {
            "(no message)"
        }
    }

    /// The plugin's manifest, from the trait's constants.
    pub extern "C" fn manifest<S: Service>() -> RManifest {
        RManifest {
            name: S::NAME.into(),
            version: S::VERSION.into(),
            dependencies: S::DEPENDENCIES.iter().map(|d| RString::from(*d)).collect(),
        }
    }

    /// Creates an instance of `S`.
    pub extern "C" fn new_service<S: Service>(
        host: HostHandle,
        config: ROption<RString>,
    ) -> RCallResult<RawService> {
        let host = Host { raw: host };
        // The logging macros work from `new` on.
        register_instance(host.clone());
        let created = guard("new", || {
            let service = S::new(host, config.as_ref().map(|c| c.as_str()).into_option())?;
            let this = Box::into_raw(Box::new(service)).cast::<c_void>();
            // SAFETY: `this` is a live `S`, which is what every function of `Glue::<S>`
            // expects; the host owns it from here on and frees it with `drop_service::<S>`.
            Ok(unsafe { RawService::new(this, Glue::<S>::VTABLE_REF) })
        });
        if created.is_err() {
            unregister_instance();
        }
        created
    }

    /// Counts a live instance and makes `host` the destination of the logging macros.
    fn register_instance(host: Host) {
        let mut sink = lock_sink();
        sink.instances += 1;
        sink.host = Some(host);
    }

    /// Forgets an instance; the last one releases the host handle.
    fn unregister_instance() {
        let host = {
            let mut sink = lock_sink();
            sink.instances = sink.instances.saturating_sub(1);
            if sink.instances == 0 {
                sink.host.take()
            } else {
                None
            }
        };
        drop(host);
    }

    struct Glue<S>(PhantomData<S>);

    impl<S: Service> Glue<S> {
        const VTABLE: ServiceVTable = ServiceVTable {
            start: start::<S>,
            stop: stop::<S>,
            handle: handle::<S>,
            on_event: on_event::<S>,
            export_state: export_state::<S>,
            import_state: import_state::<S>,
            drop: drop_service::<S>,
        };
        const VTABLE_REF: &'static ServiceVTable = &Self::VTABLE;
    }

    /// # Safety
    /// `this` must come from `new_service::<S>` and not have been dropped, and no other
    /// reference to it may be live.
    unsafe fn instance<'a, S>(this: *mut c_void) -> &'a mut S {
        // SAFETY: guaranteed by the caller.
        unsafe { &mut *this.cast::<S>() }
    }

    unsafe extern "C" fn start<S: Service>(this: *mut c_void) -> RCallResult<()> {
        // SAFETY: the host passes the pointer `new_service` returned, from one thread.
        let service = unsafe { instance::<S>(this) };
        guard("start", || service.start())
    }

    unsafe extern "C" fn stop<S: Service>(this: *mut c_void) -> RCallResult<()> {
        // SAFETY: as in `start`.
        let service = unsafe { instance::<S>(this) };
        guard("stop", || service.stop())
    }

    unsafe extern "C" fn handle<S: Service>(this: *mut c_void, request: RMessage<'_>) -> RReply {
        // SAFETY: as in `start`.
        let service = unsafe { instance::<S>(this) };
        let request = Message::from_raw(request);
        // A `BadRequest` anywhere in the error's chain is the requester's fault: 400. Told
        // apart (and the error dropped) under `catch_unwind`, as `guard` does.
        let bad_request = std::cell::Cell::new(false);
        let outcome = guard("handle", || {
            service.handle(request).map_err(|error| {
                bad_request.set(BadRequest::is_in(&*error));
                error
            })
        });
        match outcome {
            RResult::ROk(reply) => reply.into_raw(),
            RResult::RErr(message) => {
                let code = if bad_request.get() {
                    codes::BAD_REQUEST
                } else {
                    codes::FAILED
                };
                Reply::error(code, message.into_string()).into_raw()
            }
        }
    }

    unsafe extern "C" fn on_event<S: Service>(
        this: *mut c_void,
        event: RMessage<'_>,
    ) -> RCallResult<()> {
        // SAFETY: as in `start`.
        let service = unsafe { instance::<S>(this) };
        let event = Message::from_raw(event);
        guard("on_event", || service.on_event(event))
    }

    unsafe extern "C" fn export_state<S: Service>(this: *mut c_void) -> RCallResult<RVec<u8>> {
        // SAFETY: as in `start`.
        let service = unsafe { instance::<S>(this) };
        guard("export_state", || service.export_state().map(RVec::from))
    }

    unsafe extern "C" fn import_state<S: Service>(
        this: *mut c_void,
        from_version: RStr<'_>,
        state: RSlice<'_, u8>,
    ) -> RCallResult<()> {
        // SAFETY: as in `start`.
        let service = unsafe { instance::<S>(this) };
        guard("import_state", || {
            service.import_state(from_version.as_str(), state.as_slice())
        })
    }

    unsafe extern "C" fn drop_service<S: Service>(this: *mut c_void) {
        contain("drop", || {
            // SAFETY: `this` came from `Box::into_raw` in `new_service::<S>`; the host frees
            // each instance exactly once.
            drop(unsafe { Box::from_raw(this.cast::<S>()) });
        });
        contain("unregistering the instance", unregister_instance);
    }
}
