//! Which plugin files the host trusts to run code in it: as sshd's `StrictModes` does, a
//! plugins directory or a plugin file that another user could write is refused (whoever
//! can write it can run code as the host), and with `--allow-sha256 FILE` only the files
//! whose SHA-256 is listed there are loaded.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Why a path is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Another user can write it.
    #[error("{what} {path} is writable by {who} (mode {mode:04o}): whoever can write it {}; run `chmod go-w {path}` (or start the host with --allow-insecure-permissions)", stake(what))]
    Writable {
        /// `plugins directory`, `plugin`, `allow list`.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// `its group`, `other users`, or both.
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory above it can be written by another user (who can then replace it).
    #[error("{what} {below} is in {path}, which is writable by {who} (mode {mode:04o}) and not sticky: whoever can write it can replace what is below, and so {}; run `chmod go-w {path}` (or start the host with --allow-insecure-permissions)", stake(what))]
    AncestorWritable {
        /// What is below it.
        what: &'static str,
        /// The path below it.
        below: PathBuf,
        /// The directory.
        path: PathBuf,
        /// `its group`, `other users`, or both.
        who: &'static str,
        /// Its permission bits.
        mode: u32,
    },
    /// It belongs to another user than the host's (and not to root).
    #[error("{what} {path} is owned by uid {owner}, neither the host's user (uid {me}) nor root: that user {} (or start the host with --allow-insecure-permissions)", stake(what))]
    Owner {
        /// What it is.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The host's effective uid.
        me: u32,
    },
    /// Its metadata could not be read.
    #[error("{what} {path}: reading its metadata failed")]
    Io {
        /// What it is.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file's digest is not in the allow list.
    #[error(
        "plugin {path} (sha256 {sha256}) is not listed in {list} (--allow-sha256): not loaded"
    )]
    NotAllowed {
        /// The plugin file.
        path: PathBuf,
        /// Its SHA-256, hex.
        sha256: String,
        /// The allow list.
        list: PathBuf,
    },
    /// A line of the allow list is not `<64 hex digits> [name]`.
    #[error("allow list {path}, line {line}: expected a SHA-256 (64 hex digits), optionally followed by a file name, as `sha256sum` prints")]
    ListSyntax {
        /// The allow list.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
    },
}

/// What the host trusts.
#[derive(Debug, Clone)]
pub struct Trust {
    /// Refuse plugins directories and plugin files that another user could write or owns.
    pub strict_modes: bool,
    /// Only load plugin files whose SHA-256 is listed in this file (read at every rescan).
    pub allow_list: Option<PathBuf>,
}

impl Default for Trust {
    fn default() -> Self {
        Trust {
            strict_modes: true,
            allow_list: None,
        }
    }
}

/// The SHA-256 digests a host may load.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    path: PathBuf,
    digests: HashSet<[u8; 32]>,
}

impl Trust {
    /// Checks a path (the plugins directory, a configuration file, the allow list) under
    /// strict modes, as sshd does: it is neither writable by group or others nor owned by
    /// another user than the host's or root, and neither is any directory above it (where
    /// a directory that others may write but with the sticky bit, as `/tmp`, is fine: none
    /// of them can rename what is not theirs). Symbolic links are followed: what is checked
    /// is where they lead.
    pub fn check(&self, what: &'static str, path: &Path) -> Result<(), TrustError> {
        if !self.strict_modes {
            return Ok(());
        }
        let io = |path: &Path, source| TrustError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        let real = fs::canonicalize(path).map_err(|e| io(path, e))?;
        let meta = fs::metadata(&real).map_err(|e| io(&real, e))?;
        check_metadata(what, path, meta.mode(), meta.uid())?;
        check_ancestors(what, &real)?;
        check_ancestors(what, &lexical(path))
    }

