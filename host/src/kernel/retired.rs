//! Retired libraries: no service uses them any more, and they are closed as soon as no
//! plugin code can run in them.
//!
//! A library is closed only when (1) every executor that ran one of its instances has ended
//! (an executor stuck in plugin code keeps it, through the [`Stuck`] kept here and the
//! instance the thread owns), and (2) no thread that the host did not start, and that was
//! not alive when the library was opened, is alive (a census of the process's threads: such
//! a thread may be running the library's code, as a C library's worker does). A thread named
//! after another service's executor (`svc-<name>`, inherited by the threads that executor's
//! plugin starts) is attributed to that service instead.
//!
//! Until then the library stays loaded — a leak, never a crash — and `list` shows it under
//! the service as pinned. [`KernelInner::sweep`] tries again (the daemon sweeps at every
//! checkpoint tick).

use std::{collections::BTreeSet, sync::Arc};

use super::{lock, KernelInner, Loaded};
use crate::{
    executor::Stuck,
    loader::threads::{kernel_name, ThreadInfo},
};

/// How often, and how far apart, a library just retired is tried again before it is left for
/// the sweeps: 10 × 5 ms.
const GRACE_TRIES: usize = 10;
const GRACE_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// A library waiting to be closed.
#[derive(Debug)]
pub(crate) struct Retired {
    service: String,
    version: String,
    loaded: Loaded,
    /// Executors of its instances that had not ended when it was retired.
    stuck: Vec<Stuck>,
    /// Whether this entry closes the library (`false`: it only keeps track of a stuck
    /// executor of a library that someone else owns, such as the service itself).
    owned: bool,
    /// The threads that kept it loaded at the last try.
    threads: Vec<ThreadInfo>,
}

impl Retired {
    /// One line for `list`.
    fn describe(&self) -> String {
        let mut reasons = Vec::new();
        for stuck in &self.stuck {
            reasons.push(format!("an instance {stuck}"));
        }
        if !self.threads.is_empty() {
            let threads: Vec<String> = self.threads.iter().map(ToString::to_string).collect();
            reasons.push(format!(
                "threads it started are alive: {}",
                threads.join(", ")
            ));
        }
        if reasons.is_empty() {
            reasons.push("still referenced".to_owned());
        }
        format!(
            "{} ({}): {}",
            self.version,
            self.loaded.path().display(),
            reasons.join("; ")
        )
    }
}

/// The outcome of trying to close one retired library.
enum Tried {
    /// Closed; whether it is gone from the address space.
    Closed(bool),
    /// Still loaded, for the reason the entry now records.
    Kept(Retired),
}

impl KernelInner {
    /// Retires `library` (with the executor of its last instance, if that did not end), and
    /// tries to close it at once. Returns whether it was closed and is gone from memory.
    pub(super) fn retire(&self, service: &str, loaded: Loaded, stuck: Option<Stuck>) -> bool {
        self.add_retired(service, loaded, stuck, true)
    }

    /// Keeps track of an executor stuck in plugin code of a library that stays in use (it
    /// serves again after a rollback): shown as pinned until the executor ends.
    pub(super) fn track_stuck(&self, service: &str, loaded: Loaded, stuck: Stuck) {
        self.add_retired(service, loaded, Some(stuck), false);
    }

    fn add_retired(
        &self,
        service: &str,
        loaded: Loaded,
        stuck: Option<Stuck>,
        owned: bool,
    ) -> bool {
        let retired = Retired {
            service: service.to_owned(),
            version: loaded.manifest().version.to_string(),
            loaded,
            stuck: stuck.into_iter().collect(),
            owned,
            threads: Vec::new(),
        };
        let mut tried = self.try_close(retired);
        // A plugin's thread told to finish in `stop` (and not joined there) may need a
        // moment; so may a thread that is about to say it is the host's.
        for _ in 0..GRACE_TRIES {
            match tried {
                Tried::Kept(retired) if !retired.threads.is_empty() => {
                    std::thread::sleep(GRACE_PAUSE);
                    tried = self.try_close(retired);
                }
                _ => break,
            }
        }
        match tried {
            Tried::Closed(unmapped) => unmapped,
            Tried::Kept(retired) => {
                tracing::warn!(
                    service,
                    pinned = %retired.describe(),
                    "old library kept loaded: plugin code may still run in it (a leak, not a crash); it is closed once that ends"
                );
                lock(&self.retired).push(retired);
                false
            }
        }
    }

