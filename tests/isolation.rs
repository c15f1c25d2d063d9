//! Isolated services: a plugin file run in a worker process, and what only isolation can
//! survive (issue 17).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use host::{worker::Isolation, BadStatePolicy, Kernel, KernelConfig, Status};
use plugin_api::codes;

use crate::support::{self, echo_count, json, plugin_dir, Persisted, TestResult};

/// The host's own program, which workers run.
pub fn worker_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_microkernel"))
}

/// `services` isolated with `settings`.
pub fn isolating(services: &[&str], settings: &Isolation) -> BTreeMap<String, Isolation> {
    services
        .iter()
        .map(|s| ((*s).to_owned(), settings.clone()))
        .collect()
}

/// A persisting kernel running `plugins`, with `services` isolated.
fn isolated_kernel(
    persisted: &Persisted,
    plugins: &Path,
    services: &[&str],
    settings: &Isolation,
) -> (Kernel, host::reload::ScanReport) {
    persisted.kernel_with(plugins, isolated_config(persisted, services, settings))
}

/// A persisting kernel's configuration with `services` isolated.
fn isolated_config(persisted: &Persisted, services: &[&str], settings: &Isolation) -> KernelConfig {
    KernelConfig {
        isolation: isolating(services, settings),
        worker_program: Some(worker_program()),
        ..persisted.config(BadStatePolicy::Refuse)
    }
}

/// Restarts at once and without limit: for tests that crash a worker on purpose.
fn quick_restarts() -> Isolation {
    Isolation {
        max_restarts: 1_000_000,
        backoff: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
        ..Isolation::default()
    }
}

fn put(kernel: &Kernel, key: &str, value: u64) -> plugin_api::Reply {
    let payload = serde_json::json!({"op": "put", "key": key, "value": value}).to_string();
    kernel.request("kv", "request", payload.as_bytes(), None)
}

fn get(kernel: &Kernel, key: &str) -> plugin_api::Reply {
    let payload = serde_json::json!({"op": "get", "key": key}).to_string();
    kernel.request("kv", "request", payload.as_bytes(), None)
}

