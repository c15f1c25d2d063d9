//! The `microkernel` binary as an operator uses it: daemon, signals, control socket, keys.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::support::*;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_microkernel");

pub(crate) fn microkernel<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MICROKERNEL_STATE_KEY")
        .env_remove("RUST_LOG")
        .output()
        .expect("microkernel runs")
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `inspect-state` of a service's state file under a test's root directory, with its key.
pub(crate) fn inspect(root: &Path, service: &str, extra: &[&str]) -> Output {
    let key = root.join("key");
    let file = root.join(format!("state/{service}.state"));
    let mut args = vec![
        "inspect-state",
        "--key-file",
        key.to_str().unwrap(),
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    microkernel(&args)
}

/// `run` with the plugins, state directory and key of a test's root directory.
pub(crate) fn run_args(root: &Path) -> Vec<String> {
    let p = |name: &str| root.join(name).to_string_lossy().into_owned();
    [
        "run",
        "--plugins",
        &p("plugins"),
        "--state-dir",
        &p("state"),
        "--key-file",
        &p("key"),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A host running as a child process, in its own directory.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) root: PathBuf,
}

impl Daemon {
    pub(crate) fn start(root: &Path) -> Daemon {
        Daemon::start_with(root, &[])
    }

    pub(crate) fn start_with(root: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(root, extra, &[])
    }

    /// Started with `extra` arguments and `env` variables (and no `NOTIFY_SOCKET` of the
    /// test's own environment).
    pub(crate) fn start_with_env(root: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let pid_file = root.join("host.pid").to_string_lossy().into_owned();
        let mut command = Command::new(BIN);
        command
            .args(run_args(root))
            .args(["--pid-file", &pid_file])
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied());
        Daemon::spawn(root, command)
    }

    /// Started through `wrapper`, a program (with its arguments) that runs the host binary
    /// named after them: `prlimit --nofile=128`, the dynamic loader.
    pub(crate) fn start_through(root: &Path, wrapper: &[&str]) -> Daemon {
        let mut command = Command::new(wrapper[0]);
        command
            .args(&wrapper[1..])
            .arg(BIN)
            .args(run_args(root))
            .env_remove("NOTIFY_SOCKET");
        Daemon::spawn(root, command)
    }

    /// Runs `command` (a host, with its arguments) with its log in `root/host.log`, and
    /// waits until its control socket answers.
    fn spawn(root: &Path, mut command: Command) -> Daemon {
        let log = fs::File::create(root.join("host.log")).unwrap();
        let child = command
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            root: root.to_owned(),
        };
        daemon.wait_for(
            |d| d.ctl(&["list"]).status.success(),
            "the control socket to answer",
        );
        daemon
    }

    pub(crate) fn ctl(&self, args: &[&str]) -> Output {
        let socket = self.root.join("state/control.sock");
        let mut all = vec!["ctl", "--socket", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        microkernel(&all)
    }

    pub(crate) fn send(&self, service: &str, payload: &str) -> serde_json::Value {
        let output = self.ctl(&["send", service, payload]);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    pub(crate) fn services(&self) -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&self.ctl(&["list", "--json"]).stdout)
            .map(|list| list["services"].clone())
            .unwrap_or_default()
    }

    pub(crate) fn wait_for(&self, done: impl Fn(&Daemon) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; host log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.root.join("host.log")).unwrap_or_default()
    }

    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn setup(packages: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("plugins")).unwrap();
    for package in packages {
        add_plugin(&root.path().join("plugins"), package);
    }
    let key = root.path().join("key");
    let output = microkernel(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    root
}

