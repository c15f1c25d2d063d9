//! Plugins that misbehave as real ones do (errors that panic, callbacks that hang, C worker
//! threads, corrupt files): the host, the other services and their state survive.
//!
//! Most scenarios use the `faulty` fixture (`tests/fixtures/faulty`), told by its
//! configuration where to misbehave. A scenario that leaves a plugin's own thread running
//! runs in a child process of its own (see `isolated`), so that the thread cannot keep other
//! tests' libraries loaded.

use std::{
    fs,
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use host::{
    kernel::SwapError,
    loader::{LoadError, Probe},
    reload::ReloadError,
    BadStatePolicy, Call, Kernel, KernelConfig, KernelError, Status,
};
use plugin_api::codes;

use crate::{cli::*, support::*};

/// What `faulty` answers with once describing its failure panicked too.
const UNDESCRIBABLE: &str = "failed, and describing the failure panicked too";

/// Runs `f` on another thread and waits for it at most `limit`: a liveness bound, so that a
/// wait that never ends fails the test instead of hanging it (the figures are the bench's).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        adopt();
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still waiting after {limit:?}: an unbounded wait"))
}

/// A kernel (with state in `persisted`) running `faulty` version 1 with `conf`, and the
/// other packages given.
fn faulty_kernel(
    persisted: &Persisted,
    conf: &str,
    others: &[&str],
    tune: impl FnOnce(&mut KernelConfig),
) -> (Kernel, tempfile::TempDir) {
    let mut packages = vec!["fixture-faulty"];
    packages.extend_from_slice(others);
    let plugins = plugin_dir(&packages);
    fs::write(plugins.path().join("faulty.conf"), conf).unwrap();
    let mut config = persisted.config(BadStatePolicy::Refuse);
    tune(&mut config);
    let (kernel, _) = persisted.kernel_with(plugins.path(), config);
    (kernel, plugins)
}

fn count(kernel: &Kernel, service: &str) -> u64 {
    json(&kernel.request(service, "count", b"", None))["count"]
        .as_u64()
        .unwrap()
}

#[test]
fn an_error_whose_display_panics_is_a_500_and_the_host_lives_on() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, "{}", &[], |_| {});
    assert_eq!(count(&kernel, "faulty"), 1);
    let reply = kernel.request("faulty", "fail-display-panics", b"", None);
    assert_eq!(reply.code, codes::FAILED, "{reply}");
    assert_eq!(
        reply.message,
        "handle panicked: Display of the error panicked on purpose"
    );
    let reply = kernel.request("faulty", "panic-payload-drop-panics", b"", None);
    assert_eq!(reply.code, codes::FAILED, "{reply}");
    assert_eq!(reply.message, format!("handle {UNDESCRIBABLE}"));
    // The instance keeps serving, with its state.
    assert_eq!(count(&kernel, "faulty"), 2);
    Ok(())
}

#[test]
fn a_start_whose_error_display_panics_fails_cleanly() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(
        &persisted,
        r#"{"start":"fail-display-panics"}"#,
        &["echo"],
        |_| {},
    );
    let info = kernel.info("faulty").unwrap();
    assert_eq!(info.status, Status::Failed);
    assert!(
        info.last_error
            .as_deref()
            .unwrap_or("")
            .contains("Display of the error panicked"),
        "{info:?}"
    );
    let error = kernel.start("faulty").unwrap_err();
    assert!(
        matches!(
            &error,
            KernelError::StartFailed {
                cause: host::InstanceError::Start(_),
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(echo_count(&kernel), 1);
    Ok(())
}

#[test]
fn a_replace_whose_old_instance_never_finishes_dropping_completes_and_the_new_version_serves(
) -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"drop":"hang"}"#, &[], |c| {
        c.operation_timeout = Duration::from_millis(300);
    });
    assert_eq!(count(&kernel, "faulty"), 1);
    let kernel = std::sync::Arc::new(kernel);
    let swapping = kernel.clone();
    let report = within(Duration::from_secs(30), move || {
        let v2 =
            load(swapping.loader(), &fixture("fixture-faulty-v2")).map_err(|e| e.to_string())?;
        swapping.replace(v2, None).map_err(|e| e.to_string())
    })?;
    assert_eq!(report.to, "2.0.0");
    assert!(
        !report.unmapped,
        "a library with an instance stuck in drop was closed"
    );
    // The new version serves, with the state.
    assert_eq!(count(&kernel, "faulty"), 2);
    let info = kernel.info("faulty").unwrap();
    assert_eq!(info.status, Status::Running);
    assert!(
        matches!(&info.pinned[..], [pinned] if pinned.starts_with("1.0.0") && pinned.contains("`drop`")),
        "{:?}",
        info.pinned
    );
    Ok(())
}

