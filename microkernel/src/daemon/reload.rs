//! The reload thread: owns the `Reloader`, applies one rescan at a time, coalesces the
//! requests that wait meanwhile, and puts each outcome in lines.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context;
use crossbeam_channel::{unbounded, Sender};

use host::{
    loader::threads,
    reload::{Reloader, ScanReport},
    Kernel,
};

use super::running_status;
use crate::config::FileConfig;

/// The thread that applies rescans, one at a time, starting with the first one (then it
/// sends `started`); the reload requests waiting when one ends are served by one more.
pub(super) fn spawn_reload_thread(
    kernel: Arc<Kernel>,
    mut reloader: Reloader,
    mut config_file: Option<(PathBuf, FileConfig)>,
    started: Sender<()>,
) -> anyhow::Result<Sender<Work>> {
    let (tx, rx) = unbounded::<Work>();
    threads::spawn_detached("reload", move || {
        reloader.scan(&kernel, None);
        if let Some((path, file)) = &config_file {
            for line in unknown_sections(&kernel, path, file) {
                tracing::warn!("{line}");
            }
        }
        let _ = started.send(());
        while let Ok(first) = rx.recv() {
            let mut sweep = false;
            let mut reloads = Vec::new();
            for work in std::iter::once(first).chain(rx.try_iter()) {
                match work {
                    Work::Sweep => sweep = true,
                    Work::Reload(request) => reloads.push(request),
                }
            }
            let mut reloads = reloads.into_iter();
            if let Some(first) = reloads.next() {
                let Batch {
                    only,
                    retry,
                    replies,
                } = Batch::of(first, reloads);
                crate::notify::reloading();
                let reread = config_file
                    .as_mut()
                    .and_then(|(path, file)| reread(&kernel, path, file));
                let report = reloader.scan_with(&kernel, only.as_deref(), retry);
                let mut lines = report_lines(&report, only.as_deref(), &kernel);
                if let Some((path, file)) = &config_file {
                    for line in unknown_sections(&kernel, path, file) {
                        tracing::warn!("{line}");
                        lines.push((line, false));
                    }
                }
                if let Some(error) = reread {
                    lines.insert(0, (error, true));
                }
                crate::notify::ready(&running_status(&kernel));
                for reply in replies {
                    let _ = reply.send(lines.clone());
                }
            }
            if sweep {
                kernel.sweep();
            }
        }
    })
    .context("starting the reload thread")?;
    Ok(tx)
}

/// A line for each `[service.NAME]` section of the file that names no service the host
/// has (a typo, or a plugin not deployed yet): such a section does nothing.
fn unknown_sections(kernel: &Kernel, path: &Path, file: &FileConfig) -> Vec<String> {
    file.service
        .keys()
        .filter(|service| kernel.info(service).is_none())
        .map(|service| {
            format!(
                "configuration file {}: [service.{service}] names no service the host runs; it does nothing until one is deployed",
                path.display()
            )
        })
        .collect()
}

/// Reads the configuration file again before a rescan: its `[service.*]` sections take
/// effect (the rescan moves a service whose mode changed); a change to another key is said
/// to wait for a restart. A file that does not read leaves every setting as it was; the
/// error is returned, for the reload's answer.
fn reread(kernel: &Kernel, path: &Path, file: &mut FileConfig) -> Option<String> {
    let new = match crate::config::read(path) {
        Ok(new) => new,
        Err(error) => {
            let error = format!("{error:#}; the settings read before stay");
            tracing::error!(%error, "configuration file not applied");
            return Some(error);
        }
    };
    let isolation = crate::config::isolation(&new, kernel.operation_timeout());
    if let Err(error) =
        crate::config::validate_isolation(&isolation, kernel.operation_timeout(), Some(path))
    {
        let error = format!("{error:#}; the settings read before stay");
        tracing::error!(%error, "configuration file not applied");
        return Some(error);
    }
    if let Err(error) = kernel.set_isolation(isolation) {
        return Some(format!("configuration file {}: {error}", path.display()));
    }
    let services_only = |config: &FileConfig| FileConfig {
        service: Default::default(),
        ..config.clone()
    };
    if services_only(&new) != services_only(file) {
        tracing::warn!(file = %path.display(), "keys outside the [service.*] sections changed: they take effect when the host restarts");
    }
    *file = new;
    None
}