    /// Tries again to close every retired library, and forgets the stuck instances that have
    /// ended since (saving the state they handed over). Returns how many libraries stay
    /// loaded.
    pub(crate) fn sweep(&self) -> usize {
        for slot in self.slots() {
            // Not waiting for an operation under way: the next sweep will do.
            let Some(mut ops) = slot.ops.try_lock() else {
                continue;
            };
            if !matches!(ops.run, super::Run::Stuck(_)) {
                continue;
            }
            let late = ops.run.reap();
            if matches!(ops.run, super::Run::Stuck(_)) {
                continue;
            }
            let saved = match late {
                Some(late) => {
                    let version = ops.loaded.manifest().version.to_string();
                    self.save(&slot, &mut ops, &version, &late).map(|()| true)
                }
                None => Ok(false),
            };
            match saved {
                Err(error) => slot.record_error(&error),
                Ok(saved) => slot.update(|info| {
                    info.last_error = Some(format!(
                        "its instance was stuck in plugin code and has ended since{}; start it again",
                        if saved { ", handing over its state (saved)" } else { "" }
                    ))
                }),
            }
            slot.publish(&ops, None);
        }
        let waiting = std::mem::take(&mut *lock(&self.retired));
        let mut kept = Vec::new();
        for retired in waiting {
            match self.try_close(retired) {
                Tried::Closed(_) => {}
                Tried::Kept(retired) => kept.push(retired),
            }
        }
        let mut retired = lock(&self.retired);
        retired.extend(kept);
        retired.len()
    }

    /// What `list` shows for `service`'s retired libraries.
    pub(super) fn pinned(&self, service: &str) -> Vec<String> {
        lock(&self.retired)
            .iter()
            .filter(|r| r.service == service)
            .map(Retired::describe)
            .collect()
    }

    fn try_close(&self, mut retired: Retired) -> Tried {
        retired.stuck.retain_mut(|stuck| !stuck.ended());
        if !retired.stuck.is_empty() {
            return Tried::Kept(retired);
        }
        let shared = match retired.loaded {
            Loaded::InProcess(library) => library,
            // No library was opened here: its workers are gone with its executors.
            Loaded::Isolated(_) => return Tried::Closed(true),
        };
        let library = match Arc::try_unwrap(shared) {
            Ok(library) => library,
            Err(_) if !retired.owned => {
                // Its stuck executor ended; the library is someone else's to close.
                return Tried::Closed(false);
            }
            Err(shared) => {
                retired.loaded = Loaded::InProcess(shared);
                retired.threads.clear();
                return Tried::Kept(retired);
            }
        };
        let elsewhere = self.executor_names_except(&retired.service);
        match library.close(&|name| elsewhere.contains(name)) {
            Ok(unmapped) => {
                tracing::debug!(service = %retired.service, version = %retired.version, unmapped, "old library closed");
                Tried::Closed(unmapped)
            }
            Err((library, threads)) => {
                retired.loaded = Loaded::InProcess(Arc::new(library));
                retired.threads = threads;
                Tried::Kept(retired)
            }
        }
    }

    /// The kernel names of the executors of every service ever registered but `service` (and
    /// of none that shares `service`'s kernel name): threads so named belong to those
    /// services, whose own libraries account for them.
    fn executor_names_except(&self, service: &str) -> BTreeSet<String> {
        let own = executor_name(service);
        lock(&self.ever_registered)
            .iter()
            .map(|name| executor_name(name))
            .filter(|name| *name != own)
            .collect()
    }
}

/// The kernel's name of `service`'s executor threads (and of the threads they start, until
/// renamed).
pub(crate) fn executor_name(service: &str) -> String {
    kernel_name(&format!("svc-{service}")).to_owned()
}
