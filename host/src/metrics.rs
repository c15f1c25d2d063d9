//! The host's metrics, in the OpenMetrics text format that Prometheus scrapes
//! (`run --metrics-listen ADDR` serves them at `/metrics`).
//!
//! Counted where they happen, with handles made once per service so that a request costs two
//! atomic additions and a histogram observation: replies by service and code, request
//! latency (from the request's posting to its reply), events, hot replaces and rollbacks,
//! the last replace's held time, checkpoints by outcome. Read when scraped: mailbox depths,
//! state bytes written, libraries opened and plugin files that failed to load.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabels {
    service: String,
    code: u32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Request latency buckets, in seconds: 2 µs to 10 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        2e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 2.5, 10.0,
    ]
    .into_iter()
}

/// Every metric of a kernel.
pub struct Metrics {
    registry: Registry,
    replies: Family<ReplyLabels, Counter>,
    latency: Family<ServiceLabel, Histogram>,
    events: Family<ServiceLabel, Counter>,
    swaps: Family<ServiceLabel, Counter>,
    rollbacks: Family<ServiceLabel, Counter>,
    worker_crashes: Family<ServiceLabel, Counter>,
    worker_restarts: Family<ServiceLabel, Counter>,
    swap_held: Family<ServiceLabel, Gauge<f64, AtomicU64>>,
    mailbox: Family<ServiceLabel, Gauge>,
    checkpoints: Family<OutcomeLabel, Counter>,
    state_bytes: Counter,
    libraries_opened: Counter,
    load_failures: Counter,
    fleet_refused: Counter,
    fleet_lease_valid: Gauge<f64, AtomicU64>,
    fleet_owned: Gauge,
    /// What the counters read at scrape time had reached at the last scrape.
    read: [AtomicU64; 4],
}

/// What a host of a fleet reports at a scrape (see [`crate::kernel::Placement::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FleetStats {
    /// State writes the store refused because this host no longer owned the service.
    pub refused_writes: u64,
    /// How long this host's lease is certainly valid still (0 without one).
    pub lease_valid: Duration,
    /// The services this host owns.
    pub owned: usize,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// One service's handles on the per-request metrics.
#[derive(Debug, Clone)]
pub(crate) struct ServiceMetrics {
    service: String,
    ok: Counter,
    latency: Histogram,
    events: Counter,
    replies: Family<ReplyLabels, Counter>,
}

impl ServiceMetrics {
    /// A reply with `code`, `latency` after its request was posted.
    pub fn reply(&self, code: u32, latency: Duration) {
        if code == plugin_api::codes::OK {
            self.ok.inc();
        } else {
            self.replies
                .get_or_create(&ReplyLabels {
                    service: self.service.clone(),
                    code,
                })
                .inc();
        }
        self.latency.observe(latency.as_secs_f64());
    }

