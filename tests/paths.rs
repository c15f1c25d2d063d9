//! Every path an operator hands the host is read safely (issue 16): a FIFO, a device or a
//! huge file in place of a file the host reads is refused at once, naming the file and what
//! it is, and blamed on that file, never on a plugin; nothing hangs.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use crate::{cli::*, support::add_plugin};

fn mkfifo(path: &Path, mode: u32) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode)).unwrap();
}

/// The status and last error of `service` in `ctl list --json`.
fn status_of(daemon: &Daemon, service: &str) -> (String, String) {
    let services = daemon.services();
    let entry = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service).cloned())
        .unwrap_or_default();
    (
        entry["status"].as_str().unwrap_or_default().to_owned(),
        entry["last_error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[test]
fn a_fifo_in_place_of_a_state_file_fails_that_service_at_once_naming_it_and_the_others_run() {
    let root = setup(&["echo", "kv"]);
    fs::create_dir(root.path().join("state")).unwrap();
    fs::set_permissions(root.path().join("state"), fs::Permissions::from_mode(0o700)).unwrap();
    mkfifo(&root.path().join("state/kv.state"), 0o600);
    let daemon = Daemon::start(root.path());
    daemon.wait_for(
        |d| status_of(d, "kv").0 == "failed" && status_of(d, "echo").0 == "running",
        "kv to fail and echo to run",
    );
    let (_, error) = status_of(&daemon, "kv");
    assert!(
        error.contains("kv.state") && error.contains("a FIFO"),
        "{error}"
    );
    // Kept, as every bad state file is.
    assert!(root.path().join("state/kv.state").exists());
    assert!(daemon.terminate().success());
}

#[test]
fn a_fifo_in_place_of_the_plugin_record_is_reported_and_every_service_starts() {
    let root = setup(&["echo"]);
    fs::create_dir(root.path().join("state")).unwrap();
    fs::set_permissions(root.path().join("state"), fs::Permissions::from_mode(0o700)).unwrap();
    mkfifo(&root.path().join("state/plugins.json"), 0o600);
    let daemon = Daemon::start(root.path());
    daemon.wait_for(|d| status_of(d, "echo").0 == "running", "echo to run");
    // The log is written by a thread of its own: the line may come after the answer.
    daemon.wait_for(
        |d| d.log().contains("plugins.json") && d.log().contains("a FIFO"),
        "the FIFO to be named in the log",
    );
}

#[test]
fn a_key_file_that_is_a_fifo_is_refused_at_once_and_the_host_exits_2() {
    let root = setup(&["echo"]);
    fs::remove_file(root.path().join("key")).unwrap();
    mkfifo(&root.path().join("key"), 0o600);
    let args = run_args(root.path());
    let output = run_with_deadline(&args, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("key") && stderr(&output).contains("a FIFO"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_configuration_that_never_ends_is_blamed_on_the_configuration_not_the_plugin() {
    let root = setup(&["echo"]);
    std::os::unix::fs::symlink("/dev/zero", root.path().join("plugins/echo.conf")).unwrap();
    // /dev/zero is writable by all: past the permission checks, the read itself is tried.
    let daemon = Daemon::start_with(root.path(), &["--allow-insecure-permissions"]);
    let reload = daemon.ctl(&["reload"]);
    let said = format!("{}{}", stdout(&reload), stderr(&reload));
    assert!(
        said.contains("echo.conf") && said.contains("a character device"),
        "{said}"
    );
    // The plugin file is not held against: once the configuration is a file, it runs.
    fs::remove_file(root.path().join("plugins/echo.conf")).unwrap();
    fs::write(root.path().join("plugins/echo.conf"), "").unwrap();
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stdout(&reload));
    daemon.wait_for(|d| status_of(d, "echo").0 == "running", "echo to run");
    assert!(!daemon.log().contains("its code hangs"), "{}", daemon.log());
}

#[test]
fn inspect_state_of_a_device_or_a_huge_sparse_file_answers_at_once() {
    let root = setup(&[]);
    let key = root.path().join("key");
    let output = microkernel(&[
        "inspect-state",
        "--key-file",
        key.to_str().unwrap(),
        "/dev/zero",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("state file /dev/zero")
            && stderr(&output).contains("a character device"),
        "{}",
        stderr(&output)
    );
    let sparse = root.path().join("big.state");
    fs::File::create(&sparse).unwrap().set_len(3 << 30).unwrap();
    let output = microkernel(&[
        "inspect-state",
        "--key-file",
        key.to_str().unwrap(),
        sparse.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("3221225472 bytes"),
        "{}",
        stderr(&output)
    );
}

/// Runs the binary with `args`, killing it if it has not ended after `deadline`.
fn run_with_deadline(args: &[String], deadline: Duration) -> std::process::Output {
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .env_remove("MICROKERNEL_STATE_KEY")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn timeouts_of_zero_are_refused_in_words() {
    let root = setup(&["echo"]);
    for option in [
        "--operation-timeout",
        "--probe-timeout",
        "--request-timeout",
    ] {
        let mut args = run_args(root.path());
        args.extend([option.to_owned(), "0s".to_owned()]);
        let output = run_with_deadline(&args, Duration::from_secs(30));
        assert_eq!(
            output.status.code(),
            Some(2),
            "{option}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("a timeout must be longer than 0")
                && stderr(&output).contains(option),
            "{option}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn ctl_ends_quietly_when_the_reader_of_its_output_goes_away() {
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    let socket = root.path().join("state/control.sock");
    // A reader that reads nothing and goes: `ctl list | true`, with a list longer than a
    // pipe's buffer is not needed: the first write fails once the reader has gone.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let output = std::process::Command::new(BIN)
        .args(["ctl", "--socket", socket.to_str().unwrap(), "list"])
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
    drop(daemon);
}

/// A process that is not a host, alive until dropped.
struct Bystander(std::process::Child);

impl Bystander {
    fn start() -> Bystander {
        Bystander(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn reload_signals_only_a_host_that_holds_its_pid_file_and_never_a_pid_that_is_not_positive() {
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    let mut bystander = Bystander::start();
    let other = root.path().join("other.pid");
    for content in [
        bystander.pid().to_string(),
        "-1".into(),
        "0".into(),
        "-12345".into(),
        "1".into(),
    ] {
        fs::write(&other, format!("{content}\n")).unwrap();
        let reload = microkernel(&["reload", "--pid-file", other.to_str().unwrap()]);
        assert_eq!(
            reload.status.code(),
            Some(2),
            "{content}: {}",
            stdout(&reload)
        );
        assert!(
            stderr(&reload).contains("other.pid") && stderr(&reload).contains("not"),
            "{content}: {}",
            stderr(&reload)
        );
        assert!(bystander.alive(), "{content}: the bystander was signalled");
    }
    // The host's own PID file names a host that holds it.
    let pid_file = root.path().join("host.pid");
    let reload = microkernel(&["reload", "--pid-file", pid_file.to_str().unwrap()]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    assert!(daemon.terminate().success());
}

#[test]
fn run_never_overwrites_a_file_that_is_not_a_pid_file() {
    let root = setup(&["echo"]);
    let important = root.path().join("important.conf");
    fs::write(&important, "listen = 8080\n").unwrap();
    let key = root.path().join("key");
    let key_before = fs::read(&key).unwrap();
    for path in [&important, &key] {
        let mut args = run_args(root.path());
        args.extend(["--pid-file".to_owned(), path.to_string_lossy().into_owned()]);
        let output = run_with_deadline(&args, Duration::from_secs(30));
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("not overwritten"),
            "{}",
            stderr(&output)
        );
    }
    assert_eq!(fs::read_to_string(&important).unwrap(), "listen = 8080\n");
    assert_eq!(fs::read(&key).unwrap(), key_before);
}

#[test]
fn a_stale_pid_file_naming_a_live_process_that_is_not_a_host_does_not_block_start_up() {
    let root = setup(&["echo"]);
    let bystander = Bystander::start();
    let pid_file = root.path().join("host.pid");
    fs::write(&pid_file, format!("{}\n", bystander.pid())).unwrap();
    let daemon = Daemon::start(root.path());
    let written = fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim(), daemon.child.id().to_string());
    assert!(daemon.terminate().success());
    assert!(!pid_file.exists());
}

#[test]
fn plugin_paths_that_are_not_regular_files_are_each_reported_never_passed_over() {
    let root = setup(&["echo"]);
    let plugins = root.path().join("plugins");
    let link = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, plugins.join(name)).unwrap();
    };
    link("missing-target.so", "dangling.so");
    link("loop.so", "loop.so");
    link("/dev/zero", "zero.so");
    link("/tmp", "dirlink.so");
    fs::create_dir(plugins.join("adir.so")).unwrap();
    let daemon = Daemon::start_with(root.path(), &["--allow-insecure-permissions"]);
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
    let said = format!("{}{}", stdout(&reload), stderr(&reload));
    for (name, cause) in [
        ("dangling.so", "No such file"),
        ("loop.so", "symbolic links"),
        ("zero.so", "a character device"),
        ("dirlink.so", "a directory"),
        ("adir.so", "a directory"),
    ] {
        assert!(
            said.lines().any(|l| l.contains(name) && l.contains(cause)),
            "{name}: {said}"
        );
    }
    // The good file is unaffected.
    assert_eq!(daemon.send("echo", "{}")["count"], 1);
}

#[test]
fn a_service_whose_plugin_file_is_gone_is_reported_at_every_rescan_in_list_and_after_a_restart() {
    let root = setup(&["echo", "kv"]);
    let daemon = Daemon::start(root.path());
    daemon.send("kv", r#"{"op":"put","key":"a","value":"1"}"#);
    fs::remove_file(root.path().join("plugins/libkv.so")).unwrap();
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
    let said = format!("{}{}", stdout(&reload), stderr(&reload));
    assert!(
        said.contains("service `kv` has no plugin file") && said.contains("keeps running"),
        "{said}"
    );
    // Still serving, and `list` says why it will not come back.
    assert_eq!(daemon.send("kv", r#"{"op":"get","key":"a"}"#)["value"], "1");
    let table = stdout(&daemon.ctl(&["list"]));
    assert!(
        table.contains("services with no plugin file") && table.contains("`kv`"),
        "{table}"
    );
    let kv = daemon
        .services()
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "kv").cloned())
        .unwrap();
    assert!(kv["no_plugin_file"].is_string(), "{kv}");
    assert!(daemon.terminate().success());

    // After a restart: not running, and said at start-up, in `list` and at every rescan.
    let daemon = Daemon::start(root.path());
    daemon.wait_for(
        |d| stdout(&d.ctl(&["list"])).contains("services with no plugin file"),
        "the start-up scan to report kv",
    );
    let table = stdout(&daemon.ctl(&["list"]));
    assert!(
        table.contains("kv.state") && table.contains("it does not run"),
        "{table}"
    );
    daemon.wait_for(
        |d| d.log().contains("service `kv` has no plugin file"),
        "kv to be named in the log",
    );
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
    assert!(root.path().join("state/kv.state").exists());
}

#[test]
fn a_plugin_file_overwritten_with_another_services_bytes_leaves_its_service_reported() {
    let root = setup(&["echo", "kv"]);
    let daemon = Daemon::start(root.path());
    fs::copy(
        root.path().join("plugins/libecho.so"),
        root.path().join("plugins/libkv.so"),
    )
    .unwrap();
    let reload = daemon.ctl(&["reload"]);
    let said = format!("{}{}", stdout(&reload), stderr(&reload));
    assert!(said.contains("service `kv` has no plugin file"), "{said}");
    assert_eq!(reload.status.code(), Some(1), "{said}");
}

#[test]
fn a_state_directory_another_user_can_write_or_owns_is_refused_with_the_plugins_opt_out() {
    let root = setup(&["echo"]);
    let state = root.path().join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    let output = run_with_deadline(&run_args(root.path()), Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("state directory")
            && stderr(&output).contains("writable by its group and other users")
            && stderr(&output).contains("control socket"),
        "{}",
        stderr(&output)
    );
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let output = run_with_deadline(&run_args(root.path()), Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("owned by uid 65534"),
        "{}",
        stderr(&output)
    );
    // The same opt-out as for the plugins directory.
    nix::unistd::chown(&state, Some(nix::unistd::geteuid()), None).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    let daemon = Daemon::start_with(root.path(), &["--allow-insecure-permissions"]);
    assert_eq!(daemon.send("echo", "{}")["count"], 1);
}

#[test]
fn ctl_sends_nothing_to_a_control_socket_another_user_serves() {
    // A host run by user nobody, in directories nobody may use: its socket is nobody's.
    let top = tempfile::tempdir().unwrap();
    fs::set_permissions(top.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let plugins = top.path().join("plugins");
    let state = top.path().join("state");
    fs::create_dir(&plugins).unwrap();
    fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let mut other = std::os::unix::process::CommandExt::uid(
        std::process::Command::new(BIN).args([
            "run",
            "--no-state",
            "--plugins",
            plugins.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ]),
        65534,
    )
    .env_remove("NOTIFY_SOCKET")
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let socket = state.join("control.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = microkernel(&["ctl", "--socket", socket.to_str().unwrap(), "list"]);
    let _ = other.kill();
    let _ = other.wait();
    assert!(!sent.status.success(), "{}", stdout(&sent));
    assert!(
        stderr(&sent).contains("served by uid 65534") && stderr(&sent).contains("nothing sent"),
        "{}",
        stderr(&sent)
    );
}

/// A host of `root` whose standard error is `stderr` (a pipe the test holds), once its
/// control socket answers; `ctl` talks to it.
struct PipedHost {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl PipedHost {
    fn start(root: &Path, stderr: std::os::fd::OwnedFd) -> PipedHost {
        let child = std::process::Command::new(BIN)
            .args(run_args(root))
            .args(["--operation-timeout", "10s"])
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(stderr))
            .spawn()
            .unwrap();
        let mut host = PipedHost {
            child,
            socket: root.join("state/control.sock"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !host.ctl(&["list"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline && host.child.try_wait().unwrap().is_none(),
                "the host did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec![
            "ctl",
            "--socket",
            self.socket.to_str().unwrap(),
            "--wait",
            "20s",
        ];
        all.extend_from_slice(args);
        microkernel(&all)
    }

    /// Puts a value in kv, rescans, and stops the host with SIGTERM: its exit status, which
    /// must come within 60 s.
    fn put_reload_and_stop(mut self) -> std::process::ExitStatus {
        let put = self.ctl(&["send", "kv", r#"{"op":"put","key":"k","value":7}"#]);
        assert!(put.status.success(), "{}", stderr(&put));
        let reload = self.ctl(&["reload"]);
        assert!(reload.status.success(), "{}", stderr(&reload));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("SIGTERM did not stop the host within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_log_reader_that_stalls_or_goes_away_costs_log_lines_never_a_reload_a_stop_or_a_state() {
    let root = setup(&["fixture-tokio", "kv"]);
    // Standard error on a pipe nobody reads: it fills, and stays full.
    let (stalled, writer) = nix::unistd::pipe().unwrap();
    let host = PipedHost::start(root.path(), writer);
    let flood = host.ctl(&["send", "tokio", "100000", "--kind", "flood"]);
    assert!(flood.status.success(), "{}", stderr(&flood));
    let status = host.put_reload_and_stop();
    drop(stalled);
    assert!(status.success(), "{status:?}");
    assert!(crate::misbehaviour::kv_holds(root.path(), "k"));
}

#[test]
fn a_host_whose_log_reader_is_gone_serves_reloads_and_stops_saving_every_state() {
    let root = setup(&["echo", "kv"]);
    // `microkernel run 2>&1 | head -1`, once `head` has exited: every write fails (EPIPE).
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let status = PipedHost::start(root.path(), writer).put_reload_and_stop();
    assert!(status.success(), "{status:?}");
    assert!(crate::misbehaviour::kv_holds(root.path(), "k"));
}

#[test]
fn a_plugin_that_crashes_or_exits_in_process_leaves_a_line_naming_the_service_and_the_call() {
    use std::os::unix::process::ExitStatusExt;
    for (kind, signal, line) in [
        (
            "segv",
            Some(libc::SIGSEGV),
            "microkernel: SIGSEGV in plugin code (service `faulty`, in `handle`)",
        ),
        (
            "abort",
            Some(libc::SIGABRT),
            "microkernel: SIGABRT in plugin code (service `faulty`, in `handle`)",
        ),
        (
            "exit-3",
            None,
            "microkernel: exit() was called in plugin code (service `faulty`, in `handle`): the host ends with status 2",
        ),
    ] {
        let root = setup(&["fixture-faulty"]);
        let mut daemon = Daemon::start(root.path());
        let sent = daemon.ctl(&["send", "faulty", "", "--kind", kind]);
        assert!(!sent.status.success(), "{kind}: {}", stdout(&sent));
        let status = daemon.child.wait().unwrap();
        match signal {
            Some(signal) => assert_eq!(status.signal(), Some(signal), "{kind}: {status:?}"),
            None => assert_eq!(status.code(), Some(2), "{kind}: {status:?}"),
        }
        let log = daemon.log();
        assert!(log.lines().any(|l| l.starts_with(line)), "{kind}: {log}");
    }
}

#[test]
fn a_plugin_file_still_being_written_in_place_is_not_loaded_until_it_is_whole() {
    use std::io::{Seek, Write};
    let root = setup(&[]);
    let daemon = Daemon::start(root.path());
    let bytes = fs::read(crate::support::fixture("echo")).unwrap();
    let path = root.path().join("plugins/libecho.so");
    // Pre-sized to its full length, then filled: half of it is there.
    let mut file = fs::File::create(&path).unwrap();
    file.set_len(bytes.len() as u64).unwrap();
    let half = bytes.len() / 2;
    file.write_all(&bytes[..half]).unwrap();
    file.sync_all().unwrap();
    let reload = daemon.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1), "{}", stdout(&reload));
    let said = format!("{}{}", stdout(&reload), stderr(&reload));
    assert!(said.contains("looks unfinished"), "{said}");
    assert_eq!(daemon.services(), serde_json::json!([]));
    // The rest, in place: the next rescan takes it.
    file.seek(std::io::SeekFrom::Start(half as u64)).unwrap();
    file.write_all(&bytes[half..]).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stdout(&reload));
    assert_eq!(daemon.send("echo", "{}")["count"], 1);
}

#[test]
fn a_plugin_with_a_library_of_its_own_under_origin_loads_and_the_library_is_pinned() {
    let root = setup(&["fixture-origin"]);
    let lib = root.path().join("plugins/lib");
    fs::create_dir(&lib).unwrap();
    let helper = crate::support::fixture_dir().join("fixture-origin/lib/libmkhelper.so");
    fs::copy(&helper, lib.join("libmkhelper.so")).unwrap();
    let daemon = Daemon::start(root.path());
    // The library's own directory is no plugin, and nothing in it is reported.
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stdout(&reload));
    assert_eq!(daemon.send("origin", "{}")["answer"], 42);
    // Overwritten where it was deployed: the running plugin's copy is another file.
    fs::write(lib.join("libmkhelper.so"), b"not a library any more").unwrap();
    assert_eq!(daemon.send("origin", "{}")["answer"], 42);
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stdout(&reload));
    assert_eq!(daemon.send("origin", "{}")["answer"], 42);
}

#[test]
fn a_fifo_as_allow_list_or_configuration_is_refused_at_once_and_rescans_go_on() {
    let root = setup(&["echo", "kv"]);
    let allow = root.path().join("allowed.sha256");
    mkfifo(&allow, 0o600);
    // At start-up: refused at once, naming it.
    let mut args = run_args(root.path());
    args.extend([
        "--allow-sha256".to_owned(),
        allow.to_string_lossy().into_owned(),
    ]);
    let output = run_with_deadline(&args, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("allowed.sha256") && stderr(&output).contains("a FIFO"),
        "{}",
        stderr(&output)
    );
    // A FIFO configuration: the rescan answers, and the next one too, once it is a file.
    let daemon = Daemon::start(root.path());
    mkfifo(&root.path().join("plugins/echo.conf"), 0o600);
    let reload = daemon.ctl(&["reload"]);
    let said = format!("{}{}", stdout(&reload), stderr(&reload));
    assert!(
        said.contains("echo.conf") && said.contains("a FIFO"),
        "{said}"
    );
    fs::remove_file(root.path().join("plugins/echo.conf")).unwrap();
    assert!(daemon.ctl(&["reload"]).status.success());
    // A FIFO state file met by `ctl start`: answered at once, the FIFO kept.
    assert!(daemon.ctl(&["stop", "kv"]).status.success());
    fs::remove_file(root.path().join("state/kv.state")).unwrap();
    mkfifo(&root.path().join("state/kv.state"), 0o600);
    let start = daemon.ctl(&["start", "kv"]);
    assert!(!start.status.success(), "{}", stdout(&start));
    let said = format!("{}{}", stdout(&start), stderr(&start));
    assert!(
        said.contains("kv.state") && said.contains("a FIFO"),
        "{said}"
    );
    assert_eq!(daemon.send("echo", "{}")["count"], 1);
}

#[test]
fn a_replaced_version_whose_stop_fails_is_said_by_the_reload_and_in_the_list() {
    let root = setup(&["fixture-faulty"]);
    fs::write(
        root.path().join("plugins/faulty.conf"),
        r#"{"stop":"fail"}"#,
    )
    .unwrap();
    let daemon = Daemon::start(root.path());
    add_plugin(&root.path().join("plugins"), "fixture-faulty-v2");
    let reload = daemon.ctl(&["reload"]);
    let said = stdout(&reload);
    assert!(
        said.contains("replaced faulty 1.0.0 -> 2.0.0")
            && said.contains("version 1.0.0's stop failed")
            && said.contains("stop refused on purpose"),
        "{said}"
    );
    let faulty = daemon
        .services()
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "faulty").cloned())
        .unwrap();
    assert_eq!(faulty["version"], "2.0.0");
    assert!(
        faulty["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("failed to stop when replaced")),
        "{faulty}"
    );
}
