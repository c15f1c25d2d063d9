//! What operators do: signals at odd moments, paths that are not what they should be, files
//! the host did not write, failures from outside a plugin file (issue 8).

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use host::{
    loader::LoadError,
    reload::{ReloadError, Reloader},
    Status,
};

use crate::{cli::*, support::*};

fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Waits for `child` to exit, at most `limit`; kills it and fails past that.
fn exit_within(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the host did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn signals_in_the_first_milliseconds_of_a_start_are_honoured_never_fatal() -> TestResult {
    let root = setup(&["echo"]);
    let socket = root.path().join("state/control.sock");
    // From 2 ms to 8 ms after the start. Before the program's first constructor runs, only
    // the dynamic loader does (0.5 to 1 ms for this debug build, mapping and relocating
    // it): no program can hold a signal then.
    for attempt in 0..30u64 {
        let delay = Duration::from_micros(2000 + attempt * 6000 / 29);
        let sighup = attempt % 3 != 2;
        let mut child = Command::new(BIN)
            .args(run_args(root.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(delay);
        if sighup {
            signal(&child, nix::sys::signal::Signal::SIGHUP);
            // A rescan once the services are up: the host runs and answers.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait()? {
                    panic!("attempt {attempt}: SIGHUP {delay:?} after the start ended the host: {status}");
                }
                let list = microkernel(&["ctl", "--socket", socket.to_str().unwrap(), "list"]);
                if list.status.success() && stdout(&list).contains("running") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "attempt {attempt}: the host never came up"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = exit_within(&mut child, Duration::from_secs(20));
        assert_eq!(
            status.code(),
            Some(0),
            "attempt {attempt}: SIGTERM {delay:?} after the start (sighup first: {sighup}): {status}"
        );
    }
    Ok(())
}

#[test]
fn socket_never_replaces_a_file_that_is_not_a_socket() -> TestResult {
    let root = setup(&["echo"]);
    let key = root.path().join("key");
    let before = fs::read(&key)?;
    for target in [key.clone(), root.path().join("plugins")] {
        let mut args = run_args(root.path());
        args.extend(["--socket".into(), target.to_string_lossy().into_owned()]);
        let output = microkernel(&args);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("is not a socket"),
            "{}",
            stderr(&output)
        );
    }
    assert_eq!(fs::read(&key)?, before, "the key file was touched");
    assert!(root.path().join("plugins/libecho.so").exists());
    Ok(())
}

#[test]
fn a_stale_socket_no_host_answers_on_is_replaced() -> TestResult {
    let root = setup(&["echo"]);
    fs::create_dir_all(root.path().join("state"))?;
    let socket = root.path().join("state/control.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket)?);
    assert!(socket.exists());
    let daemon = Daemon::start(root.path());
    assert_eq!(daemon.send("echo", "{}")["count"], 1);
    Ok(())
}

#[test]
fn quarantine_leaves_a_state_file_that_could_not_be_read_where_it_is() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["kv"]);
    // A path that cannot be read as a file (as one owned by another user cannot): an I/O
    // error, not bad content.
    fs::create_dir_all(persisted.state_file("kv"))?;
    let (kernel, report) = persisted.kernel_with(
        plugins.path(),
        persisted.config(host::BadStatePolicy::Quarantine),
    );
    let info = kernel.info("kv").unwrap();
    assert_eq!(info.status, Status::Failed, "{:?}", report.errors);
    let error = info.last_error.unwrap();
    assert!(
        error.contains("reading") && error.contains("directory"),
        "{error}"
    );
    assert!(persisted.state_file("kv").is_dir(), "moved aside");
    let moved: Vec<_> = fs::read_dir(persisted.state_dir())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".bad-"))
        .collect();
    assert!(moved.is_empty(), "{moved:?}");
    Ok(())
}

#[test]
fn shadow_directories_are_private_and_those_of_dead_hosts_are_removed() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let root = setup(&["echo"]);
    let shadows = root.path().join("shadows");
    fs::create_dir(&shadows)?;
    // A host killed with SIGKILL leaves its shadow directory behind.
    let mut daemon = Daemon::start_with(root.path(), &["--shadow-dir", shadows.to_str().unwrap()]);
    daemon.child.kill()?;
    daemon.child.wait()?;
    let left: Vec<_> = fs::read_dir(&shadows)?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // A live host's directory is kept.
    let live = host::loader::Loader::new(Some(&shadows), None)?;
    assert_eq!(
        fs::metadata(live.shadow_dir())?.permissions().mode() & 0o777,
        0o700
    );
    assert!(
        !left[0].exists(),
        "the dead host's shadow directory is still there"
    );
    let other = host::loader::Loader::new(Some(&shadows), None)?;
    assert!(live.shadow_dir().exists() && other.shadow_dir().exists());
    Ok(())
}
#[test]
fn a_private_copy_that_cannot_be_written_names_the_cause_and_is_retried() -> TestResult {
    capture_logs();
    let plugins = plugin_dir(&["echo"]);
    let shadows = tempfile::tempdir()?;
    let kernel = host::Kernel::new(host::KernelConfig {
        shadow_dir: Some(shadows.path().to_owned()),
        ..Default::default()
    })?;
    let shadow = kernel.loader().shadow_dir().to_owned();
    let owner = fs::read(shadow.join(".owner"))?;
    fs::remove_dir_all(&shadow)?;
    let mut reloader = Reloader::new(plugins.path());
    let report = reloader.scan(&kernel, None);
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Load(LoadError::ShadowCopy { .. })]
        ),
        "{:?}",
        report.errors
    );
    let text = host::error_chain(&report.errors[0]);
    assert!(text.contains("No such file or directory"), "{text}");
    // The shadow directory is back: the next rescan loads the file.
    fs::create_dir(&shadow)?;
    fs::write(shadow.join(".owner"), owner)?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.added, ["echo"]);
    assert_eq!(kernel.info("echo").unwrap().status, Status::Running);
    Ok(())
}

#[test]
fn a_rejected_version_stays_rejected_through_reloads_and_restarts_and_ctl_says_so() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    daemon.send("echo", "{}");
    // Version 9 refuses the state it is given.
    fs::write(
        root.path().join("plugins/echo.conf"),
        r#"{"import":"fail"}"#,
    )?;
    add_plugin(&root.path().join("plugins"), "fixture-echo-faulty");
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
    assert!(
        stdout(&reload).contains("rolled back"),
        "{}",
        stdout(&reload)
    );
    for _ in 0..2 {
        let reload = daemon.ctl(&["reload"]);
        assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
        assert!(
            stdout(&reload).contains("rejected")
                && stdout(&reload).contains("libfixture_echo_faulty.so"),
            "{}",
            stdout(&reload)
        );
    }
    let list = daemon.ctl(&["list"]);
    assert!(
        stdout(&list).contains("rejected plugin files") && stdout(&list).contains("9.0.0"),
        "{}",
        stdout(&list)
    );
    assert_eq!(
        daemon.services()[0]["rejected"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(daemon.terminate().code(), Some(0));

    // Restarted, the host runs version 1 with its state, not the rejected version 9.
    let daemon = Daemon::start(root.path());
    let reply = daemon.send("echo", "{}");
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("1.0.0"), Some(2))
    );
    // Asked to, it tries the rejected file again (which refuses the state again).
    let retry = daemon.ctl(&["reload", "--retry"]);
    assert_eq!(retry.status.code(), Some(1), "{}", stdout(&retry));
    assert!(stdout(&retry).contains("rolled back"), "{}", stdout(&retry));
    Ok(())
}