fn pid_of(kernel: &Kernel, service: &str) -> Option<u32> {
    kernel.info(service)?.process?.pid
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn an_isolated_service_runs_in_a_worker_process_and_the_host_never_opens_its_file() -> TestResult {
    let dir = plugin_dir(&["kv", "echo"]);
    let persisted = Persisted::new();
    let (kernel, report) = isolated_kernel(&persisted, dir.path(), &["kv"], &Isolation::default());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let info = kernel.info("kv").ok_or("kv is registered")?;
    assert_eq!(info.status, Status::Running);
    let pid = info.process.and_then(|p| p.pid).ok_or("kv has a worker")?;
    assert_ne!(pid, std::process::id());
    assert!(alive(pid));
    // echo runs in the host; kv's file was never opened here.
    assert!(kernel.info("echo").ok_or("echo")?.process.is_none());
    assert_eq!(
        kernel.stats().libraries_opened,
        1,
        "only echo is opened in the host"
    );
    assert!(!host::loader::is_mapped(Path::new("libkv.so"))?);
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    assert!(!maps.contains("libkv"), "kv is mapped in the host");

    assert_eq!(put(&kernel, "a", 1).code, codes::OK);
    assert_eq!(json(&get(&kernel, "a"))["value"], 1);
    drop(kernel);
    // Stopped with the kernel: its state was exported by the worker and saved here.
    assert!(!alive(pid), "the worker outlived its service");
    let (kernel, _) = isolated_kernel(&persisted, dir.path(), &["kv"], &Isolation::default());
    assert_eq!(json(&get(&kernel, "a"))["value"], 1);
    Ok(())
}

#[test]
fn a_segfault_in_an_isolated_request_costs_that_request_a_503_and_the_service_a_restart_from_its_checkpoint(
) -> TestResult {
    let dir = plugin_dir(&["fixture-faulty", "echo"]);
    let persisted = Persisted::new();
    let (kernel, report) =
        isolated_kernel(&persisted, dir.path(), &["faulty"], &Isolation::default());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for _ in 0..3 {
        assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    }
    // Three requests counted and checkpointed, one more counted after it.
    kernel.checkpoint();
    assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    let first = pid_of(&kernel, "faulty").ok_or("a worker")?;

    let crashed = kernel.request("faulty", "segv", b"", None);
    assert_eq!(crashed.code, codes::UNAVAILABLE, "{crashed:?}");
    assert!(crashed.message.contains("SIGSEGV"), "{}", crashed.message);
    assert!(
        crashed.message.contains("restarting"),
        "{}",
        crashed.message
    );

    // The next request is served by a new worker, from the checkpoint: the fourth count is
    // what the crash lost.
    let next = json(&kernel.request("faulty", "count", b"", None));
    assert_eq!(next["count"], 4, "{next}");
    let info = kernel.info("faulty").ok_or("faulty")?;
    let process = info.process.ok_or("isolated")?;
    assert_eq!((process.crashes, process.restarts), (1, 1));
    assert!(process
        .last_crash
        .as_deref()
        .unwrap_or("")
        .contains("SIGSEGV"));
    assert_ne!(process.pid, Some(first));
    assert!(!alive(first));
    assert_eq!(info.status, Status::Running);
    // The host and the other service never noticed.
    assert_eq!(kernel.request("echo", "echo", b"x", None).code, codes::OK);
    let metrics = kernel.metrics_text();
    assert!(
        metrics.contains("microkernel_worker_crashes_total{service=\"faulty\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("microkernel_worker_restarts_total{service=\"faulty\"} 1"));
    Ok(())
}

#[test]
fn an_isolated_hot_replace_keeps_the_state_and_leaves_no_worker_behind() -> TestResult {
    let dir = plugin_dir(&["echo"]);
    let persisted = Persisted::new();
    let (kernel, _) = isolated_kernel(&persisted, dir.path(), &["echo"], &Isolation::default());
    for _ in 0..5 {
        assert_eq!(kernel.request("echo", "echo", b"", None).code, codes::OK);
    }
    let old = pid_of(&kernel, "echo").ok_or("a worker")?;
    support::add_plugin(dir.path(), "echo-v2");
    let report = support::reloader_of(dir.path()).scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.replaced.len(), 1);
    let info = kernel.info("echo").ok_or("echo")?;
    assert_eq!(info.version, "2.0.0");
    assert!(!alive(old), "the old worker is gone");
    let reply = json(&kernel.request("echo", "echo", b"", None));
    assert_eq!(reply["count"], 6, "{reply}");
    assert_eq!(kernel.stats().libraries_opened, 0);
    Ok(())
}

#[test]
fn a_service_moves_between_modes_by_a_hot_replace_that_keeps_its_state() -> TestResult {
    let dir = plugin_dir(&["kv"]);
    let persisted = Persisted::new();
    let (kernel, _) = isolated_kernel(&persisted, dir.path(), &[], &Isolation::default());
    let mut reloader = support::reloader_of(dir.path());
    reloader.scan(&kernel, None);
    assert!(kernel.info("kv").ok_or("kv")?.process.is_none());
    assert_eq!(put(&kernel, "k", 7).code, codes::OK);

    kernel.set_isolation(isolating(&["kv"], &Isolation::default()))?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.replaced.len(), 1, "{report:?}");
    assert!(pid_of(&kernel, "kv").is_some(), "kv now runs in a worker");
    assert_eq!(json(&get(&kernel, "k"))["value"], 7);
    assert_eq!(put(&kernel, "k", 8).code, codes::OK);

    // New settings for the isolated service: applied by a replace too.
    let confined = Isolation {
        landlock: true,
        max_restarts: 1,
        ..Isolation::default()
    };
    kernel.set_isolation(isolating(&["kv"], &confined))?;
    let report = reloader.scan(&kernel, None);
    assert_eq!(report.replaced.len(), 1, "{report:?}");
    assert_eq!(kernel.isolation_in_effect("kv"), Some(confined));
    let process = kernel.info("kv").ok_or("kv")?.process.ok_or("isolated")?;
    assert!(process.confined.is_some(), "{process:?}");
    assert_eq!(json(&get(&kernel, "k"))["value"], 8);
    assert!(reloader.scan(&kernel, None).replaced.is_empty());

    kernel.set_isolation(BTreeMap::new())?;
    let report = reloader.scan(&kernel, None);
    assert_eq!(report.replaced.len(), 1, "{report:?}");
    assert!(kernel.info("kv").ok_or("kv")?.process.is_none());
    assert_eq!(json(&get(&kernel, "k"))["value"], 8);
    // Unchanged now: nothing more to do.
    let report = reloader.scan(&kernel, None);
    assert!(report.replaced.is_empty());
    Ok(())
}

/// A client that sends requests to `service` until told to stop; returns how many it sent
/// and the replies that failed.
struct Client {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<plugin_api::Reply>)>,
}

