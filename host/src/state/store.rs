//! One sealed file per service: `<state-dir>/<service>.state`.
//!
//! Format (version 1), all integers little-endian:
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `MKSTATE\0` |
//! | 2 | format version (`1`) |
//! | 8 | key id: first 8 bytes of SHA-256 of the key that sealed the file |
//! | 1 + n | service name: length, then UTF-8 |
//! | 1 + n | version of the plugin that exported the state: length, then UTF-8 |
//! | 12 | nonce, fresh for every write |
//! | rest | AES-256-GCM ciphertext of the exported bytes, then the 16-byte tag |
//!
//! The associated data is everything before the ciphertext, so editing any header field, or
//! presenting the file as another service's, makes it fail to open.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    cipher::{self, NONCE_LEN, TAG_LEN},
    keys::{KeyRing, KEY_ID_LEN},
};

const MAGIC: &[u8; 8] = b"MKSTATE\0";
const FORMAT_VERSION: u16 = 1;

/// The largest state a service may export: a larger one is not saved (the version that
/// exported it keeps running), so that every state file the host writes it can read back.
pub const MAX_STATE_SIZE: u64 = 1 << 30;
/// The largest state file read: a state, and room for its header and tag. A larger file
/// (a sparse file, a link to a device) is refused unread.
pub const MAX_STATE_FILE_SIZE: u64 = MAX_STATE_SIZE + 4096;
/// The largest record file (`plugins.json`) read.
pub const MAX_RECORD_SIZE: u64 = 16 << 20;

/// Why a state file could not be written or opened. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file-system operation failed.
    #[error("{} {path}: {op} failed", kind_of(path))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// A state file could not be read: it is not a regular file, it is larger than
    /// [`MAX_STATE_FILE_SIZE`], or the operating system said no.
    #[error("state file {path}: reading failed")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state larger than [`MAX_STATE_SIZE`] was exported: it is not saved.
    #[error("state file {path}: a state of {len} bytes is not saved (at most {MAX_STATE_SIZE})")]
    TooLarge {
        /// The file it would have gone to.
        path: PathBuf,
        /// The state's size.
        len: u64,
    },
    /// The service name or the version is too long for the header (255 bytes at most).
    #[error("state file {path}: the {field} is longer than 255 bytes")]
    HeaderField {
        /// The file.
        path: PathBuf,
        /// Which field.
        field: &'static str,
    },
    /// The file does not start with the state magic.
    #[error("state file {path} is not a microkernel state file (bad magic)")]
    NotAStateFile {
        /// The file.
        path: PathBuf,
    },
    /// The file is shorter than its header says.
    #[error("state file {path} is truncated ({len} bytes)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The file has a format version this host does not know.
    #[error(
        "state file {path} has format version {found}; this host reads version {FORMAT_VERSION}"
    )]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// Its format version.
        found: u16,
    },
    /// The file was sealed for another service (renamed or copied).
    #[error("state file {path} belongs to service `{found}`, not `{expected}` (was it renamed?)")]
    WrongService {
        /// The file.
        path: PathBuf,
        /// The service it was opened for.
        expected: String,
        /// The service named in its header.
        found: String,
    },
    /// None of the configured keys sealed the file.
    #[error("state file {path} was sealed with key {key_id}, which is neither the current key ({current}) nor an old key (--old-key-file)")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The id of the key that sealed it.
        key_id: String,
        /// The id of the current key.
        current: String,
    },
    /// Decryption failed: the content or the header was modified.
    #[error("state file {path} failed authentication: it was modified or damaged")]
    Tampered {
        /// The file.
        path: PathBuf,
    },
    /// The shared store a fleet keeps states in failed or could not be reached: the
    /// host's trouble, not the state's.
    #[error("state of `{service}` at {location}: {op} failed")]
    Store {
        /// The service.
        service: String,
        /// Where (the store and key).
        location: String,
        /// What was being done.
        op: &'static str,
        /// What the store said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A write refused because this host no longer owns the service (another does, or its
    /// ownership lapsed): fenced, nothing was written.
    #[error("state of `{service}` not written: this host ({node}) no longer owns the service{}", owner.as_deref().map(|o| format!(" (its owner is {o})")).unwrap_or_default())]
    NotOwner {
        /// The service.
        service: String,
        /// This host's node name.
        node: String,
        /// The owner now, if known.
        owner: Option<String>,
    },
}

