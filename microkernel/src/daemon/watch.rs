//! `--watch`: polls the plugins directory and asks for a rescan once it has settled.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use crossbeam_channel::Sender;

use host::loader::threads;

use crate::event::Event;

/// Polls the plugins directory; after a change, waits until it has been quiet for the
/// debounce period, then asks for a rescan.
pub(super) fn spawn_watcher(dir: PathBuf, events: Sender<Event>) -> anyhow::Result<()> {
    const POLL: Duration = Duration::from_millis(250);
    const QUIET: Duration = Duration::from_millis(500);
    threads::spawn_detached("watch", move || {
        let mut seen = snapshot(&dir);
        let mut changed_at: Option<Instant> = None;
        loop {
            std::thread::sleep(POLL);
            let now = snapshot(&dir);
            if now != seen {
                seen = now;
                changed_at = Some(Instant::now());
            } else if changed_at.is_some_and(|at| at.elapsed() >= QUIET) {
                changed_at = None;
                tracing::info!(dir = %dir.display(), "plugins changed: rescanning");
                if events
                    .send(Event::Reload {
                        service: None,
                        retry: false,
                        reply: None,
                    })
                    .is_err()
                {
                    return;
                }
            }
        }
    })
    .context("starting the watcher")?;
    Ok(())
}

pub(super) fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "so"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}
