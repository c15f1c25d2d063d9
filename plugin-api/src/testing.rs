//! A test kit for plugins (feature `testing`): drive a [`Service`] in-process from the
//! plugin's own `cargo test`, through the same glue a host calls, without building the `.so`
//! or running a host.
//!
//! ```
//! use plugin_api::{testing::Harness, BoxError, Host, Reply, Request, Service};
//!
//! struct Counter { count: u64 }
//!
//! impl Service for Counter {
//!     const NAME: &'static str = "counter";
//!     const VERSION: &'static str = "2.0.0";
//!     fn new(_host: Host, _config: Option<&str>) -> Result<Self, BoxError> {
//!         Ok(Counter { count: 0 })
//!     }
//!     fn handle(&mut self, _request: Request) -> Result<Reply, BoxError> {
//!         self.count += 1;
//!         Ok(Reply::ok(self.count.to_string()))
//!     }
//!     fn export_state(&mut self) -> Result<Vec<u8>, BoxError> {
//!         Ok(self.count.to_string().into_bytes())
//!     }
//!     fn import_state(&mut self, _from: &str, state: &[u8]) -> Result<(), BoxError> {
//!         self.count = std::str::from_utf8(state)?.parse()?;
//!         Ok(())
//!     }
//! }
//!
//! // A state exported by version 1, imported by this version, as a hot replace would.
//! let mut counter = Harness::<Counter>::new(None).unwrap();
//! counter.import_state("1.4.0", b"41").unwrap();
//! counter.start().unwrap();
//! assert_eq!(counter.request("count", "").data, b"42");
//! assert_eq!(counter.export_state().unwrap(), b"42");
//! ```
//!
//! What the service does with its [`Host`] is recorded: log lines ([`Harness::logs`]),
//! requests ([`Harness::requests_sent`], answered by [`Harness::answer_requests`], 404 by
//! default) and events ([`Harness::events_emitted`]). Log lines written on the test's
//! thread during a call are the harness's; those written by threads the service started go
//! to the newest harness of the process (as in a plugin, where one service logs).

use std::{
    cell::RefCell,
    ffi::c_void,
    marker::PhantomData,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Mutex, MutexGuard},
};

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString};

use crate::{
    abi::{HostHandle, HostVTable, LogLevel, RCallResult, RMessage, RReply, RawService},
    codes, export_parts, Reply, Service,
};

/// A log line the service wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its level.
    pub level: LogLevel,
    /// The module that wrote it.
    pub target: String,
    /// The line.
    pub message: String,
}

/// A request or an event the service sent through its [`Host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// To whom (a service, or `kernel`).
    pub to: String,
    /// Its kind.
    pub kind: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

type Responder = Box<dyn FnMut(&Sent) -> Reply + Send>;

/// What the test host records, shared by every handle of one harness.
struct Recorder {
    logs: Mutex<Vec<LogLine>>,
    requests: Mutex<Vec<Sent>>,
    events: Mutex<Vec<Sent>>,
    responder: Mutex<Responder>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Recorder {
    fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            logs: Mutex::default(),
            requests: Mutex::default(),
            events: Mutex::default(),
            responder: Mutex::new(Box::new(|sent: &Sent| {
                Reply::error(
                    codes::NOT_FOUND,
                    format!("no service `{}` in this test", sent.to),
                )
            })),
        })
    }
}

static VTABLE: HostVTable = HostVTable {
    clone: ctx_clone,
    drop: ctx_drop,
    log,
    request,
    emit,
};

/// A handle on `recorder`, as a host gives one to an instance.
fn handle(recorder: &Arc<Recorder>) -> HostHandle {
    let ctx = Arc::into_raw(recorder.clone()).cast::<c_void>();
    // SAFETY: `ctx` is one strong reference to a `Recorder`, owned by the handle; every
    // function of `VTABLE` takes such a context from any thread (`Recorder` is `Sync`),
    // `ctx_clone` makes one more reference and `ctx_drop` releases one.
    unsafe { HostHandle::new(ctx, &VTABLE) }
}