/// What a path of the state directory is, in words.
fn kind_of(path: &Path) -> &'static str {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if RECORD_FILES.contains(&name) {
        "plugin record"
    } else if name.ends_with(".state") || name.contains(".state.") {
        "state file"
    } else {
        "state directory"
    }
}

impl StateError {
    /// Whether the error is about what the file is or holds (not a regular file, too large,
    /// not a state file, truncated, another service's, an unknown key, tampered): a bad
    /// file. Any other I/O error (a file that could not be read at all) is not: the file
    /// may be fine.
    pub fn is_about_content(&self) -> bool {
        matches!(self, StateError::Read { source, .. } if is_not_a_file(source))
            || matches!(
                self,
                StateError::NotAStateFile { .. }
                    | StateError::Truncated { .. }
                    | StateError::UnsupportedFormat { .. }
                    | StateError::WrongService { .. }
                    | StateError::UnknownKey { .. }
                    | StateError::Tampered { .. }
            )
    }
}

/// Whether a read failed because of what the path is (not a regular file) or holds (too
/// much), as [`crate::bounded::read`] says: the file's fault, not the host's.
fn is_not_a_file(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
    )
}

/// The clear-text header of a state file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateHeader {
    /// Format version.
    pub format: u16,
    /// Hex id of the key that sealed it.
    pub key_id: String,
    /// The service it belongs to.
    pub service: String,
    /// The version of the plugin that exported the state.
    pub exported_by: String,
    /// Hex nonce.
    pub nonce: String,
    /// Length of the ciphertext with its tag.
    pub sealed_len: usize,
}

/// State read back from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState {
    /// The version of the plugin that exported it.
    pub version: String,
    /// The exported bytes.
    pub bytes: Vec<u8>,
}

/// The prefix and suffix of the temporary file a save writes before renaming it into place:
/// `.<service>.state.tmp-XXXXXX`. Only names of this form are ever removed as leftovers.
const TMP_INFIX: &str = ".tmp-";

/// The host's own records in the state directory, besides the state files.
pub const RECORD_FILES: &[&str] = &["plugins.json"];
const TMP_RANDOM_LEN: usize = 6;

/// Reads and writes the state files of one state directory. Lives as long as the kernel.
#[derive(Debug)]
///
/// Every file is read and written through a handle on the directory opened at the start,
/// never through its path again: if the directory is moved, renamed or replaced while the
/// host runs, the host goes on in its own directory, wherever it is now, and never writes
/// into whatever took its path (another host's, perhaps).
pub struct StateStore {
    /// The path the directory was opened at.
    dir: PathBuf,
    /// The directory itself.
    handle: fs::File,
    /// (device, inode) of the directory: whether the path still leads to it.
    identity: (u64, u64),
    keys: KeyRing,
    /// Bytes written to files that were renamed into place, since the store was opened.
    written: std::sync::atomic::AtomicU64,
}

fn identity_of(dir: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir)?;
    Ok((meta.dev(), meta.ino()))
}