#[test]
fn a_replace_of_a_busy_service_with_a_full_mailbox_gives_up_and_the_old_version_serves(
) -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, "{}", &[], |c| {
        c.operation_timeout = Duration::from_millis(100);
        c.mailbox_capacity = 1;
    });
    let sleeper = busy_for(&kernel, "faulty", 3000);
    wait_until_busy(&kernel, "faulty");
    let v2 = load(kernel.loader(), &fixture("fixture-faulty-v2"))?;
    let error = kernel.replace(v2, None).unwrap_err();
    assert!(
        matches!(&error, KernelError::Swap(SwapError::Export { version, .. }) if version == "1.0.0"),
        "{error}"
    );
    // It gave up while the request still ran: it did not wait for the service.
    assert!(!sleeper.is_finished());
    assert!(sleeper.join().unwrap().is_ok());
    assert_eq!(kernel.info("faulty").unwrap().version, "1.0.0");
    assert_eq!(count(&kernel, "faulty"), 1);
    Ok(())
}

#[test]
fn a_stop_whose_drop_hangs_saves_the_state_and_leaves_the_service_failed_naming_the_call(
) -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"drop":"hang"}"#, &[], |c| {
        c.operation_timeout = Duration::from_millis(200);
    });
    assert_eq!(count(&kernel, "faulty"), 1);
    let error = kernel.stop("faulty").unwrap_err();
    assert!(
        matches!(&error, KernelError::Stuck { service, call: Call::Drop, .. } if service == "faulty"),
        "{error}"
    );
    let info = kernel.info("faulty").unwrap();
    assert_eq!(info.status, Status::Failed);
    assert!(info.last_error.unwrap().contains("`drop`"));
    // The state came back before the drop: it was saved.
    let saved = kernel.state_store().unwrap().load("faulty")?.unwrap();
    assert_eq!(saved.bytes, br#"{"count":1}"#);
    Ok(())
}

#[test]
fn a_failed_start_whose_drop_hangs_returns_and_names_the_call() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(
        &persisted,
        r#"{"start":"fail","drop":"hang"}"#,
        &["echo"],
        |c| c.operation_timeout = Duration::from_millis(200),
    );
    let info = kernel.info("faulty").unwrap();
    assert_eq!(info.status, Status::Failed);
    assert!(info.last_error.unwrap().contains("`drop`"));
    let error = kernel.start("faulty").unwrap_err();
    assert!(
        matches!(
            &error,
            KernelError::Stuck {
                call: Call::Drop,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(echo_count(&kernel), 1);
    Ok(())
}

#[test]
fn a_start_that_hangs_is_given_up_naming_the_call() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"start":"hang"}"#, &["echo"], |c| {
        c.operation_timeout = Duration::from_millis(200);
    });
    let failures = kernel.start_all();
    assert!(
        matches!(&failures[..], [(s, KernelError::Stuck { call: Call::Start, .. })] if s == "faulty"),
        "{failures:?}"
    );
    assert_eq!(kernel.info("faulty").unwrap().status, Status::Failed);
    assert_eq!(
        kernel.request("faulty", "count", b"", None).code,
        codes::NOT_FOUND
    );
    assert_eq!(echo_count(&kernel), 1);
    Ok(())
}

#[test]
fn a_thread_local_with_a_destructor_does_not_pin_the_library_at_unload() -> TestResult {
    let shadow_parent = tempfile::tempdir()?;
    let plugins = plugin_dir(&["fixture-faulty"]);
    fs::write(
        plugins.path().join("faulty.conf"),
        r#"{"thread_local":true}"#,
    )?;
    let kernel = Kernel::new(KernelConfig {
        shadow_dir: Some(shadow_parent.path().to_owned()),
        ..Default::default()
    })?;
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(count(&kernel, "faulty"), 1);
    let shadow_dir = fs::read_dir(shadow_parent.path())?.next().unwrap()?.path();
    let mapped = || {
        fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&*shadow_dir.to_string_lossy()))
            .count()
    };
    assert!(mapped() > 0);
    kernel.shutdown();
    assert!(all_closed_soon(&kernel));
    // The executor (where the destructor was registered) ended before the library closed.
    assert_eq!(
        mapped(),
        0,
        "the thread-local's destructor pinned the library"
    );
    Ok(())
}

