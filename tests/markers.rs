//! Compile-time checks that the types shared between threads can be.

use host::{
    loader::{Library, Loader},
    reload::Reloader,
    state::{KeyRing, StateStore},
    Kernel,
};

fn send_and_sync<T: Send + Sync>() {}

#[test]
fn the_types_threads_share_are_send_and_sync() {
    // The daemon shares the kernel with the control socket's threads.
    send_and_sync::<Kernel>();
    // A library is shared (as an `Arc`) by the kernel and by its instance's executor.
    send_and_sync::<Library>();
    send_and_sync::<Loader>();
    send_and_sync::<StateStore>();
    send_and_sync::<KeyRing>();
    send_and_sync::<Reloader>();
    // A plugin may keep its host handle in a thread of its own.
    send_and_sync::<plugin_api::Host>();
}
