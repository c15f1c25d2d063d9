//! The state directory's lock and the PID file, and `reload --pid-file`'s signal.

use std::{
    fs,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

/// Makes sure no other host uses the same state directory (two hosts would overwrite each
/// other's state). The lock is held until the returned file is dropped.
pub(super) fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            anyhow::anyhow!(
                "state directory {} is in use by another host ({errno})",
                dir.display()
            )
        },
    )
}

/// The most a PID file may hold: a process id and a newline.
const MAX_PID_FILE_SIZE: u64 = 64;

/// What a PID file at a path holds, as far as a host may use it.
enum PidFileContent {
    /// No file there.
    Missing,
    /// An empty regular file.
    Empty,
    /// A positive process id.
    Pid(i32),
}

/// Reads the PID file at `path`: refuses anything but a regular file that is empty or holds
/// a positive process id (never read whole, never waited on).
fn read_pid_file(path: &Path) -> anyhow::Result<PidFileContent> {
    let text = match host::bounded::read_to_string(path, MAX_PID_FILE_SIZE) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PidFileContent::Missing),
        Err(e) => bail!("PID file {}: {e}", path.display()),
    };
    if text.trim().is_empty() {
        return Ok(PidFileContent::Empty);
    }
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(PidFileContent::Pid(pid)),
        _ => bail!(
            "PID file {} does not hold a process id ({:?})",
            path.display(),
            text.trim()
        ),
    }
}

/// The process that holds the write lock a host takes on its PID file, if any.
fn lock_holder(path: &Path) -> anyhow::Result<Option<i32>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening PID file {}", path.display()))?;
    let mut probe = whole_file_lock(nix::libc::F_WRLCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETLK(&mut probe))
        .with_context(|| format!("asking who locks PID file {}", path.display()))?;
    Ok((i32::from(probe.l_type) != nix::libc::F_UNLCK).then_some(probe.l_pid))
}

/// A POSIX record lock of type `kind` over a whole file.
fn whole_file_lock(kind: i32) -> nix::libc::flock {
    nix::libc::flock {
        l_type: kind as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// A PID file, write-locked by this process for its life (the proof, for `reload
/// --pid-file`, that the PID in it is a live host's), and removed when dropped if it is
/// still ours.
#[derive(Debug)]
pub(super) struct PidFile {
    path: PathBuf,
    /// Holds the lock: a POSIX record lock lasts until this process closes any descriptor
    /// of the file, so nothing else here opens it.
    file: fs::File,
}

impl PidFile {
    /// Writes this process's id to `path` and locks it. Refuses a path that holds anything
    /// but a PID file (an empty file or a process id): it is not overwritten. A PID file
    /// locked by a live host is refused; one nobody locks (left by a host that is gone,
    /// whatever process its PID now names) is replaced.
    pub(super) fn create(path: &Path) -> anyhow::Result<Self> {
        match read_pid_file(path)
            .context("not overwritten: remove it or choose another --pid-file")?
        {
            PidFileContent::Pid(pid) => {
                if let Some(holder) = lock_holder(path)? {
                    bail!(
                        "PID file {} is held by process {holder} (it names {pid}): another host is running with it",
                        path.display()
                    );
                }
            }
            PidFileContent::Missing | PidFileContent::Empty => {}
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let writing = || format!("writing PID file {}", path.display());
        let mut temp = tempfile::NamedTempFile::new_in(dir).with_context(writing)?;
        std::io::Write::write_all(&mut temp, format!("{}\n", std::process::id()).as_bytes())
            .with_context(writing)?;
        nix::fcntl::fcntl(
            temp.as_file(),
            nix::fcntl::FcntlArg::F_SETLK(&whole_file_lock(nix::libc::F_WRLCK)),
        )
        .with_context(|| format!("locking PID file {}", path.display()))?;
        let file = temp.persist(path).with_context(writing)?;
        Ok(PidFile {
            path: path.to_owned(),
            file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        // Only our own: another host may have written its PID there since.
        let same = |a: &fs::Metadata, b: &fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
        let ours = match (fs::symlink_metadata(&self.path), self.file.metadata()) {
            (Ok(there), Ok(mine)) => same(&there, &mine),
            _ => false,
        };
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `microkernel reload --pid-file`: sends SIGHUP to the host named in the PID file, once it
/// is proven to be a live host's: the file holds a positive process id, and that process
/// holds the lock a host takes on its PID file.
pub fn signal_reload(pid_file: &Path) -> anyhow::Result<i32> {
    let pid = match read_pid_file(pid_file)? {
        PidFileContent::Pid(pid) => pid,
        PidFileContent::Missing => bail!(
            "PID file {} does not exist (is the host running with --pid-file?)",
            pid_file.display()
        ),
        PidFileContent::Empty => bail!("PID file {} is empty", pid_file.display()),
    };
    match lock_holder(pid_file)? {
        Some(holder) if holder == pid => {}
        Some(holder) => bail!(
            "PID file {} names process {pid}, but process {holder} holds it: not signalled",
            pid_file.display()
        ),
        None => bail!(
            "PID file {} names process {pid}, but no host holds it (the host that wrote it is gone): not signalled",
            pid_file.display()
        ),
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .with_context(|| {
        format!(
            "sending SIGHUP to process {pid} from {}",
            pid_file.display()
        )
    })?;
    Ok(pid)
}