/// # Safety
/// `ctx` must come from [`handle`] or [`ctx_clone`] and not have been released.
unsafe fn recorder<'a>(ctx: *const c_void) -> &'a Recorder {
    // SAFETY: guaranteed by the caller: `ctx` is a live `Arc<Recorder>`'s pointer.
    unsafe { &*ctx.cast::<Recorder>() }
}

unsafe extern "C" fn ctx_clone(ctx: *const c_void) -> *const c_void {
    // SAFETY: the SDK passes a context its handle holds (the `HostHandle` contract).
    unsafe { Arc::increment_strong_count(ctx.cast::<Recorder>()) };
    ctx
}

unsafe extern "C" fn ctx_drop(ctx: *const c_void) {
    // SAFETY: each reference is released exactly once (`HostHandle::drop`).
    drop(unsafe { Arc::from_raw(ctx.cast::<Recorder>()) });
}

unsafe extern "C" fn log(ctx: *const c_void, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
    // SAFETY: as in `ctx_clone`.
    let recorder = unsafe { recorder(ctx) };
    lock(&recorder.logs).push(LogLine {
        level,
        target: target.as_str().to_owned(),
        message: message.as_str().to_owned(),
    });
}

fn sent(to: RStr<'_>, kind: RStr<'_>, payload: RSlice<'_, u8>) -> Sent {
    Sent {
        to: to.as_str().to_owned(),
        kind: kind.as_str().to_owned(),
        payload: payload.as_slice().to_vec(),
    }
}

unsafe extern "C" fn request(
    ctx: *const c_void,
    to: RStr<'_>,
    kind: RStr<'_>,
    payload: RSlice<'_, u8>,
    _timeout_ms: u64,
) -> RReply {
    // SAFETY: as in `ctx_clone`.
    let recorder = unsafe { recorder(ctx) };
    let sent = sent(to, kind, payload);
    lock(&recorder.requests).push(sent.clone());
    let reply = catch_unwind(AssertUnwindSafe(|| (lock(&recorder.responder))(&sent)));
    reply
        .unwrap_or_else(|_| Reply::error(codes::FAILED, "the test's responder panicked"))
        .into_raw()
}

unsafe extern "C" fn emit(
    ctx: *const c_void,
    to: RStr<'_>,
    kind: RStr<'_>,
    payload: RSlice<'_, u8>,
) -> RCallResult<()> {
    // SAFETY: as in `ctx_clone`.
    let recorder = unsafe { recorder(ctx) };
    lock(&recorder.events).push(sent(to, kind, payload));
    RResult::ROk(())
}

thread_local! {
    /// The harness whose instance this thread is calling: the logging macros write to it.
    static CALLER: RefCell<Option<crate::Host>> = const { RefCell::new(None) };
}

/// Writes a log line to the harness this thread is calling, if any; `false` otherwise.
pub(crate) fn log_to_caller(level: LogLevel, target: &str, message: &str) -> bool {
    CALLER.with(|caller| match &*caller.borrow() {
        Some(host) => {
            host.log(level, target, message);
            true
        }
        None => false,
    })
}

/// One instance of `S`, created and called as a host would, with a host that records.
pub struct Harness<S: Service> {
    raw: RawService,
    recorder: Arc<Recorder>,
    host: crate::Host,
    _service: PhantomData<S>,
}

impl<S: Service> std::fmt::Debug for Harness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("service", &S::NAME)
            .finish_non_exhaustive()
    }
}

fn into_result(result: RCallResult<()>) -> Result<(), String> {
    result.into_result().map_err(RString::into_string)
}

impl<S: Service> Harness<S> {
    /// Creates an instance with `config` as its configuration text (what a host reads from
    /// `<service>.conf`). The error is the message a host would show.
    pub fn new(config: Option<&str>) -> Result<Self, String> {
        let recorder = Recorder::new();
        let host = crate::Host::from_handle(handle(&recorder));
        let config: ROption<RString> = config.map(RString::from).into();
        let raw = with_caller(&host, || {
            export_parts::new_service::<S>(handle(&recorder), config)
                .into_result()
                .map_err(RString::into_string)
        })?;
        Ok(Harness {
            raw,
            recorder,
            host,
            _service: PhantomData,
        })
    }

