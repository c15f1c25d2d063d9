//! The kernel driven with services linked into this test binary ([`Library::linked`]): no
//! `.so`, no `dlopen`, no nested build. What only a real library shows (loading, the probe,
//! unmapping, pinning, ABI checks) is tested with the fixtures in `tests/`.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use plugin_api::{codes, BoxError, Host, Reply, Request, Service};

use super::{Kernel, KernelConfig, KernelError, Status, SwapError};
use crate::{
    loader::{threads, Library},
    state::{KeyRing, StateKey, StateStore},
    BadStatePolicy,
};

/// The order in which linked services started and stopped, across one test's kernel (each
/// test uses service names of its own).
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record(what: String) {
    EVENTS.lock().unwrap().push(what);
}

fn recorded(prefix: &str) -> Vec<String> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.contains(prefix))
        .cloned()
        .collect()
}

/// A counter whose behaviour is chosen by its configuration: `start-fails`, `import-fails`,
/// `panics` (in `handle`), `hangs` (in `handle`, until released).
macro_rules! counter {
    ($ty:ident, $name:literal, $version:literal, [$($dep:literal),*]) => {
        struct $ty {
            count: u64,
            config: String,
        }

        impl Service for $ty {
            const NAME: &'static str = $name;
            const VERSION: &'static str = $version;
            const DEPENDENCIES: &'static [&'static str] = &[$($dep),*];

            fn new(_host: Host, config: Option<&str>) -> Result<Self, BoxError> {
                Ok($ty { count: 0, config: config.unwrap_or_default().to_owned() })
            }

            fn start(&mut self) -> Result<(), BoxError> {
                if self.config == "start-fails" {
                    return Err("refusing to start".into());
                }
                record(format!("start {} {}", $name, $version));
                Ok(())
            }

            fn stop(&mut self) -> Result<(), BoxError> {
                record(format!("stop {} {}", $name, $version));
                Ok(())
            }

            fn handle(&mut self, request: Request) -> Result<Reply, BoxError> {
                match self.config.as_str() {
                    "panics" if request.kind == "count" => panic!("a bug in handle"),
                    "hangs" if request.kind == "count" => {
                        while !RELEASE.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    _ => {}
                }
                self.count += 1;
                Ok(Reply::ok(format!("{} {}", $version, self.count)))
            }

            fn export_state(&mut self) -> Result<Vec<u8>, BoxError> {
                Ok(self.count.to_string().into_bytes())
            }

            fn import_state(&mut self, _from: &str, state: &[u8]) -> Result<(), BoxError> {
                if self.config == "import-fails" {
                    return Err("cannot read that state".into());
                }
                self.count = std::str::from_utf8(state)?.parse()?;
                Ok(())
            }
        }
    };
}

static RELEASE: AtomicBool = AtomicBool::new(false);

counter!(OrderBase, "order-base", "1.0.0", []);
counter!(OrderMid, "order-mid", "1.0.0", ["order-base"]);
counter!(OrderTop, "order-top", "1.0.0", ["order-mid", "order-base"]);
counter!(SwapV1, "swapped", "1.0.0", []);
counter!(SwapV2, "swapped", "2.0.0", []);
counter!(Buggy, "buggy", "1.0.0", []);
counter!(Stuck, "stuck", "1.0.0", []);
counter!(Saved, "saved", "1.0.0", []);

fn kernel_with(config: KernelConfig) -> Kernel {
    threads::adopt_current_thread();
    Kernel::new(config).unwrap()
}

fn linked<S: Service>() -> Library {
    Library::linked::<S>().unwrap()
}

fn count(kernel: &Kernel, service: &str) -> String {
    let reply = kernel.request(service, "count", b"", None);
    assert!(reply.is_ok(), "{reply:?}");
    String::from_utf8(reply.data).unwrap()
}

#[test]
fn linked_services_start_after_their_dependencies_and_stop_before_them() {
    let kernel = kernel_with(KernelConfig::default());
    // Registered in the worst order.
    kernel.register(linked::<OrderTop>(), None).unwrap();
    kernel.register(linked::<OrderMid>(), None).unwrap();
    kernel.register(linked::<OrderBase>(), None).unwrap();
    assert!(kernel.start_all().is_empty());
    assert_eq!(count(&kernel, "order-top"), "1.0.0 1");
    let report = kernel.stop_all();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        recorded("order-"),
        [
            "start order-base 1.0.0",
            "start order-mid 1.0.0",
            "start order-top 1.0.0",
            "stop order-top 1.0.0",
            "stop order-mid 1.0.0",
            "stop order-base 1.0.0",
        ]
    );
}

