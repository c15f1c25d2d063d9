//! State keys: 256-bit, written as 64 hex digits, identified by a short digest.

use std::{
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Length of a key id, in bytes.
pub const KEY_ID_LEN: usize = 8;

/// Why a key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The key file may be read by other users.
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file belongs to another user (not root): that user can replace the key.
    #[error("key file {path} is owned by uid {owner}, neither the host's user (uid {me}) nor root; run `chown {me} {path}`")]
    Owner {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The host's effective uid.
        me: u32,
    },
    /// The key is not 64 hex digits.
    #[error("{origin}: a state key is 64 hex digits (32 bytes); {problem}")]
    Format {
        /// Where the key came from (a file or an environment variable).
        origin: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `keygen` will not overwrite a key.
    #[error("{path} already exists; refusing to overwrite a key (state sealed with it would become unreadable)")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
}

/// A 256-bit state key. Zeroed when dropped (every copy); never printed.
#[derive(Clone)]
pub struct StateKey {
    bytes: Zeroizing<[u8; 32]>,
    id: [u8; KEY_ID_LEN],
}

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateKey({})", self.id_hex())
    }
}

impl StateKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).expect("the operating system's random source failed");
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        let digest = Sha256::digest(bytes.as_ref());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        StateKey { bytes, id }
    }

    /// Parses 64 hex digits (surrounding white space ignored). `origin` names the source in
    /// errors.
    pub fn from_hex(text: &str, origin: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let format = |problem: String| KeyError::Format {
            origin: origin.to_owned(),
            problem,
        };
        if text.len() != 64 {
            return Err(format(format!("found {} characters", text.len())));
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text, bytes.as_mut()).map_err(|e| format(e.to_string()))?;
        Ok(Self::from_bytes(bytes))
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(KeyError::Owner {
                path: path.to_owned(),
                owner: meta.uid(),
                me,
            });
        }
        let mut text =
            crate::bounded::read_to_string(path, crate::bounded::MAX_KEY_FILE_SIZE).map_err(io)?;
        let key = Self::from_hex(&text, &format!("key file {}", path.display()));
        text.zeroize();
        key
    }

    /// Writes a new random key to `path` (mode 0600), which must not exist yet.
    pub fn write_new(path: &Path) -> Result<Self, KeyError> {
        let key = Self::generate();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_owned(),
                },
                _ => KeyError::Io {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let mut text = Zeroizing::new(hex::encode(key.bytes.as_ref()));
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(key)
    }

    /// The key's id: the first 8 bytes of its SHA-256. Stored in each state file to tell
    /// which key sealed it; reveals nothing usable about the key.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    /// The id as hex, for messages.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// Seals `buffer` in place with this key (see [`super::cipher::seal_in_place`]): what a
    /// state write does, for measures that compare with it. The key's bytes stay inside.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; super::cipher::NONCE_LEN],
        aad: &[u8],
        buffer: &mut [u8],
    ) -> [u8; super::cipher::TAG_LEN] {
        super::cipher::seal_in_place(self.bytes(), nonce, aad, buffer)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

/// The current key, which seals every write, and older keys, which may still open files.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: StateKey,
    old: Vec<StateKey>,
}

impl KeyRing {
    /// A ring with `current` for writing and `old` keys for reading only.
    pub fn new(current: StateKey, old: Vec<StateKey>) -> Self {
        KeyRing { current, old }
    }

    /// The key that seals writes.
    pub fn current(&self) -> &StateKey {
        &self.current
    }

    /// The key with that id, current or old.
    pub fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<&StateKey> {
        std::iter::once(&self.current)
            .chain(&self.old)
            .find(|key| &key.id == id)
    }
}
