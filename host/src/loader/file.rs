//! A plugin file read once ([`PluginFile`]): its bytes, digest, mode and owner, and the ELF
//! check done before anything is copied or opened.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::LoadError;

/// A plugin file's content and its SHA-256, read once: what a rescan compares, and what
/// [`Loader::load_file`] opens.
#[derive(Debug, Clone)]
pub struct PluginFile {
    pub(super) path: PathBuf,
    pub(super) bytes: Vec<u8>,
    pub(super) sha256: [u8; 32],
    /// Permission bits and owner of the file read.
    pub(super) mode: u32,
    pub(super) uid: u32,
}

/// The largest plugin file read: anything bigger is refused unread.
pub const MAX_PLUGIN_SIZE: u64 = 1 << 30;

impl PluginFile {
    /// Reads and hashes the file at `path`, which must be a regular file of at most
    /// [`MAX_PLUGIN_SIZE`] bytes. Opened non-blocking: a path that names something that
    /// blocks readers (a FIFO, a symbolic link to `/proc/kmsg`) is refused, not waited on.
    pub fn read(path: &Path) -> Result<Self, LoadError> {
        use std::os::unix::fs::MetadataExt;
        let read = crate::bounded::read(path, MAX_PLUGIN_SIZE).map_err(|source| {
            match crate::bounded::TooLarge::of(&source) {
                Some(too_large) => LoadError::TooLarge {
                    path: path.to_owned(),
                    len: too_large.len,
                    max: too_large.max,
                },
                None => LoadError::Read {
                    path: path.to_owned(),
                    source,
                },
            }
        })?;
        let sha256 = Sha256::digest(&read.bytes).into();
        Ok(PluginFile {
            path: path.to_owned(),
            sha256,
            mode: read.metadata.mode(),
            uid: read.metadata.uid(),
            bytes: read.bytes,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 of the content read.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The file's permission bits and owner (uid), as it was read.
    pub fn mode_and_owner(&self) -> (u32, u32) {
        (self.mode, self.uid)
    }
}

/// Refuses files that are not ELF, and ELF files cut short (their section header table must
/// fit in the file), before the dynamic loader sees them.
pub(super) fn check_elf(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(LoadError::NotSharedLibrary {
            path: path.to_owned(),
        });
    }
    // Only 64-bit little-endian ELF (x86_64, aarch64) is inspected further.
    if bytes.len() < 64 || bytes[4] != 2 || bytes[5] != 1 {
        return Ok(());
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u16_at = |at: usize| u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
    // Offsets come from the file: a garbage header must not overflow (saturate instead, and
    // the file is reported as shorter than it claims).
    let table_end = |offset: usize, entry_size: usize, count: usize| {
        u64_at(offset).saturating_add(u16_at(entry_size) * u16_at(count))
    };
    let needed = table_end(0x28, 0x3A, 0x3C).max(table_end(0x20, 0x36, 0x38));
    let len = bytes.len() as u64;
    if needed > len {
        return Err(LoadError::Truncated {
            path: path.to_owned(),
            len,
            needed,
        });
    }
    // A file written in place to its full length (pre-sized, then filled) has its section
    // table, which linkers put at the end, still blank until the write is done: the section
    // naming the others (`e_shstrndx`) must be a string table (SHT_STRTAB), as it is in
    // every finished shared library.
    let (shoff, shentsize) = (u64_at(0x28), u16_at(0x3A));
    let (shnum, shstrndx) = (u16_at(0x3C), u16_at(0x3E));
    if shoff != 0 && shnum > 0 && shstrndx < shnum && shentsize >= 8 {
        let at = shoff.saturating_add(shstrndx * shentsize).saturating_add(4);
        let sh_type = usize::try_from(at)
            .ok()
            .and_then(|at| bytes.get(at..at + 4))
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        if sh_type == Some(0) {
            return Err(LoadError::Unfinished {
                path: path.to_owned(),
                offset: shoff,
            });
        }
    }
    Ok(())
}
