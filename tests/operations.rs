//! What operators do: signals at odd moments, paths that are not what they should be, files
//! the host did not write, failures from outside a plugin file (issue 8).

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use host::{loader::LoadError, reload::ReloadError, Status};

use crate::{cli::*, support::*};

fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Waits until `child`'s own code runs: its Rust runtime has set SIGPIPE to be ignored,
/// which it does before `main`.
fn wait_until_the_runtime_began(child: &std::process::Child) {
    let status = format!("/proc/{}/status", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ignored = fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                let mask = s
                    .lines()
                    .find_map(|l| l.strip_prefix("SigIgn:"))?
                    .trim()
                    .to_owned();
                u64::from_str_radix(&mask, 16).ok()
            })
            .unwrap_or(0);
        if ignored & (1 << (libc::SIGPIPE - 1)) != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the host never started");
        std::thread::yield_now();
    }
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
    // From 0 to 6 ms after the program's own code began (its runtime ignores SIGPIPE
    // before `main`): before that only the dynamic loader runs, for 0.5 ms or (on a loaded
    // machine) several, and no program can hold a signal then.
    for attempt in 0..30u64 {
        let delay = Duration::from_micros(attempt * 6000 / 29);
        let sighup = attempt % 3 != 2;
        let mut child = Command::new(BIN)
            .args(run_args(root.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_until_the_runtime_began(&child);
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
    // A path that cannot be read (as one owned by another user cannot, for a host not
    // root): an I/O error, not bad content. A link to itself: opening it fails (ELOOP).
    fs::create_dir_all(persisted.state_dir())?;
    std::os::unix::fs::symlink("kv.state", persisted.state_file("kv"))?;
    let (kernel, report) = persisted.kernel_with(
        plugins.path(),
        persisted.config(host::BadStatePolicy::Quarantine),
    );
    let info = kernel.info("kv").unwrap();
    assert_eq!(info.status, Status::Failed, "{:?}", report.errors);
    let error = info.last_error.unwrap();
    assert!(
        error.contains("reading") && error.contains("symbolic links"),
        "{error}"
    );
    assert!(persisted.state_file("kv").is_symlink(), "moved aside");
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
    let mut reloader = reloader_of(plugins.path());
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

fn host_status(daemon: &Daemon, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn open_descriptors(daemon: &Daemon) -> usize {
    fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .unwrap()
        .count()
}

/// Reads one answer line (at most 10 s).
fn answer_of(stream: &std::os::unix::net::UnixStream) -> String {
    use std::io::BufRead;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(stream).read_line(&mut line);
    line
}

#[test]
fn the_control_socket_answers_every_malformed_request_and_closes_oversized_ones() -> TestResult {
    use std::io::Write;
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    let socket = root.path().join("state/control.sock");
    let rss_before = host_status(&daemon, "VmRSS");

    // Invalid UTF-8 and invalid JSON: an error each, and the connection serves on.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
    stream.write_all(b"{\"cmd\":\"list\xff\"}\n")?;
    let answer = answer_of(&stream);
    assert!(answer.contains("not valid UTF-8"), "{answer}");
    stream.write_all(b"not json\n")?;
    assert!(answer_of(&stream).contains("bad control request"));
    stream.write_all(b"{\"cmd\":\"list\"}\n")?;
    assert!(answer_of(&stream).contains("services"));

    // A line that never ends: answered and closed once past the limit, not buffered.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    for _ in 0..64 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let answer = answer_of(&stream);
    assert!(
        answer.contains("request too large"),
        "{answer} (sent {sent} bytes)"
    );
    let rss_after = host_status(&daemon, "VmRSS");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "resident memory grew from {rss_before} kB to {rss_after} kB"
    );
    assert!(daemon.ctl(&["list"]).status.success());
    Ok(())
}

#[test]
fn idle_control_connections_cost_no_thread_and_never_lock_the_operator_out() -> TestResult {
    let root = setup(&["echo"]);
    // No checkpoints: their threads would come and go between the two counts.
    let daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "0"]);
    let socket = root.path().join("state/control.sock");
    let threads_before = host_status(&daemon, "Threads");
    let descriptors_before = open_descriptors(&daemon);
    // A buggy script opens 300 connections and sends nothing.
    let idle: Vec<_> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(300));
    // The operator's own ctl gets through (the oldest idle connection gives way).
    let list = daemon.ctl(&["list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert_eq!(host_status(&daemon, "Threads"), threads_before);
    assert!(
        open_descriptors(&daemon) <= descriptors_before + 64,
        "{} descriptors open, {descriptors_before} before",
        open_descriptors(&daemon)
    );
    // Those that gave way were told why; the others are closed after the idle timeout.
    let evicted = answer_of(&idle[0]);
    assert!(evicted.contains("connection limit"), "{evicted}");
    let last = answer_of(&idle[299]);
    assert!(last.contains("no whole request"), "{last}");
    Ok(())
}

/// Limits the size of the files `daemon` may write (`prlimit`, from util-linux): a write past
/// it fails with EFBIG, as one on a full disk fails with ENOSPC.
fn limit_file_size(daemon: &Daemon, limit: &str) {
    let output = Command::new("prlimit")
        .args([
            "--pid",
            &daemon.child.id().to_string(),
            &format!("--fsize={limit}:unlimited"),
        ])
        .output()
        .expect("prlimit runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A host whose kv has a checkpoint, then a newer put, and a state too large for the file
/// size limit of [`the_state_cannot_be_written`] (its log lines still can be).
fn kv_daemon_with_a_checkpoint_and_a_newer_put(timeout: &str) -> (tempfile::TempDir, Daemon) {
    let root = setup(&["kv"]);
    let daemon = Daemon::start_with(
        root.path(),
        &["--checkpoint-interval", "0", "--operation-timeout", timeout],
    );
    let large = "x".repeat(100_000);
    for key in ["large-1", "large-2", "large-3"] {
        daemon.send(
            "kv",
            &format!(r#"{{"op":"put","key":"{key}","value":"{large}"}}"#),
        );
    }
    daemon.send("kv", r#"{"op":"put","key":"checkpointed","value":1}"#);
    assert!(daemon.ctl(&["checkpoint"]).status.success());
    daemon.send("kv", r#"{"op":"put","key":"newer","value":2}"#);
    (root, daemon)
}

/// Files of 200 kB at most for the host from now on: its state cannot be written.
fn the_state_cannot_be_written(daemon: &Daemon) {
    limit_file_size(daemon, "200000");
}

#[test]
fn a_last_save_that_fails_at_shutdown_is_retried_until_it_succeeds() -> TestResult {
    let (root, mut daemon) = kv_daemon_with_a_checkpoint_and_a_newer_put("20s");
    the_state_cannot_be_written(&daemon);
    signal(&daemon.child, nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        daemon.child.try_wait()?.is_none(),
        "the host gave up at once:\n{}",
        daemon.log()
    );
    limit_file_size(&daemon, "unlimited");
    let status = exit_within(&mut daemon.child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(
        crate::misbehaviour::kv_holds(root.path(), "newer"),
        "{}",
        daemon.log()
    );
    Ok(())
}

#[test]
fn a_last_save_that_never_succeeds_exits_non_zero_naming_the_service_and_what_was_kept(
) -> TestResult {
    let (root, mut daemon) = kv_daemon_with_a_checkpoint_and_a_newer_put("2s");
    the_state_cannot_be_written(&daemon);
    signal(&daemon.child, nix::sys::signal::Signal::SIGTERM);
    let status = exit_within(&mut daemon.child, Duration::from_secs(20));
    let log = daemon.log();
    assert_eq!(status.code(), Some(2), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("kv (")
            && last.contains("File too large")
            && last.contains("kept: ")
            && last.contains("kv.state"),
        "{last}"
    );
    assert!(crate::misbehaviour::kv_holds(root.path(), "checkpointed"));
    assert!(!crate::misbehaviour::kv_holds(root.path(), "newer"));
    Ok(())
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_plugins_directory_or_file_another_user_can_write_is_refused_unless_allowed() -> TestResult {
    let root = setup(&["echo"]);
    let plugins = root.path().join("plugins");
    chmod(&plugins, 0o777);
    let output = microkernel(&run_args(root.path()));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("plugins directory")
            && stderr(&output).contains("writable by")
            && stderr(&output).contains("--allow-insecure-permissions"),
        "{}",
        stderr(&output)
    );
    chmod(&plugins, 0o755);

    let daemon = Daemon::start(root.path());
    let kv = add_plugin(&plugins, "kv");
    chmod(&kv, 0o666);
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
    assert!(
        stdout(&reload).contains("libkv.so is writable by its group and other users"),
        "{}",
        stdout(&reload)
    );
    // Owned by another user, it is refused too.
    chmod(&kv, 0o644);
    nix::unistd::chown(&kv, Some(nix::unistd::Uid::from_raw(65534)), None)?;
    let reload = daemon.ctl(&["reload"]);
    assert!(
        stdout(&reload).contains("owned by uid 65534"),
        "{}",
        stdout(&reload)
    );
    assert!(daemon
        .services()
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["name"] != "kv"));
    // Made safe, it is taken at the next rescan.
    nix::unistd::chown(&kv, Some(nix::unistd::geteuid()), None)?;
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stdout(&reload));
    assert!(stdout(&reload).contains("added kv"));
    drop(daemon);

    // The opt-out.
    chmod(&kv, 0o666);
    let daemon = Daemon::start_with(root.path(), &["--allow-insecure-permissions"]);
    daemon.send("kv", r#"{"op":"put","key":"a","value":1}"#);
    Ok(())
}

#[test]
fn with_an_allow_list_only_the_listed_plugins_are_loaded() -> TestResult {
    use sha2::Digest;
    let root = setup(&["echo", "kv"]);
    let digest =
        |package: &str| hex::encode(sha2::Sha256::digest(fs::read(fixture(package)).unwrap()));
    let list = root.path().join("allowed.sha256");
    fs::write(
        &list,
        format!("# reviewed plugins\n{}  libecho.so\n", digest("echo")),
    )?;
    let daemon = Daemon::start_with(root.path(), &["--allow-sha256", list.to_str().unwrap()]);
    assert_eq!(daemon.send("echo", "{}")["count"], 1);
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(
        stdout(&reload).contains(&format!("libkv.so (sha256 {}) is not listed", digest("kv"))),
        "{}",
        stdout(&reload)
    );
    fs::write(&list, format!("{}\n{}\n", digest("echo"), digest("kv")))?;
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stdout(&reload));
    assert!(stdout(&reload).contains("added kv"), "{}", stdout(&reload));
    Ok(())
}

#[test]
fn a_host_whose_state_directory_is_moved_keeps_its_state_there_and_never_writes_at_the_path(
) -> TestResult {
    let root = setup(&["kv"]);
    let mut daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "0"]);
    daemon.send("kv", r#"{"op":"put","key":"first","value":1}"#);
    let state = root.path().join("state");
    let moved = root.path().join("state.moved");
    fs::rename(&state, &moved)?;
    // A second host starts on the same path, which is free now.
    let other_root = root.path().join("other");
    fs::create_dir(&other_root)?;
    fs::create_dir(other_root.join("plugins"))?;
    let mut second = Command::new(BIN)
        .args([
            "run",
            "--plugins",
            other_root.join("plugins").to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--key-file",
            root.path().join("key").to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    daemon.wait_for(
        |_| state.join("control.sock").exists(),
        "the second host to take the path",
    );
    // The first host checkpoints into its own directory, where it is now, not the path.
    let moved_socket = moved.join("control.sock");
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", moved_socket.to_str().unwrap()];
        all.extend_from_slice(args);
        microkernel(&all)
    };
    let checkpoint = ctl(&["checkpoint"]);
    assert!(checkpoint.status.success(), "{}", stdout(&checkpoint));
    assert!(!state.join("kv.state").exists());
    daemon.wait_for(
        |d| d.log().contains("the state directory was moved"),
        "the host to say so",
    );
    assert!(
        daemon.log().contains(&format!("now={}", moved.display())),
        "{}",
        daemon.log()
    );
    // And saves there when it stops, leaving the second host's socket alone.
    let put = ctl(&["send", "kv", r#"{"op":"put","key":"second","value":2}"#]);
    assert!(put.status.success(), "{}", stderr(&put));
    signal(&daemon.child, nix::sys::signal::Signal::SIGTERM);
    let status = exit_within(&mut daemon.child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
    assert!(
        state.join("control.sock").exists(),
        "the first host removed the second's socket"
    );
    let inspect = microkernel(&[
        "inspect-state",
        "--key-file",
        root.path().join("key").to_str().unwrap(),
        moved.join("kv.state").to_str().unwrap(),
        "--json",
    ]);
    let content: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    assert_eq!(
        (
            content["content"]["first"].as_u64(),
            content["content"]["second"].as_u64()
        ),
        (Some(1), Some(2))
    );
    signal(&second, nix::sys::signal::Signal::SIGTERM);
    exit_within(&mut second, Duration::from_secs(20));
    Ok(())
}

#[test]
fn idle_control_clients_never_starve_the_state_writes_of_descriptors() -> TestResult {
    let root = setup(&["kv"]);
    let daemon = Daemon::start_through(root.path(), &["prlimit", "--nofile=128"]);
    let socket = root.path().join("state/control.sock");
    let _idle: Vec<_> = (0..300)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    daemon.send("kv", r#"{"op":"put","key":"kept","value":1}"#);
    let status = daemon.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        fs::read_to_string(root.path().join("host.log"))?
    );
    assert!(crate::misbehaviour::kv_holds(root.path(), "kept"));
    Ok(())
}

#[test]
fn clients_that_never_read_their_answers_hold_no_worker_and_are_closed() -> TestResult {
    use std::io::Write;
    let large = serde_json::json!({
        "cmd": "send", "service": "echo", "kind": "echo",
        "payload": hex::encode("x".repeat(400_000)), "timeout_ms": null,
    });
    let mut line = serde_json::to_vec(&large)?;
    line.push(b'\n');
    let asking = |socket: &std::path::Path| {
        let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&line).unwrap();
        stream
    };
    // (A long time to read answers, so that a slow machine does not close them first.)
    let root = setup(&["echo"]);
    let daemon = Daemon::start_with(root.path(), &["--control-answer-timeout", "60s"]);
    let socket = root.path().join("state/control.sock");
    // Descriptors by what they are: counting them would take a connection the host is still
    // closing (the readiness check's) for one of the clients.
    let descriptors = |d: &Daemon| -> std::collections::BTreeSet<String> {
        fs::read_dir(format!("/proc/{}/fd", d.child.id()))
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    };
    let before = descriptors(&daemon);
    // Twelve clients (more than the workers) each ask for an answer of 800 kB and read none
    // of it.
    let stuck: Vec<_> = (0..12).map(|_| asking(&socket)).collect();
    // The operator is answered while every one of them is still open: nobody waited for a
    // client that does not read to be given up.
    let list = daemon.ctl(&["list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let now = descriptors(&daemon);
    let clients = now.difference(&before).count();
    assert!(
        clients >= 12,
        "{clients} new descriptors, not the 12 clients: {before:?} before, {now:?} now"
    );
    drop(stuck);
    drop(daemon);

    // After the time to read an answer, such a connection is closed.
    let root = setup(&["echo"]);
    let daemon = Daemon::start_with(root.path(), &["--control-answer-timeout", "1s"]);
    let socket = root.path().join("state/control.sock");
    let base = open_descriptors(&daemon);
    let _stuck = asking(&socket);
    daemon.wait_for(
        |d| open_descriptors(d) <= base,
        "the connection that does not read to be closed",
    );
    Ok(())
}

#[test]
fn the_control_socket_comes_back_after_running_out_of_descriptors() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    let pid = daemon.child.id().to_string();
    let hard = Command::new("prlimit")
        .args([
            "--pid",
            &pid,
            "--nofile",
            "--output",
            "HARD",
            "--noheadings",
        ])
        .output()?;
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_owned();
    let limit = |soft: usize| {
        let status = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:{hard}")])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // Not one descriptor left: the host cannot accept the operator's connection.
    limit(3);
    let socket = root.path().join("state/control.sock");
    let refused = microkernel(&[
        "ctl",
        "--socket",
        socket.to_str().unwrap(),
        "--wait",
        "1s",
        "list",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("no answer from the host"),
        "{}",
        stderr(&refused)
    );
    // Descriptors again: it answers, without a restart.
    limit(1024);
    let list = microkernel(&[
        "ctl",
        "--socket",
        socket.to_str().unwrap(),
        "--wait",
        "10s",
        "list",
    ]);
    assert!(list.status.success(), "{}\n{}", stderr(&list), daemon.log());
    Ok(())
}

#[test]
fn requests_that_wait_on_a_busy_service_never_hold_back_the_operators_commands() -> TestResult {
    use std::io::{BufRead, Write};
    let root = setup(&["fixture-echo-faulty", "kv"]);
    let daemon = Daemon::start_with(root.path(), &["--operation-timeout", "1s"]);
    let socket = root.path().join("state/control.sock");
    // More requests than connections may wait, each on a service busy for minutes.
    let sleep = serde_json::json!({
        "cmd": "send", "service": "echo", "kind": "sleep",
        "payload": hex::encode("120000"), "timeout_ms": 600_000,
    });
    let mut line = serde_json::to_vec(&sleep)?;
    line.push(b'\n');
    let waiting: Vec<_> = (0..70)
        .map(|_| {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            let _ = stream.write_all(&line);
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Those past the share of requests to services are told the host is busy.
    let busy = waiting
        .iter()
        .filter(|stream| {
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut answer = String::new();
            let _ = std::io::BufReader::new(*stream).read_line(&mut answer);
            answer.contains("busy: ")
        })
        .count();
    assert!(busy >= 10, "{busy} of 70 were told the host is busy");
    // Meanwhile the operator's commands, and requests to other services, are answered.
    // (Checkpoints of the busy service come back after the operation timeout; several at
    // once are one checkpoint.)
    let checkpoints: Vec<_> = (0..2)
        .map(|_| {
            Command::new(BIN)
                .args([
                    "ctl",
                    "--socket",
                    socket.to_str().unwrap(),
                    "--wait",
                    "10s",
                    "checkpoint",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for command in [
        &["list"][..],
        &["reload"],
        &["send", "kv", r#"{"op":"put","key":"a","value":1}"#],
        &["checkpoint"],
    ] {
        let mut args = vec!["--wait", "10s"];
        args.extend_from_slice(command);
        let output = daemon.ctl(&args);
        assert!(
            !stderr(&output).contains("no answer") && !stderr(&output).contains("busy"),
            "{command:?}: {}",
            stderr(&output)
        );
    }
    for mut checkpoint in checkpoints {
        assert_eq!(
            checkpoint.wait()?.code(),
            Some(1),
            "a checkpoint was not answered"
        );
    }
    Ok(())
}

#[test]
fn a_reload_of_a_service_no_file_provides_is_an_error() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    let reload = daemon.ctl(&["reload", "nosuch"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(
        stdout(&reload).contains("provides a service `nosuch`"),
        "{}",
        stdout(&reload)
    );
    assert!(daemon.ctl(&["reload", "echo"]).status.success());
    Ok(())
}

#[test]
fn writing_to_a_full_standard_output_is_an_error_not_a_panic() -> TestResult {
    let root = setup(&["kv"]);
    let daemon = Daemon::start(root.path());
    daemon.send("kv", r#"{"op":"put","key":"a","value":1}"#);
    assert_eq!(daemon.terminate().code(), Some(0));
    let full = fs::OpenOptions::new().write(true).open("/dev/full")?;
    let output = Command::new(BIN)
        .args([
            "inspect-state",
            "--key-file",
            root.path().join("key").to_str().unwrap(),
            root.path().join("state/kv.state").to_str().unwrap(),
        ])
        .stdout(full)
        .output()?;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("No space left on device"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("panicked"));
    Ok(())
}

#[test]
fn strict_modes_check_the_directories_above_where_links_lead_and_configuration() -> TestResult {
    use sha2::Digest;
    // A plugins directory inside a directory anyone may write (and not sticky).
    let open = tempfile::tempdir()?;
    chmod(open.path(), 0o777);
    let root = setup(&["echo"]);
    let inside = open.path().join("plugins");
    fs::rename(root.path().join("plugins"), &inside)?;
    std::os::unix::fs::symlink(&inside, root.path().join("plugins"))?;
    let output = microkernel(&run_args(root.path()));
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("which is writable by") && stderr(&output).contains("not sticky"),
        "{}",
        stderr(&output)
    );
    fs::remove_file(root.path().join("plugins"))?;
    // Reached through a link held in such a directory, it is refused too.
    fs::rename(&inside, root.path().join("plugins"))?;
    std::os::unix::fs::symlink(root.path(), open.path().join("link"))?;
    let mut args = run_args(root.path());
    args[2] = open
        .path()
        .join("link/plugins")
        .to_string_lossy()
        .into_owned();
    let output = microkernel(&args);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("not sticky"),
        "{}",
        stderr(&output)
    );

    // A plugin that is a link into such a directory; a configuration anyone may write.
    let daemon = Daemon::start(root.path());
    fs::copy(fixture("kv"), open.path().join("libkv.so"))?;
    std::os::unix::fs::symlink(
        open.path().join("libkv.so"),
        root.path().join("plugins/libkv.so"),
    )?;
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(
        stdout(&reload).contains("not sticky"),
        "{}",
        stdout(&reload)
    );
    fs::remove_file(root.path().join("plugins/libkv.so"))?;
    let conf = root.path().join("plugins/echo.conf");
    fs::write(&conf, "{}")?;
    chmod(&conf, 0o666);
    let reload = daemon.ctl(&["reload"]);
    assert!(
        stdout(&reload).contains("configuration file")
            && stdout(&reload).contains("echo.conf is writable"),
        "{}",
        stdout(&reload)
    );
    chmod(&conf, 0o644);
    drop(daemon);

    // sha256sum escapes a line with `\` when the name needs it: such lines are read too.
    let list = root.path().join("allowed");
    let digest = hex::encode(sha2::Sha256::digest(fs::read(fixture("echo"))?));
    fs::write(&list, format!("\\{digest}  lib\\necho.so\n"))?;
    let daemon = Daemon::start_with(root.path(), &["--allow-sha256", list.to_str().unwrap()]);
    assert_eq!(daemon.send("echo", "{}")["version"], "1.0.0");
    Ok(())
}

#[test]
fn a_client_that_pipelines_faster_than_it_is_served_holds_one_request_of_memory() -> TestResult {
    use std::io::{Read, Write};
    let root = setup(&["echo"]);
    let daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "0"]);
    let socket = root.path().join("state/control.sock");
    let rss_before = host_status(&daemon, "VmRSS");
    let stream = std::os::unix::net::UnixStream::connect(&socket)?;
    let mut reader = stream.try_clone()?;
    // Reads (and drops) every answer, so the host never waits for this client.
    let drain = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    // Requests of 1 KiB (the padding is ignored), 1024 of them per MiB.
    let line = format!("{{\"cmd\":\"list\",\"pad\":\"{}\"}}\n", "x".repeat(1000));
    let lines = line.repeat(1024);
    let mut writer = stream;
    for _ in 0..48 {
        writer.write_all(lines.as_bytes())?;
    }
    let rss_after = host_status(&daemon, "VmRSS");
    writer.shutdown(std::net::Shutdown::Both)?;
    drain.join().unwrap();
    assert!(
        rss_after < rss_before + 16 * 1024,
        "resident memory grew from {rss_before} kB to {rss_after} kB for 48 MiB of pipelined requests"
    );
    Ok(())
}
