//! The host side of [`HostHandle`]: the `extern "C"` functions a plugin calls.

use std::{
    ffi::c_void,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
    time::Duration,
};

use abi_stable::std_types::{RResult, RSlice, RStr};
use plugin_api::{
    abi::{HostHandle, HostVTable, LogLevel, RCallResult, RReply},
    codes, Reply,
};

use crate::instance::HostServices;

type Ctx = Arc<dyn HostServices>;

static VTABLE: HostVTable = HostVTable {
    clone: ctx_clone,
    drop: ctx_drop,
    log,
    request,
    emit,
};

/// Makes the handle a plugin instance receives.
pub(super) fn new_handle(services: Ctx) -> HostHandle {
    let ctx = Box::into_raw(Box::new(services))
        .cast_const()
        .cast::<c_void>();
    // SAFETY: `ctx` is a live `Box<Ctx>` that the handle owns; every function of `VTABLE`
    // takes such a context, from any thread (`Ctx` is `Send + Sync`), `ctx_clone` makes a new
    // one and `ctx_drop` frees one.
    unsafe { HostHandle::new(ctx, &VTABLE) }
}

/// # Safety
/// `ctx` must come from [`new_handle`] or [`ctx_clone`] and not have been released.
unsafe fn services<'a>(ctx: *const c_void) -> &'a Ctx {
    // SAFETY: guaranteed by the caller: `ctx` is a live `Box<Ctx>`.
    unsafe { &*ctx.cast::<Ctx>() }
}

unsafe extern "C" fn ctx_clone(ctx: *const c_void) -> *const c_void {
    // SAFETY: the plugin passes a context it holds (the `HostHandle` contract).
    let cloned: Ctx = Arc::clone(unsafe { services(ctx) });
    Box::into_raw(Box::new(cloned))
        .cast_const()
        .cast::<c_void>()
}

unsafe extern "C" fn ctx_drop(ctx: *const c_void) {
    // SAFETY: the plugin releases each context it holds exactly once (`HostHandle::drop`).
    drop(unsafe { Box::from_raw(ctx.cast_mut().cast::<Ctx>()) });
}

unsafe extern "C" fn log(ctx: *const c_void, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
    // SAFETY: as in `ctx_clone`.
    let services = unsafe { services(ctx) };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        services.log(level, target.as_str(), message.as_str())
    }));
}

unsafe extern "C" fn request(
    ctx: *const c_void,
    to: RStr<'_>,
    kind: RStr<'_>,
    payload: RSlice<'_, u8>,
    timeout_ms: u64,
) -> RReply {
    // SAFETY: as in `ctx_clone`.
    let services = unsafe { services(ctx) };
    let reply = catch_unwind(AssertUnwindSafe(|| {
        services.request(
            to.as_str(),
            kind.as_str(),
            payload.as_slice(),
            Duration::from_millis(timeout_ms),
        )
    }));
    reply
        .unwrap_or_else(|_| {
            Reply::error(codes::FAILED, "the host failed while routing the request")
        })
        .into_raw()
}

unsafe extern "C" fn emit(
    ctx: *const c_void,
    to: RStr<'_>,
    kind: RStr<'_>,
    payload: RSlice<'_, u8>,
) -> RCallResult<()> {
    // SAFETY: as in `ctx_clone`.
    let services = unsafe { services(ctx) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        services.emit(to.as_str(), kind.as_str(), payload.as_slice())
    }));
    match result {
        Ok(Ok(())) => RResult::ROk(()),
        Ok(Err(message)) => RResult::RErr(message.into()),
        Err(_) => RResult::RErr("the host failed while queueing the event".into()),
    }
}