#[test]
fn the_daemon_tells_its_service_manager_when_it_is_ready_reloading_and_stopping() -> TestResult {
    let root = setup(&["echo"]);
    // What systemd does for a `Type=notify` unit: a datagram socket named in NOTIFY_SOCKET.
    let socket = root.path().join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&socket)?;
    manager.set_read_timeout(Some(Duration::from_secs(20)))?;
    let next = || -> String {
        let mut buffer = vec![0; 4096];
        let n = manager
            .recv(&mut buffer)
            .expect("a notification within 20 s");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let says = |message: &str, line: &str| message.lines().any(|l| l == line);
    let daemon = Daemon::start_with_env(root.path(), &[], &[("NOTIFY_SOCKET", &socket)]);

    let ready = next();
    assert!(says(&ready, "READY=1"), "{ready}");
    assert!(says(&ready, "STATUS=1 of 1 services running"), "{ready}");
    // Ready means serving.
    assert_eq!(daemon.send("echo", "hi")["echo"], "hi");

    // A rescan is bracketed: RELOADING=1 with the monotonic time, then READY=1.
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    let reloading = next();
    assert!(says(&reloading, "RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|us| us.parse::<u64>().is_ok_and(|us| us > 0))),
        "{reloading}"
    );
    assert!(says(&next(), "READY=1"));

    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    let stopping = next();
    assert!(says(&stopping, "STOPPING=1"), "{stopping}");
    Ok(())
}

#[test]
fn a_service_manager_that_does_not_read_its_socket_never_holds_back_a_reload_or_a_stop(
) -> TestResult {
    let root = setup(&["echo"]);
    let socket = root.path().join("notify.sock");
    // Bound, never read: its queue fills after a few notifications.
    let _deaf = std::os::unix::net::UnixDatagram::bind(&socket)?;
    let daemon = Daemon::start_with_env(root.path(), &[], &[("NOTIFY_SOCKET", &socket)]);
    for round in 0..20 {
        let reload = daemon.ctl(&["reload", "--wait", "10s"]);
        assert!(
            reload.status.success(),
            "reload {round}: {}",
            stderr(&reload)
        );
    }
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn metrics_are_served_to_a_prometheus_scrape() -> TestResult {
    let root = setup(&["echo", "kv"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with(root.path(), &["--metrics-listen", &addr]);
    for _ in 0..3 {
        daemon.send("echo", "hi");
    }
    let bad = daemon.ctl(&["send", "kv", r#"{"op":"nope"}"#]);
    assert!(!bad.status.success());
    // A hot replace, and a file that does not load.
    add_plugin(&root.path().join("plugins"), "echo-v2");
    fs::write(root.path().join("plugins/libbroken.so"), b"not a plugin")?;
    let _ = daemon.ctl(&["reload"]);
    assert!(daemon.ctl(&["checkpoint"]).status.success());

    let scrape = ureq::get(&format!("http://{addr}/metrics")).call()?;
    assert_eq!(scrape.status(), 200);
    let kind = scrape.header("Content-Type").unwrap_or_default().to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = scrape.into_string()?;
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        value(r#"microkernel_replies_total{service="echo",code="0"}"#),
        3.0
    );
    assert_eq!(
        value(r#"microkernel_replies_total{service="kv",code="400"}"#),
        1.0
    );
    assert_eq!(
        value(r#"microkernel_request_duration_seconds_count{service="echo"}"#),
        3.0
    );
    assert_eq!(value(r#"microkernel_swaps_total{service="echo"}"#), 1.0);
    assert!(value(r#"microkernel_swap_held_seconds{service="echo"}"#) > 0.0);
    assert_eq!(value(r#"microkernel_mailbox_depth{service="kv"}"#), 0.0);
    assert!(value(r#"microkernel_checkpoints_total{outcome="written"}"#) >= 1.0);
    assert!(value("microkernel_state_written_bytes_total") > 0.0);
    assert!(value("microkernel_plugin_load_failures_total") >= 1.0);
    // Its log reader keeps up: nothing dropped.
    assert_eq!(value("microkernel_log_lines_dropped_total"), 0.0);
    assert!(text.ends_with("# EOF\n"), "{text}");
    // Anything but /metrics is a 404.
    match ureq::get(&format!("http://{addr}/")).call() {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("{other:?}"),
    }

    // Clients that connect and send nothing take no descriptor of the host's (they wait in
    // the listen backlog) and no thread; the host serves on.
    let descriptors = || {
        fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
            .unwrap()
            .count()
    };
    let before = descriptors();
    let idle: Vec<_> = (0..50)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        descriptors() <= before + 2,
        "{} descriptors, {before} before",
        descriptors()
    );
    assert!(daemon.ctl(&["checkpoint"]).status.success());
    drop(idle);
    Ok(())
}

#[test]
fn a_metrics_address_that_cannot_be_bound_stops_the_host_before_it_starts() -> TestResult {
    let root = setup(&["echo"]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let mut args = run_args(root.path());
    args.extend(["--metrics-listen".to_owned(), addr.clone()]);
    let run = microkernel(&args);
    assert!(!run.status.success());
    let err = stderr(&run);
    assert!(
        err.contains(&format!("binding the metrics address {addr}")),
        "{err}"
    );
    Ok(())
}

#[test]
fn ctl_takes_its_options_after_the_command_and_answers_about_what_was_asked() -> TestResult {
    let root = setup(&["echo", "kv"]);
    let daemon = Daemon::start(root.path());
    let state = root.path().join("state");
    let state = state.to_str().unwrap();
    // --state-dir (and --wait) before the command or after it.
    for args in [
        vec!["ctl", "--state-dir", state, "list"],
        vec!["ctl", "list", "--state-dir", state, "--wait", "10s"],
    ] {
        let list = microkernel(&args);
        assert!(list.status.success(), "{args:?}: {}", stderr(&list));
        assert!(stdout(&list).contains("echo"), "{}", stdout(&list));
    }
    let zero = microkernel(&["ctl", "list", "--state-dir", state, "--wait", "0s"]);
    assert!(
        stderr(&zero).contains("a wait must be longer than 0"),
        "{}",
        stderr(&zero)
    );
    // ctl's --state-dir is the host's to talk to, not one it creates.
    let help = microkernel(&["ctl", "--help"]);
    assert!(!stdout(&help).contains("mode 0700"), "{}", stdout(&help));

    // `ctl send kernel list` does what it reads like.
    let kernel = microkernel(&["ctl", "send", "kernel", "list", "--state-dir", state]);
    assert!(kernel.status.success(), "{}", stderr(&kernel));
    let services: serde_json::Value = serde_json::from_slice(&kernel.stdout)?;
    assert!(
        services
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "echo")),
        "{services}"
    );

    // A reload of one service answers about that service; a full one about the directory.
    let one = daemon.ctl(&["reload", "echo"]);
    assert!(one.status.success(), "{}", stderr(&one));
    assert!(
        stdout(&one).contains("echo unchanged: 1.0.0 running from"),
        "{}",
        stdout(&one)
    );
    let all = daemon.ctl(&["reload"]);
    assert!(
        stdout(&all).contains("2 files unchanged"),
        "{}",
        stdout(&all)
    );
    Ok(())
}

#[test]
fn the_daemon_serves_hot_replaces_on_sighup_and_stops_cleanly_with_its_state() -> TestResult {
    let root = setup(&["echo", "logger", "kv"]);
    let daemon = Daemon::start(root.path());
    assert_eq!(daemon.services().as_array().map(Vec::len), Some(3));
    assert_eq!(daemon.send("echo", "hi")["count"], 2);

    let missing = daemon.ctl(&["send", "nope", "x"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("error 404"),
        "{}",
        stderr(&missing)
    );

    add_plugin(&root.path().join("plugins"), "echo-v2");
    let pid_file = root.path().join("host.pid");
    let reload = microkernel(&["reload", "--pid-file", pid_file.to_str().unwrap()]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    daemon.wait_for(|d| d.services()[0]["version"] == "2.0.0", "echo 2.0.0");
    let reply = daemon.send("echo", "after");
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("2.0.0"), Some(3))
    );
    assert_eq!(daemon.services()[0]["swaps"], 1);

    let checkpoint = daemon.ctl(&["checkpoint"]);
    assert!(
        stdout(&checkpoint).contains("echo: written"),
        "{}",
        stdout(&checkpoint)
    );
    let inspected = inspect(root.path(), "echo", &["--json"]);
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    let inspected: serde_json::Value = serde_json::from_slice(&inspected.stdout)?;
    assert_eq!(inspected["header"]["service"], "echo");
    assert_eq!(inspected["header"]["exported_by"], "2.0.0");
    assert_eq!(inspected["content"]["requests"], 3);
    let text = inspect(root.path(), "echo", &[]);
    assert!(
        stdout(&text).contains("\"requests\": 3"),
        "{}",
        stdout(&text)
    );

    let status = daemon.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!pid_file.exists(), "the PID file is removed at exit");
    assert!(!root.path().join("state/control.sock").exists());
    for service in ["echo", "logger", "kv"] {
        assert!(
            root.path().join(format!("state/{service}.state")).exists(),
            "{service} saved"
        );
    }

    // A restarted host picks up where the first left off: v2 (the highest version) with its
    // count, plus the restarted logger's greeting.
    let daemon = Daemon::start(root.path());
    let reply = daemon.send("echo", "again");
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("2.0.0"), Some(5))
    );
    assert!(daemon.terminate().success());
    Ok(())
}

#[test]
fn ctl_stops_and_starts_services_with_their_dependents() -> TestResult {
    let root = setup(&["echo", "logger"]);
    let daemon = Daemon::start_with(root.path(), &["--log-format", "json"]);
    let stop = daemon.ctl(&["stop", "echo"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    let services = daemon.services();
    assert_eq!(services[0]["status"], "stopped");
    assert_eq!(services[1]["status"], "stopped");
    let refused = daemon.ctl(&["start", "logger"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stdout(&refused).contains("depends on `echo`, which is not running"),
        "{}",
        stdout(&refused)
    );
    assert!(daemon.ctl(&["start", "echo"]).status.success());
    assert!(daemon.ctl(&["start", "logger"]).status.success());
    let table = stdout(&daemon.ctl(&["list"]));
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(
        table.contains("logger") && table.contains("running"),
        "{table}"
    );
    assert!(daemon.terminate().success());

    // Every log line is JSON; the plugins' lines carry their service.
    let log = fs::read_to_string(root.path().join("host.log"))?;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == "plugin" && l["fields"]["service"] == "logger"),
        "{log}"
    );
    Ok(())
}

#[test]
fn run_refuses_a_key_file_others_can_read_and_says_how_to_fix_it() -> TestResult {
    let root = setup(&["echo"]);
    let key = root.path().join("key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
    let plugins = root.path().join("plugins");
    let output = microkernel(&[
        "run",
        "--plugins",
        plugins.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("chmod 600"), "{}", stderr(&output));
    Ok(())
}

#[test]
fn run_without_a_key_says_where_to_get_one() -> TestResult {
    let root = setup(&["echo"]);
    let plugins = root.path().join("plugins");
    let output = microkernel(&["run", "--plugins", plugins.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("MICROKERNEL_STATE_KEY") && message.contains("keygen"),
        "{message}"
    );
    Ok(())
}

#[test]
fn keygen_never_overwrites_a_key() -> TestResult {
    let root = setup(&[]);
    let key = root.path().join("key");
    let before = fs::read(&key)?;
    let output = microkernel(&["keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("refusing to overwrite"),
        "{}",
        stderr(&output)
    );
    assert_eq!(fs::read(&key)?, before);
    Ok(())
}

#[test]
fn a_second_host_on_the_same_state_directory_is_refused() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start(root.path());
    let args = run_args(root.path());
    let second = microkernel(&args);
    assert_eq!(second.status.code(), Some(2));
    assert!(
        stderr(&second).contains("in use by another host"),
        "{}",
        stderr(&second)
    );
    assert_eq!(daemon.send("echo", "still")["count"], 1);
    assert!(daemon.terminate().success());
    Ok(())
}

#[test]
fn with_watch_a_new_plugin_file_is_picked_up_without_a_signal() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start_with(root.path(), &["--watch"]);
    assert_eq!(daemon.send("echo", "one")["count"], 1);
    add_plugin(&root.path().join("plugins"), "echo-v2");
    daemon.wait_for(
        |d| d.services()[0]["version"] == "2.0.0",
        "the watcher to replace echo",
    );
    assert_eq!(daemon.send("echo", "two")["count"], 2);
    assert!(daemon.terminate().success());
    Ok(())
}

#[test]
fn a_running_host_checkpoints_state_that_changed() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start_with(root.path(), &["--checkpoint-interval", "100ms"]);
    let state = root.path().join("state/echo.state");
    daemon.send("echo", "one");
    // A checkpoint may have saved the state from before the request (count 0): the one
    // after it saves count 1.
    let count = || {
        serde_json::from_slice::<serde_json::Value>(
            &inspect(root.path(), "echo", &["--json"]).stdout,
        )
        .map(|inspected| inspected["content"]["count"].clone())
        .unwrap_or_default()
    };
    daemon.wait_for(
        |_| state.exists() && count() == 1,
        "a checkpoint of echo's count 1",
    );
    assert!(daemon.terminate().success());
    Ok(())
}

#[test]
fn a_control_socket_that_cannot_be_bound_stops_the_host_before_any_service_starts() -> TestResult {
    let root = setup(&["echo"]);
    let mut args = run_args(root.path());
    let socket = root.path().join("no/such/dir/control.sock");
    args.extend(["--socket".to_owned(), socket.to_string_lossy().into_owned()]);
    let output = microkernel(&args);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("binding control socket"),
        "{}",
        stderr(&output)
    );
    assert!(
        !stderr(&output).contains("running service=echo"),
        "{}",
        stderr(&output)
    );
    assert!(!root.path().join("state/echo.state").exists());
    Ok(())
}

/// The dynamic loader, run as a program: the host then runs as valgrind or an emulator
/// would run it, with `/proc/self/exe` naming another program than the host.
const DYNAMIC_LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

#[test]
fn a_host_whose_argv0_names_another_program_still_probes_with_itself() -> TestResult {
    let root = setup(&["echo"]);
    // `exec -a /bin/true`: whoever starts the host chooses argv[0]; it must not choose the
    // probe (with /bin/true as the probe, nothing would ever load; with a fake one, the host
    // would open files no probe checked).
    let daemon = Daemon::start_through(
        root.path(),
        &["bash", "-c", r#"exec -a /bin/true "$0" "$@""#],
    );
    assert_eq!(daemon.send("echo", "{}")["count"], 1, "{}", daemon.log());
    assert_eq!(daemon.terminate().code(), Some(0));
    Ok(())
}

#[test]
fn a_host_run_through_a_loader_of_its_own_probes_with_itself_not_the_loader() -> TestResult {
    let root = setup(&["echo"]);
    let daemon = Daemon::start_through(root.path(), &[DYNAMIC_LOADER]);
    assert_eq!(daemon.send("echo", "{}")["count"], 1, "{}", daemon.log());
    assert_eq!(daemon.terminate().code(), Some(0));
    Ok(())
}
