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
    /// When (seconds since the Unix epoch).
    pub at: u64,
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
                tracing::warn!(error = %crate::error_chain(&error), "plugin record unreadable; starting without one (it is not overwritten until the next verdict)");
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
                tracing::error!(error = %crate::error_chain(&error), "the plugin record could not be written; its verdicts hold until the host stops, and it is tried again at the next rescan");
            }
        }
    }

    /// Why `sha256` was rejected for `service` with this configuration, if it was.
    pub fn rejection(
        &self,
        service: &str,
        sha256: &[u8; 32],
        config: Option<&[u8; 32]>,
    ) -> Option<Rejection> {
        let sha = hex_of(sha256);
        let config = config.map(hex_of);
        self.lock()
            .record
            .services
            .get(service)?
            .rejected
            .iter()
            .find(|r| r.file.sha256 == sha && r.config_sha256 == config)
            .cloned()
    }

    /// Records that `file` (with this configuration) must not be chosen again for `service`.
    pub fn reject(
        &self,
        service: &str,
        file: &Path,
        sha256: &[u8; 32],
        version: &str,
        config: Option<&[u8; 32]>,
        reason: String,
    ) {
        let sha = hex_of(sha256);
        let config = config.map(hex_of);
        let mut inner = self.lock();
        inner.dirty = true;
        let record = inner.record.services.entry(service.to_owned()).or_default();
        record
            .rejected
            .retain(|r| !(r.file.sha256 == sha && r.config_sha256 == config));
        tracing::warn!(service, plugin = %file.display(), version, %reason, "plugin file rejected: not chosen again until its content or its configuration changes");
        record.rejected.push(Rejection {
            file: FileRef {
                sha256: sha,
                file: file.to_owned(),
                version: version.to_owned(),
            },
            config_sha256: config,
            reason,
            at: unix_now(),
        });
    }

    /// Records that `file` runs `service`: its last good file.
    pub fn good(&self, service: &str, file: &Path, sha256: &[u8; 32], version: &str) {
        let good = Some(FileRef {
            sha256: hex_of(sha256),
            file: file.to_owned(),
            version: version.to_owned(),
        });
        let mut inner = self.lock();
        let record = inner.record.services.entry(service.to_owned()).or_default();
        if record.good != good {
            record.good = good;
            inner.dirty = true;
        }
    }

    /// The SHA-256 (hex) of the file that last ran `service`.
    pub fn last_good(&self, service: &str) -> Option<String> {
        let inner = self.lock();
        Some(
            inner
                .record
                .services
                .get(service)?
                .good
                .as_ref()?
                .sha256
                .clone(),
        )
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

    /// The rejections of `service`, one line each.
    pub fn rejected_lines(&self, service: &str) -> Vec<String> {
        self.lock()
            .record
            .services
            .get(service)
            .map(|r| r.rejected.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    /// Every service with rejections.
    pub fn services_with_rejections(&self) -> Vec<String> {
        self.lock()
            .record
            .services
            .iter()
            .filter(|(_, r)| !r.rejected.is_empty())
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Sets the files that failed to load for a reason of their own.
    pub(super) fn set_broken(&self, broken: BTreeMap<PathBuf, String>) {
        self.lock().broken = broken;
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