    /// Checks a plugin file: its mode and owner as read, and (under strict modes) the
    /// directories above where it really is (see [`Trust::check`]).
    pub fn check_file(&self, path: &Path, mode: u32, uid: u32) -> Result<(), TrustError> {
        if !self.strict_modes {
            return Ok(());
        }
        check_metadata("plugin", path, mode, uid)?;
        let real = fs::canonicalize(path).map_err(|source| TrustError::Io {
            what: "plugin",
            path: path.to_owned(),
            source,
        })?;
        check_ancestors("plugin", &real)?;
        check_ancestors("plugin", &lexical(path))
    }

    /// Reads the allow list, if there is one (checked as any trusted path is).
    pub fn allow_list(&self) -> Result<Option<AllowList>, TrustError> {
        let Some(path) = &self.allow_list else {
            return Ok(None);
        };
        self.check("allow list", path)?;
        let text = crate::bounded::read_to_string(path, crate::bounded::MAX_ALLOW_LIST_SIZE)
            .map_err(|source| TrustError::Io {
                what: "allow list",
                path: path.clone(),
                source,
            })?;
        AllowList::parse(path, &text).map(Some)
    }
}

/// `path` made absolute without resolving symbolic links: the directories that hold the
/// links on the way are checked too (whoever can write one can point the link elsewhere).
fn lexical(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Every directory above `real` (a canonical path): owned by the host's user or root, and
/// not writable by group or others unless sticky.
fn check_ancestors(what: &'static str, real: &Path) -> Result<(), TrustError> {
    for dir in real.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(|source| TrustError::Io {
            what: "directory",
            path: dir.to_owned(),
            source,
        })?;
        let sticky = meta.mode() & 0o1000 != 0;
        let mode = if sticky {
            meta.mode() & !0o022
        } else {
            meta.mode()
        };
        check_metadata("directory", dir, mode, meta.uid()).map_err(|error| match error {
            TrustError::Writable { path, who, .. } => TrustError::AncestorWritable {
                what,
                below: real.to_owned(),
                path,
                who,
                mode: meta.mode() & 0o7777,
            },
            other => other,
        })?;
    }
    Ok(())
}

/// What whoever can change `what` can do.
fn stake(what: &str) -> &'static str {
    match what {
        "state directory" => "can take over the control socket and replace the services' state",
        _ => "can run code in the host",
    }
}

fn check_metadata(
    what: &'static str,
    path: &Path,
    mode: u32,
    owner: u32,
) -> Result<(), TrustError> {
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("its group and other users"),
        (true, false) => Some("its group"),
        (false, true) => Some("other users"),
        (false, false) => None,
    };
    if let Some(who) = who {
        return Err(TrustError::Writable {
            what,
            path: path.to_owned(),
            who,
            mode: mode & 0o7777,
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if owner != me && owner != 0 {
        return Err(TrustError::Owner {
            what,
            path: path.to_owned(),
            owner,
            me,
        });
    }
    Ok(())
}

impl AllowList {
    /// Parses `sha256sum`-style lines: a digest, optionally a name; `#` comments and blank
    /// lines are skipped.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TrustError> {
        let mut digests = HashSet::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // `sha256sum` starts a line with `\` when it escapes the file name.
            let word = line.split_whitespace().next().unwrap_or_default();
            let word = word.strip_prefix('\\').unwrap_or(word);
            let mut digest = [0u8; 32];
            hex::decode_to_slice(word, &mut digest).map_err(|_| TrustError::ListSyntax {
                path: path.to_owned(),
                line: index + 1,
            })?;
            digests.insert(digest);
        }
        Ok(AllowList {
            path: path.to_owned(),
            digests,
        })
    }

    /// Whether the file at `file` with this digest may be loaded.
    pub fn permits(&self, file: &Path, sha256: &[u8; 32]) -> Result<(), TrustError> {
        if self.digests.contains(sha256) {
            Ok(())
        } else {
            Err(TrustError::NotAllowed {
                path: file.to_owned(),
                sha256: hex::encode(sha256),
                list: self.path.clone(),
            })
        }
    }
}