impl Client {
    fn start(kernel: &std::sync::Arc<Kernel>, service: &'static str) -> Client {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kernel, stopping) = (kernel.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut sent, mut failed) = (0, Vec::new());
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let payload: &[u8] = match service {
                    "kv" => br#"{"op":"len"}"#,
                    _ => b"ping",
                };
                let reply = kernel.request(service, "request", payload, None);
                sent += 1;
                if reply.code != codes::OK {
                    failed.push(reply);
                }
            }
            (sent, failed)
        });
        Client { stop, thread }
    }

    fn finish(self) -> (u64, Vec<plugin_api::Reply>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Each fault of plugin code in a request, isolated: only its own service pays (a `503`
/// and a restart from its checkpoint for those that end the worker), while another service
/// serves without one failed request and checkpoints, and the host keeps its threads and
/// descriptors.
#[test]
fn every_fault_of_an_isolated_request_costs_only_its_own_service() -> TestResult {
    // (kind, whether it ends the worker, what the reply's message names)
    let faults: &[(&str, bool, &str)] = &[
        ("segv", true, "SIGSEGV"),
        ("abort", true, "SIGABRT"),
        ("exit-3", true, "exited with status 3"),
        ("hang", true, "did not answer"),
        ("alloc-2g", true, "SIGABRT"),
        ("threads-1000", false, ""),
        ("leak-fds", false, ""),
    ];
    let dir = plugin_dir(&["fixture-faulty", "echo", "kv"]);
    let persisted = Persisted::new();
    let settings = Isolation {
        memory_max: Some(1 << 30),
        ..quick_restarts()
    };
    let config = KernelConfig {
        // A handler that hangs is killed after this.
        operation_timeout: Duration::from_secs(3),
        ..isolated_config(&persisted, &["faulty"], &settings)
    };
    let (kernel, report) = persisted.kernel_with(dir.path(), config);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let kernel = std::sync::Arc::new(kernel);
    let (threads, fds) = (host_threads(), descriptors());
    let client = Client::start(&kernel, "echo");
    let mut count = 0;
    for (round, (kind, ends, names)) in faults.iter().enumerate() {
        assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
        count += 1;
        kernel.checkpoint();
        let reply = kernel.request("faulty", kind, b"", Some(Duration::from_secs(30)));
        if *ends {
            assert_eq!(reply.code, codes::UNAVAILABLE, "{kind}: {reply:?}");
            assert!(reply.message.contains(names), "{kind}: {}", reply.message);
        } else {
            assert_eq!(reply.code, codes::OK, "{kind}: {reply:?}");
        }
        // Back, from the checkpoint taken before the fault.
        count += 1;
        let next = json(&kernel.request("faulty", "count", b"", None));
        assert_eq!(next["count"], count, "after {kind}: {next}");
        assert_eq!(put(&kernel, "round", round as u64).code, codes::OK);
        let checkpoints = kernel.checkpoint();
        assert!(
            checkpoints.iter().all(|(_, outcome)| outcome.is_ok()),
            "{kind}: {checkpoints:?}"
        );
    }
    let (sent, failed) = client.finish();
    assert!(sent > 0);
    assert!(
        failed.is_empty(),
        "echo failed {} of {sent}: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let process = kernel
        .info("faulty")
        .ok_or("faulty")?
        .process
        .ok_or("isolated")?;
    assert_eq!(process.crashes, 5, "{process:?}");
    assert_eq!(process.restarts, 5, "{process:?}");
    // The worker's 1000 threads and 1000 descriptors are not the host's (the margin is for
    // the tests that run beside this one in the same process).
    assert!(
        descriptors() < fds + 100,
        "{} descriptors, {fds} before",
        descriptors()
    );
    assert!(
        host_threads() < threads + 100,
        "{} threads, {threads} before",
        host_threads()
    );
    Ok(())
}

fn host_threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The operator's path: a configuration file isolates a service; `ctl list` shows its
/// worker; a worker killed from outside is restarted; SIGHUP moves the service back into
/// the host with its state; a bad file is refused at start-up and leaves a running host's
/// settings as they were.
#[test]
fn a_configuration_file_chooses_the_mode_and_sighup_moves_a_service_with_its_state() -> TestResult {
    use crate::cli::{microkernel, stderr, stdout, Daemon};
    let root = crate::cli::setup(&["echo", "kv"]);
    let config = root.path().join("host.toml");
    std::fs::write(
        &config,
        "checkpoint-interval = \"0\"\n[service.kv]\nisolate = true\nmax-restarts = 3\n",
    )?;
    let config_arg = config.to_str().ok_or("path")?;

    // --check prints the effective settings: the file's, and the command line's over them.
    let mut check_args = crate::cli::run_args(root.path());
    check_args.extend(["--config", config_arg, "--check", "--spin", "0s"].map(str::to_owned));
    let checked = microkernel(&check_args);
    assert!(checked.status.success(), "{}", stderr(&checked));
    let text = stdout(&checked);
    assert!(text.contains("checkpoint-interval = \"0s\""), "{text}");
    assert!(text.contains("spin = \"0s\""), "{text}");
    assert!(
        text.contains("[service.kv]\nisolate = true\nmax-restarts = 3"),
        "{text}"
    );

    let daemon = Daemon::start_with(root.path(), &["--config", config_arg]);
    let kv = |daemon: &Daemon| {
        daemon
            .services()
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == "kv").cloned())
            .unwrap_or_default()
    };
    assert_eq!(kv(&daemon)["mode"], "isolated", "{}", daemon.log());
    let pid = kv(&daemon)["worker"]["pid"]
        .as_u64()
        .ok_or("a worker pid")?;
    daemon.send("kv", r#"{"op":"put","key":"a","value":1}"#);
    assert!(daemon.ctl(&["checkpoint"]).status.success());
    daemon.send("kv", r#"{"op":"put","key":"b","value":2}"#);

    // Killed from outside: the next request is served by a new worker, from the checkpoint.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    // Dead, not only sent a signal: a request sent before it died would have been in flight
    // (a 503), which is another test's.
    while alive(pid as u32) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = daemon.ctl(&["send", "kv", r#"{"op":"get","key":"a"}"#]);
    assert!(after.status.success(), "{}", stderr(&after));
    let lost = daemon.ctl(&["send", "kv", r#"{"op":"get","key":"b"}"#]);
    assert!(
        stderr(&lost).contains("error 404"),
        "b was put after the checkpoint: {}",
        stderr(&lost)
    );
    let worker = kv(&daemon)["worker"].clone();
    assert_eq!(worker["restarts"], 1, "{worker}");
    assert!(
        worker["last_crash"]
            .as_str()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{worker}"
    );
    let table = stdout(&daemon.ctl(&["list"]));
    assert!(table.contains("isolated"), "{table}");
    assert!(
        table.contains("worker processes of isolated services"),
        "{table}"
    );
    daemon.send("kv", r#"{"op":"put","key":"c","value":3}"#);

    // A bad file on SIGHUP: said, and nothing changes.
    std::fs::write(&config, "[service.kv]\nisolate = true\nmax-restart = 3\n")?;
    let reload = daemon.ctl(&["reload"]);
    assert!(
        stdout(&reload).contains("max-restart") || stderr(&reload).contains("max-restart"),
        "{}{}",
        stdout(&reload),
        stderr(&reload)
    );
    assert_eq!(kv(&daemon)["mode"], "isolated");

    // A section that names no service (a typo) is said, and changes nothing.
    std::fs::write(
        &config,
        "checkpoint-interval = \"0\"\n[service.kv]\nisolate = true\nmax-restarts = 3\n[service.ehco]\nisolate = true\n",
    )?;
    let reload = daemon.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    assert!(
        stdout(&reload).contains("[service.ehco] names no service"),
        "{}",
        stdout(&reload)
    );
    assert_eq!(kv(&daemon)["mode"], "isolated");

    // Back into the host by SIGHUP, with the state the worker had.
    std::fs::write(&config, "checkpoint-interval = \"0\"\n")?;
    let pid_file = root.path().join("host.pid");
    let signalled = microkernel(&["reload", "--pid-file", pid_file.to_str().ok_or("path")?]);
    assert!(signalled.status.success(), "{}", stderr(&signalled));
    daemon.wait_for(|d| kv(d)["mode"] == "in-process", "kv to run in the host");
    assert_eq!(daemon.send("kv", r#"{"op":"get","key":"c"}"#)["value"], 3);
    assert!(daemon.terminate().success());

    // A bad file stops the host before it starts, naming the line and the key.
    std::fs::write(&config, "plugins = 3\n")?;
    let mut args = crate::cli::run_args(root.path());
    args.extend(["--config", config_arg].map(str::to_owned));
    let refused = microkernel(&args);
    assert_eq!(refused.status.code(), Some(2));
    let said = stderr(&refused);
    assert!(
        said.contains("line 1") && said.contains("plugins") && said.contains("host.toml"),
        "{said}"
    );
    Ok(())
}

/// Past the crash limit within its window, an isolated service stays failed: every request
/// gets a `503` saying so, `list` says it, and the host does not spin restarting it; a start
/// brings it back from its last checkpoint.
#[test]
fn a_worker_that_crashes_too_often_leaves_its_service_failed_until_it_is_started_again(
) -> TestResult {
    let dir = plugin_dir(&["fixture-faulty"]);
    let persisted = Persisted::new();
    let settings = Isolation {
        max_restarts: 2,
        backoff: Duration::from_millis(1),
        ..Isolation::default()
    };
    let (kernel, _) = isolated_kernel(&persisted, dir.path(), &["faulty"], &settings);
    assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    kernel.checkpoint();
    for crash in 1..=3 {
        let reply = kernel.request("faulty", "segv", b"", None);
        assert_eq!(reply.code, codes::UNAVAILABLE, "crash {crash}: {reply:?}");
    }
    let refused = kernel.request("faulty", "count", b"", None);
    assert_eq!(refused.code, codes::UNAVAILABLE);
    assert!(refused.message.contains("is failed"), "{}", refused.message);
    let info = kernel.info("faulty").ok_or("faulty")?;
    assert_eq!(info.status, Status::Failed);
    let process = info.process.ok_or("isolated")?;
    assert!(process.gave_up && process.pid.is_none(), "{process:?}");
    assert_eq!((process.crashes, process.restarts), (3, 2));
    // A rescan leaves it failed (only a start or another version brings it back).
    let mut reloader = support::reloader_of(dir.path());
    let report = reloader.scan(&kernel, None);
    assert!(report.restarted.is_empty(), "{report:?}");
    assert_eq!(
        kernel.info("faulty").ok_or("faulty")?.status,
        Status::Failed
    );
    // New settings are a new version of sorts: they bring it back, from its checkpoint.
    let settings = Isolation {
        max_restarts: 3,
        ..settings
    };
    kernel.set_isolation(isolating(&["faulty"], &settings))?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        kernel.info("faulty").ok_or("faulty")?.status,
        Status::Running
    );
    assert_eq!(
        json(&kernel.request("faulty", "count", b"", None))["count"],
        2
    );
    for crash in 1..=4 {
        let reply = kernel.request("faulty", "segv", b"", None);
        assert_eq!(reply.code, codes::UNAVAILABLE, "crash {crash}: {reply:?}");
    }
    assert_eq!(
        kernel.info("faulty").ok_or("faulty")?.status,
        Status::Failed
    );
    // Nothing to checkpoint, and a stop has nothing to export: no failure of either.
    let checkpoints = kernel.checkpoint();
    assert!(
        checkpoints.iter().all(|(service, _)| service != "faulty"),
        "{checkpoints:?}"
    );
    kernel.stop("faulty")?;

    kernel.start("faulty")?;
    assert_eq!(
        kernel.info("faulty").ok_or("faulty")?.status,
        Status::Running
    );
    assert_eq!(
        json(&kernel.request("faulty", "count", b"", None))["count"],
        2
    );
    // Stopped, it shows no process.
    kernel.stop("faulty")?;
    let process = kernel
        .info("faulty")
        .ok_or("faulty")?
        .process
        .ok_or("isolated")?;
    assert_eq!(process.pid, None, "{process:?}");
    Ok(())
}

/// The behaviour that does not depend on the mode, run again with every service of the
/// suite isolated: this very test binary, with `MICROKERNEL_TEST_MODE=isolated`, over the
/// modules that drive services, their state, reloads and operations. (Tests that hold
/// only in process end early there: `in_process_only!`.)
#[test]
fn the_behaviour_suite_passes_with_every_service_isolated() -> TestResult {
    if support::isolated_mode() {
        return Ok(());
    }
    let fixtures = support::fixture_dir();
    let output = std::process::Command::new(std::env::current_exe()?)
        .env("MICROKERNEL_TEST_MODE", "isolated")
        .env("MICROKERNEL_TEST_FIXTURES", fixtures)
        .args(["services::", "state::", "reload::", "operations::"])
        .args(["--test-threads", "2"])
        .output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    let failed: Vec<&str> = out
        .lines()
        .filter(|line| line.starts_with("test ") && line.ends_with("FAILED"))
        .collect();
    let tail = out.char_indices().rev().nth(8000).map_or(0, |(at, _)| at);
    assert!(
        output.status.success(),
        "isolated pass failed: {failed:?}\n{}",
        &out[tail..]
    );
    let passed = out
        .lines()
        .filter(|line| line.starts_with("test ") && line.ends_with(" ok"))
        .count();
    assert!(passed >= 60, "only {passed} tests ran isolated:\n{out}");
    Ok(())
}

/// Crashes of random kinds, one after another, in an isolated service while four clients
/// use the other services (in process): the others never fail a request, and the crashed
/// service always comes back, from its checkpoint. `MICROKERNEL_CRASHES` sets how many
/// (200 by default; the issue's figure, 1000, is in docs/RELIABILITY.md).
#[test]
fn crashes_of_random_kinds_under_four_clients_cost_the_other_services_nothing() -> TestResult {
    let crashes: u64 = std::env::var("MICROKERNEL_CRASHES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let dir = plugin_dir(&["fixture-faulty", "echo", "kv"]);
    let persisted = Persisted::new();
    let settings = Isolation {
        memory_max: Some(1 << 30),
        ..quick_restarts()
    };
    let config = KernelConfig {
        // A handler that hangs is killed after this: long enough that a worker's restart
        // (a process started, a library opened) never comes near it on a slow machine.
        operation_timeout: Duration::from_secs(2),
        ..isolated_config(&persisted, &["faulty"], &settings)
    };
    let (kernel, report) = persisted.kernel_with(dir.path(), config);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let kernel = std::sync::Arc::new(kernel);
    let clients: Vec<Client> = ["echo", "kv", "echo", "kv"]
        .iter()
        .map(|service| Client::start(&kernel, service))
        .collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut random = seed | 1;
    let mut next = move || {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random
    };
    let kinds = ["segv", "abort", "exit-3", "alloc-2g"];
    let mut by_kind = BTreeMap::<&str, u64>::new();
    for crash in 0..crashes {
        let kind = if next() % 50 == 0 {
            "hang"
        } else {
            kinds[(next() % kinds.len() as u64) as usize]
        };
        *by_kind.entry(kind).or_default() += 1;
        let reply = kernel.request("faulty", kind, b"", Some(Duration::from_secs(30)));
        assert_eq!(
            reply.code,
            codes::UNAVAILABLE,
            "crash {crash} ({kind}, seed {seed}): {reply:?}"
        );
        let back = kernel.request("faulty", "count", b"", Some(Duration::from_secs(30)));
        assert_eq!(
            back.code,
            codes::OK,
            "not back after crash {crash} ({kind}, seed {seed}): {back:?}"
        );
        if crash % 50 == 0 {
            // The others checkpoint meanwhile.
            let checkpoints = kernel.checkpoint();
            assert!(
                checkpoints.iter().all(|(_, outcome)| outcome.is_ok()),
                "{checkpoints:?}"
            );
        }
    }
    let mut served = 0;
    for client in clients {
        let (sent, failed) = client.finish();
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        served += sent;
    }
    let process = kernel
        .info("faulty")
        .ok_or("faulty")?
        .process
        .ok_or("isolated")?;
    assert_eq!(process.crashes, crashes, "{process:?}");
    assert_eq!(process.restarts, crashes, "{process:?}");
    eprintln!(
        "{crashes} crashes {by_kind:?} (seed {seed}); the other services served {served} requests, none failed"
    );
    Ok(())
}

/// Corrupt copies of a newer version of an isolated service, dropped in one by one as an
/// operator's half-finished copies arrive: whatever each does (refused by its worker, or
/// loaded and crashing at its first request), the host and its other services go on.
#[test]
fn corrupt_copies_of_an_isolated_plugin_cost_the_host_and_the_other_services_nothing() -> TestResult
{
    let dir = plugin_dir(&["echo", "kv"]);
    let persisted = Persisted::new();
    let settings = Isolation {
        max_restarts: 3,
        backoff: Duration::from_millis(1),
        ..Isolation::default()
    };
    let config = KernelConfig {
        operation_timeout: Duration::from_secs(2),
        ..isolated_config(&persisted, &["echo"], &settings)
    };
    let (kernel, _) = persisted.kernel_with(dir.path(), config);
    let mut reloader = support::reloader_of(dir.path());
    reloader.scan(&kernel, None);
    let original = std::fs::read(support::fixture("echo-v2"))?;
    let (mut refused, mut replaced, mut unavailable) = (0, 0, 0);
    for seed in 0..40 {
        std::fs::write(
            dir.path().join("libecho_v2.so"),
            crate::misbehaviour::corrupt(&original, seed, 8),
        )?;
        let report = reloader.scan_with(&kernel, None, true);
        refused += report.errors.len().min(1);
        replaced += report.replaced.len();
        let reply = kernel.request("echo", "echo", b"", Some(Duration::from_secs(10)));
        if reply.code == codes::UNAVAILABLE {
            unavailable += 1;
        }
        assert_eq!(
            put(&kernel, "seed", seed).code,
            codes::OK,
            "seed {seed}: kv failed"
        );
        // A version that loaded but crashes is left for the next copy to replace.
        if kernel
            .info("echo")
            .is_some_and(|i| i.status != Status::Running)
        {
            kernel.start("echo")?;
        }
    }
    eprintln!("40 corrupt copies: {refused} refused, {replaced} replaced, {unavailable} requests answered 503");
    assert!(refused > 0, "no copy was refused");
    assert_eq!(json(&get(&kernel, "seed"))["value"], 39);
    Ok(())
}

/// With `landlock`, an isolated service's worker reads its own file and the system's
/// libraries, and nothing else: not the state directory, not the key. `list` says what the
/// kernel enforced.
#[test]
fn a_confined_worker_cannot_read_the_state_directory() -> TestResult {
    let dir = plugin_dir(&["fixture-faulty"]);
    let persisted = Persisted::new();
    let secret = persisted.state_dir().join("secret");
    let read = |kernel: &Kernel| {
        kernel.request(
            "faulty",
            "read-file",
            secret.to_str().unwrap_or_default().as_bytes(),
            None,
        )
    };
    // Unconfined, the worker runs as the host's user and reads it.
    let (kernel, _) = isolated_kernel(&persisted, dir.path(), &["faulty"], &Isolation::default());
    std::fs::write(&secret, "not for plugins")?;
    assert_eq!(read(&kernel).code, codes::OK);
    let process = kernel
        .info("faulty")
        .ok_or("faulty")?
        .process
        .ok_or("isolated")?;
    assert_eq!(process.confined, None);
    drop(kernel);

    let confined = Isolation {
        landlock: true,
        ..Isolation::default()
    };
    let (kernel, report) = isolated_kernel(&persisted, dir.path(), &["faulty"], &confined);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let process = kernel
        .info("faulty")
        .ok_or("faulty")?
        .process
        .ok_or("isolated")?;
    let status = process.confined.ok_or("no confinement said")?;
    if status.contains("not enforced") {
        // Said plainly where the kernel has no Landlock; nothing more to check here.
        eprintln!("this kernel does not enforce Landlock: {status}");
        return Ok(());
    }
    let denied = read(&kernel);
    assert_eq!(denied.code, codes::FAILED, "{denied:?} ({status})");
    assert!(
        denied.message.contains("ermission denied"),
        "{}",
        denied.message
    );
    // Nor the host's environment, which any process of its user may read otherwise.
    let environ = format!("/proc/{}/environ", std::process::id());
    let denied = kernel.request("faulty", "read-file", environ.as_bytes(), None);
    assert_eq!(denied.code, codes::FAILED, "{denied:?} ({status})");
    // Its own entries, yes.
    let own = kernel.request("faulty", "read-file", b"/proc/self/status", None);
    assert_eq!(own.code, codes::OK, "{own:?}");
    // It still serves.
    assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    Ok(())
}

/// A worker dies with its host: a host killed with SIGKILL (no chance to stop anything)
/// leaves no worker behind.
#[test]
fn a_host_killed_outright_leaves_no_worker_behind() -> TestResult {
    use crate::cli::Daemon;
    let root = crate::cli::setup(&["kv"]);
    let config = root.path().join("host.toml");
    std::fs::write(&config, "[service.kv]\nisolate = true\n")?;
    // The key in the host's environment (it reads its key file first) never reaches a
    // worker.
    let key = root.path().join("key");
    let mut daemon = Daemon::start_with_env(
        root.path(),
        &["--config", config.to_str().ok_or("path")?],
        &[("MICROKERNEL_STATE_KEY", &key)],
    );
    let pid = daemon
        .services()
        .as_array()
        .and_then(|all| all.first().cloned())
        .and_then(|kv| kv["worker"]["pid"].as_u64())
        .ok_or("kv has a worker")?;
    assert!(alive(pid as u32));
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    assert!(
        !String::from_utf8_lossy(&environ).contains("MICROKERNEL_STATE_KEY"),
        "the worker has the key's variable"
    );
    daemon.child.kill()?;
    daemon.child.wait()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid as u32) {
        assert!(
            std::time::Instant::now() < deadline,
            "worker {pid} outlived its host"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A worker that dies while its service is idle is replaced at once, not at the next
/// request: `list` shows the new one, from the checkpoint.
#[test]
fn a_worker_that_dies_while_idle_is_restarted_without_waiting_for_a_request() -> TestResult {
    let dir = plugin_dir(&["fixture-faulty"]);
    let persisted = Persisted::new();
    let (kernel, _) = isolated_kernel(&persisted, dir.path(), &["faulty"], &Isolation::default());
    assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    kernel.checkpoint();
    let first = pid_of(&kernel, "faulty").ok_or("a worker")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let process = kernel
            .info("faulty")
            .and_then(|info| info.process)
            .ok_or("isolated")?;
        if process.restarts == 1 && process.pid.is_some_and(|pid| pid != first) {
            assert!(
                process
                    .last_crash
                    .as_deref()
                    .unwrap_or("")
                    .contains("SIGKILL"),
                "{process:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted: {process:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        json(&kernel.request("faulty", "count", b"", None))["count"],
        2
    );
    Ok(())
}

/// A restart's backoff holds back no operation: a checkpoint, a stop or a replace brings
/// the worker back at once instead of waiting behind the backoff (which only requests wait
/// for).
#[test]
fn a_restart_backoff_holds_back_no_checkpoint_and_no_stop() -> TestResult {
    let dir = plugin_dir(&["fixture-faulty"]);
    let persisted = Persisted::new();
    let slow = Isolation {
        backoff: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..Isolation::default()
    };
    let config = KernelConfig {
        operation_timeout: Duration::from_secs(5),
        ..isolated_config(&persisted, &["faulty"], &slow)
    };
    let (kernel, _) = persisted.kernel_with(dir.path(), config);
    assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    // The first crash restarts at once; the second waits a minute for its restart.
    for _ in 0..2 {
        let reply = kernel.request("faulty", "segv", b"", None);
        assert_eq!(reply.code, codes::UNAVAILABLE, "{reply:?}");
    }
    let checkpoints = kernel.checkpoint();
    assert!(
        checkpoints.iter().all(|(_, outcome)| outcome.is_ok()),
        "{checkpoints:?}"
    );
    kernel.stop("faulty")?;
    assert_eq!(
        kernel.info("faulty").ok_or("faulty")?.status,
        Status::Stopped
    );
    Ok(())
}

/// What `run` would refuse, `--check` refuses too; and a configuration file others can
/// write is refused, as a plugins directory is.
#[test]
fn check_refuses_what_run_would_and_a_file_others_can_write() -> TestResult {
    use crate::cli::{microkernel, stderr};
    use std::os::unix::fs::PermissionsExt;
    let root = crate::cli::setup(&["echo"]);
    let config = root.path().join("host.toml");
    let check = |text: &str| -> std::process::Output {
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut args = crate::cli::run_args(root.path());
        args.extend(["--config", config.to_str().unwrap(), "--check"].map(str::to_owned));
        microkernel(&args)
    };
    let refused = |text: &str, says: &str| {
        let output = check(text);
        assert_eq!(output.status.code(), Some(2), "{text}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(says),
            "{text}: {}",
            stderr(&output)
        );
    };
    assert!(check("").status.success());
    refused("no-state = true\n", "`no-state` and a key file");
    refused(
        "[service.echo]\nisolate = true\nrestart-backoff = \"20s\"\nrestart-backoff-max = \"5s\"\n",
        "longer than restart-backoff-max",
    );
    refused(
        "operation-timeout = \"10s\"\n[service.echo]\nisolate = true\nrestart-backoff-max = \"1m\"\n",
        "at most half of operation-timeout",
    );
    refused("log-level = \"bogus[[[\"\n", "not a log filter");
    // A typo'd level parses as a target name and would silence the log.
    refused("log-level = \"inof\"\n", "is not a level");
    // The file alone (no --plugins to win over it).
    let key = root.path().join("key");
    std::fs::write(
        &config,
        format!(
            "plugins = \"/nonexistent\"\nkey-file = {:?}\n",
            key.to_str().ok_or("path")?
        ),
    )?;
    let output = microkernel(&["run", "--config", config.to_str().ok_or("path")?, "--check"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("/nonexistent does not exist"),
        "{}",
        stderr(&output)
    );
    refused("[service.kernel]\nisolate = true\n", "the host's own");

    std::fs::write(&config, "")?;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666))?;
    let mut args = crate::cli::run_args(root.path());
    args.extend(["--config", config.to_str().ok_or("path")?, "--check"].map(str::to_owned));
    let output = microkernel(&args);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("configuration file"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// A new version whose worker is killed from outside before it opens the file (an
/// operator, the OOM killer) is not rejected: the replace rolls back, and the next rescan
/// tries the same file again.
#[test]
fn a_worker_killed_from_outside_during_a_replace_does_not_reject_the_file() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = plugin_dir(&["echo"]);
    let scratch = tempfile::tempdir()?;
    let flag = scratch.path().join("kill-workers");
    // The host's program, unless the flag is there: then every worker of an instance (not
    // the one that reads a file's manifest) is killed before it runs.
    let wrapper = scratch.path().join("worker.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *--service*) [ -e {flag:?} ] && kill -9 $$;; esac\nexec {:?} \"$@\"\n",
            worker_program()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let persisted = Persisted::new();
    let config = KernelConfig {
        isolation: isolating(&["echo"], &Isolation::default()),
        worker_program: Some(wrapper),
        ..persisted.config(BadStatePolicy::Refuse)
    };
    let (kernel, report) = persisted.kernel_with(dir.path(), config);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut reloader = support::reloader_of(dir.path());
    reloader.scan(&kernel, None);
    assert_eq!(kernel.request("echo", "echo", b"", None).code, codes::OK);

    std::fs::write(&flag, "")?;
    support::add_plugin(dir.path(), "echo-v2");
    let report = reloader.scan(&kernel, None);
    assert!(report.replaced.is_empty(), "{report:?}");
    let said: Vec<String> = report.errors.iter().map(|e| host::error_chain(e)).collect();
    assert!(
        said.iter().any(|e| e.contains("not the plugin's doing")),
        "{said:?}"
    );
    assert_eq!(kernel.info("echo").ok_or("echo")?.version, "1.0.0");

    std::fs::remove_file(&flag)?;
    let report = reloader.scan(&kernel, None);
    assert_eq!(report.replaced.len(), 1, "{report:?}");
    assert_eq!(kernel.info("echo").ok_or("echo")?.version, "2.0.0");
    assert_eq!(json(&kernel.request("echo", "echo", b"", None))["count"], 2);
    Ok(())
}

/// A request to an idle isolated service goes from its requester's thread to the worker (the
/// service's lane), not through the executor. A requester that stops waiting before the
/// worker answers gets a 504 at its own deadline; the worker, not killed, finishes that
/// request, and its late reply goes to no one: the next request gets its own.
#[test]
fn a_request_whose_requester_stops_waiting_leaves_its_late_reply_to_no_one() -> TestResult {
    let dir = plugin_dir(&["fixture-echo-faulty"]);
    let persisted = Persisted::new();
    let (kernel, report) =
        isolated_kernel(&persisted, dir.path(), &["echo"], &Isolation::default());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let pid = pid_of(&kernel, "echo").ok_or("a worker")?;
    let first = json(&kernel.request("echo", "echo", b"one", None));
    assert_eq!(first["count"], 1, "{first}");

    let gave_up = kernel.request("echo", "sleep", b"300", Some(Duration::from_millis(30)));
    assert_eq!(gave_up.code, codes::TIMEOUT, "{gave_up:?}");
    // Sent at once, while the worker still sleeps: answered after the late reply, with
    // its own.
    let next = kernel.request("echo", "echo", b"two", None);
    assert_eq!(next.code, codes::OK, "{next:?}");
    let next = json(&next);
    assert_eq!(
        (&next["echo"], &next["count"]),
        (&"two".into(), &2.into()),
        "{next}"
    );
    let process = kernel
        .info("echo")
        .ok_or("echo")?
        .process
        .ok_or("isolated")?;
    assert_eq!((process.pid, process.crashes), (Some(pid), 0));
    for n in 3..20 {
        assert_eq!(json(&kernel.request("echo", "echo", b"", None))["count"], n);
    }
    Ok(())
}

/// Events posted before a request are handled before it, in either mode: a request never
/// overtakes the mailbox through the lane.
#[test]
fn a_request_is_handled_after_every_event_posted_before_it() -> TestResult {
    let dir = plugin_dir(&["fixture-echo-faulty"]);
    let persisted = Persisted::new();
    for isolated in [&["echo"][..], &[]] {
        let (kernel, report) =
            isolated_kernel(&persisted, dir.path(), isolated, &Isolation::default());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let before = echo_count(&kernel);
        for round in 1..=20u64 {
            for _ in 0..50 {
                kernel.emit("echo", "count", b"")?;
            }
            let count = echo_count(&kernel);
            assert_eq!(
                count,
                before + round * 51,
                "isolated: {isolated:?}, round {round}"
            );
        }
        drop(kernel);
    }
    Ok(())
}

/// A stop, a checkpoint or a hot replace sent right behind a request that hangs in an
/// isolated service is done within the operation timeout: the worker is killed in time for
/// it (found by the adversarial pass: the stop was given up as stuck).
#[test]
fn an_operation_right_behind_a_hung_request_is_done_within_the_operation_timeout() -> TestResult {
    let dir = plugin_dir(&["fixture-faulty"]);
    let persisted = Persisted::new();
    let config = KernelConfig {
        operation_timeout: Duration::from_secs(5),
        ..isolated_config(&persisted, &["faulty"], &Isolation::default())
    };
    let (kernel, report) = persisted.kernel_with(dir.path(), config);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(kernel.request("faulty", "count", b"", None).code, codes::OK);
    kernel.checkpoint();
    let hung = kernel.request("faulty", "hang", b"", Some(Duration::from_millis(1)));
    assert_eq!(hung.code, codes::TIMEOUT);
    let checkpoint = kernel.checkpoint();
    assert!(
        checkpoint.iter().all(|(_, result)| result.is_ok()),
        "{checkpoint:?}"
    );
    let hung = kernel.request("faulty", "hang", b"", Some(Duration::from_millis(1)));
    assert_eq!(hung.code, codes::TIMEOUT);
    kernel.stop("faulty")?;
    assert_eq!(
        kernel.info("faulty").ok_or("faulty")?.status,
        Status::Stopped
    );
    kernel.start("faulty")?;
    assert_eq!(
        json(&kernel.request("faulty", "count", b"", None))["count"],
        2
    );
    Ok(())
}
