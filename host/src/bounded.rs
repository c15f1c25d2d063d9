//! Reading the files an operator hands the host (state files, the plugin record, keys, allow
//! lists, configurations, plugins) without ever blocking on them or reading without end.
//!
//! Every such file is opened non-blocking, must be a regular file (a FIFO, a device, a
//! socket or a directory in its place is refused at once, naming what it is), and is read up
//! to a bound: a larger one is refused, with its size, before it is read (or as soon as the
//! bound is passed, for files whose size is not what `stat` says).

use std::{
    fs,
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

/// A file read whole: its bytes and its metadata, as of the open.
#[derive(Debug)]
pub struct Bounded {
    /// The content.
    pub bytes: Vec<u8>,
    /// The file's metadata.
    pub metadata: fs::Metadata,
}

/// What an opened file that is not a regular file is, in words (`a FIFO`, `a directory`...).
fn kind_of(file_type: fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// The error for a file that is not a regular file.
fn not_regular(file_type: fs::FileType) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file: it is {}", kind_of(file_type)),
    )
}

/// A file larger than its bound: the inner error of the [`io::Error`] [`read`] returns then
/// (`error.get_ref()` and `downcast_ref`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes, more than the {max} this file may hold")]
pub struct TooLarge {
    /// Its size, said by `stat` or read.
    pub len: u64,
    /// The bound.
    pub max: u64,
}

fn too_large(len: u64, max: u64) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TooLarge { len, max })
}

impl TooLarge {
    /// The bound passed, if that is what `error` says.
    pub fn of(error: &io::Error) -> Option<TooLarge> {
        error.get_ref()?.downcast_ref::<TooLarge>().copied()
    }
}

/// Reads the regular file at `path` whole, at most `max` bytes; never blocks on it (see the
/// module's documentation). `NotFound` comes back as it is, for callers to whom a missing
/// file is no error.
pub fn read(path: &Path, max: u64) -> io::Result<Bounded> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_regular(metadata.file_type()));
    }
    if metadata.len() > max {
        return Err(too_large(metadata.len(), max));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // Bounded even when the size `stat` said is not the size read (files of /proc).
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64, max));
    }
    Ok(Bounded { bytes, metadata })
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path, max: u64) -> io::Result<String> {
    let bytes = read(path, max)?.bytes;
    String::from_utf8(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "not text: the file is not valid UTF-8",
        )
    })
}

/// The most a plugin's configuration file may hold.
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// The most an allow list may hold.
pub const MAX_ALLOW_LIST_SIZE: u64 = 16 << 20;
/// The most a key file may hold (a key is 64 hex digits).
pub const MAX_KEY_FILE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_a_device_and_a_directory_are_refused_at_once_naming_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Nobody writes to it: a blocking open would wait for ever.
        let error = read(&fifo, 10).unwrap_err();
        assert!(error.to_string().contains("a FIFO"), "{error}");
        let error = read(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(error.to_string().contains("a character device"), "{error}");
        let error = read(dir.path(), 10).unwrap_err();
        assert!(error.to_string().contains("a directory"), "{error}");
    }

    #[test]
    fn a_file_larger_than_its_bound_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse");
        // Sparse: 3 GiB said, nothing written.
        fs::File::create(&sparse).unwrap().set_len(3 << 30).unwrap();
        let error = read(&sparse, 1 << 20).unwrap_err();
        assert!(error.to_string().contains("3221225472 bytes"), "{error}");
        fs::write(&sparse, b"12345").unwrap();
        assert_eq!(read(&sparse, 5).unwrap().bytes, b"12345");
        assert!(read(&sparse, 4).is_err());
        assert_eq!(
            read(&dir.path().join("missing"), 5).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
