//! The state directory's lock and the PID file, and `reload --pid-file`'s signal.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

/// Makes sure no other host uses the same state directory (two hosts would overwrite each
/// other's state). The lock is held until the returned file is dropped.
pub(super) fn lock_state_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
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

/// A PID file, removed when dropped.
#[derive(Debug)]
pub(super) struct PidFile(PathBuf);

impl PidFile {
    pub(super) fn create(path: &Path) -> anyhow::Result<Self> {
        if let Ok(text) = fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if alive && pid != std::process::id() as i32 {
                    bail!("PID file {} names process {pid}, which is running: is another host using it?", path.display());
                }
            }
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("writing PID file {}", path.display()))?;
        std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes())?;
        file.persist(path)
            .with_context(|| format!("writing PID file {}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: another host may have written its PID there since.
        let ours = fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = fs::remove_file(&self.0);
        }
    }
}

/// `microkernel reload --pid-file`: sends SIGHUP to the host named in the PID file.
pub fn signal_reload(pid_file: &Path) -> anyhow::Result<i32> {
    let text = fs::read_to_string(pid_file).with_context(|| {
        format!(
            "reading PID file {} (is the host running with --pid-file?)",
            pid_file.display()
        )
    })?;
    let pid: i32 = text.trim().parse().with_context(|| {
        format!(
            "PID file {} does not hold a process id: {:?}",
            pid_file.display(),
            text.trim()
        )
    })?;
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
