//! What the host remembers of plugin files between rescans and restarts: per service, the
//! file that last ran (its *last good* file) and the files it rejected, and why.
//!
//! The record is `<state-dir>/plugins.json`, written atomically and durably as a state file
//! is (kept in memory only with `--no-state`). A rejected file is known by its SHA-256 and
//! the SHA-256 of the service's configuration when it failed: it is not chosen again until
//! one of them changes, or an operator asks for it (`ctl reload --retry`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::state::StateStore;

/// The record's file name in the state directory.
pub const RECORD: &str = "plugins.json";
const FORMAT: u32 = 1;

/// A plugin file, as the record names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// Where it was.
    pub file: PathBuf,
    /// The version of the service it provides.
    pub version: String,
}

/// A file the host will not choose again for its service, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The file.
    #[serde(flatten)]
    pub file: FileRef,
    /// SHA-256 of the service's configuration (`<service>.conf`) when it failed, hex; `None`
    /// when there was none.
    pub config_sha256: Option<String>,
    /// What went wrong.
    pub reason: String,
    /// When it was rejected for not returning in time: the operation timeout then, in
    /// milliseconds. A host run with a longer one tries the file again.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When (seconds since the Unix epoch).
    pub at: u64,
}

impl Rejection {
    /// A rejection of the file `sha256` at `file`, providing `version`, with the
    /// configuration `config`, made now.
    pub fn new(
        file: &Path,
        sha256: &[u8; 32],
        version: &str,
        config: Option<&[u8; 32]>,
        reason: String,
        timeout: Option<std::time::Duration>,
    ) -> Self {
        Rejection {
            file: FileRef {
                sha256: hex_of(sha256),
                file: file.to_owned(),
                version: version.to_owned(),
            },
            config_sha256: config.map(hex_of),
            reason,
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            at: unix_now(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (version {}, sha256 {}): {}",
            self.file.file.display(),
            self.file.version,
            self.file.sha256.get(..12).unwrap_or(&self.file.sha256),
            self.reason
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ServiceRecord {
    #[serde(default)]
    good: Option<FileRef>,
    #[serde(default)]
    rejected: Vec<Rejection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    format: u32,
    services: BTreeMap<String, ServiceRecord>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            format: FORMAT,
            services: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    record: Record,
    /// Whether the record changed since it was last written.
    dirty: bool,
    /// Files that failed to load for a reason of their own, by path: they provide no service
    /// the host could tell. Not persisted: a restart reads them again.
    broken: BTreeMap<PathBuf, String>,
    /// Services that run or have state, and no plugin file, at the last full rescan:
    /// `(service, why)`.
    orphans: Vec<(String, String)>,
    /// The plugin files in the directory at the last rescan, by SHA-256 (hex): what `list`
    /// shows rejected is what is there, under its current name.
    present: BTreeMap<String, Vec<PathBuf>>,
}

/// The verdicts on plugin files: shared by the reloader (which makes them) and the control
/// socket (which shows them). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<Inner>>);

fn hex_of(sha256: &[u8; 32]) -> String {
    hex::encode(sha256)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Verdicts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the record from the state directory. A record that cannot be parsed is moved
    /// aside (kept, as `plugins.json.bad-<unix seconds>`) and the host starts with none.
    pub fn load(&self, store: &StateStore) {
        let record = match store.read_record(RECORD) {
            Ok(None) => return,
            Ok(Some(bytes)) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(record) if record.format == FORMAT => record,
                Ok(record) => {
                    tracing::warn!(file = %store.dir().join(RECORD).display(), format = record.format, "plugin record has an unknown format; ignored");
                    return;
                }
                Err(error) => {
                    let path = store.dir().join(RECORD);
                    let aside = store.dir().join(format!("{RECORD}.bad-{}", unix_now()));
                    let moved = std::fs::rename(&path, &aside);
                    tracing::warn!(file = %path.display(), %error, moved_to = %aside.display(), moved = moved.is_ok(), "plugin record is not valid JSON: moved aside, starting without one");
                    return;
                }
            },
            Err(error) => {
                tracing::warn!(error = %plugin_api::error_chain(&error), "plugin record unreadable; starting without one (it is not overwritten until the next verdict)");
                return;
            }
        };
        self.lock().record = record;
    }

    /// Writes the record (when there is a state directory). A failure is logged: the
    /// verdicts hold in memory until the next write.
    pub fn persist(&self, store: Option<&StateStore>) {
        let Some(store) = store else { return };
        let mut inner = self.lock();
        if !inner.dirty {
            return;
        }
        let bytes = serde_json::to_vec_pretty(&inner.record).expect("the record serializes");
        match store.write_record(RECORD, &bytes) {
            Ok(()) => inner.dirty = false,
            Err(error) => {
                tracing::error!(error = %plugin_api::error_chain(&error), "the plugin record could not be written; its verdicts hold until the host stops, and it is tried again at the next rescan");
            }
        }
    }

    /// Why `sha256` was rejected for `service` with this configuration, if it was (and
    /// still is: a file rejected for a timeout shorter than `operation_timeout` is not).
    pub fn rejection(
        &self,
        service: &str,
        sha256: &[u8; 32],
        config: Option<&[u8; 32]>,
        operation_timeout: std::time::Duration,
    ) -> Option<Rejection> {
        let sha = hex_of(sha256);
        let config = config.map(hex_of);
        let now_ms = u64::try_from(operation_timeout.as_millis()).unwrap_or(u64::MAX);
        self.lock()
            .record
            .services
            .get(service)?
            .rejected
            .iter()
            .find(|r| {
                r.file.sha256 == sha
                    && r.config_sha256 == config
                    && r.timeout_ms.is_none_or(|then| now_ms <= then)
            })
            .cloned()
    }

    /// Records that a file (with a configuration) must not be chosen again for `service`.
    pub fn reject(&self, service: &str, rejection: Rejection) {
        tracing::warn!(service, plugin = %rejection.file.file.display(), version = %rejection.file.version, reason = %rejection.reason, "plugin file rejected: not chosen again until its content or its configuration changes");
        let mut inner = self.lock();
        inner.dirty = true;
        let record = inner.record.services.entry(service.to_owned()).or_default();
        record.rejected.retain(|r| {
            !(r.file.sha256 == rejection.file.sha256 && r.config_sha256 == rejection.config_sha256)
        });
        record.rejected.push(rejection);
    }

    /// Records that `file` runs `service`: its last good file. Its rejections (under
    /// another configuration) are forgotten: it has proven itself.
    pub fn good(&self, service: &str, file: &Path, sha256: &[u8; 32], version: &str) {
        let sha = hex_of(sha256);
        let good = Some(FileRef {
            sha256: sha.clone(),
            file: file.to_owned(),
            version: version.to_owned(),
        });
        let mut inner = self.lock();
        let record = inner.record.services.entry(service.to_owned()).or_default();
        let rejected = record.rejected.len();
        record.rejected.retain(|r| r.file.sha256 != sha);
        if record.good != good || record.rejected.len() != rejected {
            record.good = good;
            inner.dirty = true;
        }
    }

    /// The file that last ran `service`.
    pub fn last_good(&self, service: &str) -> Option<FileRef> {
        self.lock().record.services.get(service)?.good.clone()
    }

    /// Forgets the rejections (of one service, or all, with the broken files): they are
    /// tried again.
    pub fn clear(&self, service: Option<&str>) {
        let mut inner = self.lock();
        inner.dirty = true;
        match service {
            Some(service) => {
                if let Some(record) = inner.record.services.get_mut(service) {
                    record.rejected.clear();
                }
            }
            None => {
                for record in inner.record.services.values_mut() {
                    record.rejected.clear();
                }
                inner.broken.clear();
            }
        }
    }

    /// The rejections of `service` whose files are in the plugins directory, one line each,
    /// under the files' current names.
    pub fn rejected_lines(&self, service: &str) -> Vec<String> {
        let inner = self.lock();
        let Some(record) = inner.record.services.get(service) else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        for rejection in &record.rejected {
            for path in inner
                .present
                .get(&rejection.file.sha256)
                .into_iter()
                .flatten()
            {
                let mut shown = rejection.clone();
                shown.file.file = path.clone();
                lines.push(shown.to_string());
            }
        }
        lines
    }

    /// Sets the plugin files in the directory (path and SHA-256).
    pub(super) fn set_present(&self, files: impl IntoIterator<Item = (PathBuf, [u8; 32])>) {
        let mut present: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for (path, sha) in files {
            present.entry(hex_of(&sha)).or_default().push(path);
        }
        self.lock().present = present;
    }

    /// Every service with rejections.
    pub fn services_with_rejections(&self) -> Vec<String> {
        let inner = self.lock();
        inner
            .record
            .services
            .iter()
            .filter(|(_, r)| {
                r.rejected
                    .iter()
                    .any(|rejection| inner.present.contains_key(&rejection.file.sha256))
            })
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Sets the files that failed to load for a reason of their own.
    pub(super) fn set_broken(&self, broken: BTreeMap<PathBuf, String>) {
        self.lock().broken = broken;
    }

    /// Sets the services that run or have state and no plugin file.
    pub(super) fn set_orphans(&self, orphans: Vec<(String, String)>) {
        self.lock().orphans = orphans;
    }

    /// The services that run or have state and no plugin file, at the last full rescan:
    /// `(service, why)`.
    pub fn orphans(&self) -> Vec<(String, String)> {
        self.lock().orphans.clone()
    }

    /// The files that failed to load for a reason of their own, one line each.
    pub fn broken_lines(&self) -> Vec<String> {
        self.lock()
            .broken
            .iter()
            .map(|(path, reason)| format!("{}: {reason}", path.display()))
            .collect()
    }
}