impl StateStore {
    /// Uses `dir` (created with mode 0700 if missing) and `keys`.
    pub fn new(dir: &Path, keys: KeyRing) -> Result<Self, StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                path: dir.to_owned(),
                op: "creating the state directory",
                source,
            })?;
        if let Ok(meta) = fs::metadata(dir) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:04o}"), "the state directory is accessible to other users; run `chmod 700` on it");
            }
        }
        let open = |source| StateError::Io {
            path: dir.to_owned(),
            op: "opening the state directory",
            source,
        };
        let handle = fs::File::open(dir).map_err(open)?;
        let identity = {
            use std::os::unix::fs::MetadataExt;
            let meta = handle.metadata().map_err(open)?;
            (meta.dev(), meta.ino())
        };
        Ok(StateStore {
            dir: dir.to_owned(),
            handle,
            identity,
            keys,
            written: Default::default(),
        })
    }

    /// `name` in the directory itself, wherever it is now (through `/proc/self/fd`).
    fn at(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.handle.as_raw_fd()))
    }

    /// Where the state directory is now, when its path no longer leads to it (it was moved
    /// or renamed, or removed: then the path ends in ` (deleted)`).
    pub fn moved_to(&self) -> Option<PathBuf> {
        if identity_of(&self.dir).is_ok_and(|id| id == self.identity) {
            return None;
        }
        use std::os::fd::AsRawFd;
        let link = format!("/proc/self/fd/{}", self.handle.as_raw_fd());
        Some(fs::read_link(link).unwrap_or_else(|_| PathBuf::from("(unknown)")))
    }

    /// The bytes written (state files and records) since the store was opened.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The keys this store seals and opens with.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The state directory (the path it was opened at).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `service`'s state lives: in the state directory, or where it was moved to.
    pub fn path(&self, service: &str) -> PathBuf {
        self.moved_to()
            .unwrap_or_else(|| self.dir.clone())
            .join(format!("{service}.state"))
    }

    /// Seals `bytes`, exported by `version` of `service`, and replaces the service's file
    /// atomically and durably: temporary file in the same directory, write, fsync, rename,
    /// fsync of the directory. Either the old file or the new one survives a crash.
    pub fn save(&self, service: &str, version: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.path(service);
        let sealed = seal_state(&self.keys, &path, service, version, bytes)?;
        self.write_atomically(&format!("{service}.state"), &path, &sealed)
    }

    /// The services that have a state file here (`<service>.state`, a valid service name),
    /// sorted.
    pub fn services_with_state(&self) -> Vec<String> {
        let mut services: Vec<String> = fs::read_dir(self.at(""))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let service = name.strip_suffix(".state")?;
                plugin_api::is_valid_service_name(service).then(|| service.to_owned())
            })
            .collect();
        services.sort();
        services
    }

    /// Replaces the file `name` of the state directory (one of [`RECORD_FILES`]) atomically
    /// and durably, as a state file is: for the host's own small records.
    pub fn write_record(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        debug_assert!(RECORD_FILES.contains(&name));
        self.write_atomically(name, &self.dir.join(name), bytes)
    }

    /// Reads the file `name` of the state directory, if it exists.
    pub fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.dir.join(name);
        match crate::bounded::read(&self.at(name), MAX_RECORD_SIZE) {
            Ok(data) => Ok(Some(data.bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io {
                path,
                op: "reading",
                source,
            }),
        }
    }

    /// Replaces the directory's file `name` (shown as `path`): temporary file in the same
    /// directory (`.<name>.tmp-XXXXXX`), write, fsync, rename, fsync of the directory:
    /// either the old file or the new one survives a crash.
    fn write_atomically(&self, name: &str, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
        let io = |op, source| StateError::Io {
            path: path.to_owned(),
            op,
            source,
        };
        let mut file = tempfile::Builder::new()
            .prefix(&format!(".{name}{TMP_INFIX}"))
            .rand_bytes(TMP_RANDOM_LEN)
            .tempfile_in(self.at(""))
            .map_err(|e| io("creating a temporary file", e))?;
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| io("setting permissions", e))?;
        file.write_all(bytes).map_err(|e| io("writing", e))?;
        file.as_file().sync_all().map_err(|e| io("fsync", e))?;
        file.persist(self.at(name))
            .map_err(|e| io("renaming into place", e.error))?;
        self.handle
            .sync_all()
            .map_err(|e| io("fsync of the state directory", e))?;
        self.written
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Removes the temporary files of saves that never completed (a crash between creating
    /// and renaming): only names a save writes, `.<service>.state.tmp-XXXXXX`; anything else
    /// (an operator's `.kv.state.backup`) is left alone. Call it only when no save can be
    /// running. Returns what it removed.
    pub fn remove_leftovers(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(self.at("")).into_iter().flatten().flatten() {
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            let name = entry.file_name();
            if is_file
                && name.to_str().is_some_and(is_temporary_name)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed.push(self.dir.join(name));
            }
        }
        removed
    }

    /// Opens `service`'s state, if it has a file.
    pub fn load(&self, service: &str) -> Result<Option<SavedState>, StateError> {
        let path = self.path(service);
        let data = match crate::bounded::read(
            &self.at(&format!("{service}.state")),
            MAX_STATE_FILE_SIZE,
        ) {
            Ok(data) => data.bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            // Not a regular file, or too large: the file's fault, as bad content is.
            Err(source) if is_not_a_file(&source) => return Err(StateError::Read { path, source }),
            Err(source) => {
                return Err(StateError::Io {
                    path,
                    op: "reading",
                    source,
                })
            }
        };
        let (header, bytes) = open(&self.keys, &path, &data, Some(service))?;
        Ok(Some(SavedState {
            version: header.exported_by,
            bytes,
        }))
    }

    /// Moves `service`'s file aside to `<service>.state.bad-<unix seconds>` and returns the
    /// new path. The file is kept, never deleted.
    pub fn quarantine(&self, service: &str) -> Result<PathBuf, StateError> {
        let path = self.path(service);
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut target = format!("{service}.state.bad-{stamp}");
        let mut n = 1;
        while self.at(&target).exists() {
            target = format!("{service}.state.bad-{stamp}-{n}");
            n += 1;
        }
        fs::rename(self.at(&format!("{service}.state")), self.at(&target)).map_err(|source| {
            StateError::Io {
                path: path.clone(),
                op: "moving aside",
                source,
            }
        })?;
        Ok(path.with_file_name(target))
    }
}