#[test]
fn a_shutdown_abandons_a_service_stuck_in_stop_and_still_saves_the_others() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"stop":"hang"}"#, &["kv"], |c| {
        c.operation_timeout = Duration::from_secs(30);
    });
    assert!(kernel
        .request("kv", "put", br#"{"op":"put","key":"k","value":1}"#, None)
        .is_ok());
    let kernel = std::sync::Arc::new(kernel);
    let stopping = kernel.clone();
    let report = within(Duration::from_secs(30), move || {
        // Ample for kv to stop and save on a loaded machine; faulty hangs whatever it is.
        stopping.shutdown_until(Instant::now() + Duration::from_secs(3))
    });
    assert_eq!(report.abandoned(), ["faulty"]);
    let saved = kernel.state_store().unwrap().load("kv")?.unwrap();
    assert_eq!(saved.bytes, br#"{"k":1}"#);
    Ok(())
}

/// A kernel that proves files in a child process (the real binary), with a short limit.
fn probing_kernel() -> Kernel {
    adopt();
    capture_logs();
    Kernel::new(KernelConfig {
        probe: Some(Probe::new(BIN.into(), Duration::from_secs(2))),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn a_probe_that_fails_before_it_opens_the_file_is_the_hosts_trouble_and_is_tried_again(
) -> TestResult {
    adopt();
    capture_logs();
    // The probe's program is a link: first to a program that is not this host (as valgrind's
    // tool was, run as `/proc/self/exe`), then to the host.
    let programs = tempfile::tempdir()?;
    let program = programs.path().join("probe");
    std::os::unix::fs::symlink("/bin/false", &program)?;
    let kernel = Kernel::new(KernelConfig {
        probe: Some(Probe::new(program.clone(), Duration::from_secs(10))),
        ..Default::default()
    })?;
    let plugins = plugin_dir(&["echo"]);
    let mut reloader = reloader_of(plugins.path());
    let report = reloader.scan(&kernel, None);
    assert!(
        matches!(&report.errors[..], [ReloadError::Load(error @ LoadError::ProbeDidNotStart { path, how, .. })]
            if path.ends_with("libecho.so") && how == "exited with status 1" && !error.is_the_files_fault()),
        "{:?}",
        report.errors
    );
    assert!(kernel.info("echo").is_none());
    // Not remembered as the file's fault: the next rescan tries it again, and it loads.
    fs::remove_file(&program)?;
    std::os::unix::fs::symlink(BIN, &program)?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(echo_count(&kernel), 1);
    Ok(())
}

#[test]
fn a_plugin_that_kills_its_process_when_opened_is_refused_by_the_probe() -> TestResult {
    let kernel = probing_kernel();
    let plugins = plugin_dir(&["fixture-faulty", "echo"]);
    fs::write(plugins.path().join("faulty.conf"), r#"{"new":"abort"}"#)?;
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(
        matches!(&report.errors[..], [ReloadError::Load(LoadError::ProbeCrashed { path, how, .. })]
            if path.ends_with("libfixture_faulty.so") && how == "killed by SIGABRT"),
        "{:?}",
        report.errors
    );
    assert!(kernel.info("faulty").is_none());
    assert_eq!(echo_count(&kernel), 1);
    Ok(())
}

#[test]
fn a_plugin_that_exits_with_any_status_when_opened_is_its_own_fault_not_the_hosts() -> TestResult {
    let kernel = probing_kernel();
    let plugins = plugin_dir(&["fixture-faulty"]);
    fs::write(plugins.path().join("faulty.conf"), r#"{"new":"exit-4"}"#)?;
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(
        matches!(&report.errors[..], [ReloadError::Load(error @ LoadError::ProbeCrashed { how, .. })]
            if how == "exited with status 4 without a report" && error.is_the_files_fault()),
        "{:?}",
        report.errors
    );
    Ok(())
}

#[test]
fn a_new_version_that_crashes_importing_the_state_is_refused_and_the_old_one_serves() -> TestResult
{
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["fixture-faulty"]);
    let mut config = persisted.config(BadStatePolicy::Refuse);
    config.probe = Some(Probe::new(BIN.into(), Duration::from_secs(10)));
    let (kernel, report) = persisted.kernel_with(plugins.path(), config);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(count(&kernel, "faulty"), 1);
    // Version 2 kills its process when it imports a state (as a corrupt `import_state` does).
    fs::write(
        plugins.path().join("faulty.conf"),
        r#"{"import_state":"abort"}"#,
    )?;
    add_plugin(plugins.path(), "fixture-faulty-v2");
    let report = reloader_of(plugins.path()).scan(&kernel, Some("faulty"));
    assert!(
        report.errors.iter().any(
            |e| matches!(e, ReloadError::Load(LoadError::ProbeCrashed { step, how, .. })
            if step.contains("state") && how == "killed by SIGABRT")
        ),
        "{:?}",
        report.errors
    );
    assert_eq!(kernel.info("faulty").unwrap().version, "1.0.0");
    assert_eq!(count(&kernel, "faulty"), 2);
    Ok(())
}

#[test]
fn a_plugin_that_hangs_when_opened_is_refused_after_the_probe_timeout() -> TestResult {
    let kernel = probing_kernel();
    let plugins = plugin_dir(&["fixture-faulty"]);
    fs::write(plugins.path().join("faulty.conf"), r#"{"new":"hang"}"#)?;
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Load(LoadError::ProbeTimedOut { .. })]
        ),
        "{:?}",
        report.errors
    );
    assert!(kernel.info("faulty").is_none());
    Ok(())
}

#[test]
fn a_file_the_probe_survives_is_checked_by_the_host_with_its_own_typed_error() -> TestResult {
    let kernel = probing_kernel();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("libnotes.so");
    // An executable: the probe survives opening it, then the host refuses it itself.
    fs::copy(BIN, &path)?;
    let error = load(kernel.loader(), &path).unwrap_err();
    assert!(matches!(&error, LoadError::Open { .. }), "{error}");
    Ok(())
}

/// Runs the test `name` in a child process of its own (this binary, that test only), where
/// `isolated` returns `true`; in the parent it returns `false` once the child passed.
fn isolated(name: &str) -> bool {
    const VAR: &str = "MICROKERNEL_TEST_ISOLATED";
    if std::env::var(VAR).is_ok_and(|v| v == name) {
        return true;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(VAR, name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A liveness bound: a child that hangs fails the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{name} in a child process: {:?}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    false
}

#[test]
fn a_plugin_with_a_raw_pthread_worker_leaves_the_host_running_through_many_replaces() -> TestResult
{
    if !isolated("misbehaviour::a_plugin_with_a_raw_pthread_worker_leaves_the_host_running_through_many_replaces") {
        return Ok(());
    }
    let persisted = Persisted::new();
    // A C library's worker: nothing pins the library but the host's own check.
    let conf = r#"{"start_pthread":true}"#;
    let (kernel, _plugins) = faulty_kernel(&persisted, conf, &["echo"], |_| {});
    assert_eq!(count(&kernel, "faulty"), 1);
    const REPLACES: u64 = 20;
    for round in 0..REPLACES {
        let next = if round % 2 == 0 {
            "fixture-faulty-v2"
        } else {
            "fixture-faulty"
        };
        let library = load(kernel.loader(), &fixture(next))?;
        let report = kernel.replace(library, Some(conf.into()))?;
        assert!(
            !report.unmapped,
            "a library whose threads still run was closed"
        );
        // The workers of every earlier version go on running their code meanwhile.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count(&kernel, "faulty"), round + 2);
    }
    let info = kernel.info("faulty").unwrap();
    assert_eq!(info.pinned.len(), REPLACES as usize, "{:?}", info.pinned);
    assert!(
        info.pinned[0].contains("threads it started are alive"),
        "{:?}",
        info.pinned
    );
    assert_eq!(kernel.sweep(), REPLACES as usize);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(echo_count(&kernel), 1);
    Ok(())
}

#[test]
fn a_plugin_whose_std_thread_outlives_it_keeps_its_library_pinned() -> TestResult {
    if !isolated("misbehaviour::a_plugin_whose_std_thread_outlives_it_keeps_its_library_pinned") {
        return Ok(());
    }
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"start_thread":true}"#, &[], |_| {});
    let v2 = load(kernel.loader(), &fixture("fixture-faulty-v2"))?;
    let report = kernel.replace(v2, Some("{}".into()))?;
    assert!(!report.unmapped);
    assert_eq!(kernel.info("faulty").unwrap().pinned.len(), 1);
    Ok(())
}

/// A same-size copy of `bytes` with `n` bytes changed, chosen by `seed`.
pub(crate) fn corrupt(bytes: &[u8], seed: u64, n: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut copy = bytes.to_vec();
    for _ in 0..n {
        let at = (next() % copy.len() as u64) as usize;
        copy[at] = (next() >> 56) as u8;
    }
    copy
}

/// How many corrupt copies the corrupt-copies test drops in.
const CORRUPT_COPIES: u64 = 60;

#[test]
fn corrupt_copies_of_a_plugin_never_crash_the_host() -> TestResult {
    let root = setup(&["echo"]);
    let plugins = root.path().join("plugins");
    let daemon = Daemon::start(root.path());
    let original = fs::read(fixture("kv"))?;
    let mut crashed = Vec::new();
    for seed in 0..CORRUPT_COPIES {
        fs::write(plugins.join("libkv.so"), corrupt(&original, seed, 8))?;
        let reload = daemon.ctl(&["reload"]);
        let said = format!("{}{}", stdout(&reload), stderr(&reload));
        assert!(
            said.contains("unchanged"),
            "seed {seed}: no answer from the host: {said}\n{}",
            daemon.log()
        );
        if said.contains("in a probe process, the process was killed by") {
            crashed.push(seed);
        }
    }
    // Some of those would have killed the host had it opened them itself.
    assert!(!crashed.is_empty(), "no corrupt copy crashed its probe");
    assert_eq!(daemon.send("echo", "still here")["echo"], "still here");

    // A host that starts with such a file in its directory starts, without it.
    drop(daemon);
    fs::write(plugins.join("libkv.so"), corrupt(&original, crashed[0], 8))?;
    let daemon = Daemon::start(root.path());
    assert_eq!(
        daemon.send("echo", "after a restart")["echo"],
        "after a restart"
    );
    daemon.wait_for(|d| d.log().contains("killed by"), "the crash in the log");
    Ok(())
}

pub(crate) fn kv_holds(root: &Path, key: &str) -> bool {
    let output = inspect(root, "kv", &["--json"]);
    output.status.success()
        && serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .is_ok_and(|v| v["content"][key].is_number())
}

#[test]
fn a_busy_service_holds_back_neither_the_checkpoints_nor_the_rescans_of_the_others() -> TestResult {
    let root = setup(&["fixture-faulty", "kv"]);
    let daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "200ms"]);
    let socket = root.path().join("state/control.sock");
    // `faulty` handles one request for 8 s.
    let mut busy = std::process::Command::new(BIN)
        .args(["ctl", "--socket", socket.to_str().unwrap()])
        .args([
            "send",
            "faulty",
            "8000",
            "--kind",
            "sleep",
            "--timeout",
            "30s",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    // Busy once a request that does nothing waits behind the sleep.
    daemon.wait_for(
        |d| {
            let probe = d.ctl(&[
                "send",
                "faulty",
                "0",
                "--kind",
                "sleep",
                "--timeout",
                "200ms",
            ]);
            stderr(&probe).contains("did not reply")
        },
        "faulty to be busy",
    );
    daemon.send("kv", r#"{"op":"put","key":"during","value":1}"#);
    // kv's checkpoint reaches the disk, and a rescan adds a service, while faulty is busy.
    daemon.wait_for(|d| kv_holds(&d.root, "during"), "kv's checkpoint");
    add_plugin(&root.path().join("plugins"), "echo");
    let reload = daemon.ctl(&["reload"]);
    assert!(
        stdout(&reload).contains("added echo"),
        "{}",
        stdout(&reload)
    );
    assert!(
        busy.try_wait()?.is_none(),
        "faulty was no longer busy: the test proves nothing"
    );
    // A crash now loses nothing kv was told.
    let mut daemon = daemon;
    daemon.child.kill()?;
    daemon.child.wait()?;
    assert!(kv_holds(root.path(), "during"));
    let _ = busy.kill();
    let _ = busy.wait();
    Ok(())
}

/// A daemon running `faulty` (with `conf`) and `kv`, which holds `before-stop`.
fn faulty_daemon(conf: &str, operation_timeout: &str) -> (tempfile::TempDir, Daemon) {
    let root = setup(&["fixture-faulty", "kv"]);
    fs::write(root.path().join("plugins/faulty.conf"), conf).unwrap();
    let daemon = Daemon::start_with(root.path(), &["--operation-timeout", operation_timeout]);
    daemon.send("kv", r#"{"op":"put","key":"before-stop","value":1}"#);
    (root, daemon)
}

/// SIGTERM, then the exit status and the log, waited for at most 30 s.
fn terminated(daemon: Daemon) -> (std::process::ExitStatus, String) {
    within(Duration::from_secs(30), move || {
        let log_root = daemon.root.clone();
        let status = daemon.terminate();
        let log = fs::read_to_string(log_root.join("host.log")).unwrap_or_default();
        (status, log)
    })
}

#[test]
fn sigterm_ends_the_host_within_the_operation_timeout_with_a_plugin_stuck_in_stop() -> TestResult {
    let (root, daemon) = faulty_daemon(r#"{"stop":"hang"}"#, "1s");
    let (status, log) = terminated(daemon);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("abandoned") && log.contains("faulty"), "{log}");
    assert!(kv_holds(root.path(), "before-stop"), "{log}");
    Ok(())
}

#[test]
fn a_new_version_can_replace_an_instance_stuck_in_plugin_code() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"stop":"hang"}"#, &[], |c| {
        c.operation_timeout = Duration::from_millis(200);
    });
    assert_eq!(count(&kernel, "faulty"), 1);
    assert!(matches!(
        kernel.stop("faulty"),
        Err(KernelError::Stuck { .. })
    ));
    let v2 = load(kernel.loader(), &fixture("fixture-faulty-v2"))?;
    kernel.replace(v2, Some("{}".into()))?;
    let info = kernel.info("faulty").unwrap();
    assert_eq!(
        (info.status, info.version.as_str()),
        (Status::Running, "2.0.0")
    );
    // The state exported when the stop was asked for came with it.
    assert_eq!(count(&kernel, "faulty"), 2);
    Ok(())
}

#[test]
fn a_new_version_serves_alone_after_replacing_an_instance_stuck_in_handle() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, "{}", &[], |c| {
        c.operation_timeout = Duration::from_millis(200);
    });
    let sleeper = busy_for(&kernel, "faulty", 1500);
    wait_until_busy(&kernel, "faulty");
    // The stop is given up (the Stop message stays queued for the old instance)...
    assert!(matches!(
        kernel.stop("faulty"),
        Err(KernelError::Stuck { .. })
    ));
    // ...and a new version takes over the service.
    let v2 = load(kernel.loader(), &fixture("fixture-faulty-v2"))?;
    kernel.replace(v2, Some("{}".into()))?;
    assert!(sleeper.join().unwrap().is_ok());
    // Once the old instance is out of `handle`, it serves nothing: every request is version
    // 2's, and version 2 was not stopped by the message meant for version 1.
    for _ in 0..5 {
        let reply = json(&kernel.request("faulty", "count", b"", None));
        assert_eq!(reply["version"], "2.0.0", "{reply}");
    }
    assert_eq!(kernel.info("faulty").unwrap().status, Status::Running);
    Ok(())
}