    fn call<T>(&mut self, f: impl FnOnce(&RawService) -> T) -> T {
        let raw = &self.raw;
        with_caller(&self.host, || f(raw))
    }

    /// Calls `start`.
    pub fn start(&mut self) -> Result<(), String> {
        // SAFETY: `raw` is the live instance `new_service` made, called from one thread
        // (`&mut self`), and freed only in `drop`.
        self.call(|raw| into_result(unsafe { (raw.vtable().start)(raw.this()) }))
    }

    /// Calls `stop`.
    pub fn stop(&mut self) -> Result<(), String> {
        // SAFETY: as in `start`.
        self.call(|raw| into_result(unsafe { (raw.vtable().stop)(raw.this()) }))
    }

    /// Sends a request from `external`, as `ctl send` does, and returns the reply: an
    /// error or a panic in `handle` comes back as a 500 (or 400 for a
    /// [`crate::BadRequest`]), as from a host.
    pub fn request(&mut self, kind: &str, payload: impl AsRef<[u8]>) -> Reply {
        let message = message(S::NAME, kind, payload.as_ref());
        // SAFETY: as in `start`; the message outlives the call.
        self.call(|raw| Reply::from_raw(unsafe { (raw.vtable().handle)(raw.this(), message) }))
    }

    /// Sends an event from `external`.
    pub fn event(&mut self, kind: &str, payload: impl AsRef<[u8]>) -> Result<(), String> {
        let message = message(S::NAME, kind, payload.as_ref());
        // SAFETY: as in `request`.
        self.call(|raw| into_result(unsafe { (raw.vtable().on_event)(raw.this(), message) }))
    }

    /// Calls `export_state`: the bytes a host would seal and save.
    pub fn export_state(&mut self) -> Result<Vec<u8>, String> {
        self.call(|raw| {
            // SAFETY: as in `start`; the bytes are copied before the call returns.
            unsafe { (raw.vtable().export_state)(raw.this()) }
                .into_result()
                .map(|bytes| bytes.to_vec())
                .map_err(RString::into_string)
        })
    }

    /// Calls `import_state` with `state` as if exported by version `from_version` (before
    /// [`Harness::start`], as a host does at a start with state or during a hot replace).
    pub fn import_state(&mut self, from_version: &str, state: &[u8]) -> Result<(), String> {
        self.call(|raw| {
            // SAFETY: as in `start`; the arguments outlive the call.
            into_result(unsafe {
                (raw.vtable().import_state)(raw.this(), from_version.into(), state.into())
            })
        })
    }

    /// How the host answers the requests the service sends (404 until this is called).
    pub fn answer_requests(&mut self, responder: impl FnMut(&Sent) -> Reply + Send + 'static) {
        *lock(&self.recorder.responder) = Box::new(responder);
    }

    /// The log lines the service wrote so far.
    pub fn logs(&self) -> Vec<LogLine> {
        lock(&self.recorder.logs).clone()
    }

    /// The requests the service sent so far.
    pub fn requests_sent(&self) -> Vec<Sent> {
        lock(&self.recorder.requests).clone()
    }

    /// The events the service emitted so far.
    pub fn events_emitted(&self) -> Vec<Sent> {
        lock(&self.recorder.events).clone()
    }
}

impl<S: Service> Drop for Harness<S> {
    fn drop(&mut self) {
        let raw = &self.raw;
        // SAFETY: the instance was made by `new_service` and is freed exactly once, here.
        with_caller(&self.host, || unsafe { (raw.vtable().drop)(raw.this()) });
    }
}

fn message<'a>(to: &'a str, kind: &'a str, payload: &'a [u8]) -> RMessage<'a> {
    RMessage {
        from: "external".into(),
        to: to.into(),
        kind: kind.into(),
        payload: payload.into(),
    }
}

/// Runs `f` with the logging macros of this thread writing to `host`.
fn with_caller<T>(host: &crate::Host, f: impl FnOnce() -> T) -> T {
    let previous = CALLER.with(|caller| caller.replace(Some(host.clone())));
    let value = f();
    CALLER.with(|caller| *caller.borrow_mut() = previous);
    value
}