#[test]
fn a_replace_carries_the_state_and_a_new_version_that_fails_rolls_back_with_it() {
    let kernel = kernel_with(KernelConfig::default());
    kernel.register(linked::<SwapV1>(), None).unwrap();
    kernel.start("swapped").unwrap();
    assert_eq!(count(&kernel, "swapped"), "1.0.0 1");

    // A version whose import refuses the state: the old one never stopped.
    let refused = kernel.replace(linked::<SwapV2>(), Some("import-fails".into()));
    assert!(
        matches!(
            refused,
            Err(KernelError::Swap(SwapError::RolledBack { ref new, .. })) if new == "2.0.0"
        ),
        "{refused:?}"
    );
    assert_eq!(count(&kernel, "swapped"), "1.0.0 2");

    // A version whose start fails: the old one comes back with the same state.
    let failed = kernel.replace(linked::<SwapV2>(), Some("start-fails".into()));
    assert!(
        matches!(failed, Err(KernelError::Swap(SwapError::RolledBack { .. }))),
        "{failed:?}"
    );
    assert_eq!(count(&kernel, "swapped"), "1.0.0 3");

    let report = kernel.replace(linked::<SwapV2>(), None).unwrap();
    assert_eq!(
        (report.from.as_str(), report.to.as_str()),
        ("1.0.0", "2.0.0")
    );
    assert!(report.unmapped, "a linked service has nothing to unmap");
    assert_eq!(count(&kernel, "swapped"), "2.0.0 4");
    assert_eq!(kernel.info("swapped").unwrap().swaps, 1);
}

#[test]
fn a_panic_in_a_handler_is_answered_500_and_the_service_serves_on() {
    let kernel = kernel_with(KernelConfig::default());
    kernel
        .register(linked::<Buggy>(), Some("panics".into()))
        .unwrap();
    kernel.start("buggy").unwrap();
    let reply = kernel.request("buggy", "count", b"", None);
    assert_eq!(reply.code, codes::FAILED, "{reply:?}");
    assert_eq!(reply.message, "handle panicked: a bug in handle");
    let other = kernel.request("buggy", "other", b"", None);
    assert!(other.is_ok(), "{other:?}");
    assert_eq!(kernel.info("buggy").unwrap().status, Status::Running);
}

#[test]
fn a_hung_handler_times_its_requester_out_and_its_stop_is_given_up_in_time() {
    let kernel = kernel_with(KernelConfig {
        operation_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    kernel
        .register(linked::<Stuck>(), Some("hangs".into()))
        .unwrap();
    kernel.start("stuck").unwrap();
    let reply = kernel.request("stuck", "count", b"", Some(Duration::from_millis(50)));
    assert_eq!(reply.code, codes::TIMEOUT, "{reply:?}");
    // The kernel's own wait on the hung service is bounded: the stop is given up.
    let report = kernel.stop_all();
    assert_eq!(report.abandoned(), ["stuck"]);
    RELEASE.store(true, Ordering::Release);
}

#[test]
fn a_checkpoint_writes_the_live_state_once_and_a_restart_imports_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    StateKey::write_new(&key).unwrap();
    let hex = std::fs::read_to_string(&key).unwrap();
    let store = || {
        let key = StateKey::from_hex(hex.trim(), "test").unwrap();
        StateStore::new(&dir.path().join("state"), KeyRing::new(key, vec![]))
    };
    let config = || KernelConfig {
        state: Some(store().unwrap()),
        on_bad_state: BadStatePolicy::Refuse,
        ..Default::default()
    };
    let kernel = kernel_with(config());
    kernel.register(linked::<Saved>(), None).unwrap();
    kernel.start("saved").unwrap();
    count(&kernel, "saved");
    count(&kernel, "saved");
    let written = kernel.stats().state_writes;
    let checkpoints = kernel.checkpoint();
    assert!(
        matches!(&checkpoints[..], [(name, Ok(super::Checkpoint::Written))] if name == "saved"),
        "{checkpoints:?}"
    );
    // Unchanged: not written again.
    let again = kernel.checkpoint();
    assert!(
        matches!(&again[..], [(_, Ok(super::Checkpoint::Unchanged))]),
        "{again:?}"
    );
    assert_eq!(kernel.stats().state_writes, written + 1);
    assert_eq!(store().unwrap().load("saved").unwrap().unwrap().bytes, b"2");
    drop(kernel);

    let restarted = kernel_with(config());
    restarted.register(linked::<Saved>(), None).unwrap();
    restarted.start("saved").unwrap();
    assert_eq!(count(&restarted, "saved"), "1.0.0 3");
}

#[test]
fn a_linked_service_counts_no_library_opened() {
    let kernel = kernel_with(KernelConfig::default());
    let before = kernel.loader().libraries_opened();
    kernel.register(linked::<OrderBase>(), None).unwrap();
    assert_eq!(kernel.loader().libraries_opened(), before);
    let library = linked::<OrderBase>();
    assert!(library.is_linked());
    assert_eq!(library.path().to_str(), Some("linked:order-base"));
}