#[test]
fn a_stop_given_up_on_a_full_mailbox_lets_the_service_start_again_with_its_state() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, "{}", &[], |c| {
        c.operation_timeout = Duration::from_millis(200);
        c.mailbox_capacity = 1;
    });
    assert_eq!(count(&kernel, "faulty"), 1);
    let sleeper = busy_for(&kernel, "faulty", 1500);
    wait_until_busy(&kernel, "faulty");
    // Whatever the probe left, the one place in the mailbox is taken now.
    let _ = kernel.emit("faulty", "filler", b"");
    assert!(
        kernel.emit("faulty", "filler", b"").is_err(),
        "the mailbox is not full"
    );
    // The mailbox is full: the Stop cannot even be posted.
    assert!(matches!(
        kernel.stop("faulty"),
        Err(KernelError::Stuck { .. })
    ));
    // Out of `handle`, the instance hands its state over and ends: the service starts again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(error) = kernel.start("faulty") {
        assert!(Instant::now() < deadline, "{error}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The state it handed over (count 1) was saved and imported: this is the second.
    assert_eq!(count(&kernel, "faulty"), 2);
    let _ = sleeper.join();
    Ok(())
}

#[test]
fn sigterm_ends_the_host_even_when_a_library_destructor_hangs() -> TestResult {
    let (root, daemon) = faulty_daemon(r#"{"fini":"hang"}"#, "1s");
    let (status, log) = terminated(daemon);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(kv_holds(root.path(), "before-stop"), "{log}");
    Ok(())
}

#[test]
fn a_library_whose_destructor_hangs_is_given_up_and_the_host_goes_on() -> TestResult {
    if !isolated("misbehaviour::a_library_whose_destructor_hangs_is_given_up_and_the_host_goes_on")
    {
        return Ok(());
    }
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, r#"{"fini":"hang"}"#, &[], |c| {
        c.operation_timeout = Duration::from_millis(300);
    });
    assert_eq!(count(&kernel, "faulty"), 1);
    let v2 = load(kernel.loader(), &fixture("fixture-faulty-v2"))?;
    let report = kernel.replace(v2, Some("{}".into()))?;
    // Closing version 1 ran its destructor, which never returned: given up, after the
    // operation timeout.
    assert!(!report.unmapped);
    assert_eq!(report.to, "2.0.0");
    // The dynamic loader's lock is held for good: loading is refused, not hung.
    let error = load(kernel.loader(), &fixture("fixture-faulty")).unwrap_err();
    assert!(matches!(error, LoadError::LoaderWedged { .. }), "{error}");
    assert!(host::loader::loader_wedged());
    // A normal exit would run the destructors again (and wait for the lock).
    host::loader::exit_without_destructors(0)
}

