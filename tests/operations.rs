//! What operators do: signals at odd moments, paths that are not what they should be, files
//! the host did not write, failures from outside a plugin file (issue 8).

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use host::Status;

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