/// What the reload thread is asked to do.
#[derive(Debug)]
pub(super) enum Work {
    /// A rescan.
    Reload(ReloadRequest),
    /// Close the retired libraries nothing runs in any more.
    Sweep,
}

/// A reload asked for, as the reload thread gets it.
#[derive(Debug)]
pub(super) struct ReloadRequest {
    pub(super) service: Option<String>,
    pub(super) retry: bool,
    pub(super) reply: Option<Sender<Vec<(String, bool)>>>,
}

/// What the reload requests waiting in the queue amount to: one rescan serves them all.
#[derive(Debug)]
pub(super) struct Batch {
    /// The one service every request names, or `None` (a full rescan) when any names none
    /// or they differ.
    only: Option<String>,
    /// Whether any asks for the rejected files to be tried again.
    retry: bool,
    /// Where the outcome goes.
    replies: Vec<Sender<Vec<(String, bool)>>>,
}

impl Batch {
    fn of(first: ReloadRequest, rest: impl Iterator<Item = ReloadRequest>) -> Batch {
        let mut only: Option<Option<String>> = None;
        let mut replies = Vec::new();
        let mut retry = false;
        for ReloadRequest {
            service,
            retry: again,
            reply,
        } in std::iter::once(first).chain(rest)
        {
            retry |= again;
            only = match only {
                None => Some(service),
                Some(previous) if previous == service => Some(previous),
                Some(_) => Some(None),
            };
            replies.extend(reply);
        }
        Batch {
            only: only.flatten(),
            retry,
            replies,
        }
    }
}

/// What a rescan did, line by line (and whether each is an error); `only` is the service a
/// reload was limited to: its last line is about that service, not the whole directory.
pub(super) fn report_lines(
    report: &ScanReport,
    only: Option<&str>,
    kernel: &Kernel,
) -> Vec<(String, bool)> {
    let mut lines = Vec::new();
    for service in &report.added {
        lines.push((format!("added {service}"), false));
    }
    for swap in &report.replaced {
        let mut line = format!(
            "replaced {} {} -> {} (requests held {:.2} ms)",
            swap.service,
            swap.from,
            swap.to,
            swap.held.as_secs_f64() * 1e3
        );
        if let Some(error) = &swap.old_stop_failed {
            line.push_str(&format!("; version {}'s stop failed: {error}", swap.from));
        }
        lines.push((line, false));
    }
    for service in &report.restarted {
        lines.push((format!("started {service}"), false));
    }
    for line in &report.fell_back {
        lines.push((line.clone(), false));
    }
    for error in &report.errors {
        lines.push((host::error_chain(error), true));
    }
    match only {
        Some(service) if lines.is_empty() => {
            let line = match kernel.info(service) {
                Some(info) => format!(
                    "{service} unchanged: {} {} from {}",
                    info.version,
                    info.status,
                    info.path.display()
                ),
                None => format!("{service} unchanged"),
            };
            lines.push((line, false));
        }
        Some(_) => {}
        None => {
            let files = if report.unchanged == 1 {
                "file"
            } else {
                "files"
            };
            lines.push((format!("{} {files} unchanged", report.unchanged), false));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::{Batch, ReloadRequest};

    fn reload(service: Option<&str>) -> ReloadRequest {
        ReloadRequest {
            service: service.map(str::to_owned),
            retry: false,
            reply: None,
        }
    }

    #[test]
    fn reloads_waiting_together_become_one_rescan() {
        let events = vec![reload(Some("echo")), reload(Some("echo"))];
        assert_eq!(
            Batch::of(reload(Some("echo")), events.into_iter()).only,
            Some("echo".into())
        );
        let mixed = vec![reload(Some("kv"))];
        assert_eq!(
            Batch::of(reload(Some("echo")), mixed.into_iter()).only,
            None
        );
        let full = vec![reload(Some("echo"))];
        assert_eq!(Batch::of(reload(None), full.into_iter()).only, None);
    }
}