#[test]
fn a_host_whose_loader_is_wedged_by_a_destructor_saves_its_states_and_exits() -> TestResult {
    let root = setup(&["fixture-faulty", "kv"]);
    fs::write(
        root.path().join("plugins/faulty.conf"),
        r#"{"fini":"hang"}"#,
    )?;
    let mut daemon = Daemon::start_with(root.path(), &["--operation-timeout", "1s"]);
    daemon.send("kv", r#"{"op":"put","key":"before","value":1}"#);
    add_plugin(&root.path().join("plugins"), "fixture-faulty-v2");
    // The replace closes version 1, whose destructor never returns (the host may be gone
    // before it answers).
    let _ = daemon.ctl(&["reload"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = daemon.child.try_wait()? {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the host did not stop: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(2), "{}", daemon.log());
    assert!(
        daemon.log().contains("destructors hang"),
        "{}",
        daemon.log()
    );
    assert!(kv_holds(root.path(), "before"));
    Ok(())
}

/// `faulty` (configured with `conf`) with `n` requests counted, then busy in a `sleep` of
/// 3 s, and a stop of it given up after the operation timeout of 1 s: the instance will come
/// out of `handle` after the sleep.
fn given_up_while_busy(
    persisted: &Persisted,
    conf: &str,
    n: u64,
) -> (
    std::sync::Arc<Kernel>,
    tempfile::TempDir,
    std::thread::JoinHandle<plugin_api::Reply>,
) {
    let (kernel, plugins) = faulty_kernel(persisted, conf, &[], |c| {
        c.operation_timeout = Duration::from_secs(1);
    });
    for _ in 0..n {
        count(&kernel, "faulty");
    }
    let sleeper = busy_for(&kernel, "faulty", 3000);
    let kernel = std::sync::Arc::new(kernel);
    wait_until_busy(&kernel, "faulty");
    assert!(matches!(
        kernel.stop("faulty"),
        Err(KernelError::Stuck { .. })
    ));
    (kernel, plugins, sleeper)
}

#[test]
fn a_new_version_replacing_a_given_up_instance_imports_the_state_it_handed_over() -> TestResult {
    let persisted = Persisted::new();
    // Out of `handle`, the old instance exports and hands its state over, then takes 100 ms
    // to stop: the replace takes that state (waiting for it, within the operation timeout,
    // if the export is under way), as it is newer than the file.
    let (kernel, _plugins, sleeper) =
        given_up_while_busy(&persisted, r#"{"stop":"sleep","sleep_ms":100}"#, 5);
    assert!(sleeper.join().unwrap().is_ok());
    assert_eq!(replaced_by_version_2_counts(&kernel)?, 6);
    Ok(())
}

/// `faulty` replaced by its version 2: the count its first request answers.
fn replaced_by_version_2_counts(kernel: &Kernel) -> Result<u64, Box<dyn std::error::Error>> {
    let v2 = load(kernel.loader(), &fixture("fixture-faulty-v2"))?;
    kernel.replace(v2, Some("{}".into()))?;
    let reply = json(&kernel.request("faulty", "count", b"", None));
    assert_eq!(reply["version"], "2.0.0", "{reply}");
    Ok(reply["count"].as_u64().ok_or("a count")?)
}

/// The old instance comes out of `handle`, hands its state over, then hangs in `stop` for
/// good: the state it handed over is saved at the first start (refused: the thread is still
/// there), and a new version imports it.
#[test]
fn a_state_handed_over_by_an_instance_then_stuck_in_stop_is_saved_and_imported() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins, sleeper) = given_up_while_busy(&persisted, r#"{"stop":"hang"}"#, 5);
    assert!(sleeper.join().unwrap().is_ok());
    for _ in 0..2 {
        assert!(matches!(
            kernel.start("faulty"),
            Err(KernelError::Stuck { .. })
        ));
    }
    assert_eq!(replaced_by_version_2_counts(&kernel)?, 6);
    Ok(())
}

/// An instance stopped without saving (as a host of a fleet stops a service another host
/// owns now) and given up in `handle`: the state it hands over when it comes out is thrown
/// away, never saved over what the service's owner may have written since.
#[test]
fn the_state_an_instance_stopped_without_saving_hands_over_late_is_thrown_away() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins) = faulty_kernel(&persisted, "{}", &[], |c| {
        c.operation_timeout = Duration::from_secs(1);
    });
    for _ in 0..5 {
        count(&kernel, "faulty");
    }
    let sleeper = busy_for(&kernel, "faulty", 3000);
    wait_until_busy(&kernel, "faulty");
    assert!(matches!(
        kernel.relinquish("faulty"),
        Err(KernelError::Stuck { .. })
    ));
    assert!(sleeper.join().unwrap().is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = kernel.start("faulty") {
        assert!(Instant::now() < deadline, "{error}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count(&kernel, "faulty"), 1, "the late state was saved");
    Ok(())
}

#[test]
fn a_shutdown_waits_for_a_given_up_instance_and_saves_the_state_it_hands_over() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, _plugins, sleeper) = given_up_while_busy(&persisted, "{}", 5);
    let stopping = kernel.clone();
    let report = within(Duration::from_secs(30), move || {
        stopping.shutdown_until(Instant::now() + Duration::from_secs(10))
    });
    assert!(report.abandoned().is_empty(), "{:?}", report.failures);
    let saved = kernel.state_store().unwrap().load("faulty")?.unwrap();
    assert_eq!(saved.bytes, br#"{"count":5}"#);
    let _ = sleeper.join();
    Ok(())
}

#[test]
fn sigterm_while_a_library_destructor_hangs_still_stops_the_host() -> TestResult {
    let (root, daemon) = faulty_daemon(r#"{"fini":"hang"}"#, "2s");
    add_plugin(&root.path().join("plugins"), "fixture-faulty-v2");
    // The reload hangs in version 1's destructor; SIGTERM comes before that is noticed.
    let socket = root.path().join("state/control.sock");
    let mut reload = std::process::Command::new(BIN)
        .args(["ctl", "--socket", socket.to_str().unwrap(), "reload"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let (status, log) = terminated(daemon);
    assert!(status.code().is_some(), "{status:?}\n{log}");
    assert!(kv_holds(root.path(), "before-stop"), "{log}");
    let _ = reload.kill();
    let _ = reload.wait();
    Ok(())
}
