//! The private directory that holds the shadow copies of plugin files, and its owner lock.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Whether the file system of `dir` is mounted noexec (nothing can be mapped from it).
pub(super) fn is_noexec(dir: &Path) -> bool {
    nix::sys::statvfs::statvfs(dir)
        .is_ok_and(|fs| fs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC))
}

/// What every shadow directory's name starts with.
pub(super) const SHADOW_PREFIX: &str = "microkernel-shadow-";
/// The file in a shadow directory that its host holds a lock on.
pub(super) const OWNER_FILE: &str = ".owner";

/// Creates the owner file of a shadow directory already locked: it is locked under another
/// name, then renamed, so that no other host ever sees it unlocked while this one lives.
pub(super) fn lock_owner_file(dir: &Path) -> std::io::Result<nix::fcntl::Flock<fs::File>> {
    let staging = dir.join(".owner.new");
    let file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&staging)?;
    let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| std::io::Error::from(errno))?;
    fs::rename(&staging, dir.join(OWNER_FILE))?;
    Ok(locked)
}

/// Removes the shadow directories in `parent` that a host left when it died (killed before
/// it could remove its own): this user's, with an owner file no live host holds a lock on.
/// Directories without an owner file are left alone. Returns what it removed.
pub(super) fn remove_stale_shadow_dirs(parent: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let mut removed = Vec::new();
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(SHADOW_PREFIX))
            && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !ours {
            continue;
        }
        let Ok(owner) = fs::OpenOptions::new()
            .write(true)
            .open(path.join(OWNER_FILE))
        else {
            continue;
        };
        // The lock is held while the directory goes: no host can take it meanwhile.
        if let Ok(_held) =
            nix::fcntl::Flock::lock(owner, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            if fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}