/// Whether `name` is one a save gives its temporary file: `.<service>.state.tmp-XXXXXX`
/// (with a valid service name) or `.<record>.tmp-XXXXXX`, with six characters from
/// tempfile's alphabet.
fn is_temporary_name(name: &str) -> bool {
    let Some((file, random)) = name
        .strip_prefix('.')
        .and_then(|rest| rest.rsplit_once(TMP_INFIX))
    else {
        return false;
    };
    let ours = file
        .strip_suffix(".state")
        .is_some_and(plugin_api::is_valid_service_name)
        || RECORD_FILES.contains(&file);
    ours && random.len() == TMP_RANDOM_LEN && random.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Opens any state file (for `inspect-state`): returns its header and content.
pub fn inspect(keys: &KeyRing, path: &Path) -> Result<(StateHeader, Vec<u8>), StateError> {
    let data = crate::bounded::read(path, MAX_STATE_FILE_SIZE)
        .map_err(|source| StateError::Read {
            path: path.to_owned(),
            source,
        })?
        .bytes;
    open(keys, path, &data, None)
}

/// Seals `bytes`, exported by `version` of `service`, as a state file holds them: for a
/// backend that keeps states elsewhere (`location` names where, in errors). Fails when the
/// state is too large, or a name does not fit the header.
pub fn seal_state(
    keys: &KeyRing,
    location: &Path,
    service: &str,
    version: &str,
    bytes: &[u8],
) -> Result<Vec<u8>, StateError> {
    if bytes.len() as u64 > MAX_STATE_SIZE {
        return Err(StateError::TooLarge {
            path: location.to_owned(),
            len: bytes.len() as u64,
        });
    }
    seal(keys, service, version, bytes).map_err(|field| StateError::HeaderField {
        path: location.to_owned(),
        field,
    })
}

/// Opens sealed bytes of `service`'s state, as [`seal_state`] made them, read from
/// `location`.
pub fn open_sealed(
    keys: &KeyRing,
    location: &Path,
    data: &[u8],
    service: &str,
) -> Result<SavedState, StateError> {
    let (header, bytes) = open(keys, location, data, Some(service))?;
    Ok(SavedState {
        version: header.exported_by,
        bytes,
    })
}

/// Seals `bytes`; fails (naming the field) when the service name or version does not fit
/// its one-byte length.
pub(super) fn seal(
    keys: &KeyRing,
    service: &str,
    version: &str,
    bytes: &[u8],
) -> Result<Vec<u8>, &'static str> {
    let key = keys.current();
    let nonce = cipher::fresh_nonce();
    // Exactly the file's size: the state is never moved once copied in.
    let header_len = MAGIC.len()
        + std::mem::size_of_val(&FORMAT_VERSION)
        + key.id().len()
        + 2
        + service.len()
        + version.len()
        + NONCE_LEN;
    let mut out = Vec::with_capacity(header_len + bytes.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&key.id());
    for (name, field) in [("service name", service), ("version", version)] {
        let len = u8::try_from(field.len()).map_err(|_| name)?;
        out.push(len);
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(&nonce);
    // Sealed where it lies: one buffer for the whole file, the header as associated data.
    debug_assert_eq!(out.len(), header_len);
    out.extend_from_slice(bytes);
    let (header, body) = out.split_at_mut(header_len);
    let tag = cipher::seal_in_place(key.bytes(), &nonce, header, body);
    out.extend_from_slice(&tag);
    Ok(out)
}

pub(super) fn open(
    keys: &KeyRing,
    path: &Path,
    data: &[u8],
    expected_service: Option<&str>,
) -> Result<(StateHeader, Vec<u8>), StateError> {
    let truncated = || StateError::Truncated {
        path: path.to_owned(),
        len: data.len(),
    };
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(if data.len() < MAGIC.len() && MAGIC.starts_with(data) {
            truncated()
        } else {
            StateError::NotAStateFile {
                path: path.to_owned(),
            }
        });
    }
    let mut at = MAGIC.len();
    let mut take = |n: usize| -> Result<&[u8], StateError> {
        let slice = data.get(at..at + n).ok_or_else(truncated)?;
        at += n;
        Ok(slice)
    };
    let format = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes"));
    if format != FORMAT_VERSION {
        return Err(StateError::UnsupportedFormat {
            path: path.to_owned(),
            found: format,
        });
    }
    let key_id: [u8; KEY_ID_LEN] = take(KEY_ID_LEN)?.try_into().expect("key id");
    let mut text = || -> Result<String, StateError> {
        let len = usize::from(take(1)?[0]);
        Ok(String::from_utf8_lossy(take(len)?).into_owned())
    };
    let service = text()?;
    let exported_by = text()?;
    let nonce: [u8; NONCE_LEN] = take(NONCE_LEN)?.try_into().expect("nonce");
    let header_len = at;
    let sealed = &data[header_len..];
    if sealed.len() < TAG_LEN {
        return Err(truncated());
    }
    if let Some(expected) = expected_service {
        if service != expected {
            return Err(StateError::WrongService {
                path: path.to_owned(),
                expected: expected.to_owned(),
                found: service,
            });
        }
    }
    let key = keys.find(&key_id).ok_or_else(|| StateError::UnknownKey {
        path: path.to_owned(),
        key_id: hex::encode(key_id),
        current: keys.current().id_hex(),
    })?;
    let bytes =
        cipher::open(key.bytes(), &nonce, &data[..header_len], sealed).ok_or_else(|| {
            StateError::Tampered {
                path: path.to_owned(),
            }
        })?;
    let header = StateHeader {
        format,
        key_id: hex::encode(key_id),
        service,
        exported_by,
        nonce: hex::encode(nonce),
        sealed_len: sealed.len(),
    };
    Ok((header, bytes))
}