    /// An event handled.
    pub fn event(&self) {
        self.events.inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("microkernel");
        let metrics = Metrics {
            replies: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            events: Family::default(),
            swaps: Family::default(),
            rollbacks: Family::default(),
            worker_crashes: Family::default(),
            worker_restarts: Family::default(),
            swap_held: Family::default(),
            mailbox: Family::default(),
            checkpoints: Family::default(),
            state_bytes: Counter::default(),
            libraries_opened: Counter::default(),
            load_failures: Counter::default(),
            fleet_refused: Counter::default(),
            fleet_lease_valid: Gauge::default(),
            fleet_owned: Gauge::default(),
            read: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "replies",
            "Replies to requests, by service and code (0 ok, 400, 404, 408, 500, 503, 508)",
            metrics.replies.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a request's posting to its service's reply (queueing included)",
            metrics.latency.clone(),
        );
        registry.register(
            "events",
            "Events handled, by service",
            metrics.events.clone(),
        );
        registry.register(
            "swaps",
            "Hot replaces done, by service",
            metrics.swaps.clone(),
        );
        registry.register(
            "rollbacks",
            "Hot replaces that failed after the old version was suspended (the old one serves)",
            metrics.rollbacks.clone(),
        );
        registry.register(
            "worker_crashes",
            "Worker processes of isolated services lost (a signal, an exit, no answer in time), by service",
            metrics.worker_crashes.clone(),
        );
        registry.register(
            "worker_restarts",
            "Worker processes of isolated services started again after a crash, by service",
            metrics.worker_restarts.clone(),
        );
        registry.register(
            "swap_held_seconds",
            "How long the last hot replace held the service's requests",
            metrics.swap_held.clone(),
        );
        registry.register(
            "mailbox_depth",
            "Messages waiting in each service's mailbox",
            metrics.mailbox.clone(),
        );
        registry.register(
            "checkpoints",
            "Checkpoints of a service, by outcome (written, unchanged, failed)",
            metrics.checkpoints.clone(),
        );
        registry.register(
            "state_written_bytes",
            "Bytes of state files and records written durably",
            metrics.state_bytes.clone(),
        );
        registry.register(
            "libraries_opened",
            "Plugin libraries opened",
            metrics.libraries_opened.clone(),
        );
        registry.register(
            "plugin_load_failures",
            "Plugin files that failed to load (refused by the probe or the checks)",
            metrics.load_failures.clone(),
        );
        registry.register(
            "fleet_refused_writes",
            "State writes refused because this host no longer owned the service (0 outside a fleet)",
            metrics.fleet_refused.clone(),
        );
        registry.register(
            "fleet_lease_valid_seconds",
            "How long this host's lease in the fleet is certainly valid still (0 without one, or outside a fleet)",
            metrics.fleet_lease_valid.clone(),
        );
        registry.register(
            "fleet_owned_services",
            "Services this host owns in the fleet (0 outside a fleet)",
            metrics.fleet_owned.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// `service`'s handles (made once, when its executor starts).
    pub(crate) fn service(&self, service: &str) -> ServiceMetrics {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        ServiceMetrics {
            service: service.to_owned(),
            ok: self
                .replies
                .get_or_create(&ReplyLabels {
                    service: service.to_owned(),
                    code: plugin_api::codes::OK,
                })
                .clone(),
            latency: self.latency.get_or_create(&label).clone(),
            events: self.events.get_or_create(&label).clone(),
            replies: self.replies.clone(),
        }
    }

    /// A reply the routing gave itself for `service` (not running, mailbox full).
    pub(crate) fn refused(&self, service: &str, code: u32) {
        self.replies
            .get_or_create(&ReplyLabels {
                service: service.to_owned(),
                code,
            })
            .inc();
    }

    /// A hot replace of `service` that held its requests `held`.
    pub(crate) fn swapped(&self, service: &str, held: Duration) {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        self.swaps.get_or_create(&label).inc();
        self.swap_held.get_or_create(&label).set(held.as_secs_f64());
    }

    /// A hot replace of `service` rolled back.
    pub(crate) fn worker_crashed(&self, service: &str) {
        self.worker_crashes
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .inc();
    }

    pub(crate) fn worker_restarted(&self, service: &str) {
        self.worker_restarts
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .inc();
    }

    pub(crate) fn rolled_back(&self, service: &str) {
        self.rollbacks
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .inc();
    }

    /// A checkpoint's outcome: `written`, `unchanged` or `failed`.
    pub(crate) fn checkpoint(&self, outcome: &'static str) {
        self.checkpoints
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// The text format, with what is read at scrape time: mailbox depths by service, the
    /// totals given (state bytes written, libraries opened, load failures), and the fleet's.
    pub(crate) fn encode(
        &self,
        mailboxes: &[(String, usize)],
        totals: [u64; 3],
        fleet: FleetStats,
    ) -> String {
        self.fleet_lease_valid.set(fleet.lease_valid.as_secs_f64());
        self.fleet_owned
            .set(i64::try_from(fleet.owned).unwrap_or(i64::MAX));
        let totals = [totals[0], totals[1], totals[2], fleet.refused_writes];
        for (service, depth) in mailboxes {
            self.mailbox
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .set(i64::try_from(*depth).unwrap_or(i64::MAX));
        }
        let counters = [
            &self.state_bytes,
            &self.libraries_opened,
            &self.load_failures,
            &self.fleet_refused,
        ];
        for ((counter, read), total) in counters.iter().zip(&self.read).zip(totals) {
            let before = read.swap(total, Ordering::Relaxed);
            counter.inc_by(total.saturating_sub(before));
        }
        let mut text = String::new();
        // Writing to a `String` does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
