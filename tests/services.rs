//! Services at work: dependency order, requests through the kernel, failures of plugins.

use std::{fs, time::Duration};

use host::{Kernel, KernelConfig, KernelError, Status};
use plugin_api::codes;

use crate::support::*;

/// A kernel running the given packages, loaded from a plugins directory like the daemon does.
fn running(packages: &[&str], conf: &[(&str, &str)]) -> (Kernel, tempfile::TempDir) {
    let kernel = kernel();
    let dir = plugin_dir(packages);
    for (service, text) in conf {
        fs::write(dir.path().join(format!("{service}.conf")), text).unwrap();
    }
    let report = reloader_of(dir.path()).scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    (kernel, dir)
}

#[test]
fn plugins_start_in_dependency_order_and_answer_through_the_kernel() -> TestResult {
    let (kernel, _dir) = running(&["logger", "kv", "echo"], &[]);
    let names: Vec<(String, Status)> = kernel
        .list()
        .into_iter()
        .map(|i| (i.name, i.status))
        .collect();
    assert_eq!(
        names,
        [
            ("echo".into(), Status::Running),
            ("kv".into(), Status::Running),
            ("logger".into(), Status::Running)
        ]
    );
    // logger's start asked echo once: echo was running before logger started.
    let reply = json(&kernel.request("echo", "echo", b"hi", None));
    assert_eq!(reply["count"], 2);
    assert_eq!(reply["echo"], "hi");
    assert_eq!(reply["version"], "1.0.0");

    let put = kernel.request(
        "kv",
        "put",
        br#"{"op":"put","key":"a","value":[1,2]}"#,
        None,
    );
    assert_eq!(json(&put)["previous"], serde_json::Value::Null);
    let get = kernel.request("kv", "get", br#"{"op":"get","key":"a"}"#, None);
    assert_eq!(json(&get)["value"], serde_json::json!([1, 2]));
    let missing = kernel.request("kv", "get", br#"{"op":"get","key":"zz"}"#, None);
    assert_eq!(missing.code, codes::NOT_FOUND);
    // A bad request is told what was wrong in words, not in Rust's debug notation; a
    // payload that is not JSON is a bad request too (`request.json()?` in the plugin).
    for (payload, said) in [
        (&b"not json"[..], "is not the expected JSON"),
        (br#"{"op":"nope"}"#, "unknown op `nope`"),
        (br#"{"key":"a"}"#, "no string `op`"),
    ] {
        let bad = kernel.request("kv", "x", payload, None);
        assert_eq!(bad.code, codes::BAD_REQUEST);
        assert!(
            bad.message.contains(said) && !bad.message.contains("Some("),
            "{}",
            bad.message
        );
    }

    let logged = kernel.request("logger", "log", b"a line", None);
    assert_eq!(json(&logged)["logged"], 1);

    let pong = kernel.request("kernel", "ping", b"", None);
    assert_eq!(json(&pong)["pong"], true);
    let list = json(&kernel.request("kernel", "list", b"", None));
    assert_eq!(list.as_array().map(Vec::len), Some(3));
    Ok(())
}

#[test]
fn stopping_a_dependency_stops_its_dependents_first_and_restart_needs_it() -> TestResult {
    let (kernel, _dir) = running(&["logger", "echo"], &[]);
    kernel.stop("echo")?;
    assert_eq!(kernel.info("logger").unwrap().status, Status::Stopped);
    assert_eq!(kernel.info("echo").unwrap().status, Status::Stopped);
    assert_eq!(
        kernel.request("echo", "echo", b"", None).code,
        codes::NOT_FOUND
    );

    let error = kernel.start("logger").unwrap_err();
    assert!(
        matches!(&error, KernelError::DependencyNotRunning { service, dependency } if service == "logger" && dependency == "echo"),
        "{error}"
    );
    kernel.start("echo")?;
    kernel.start("logger")?;
    assert_eq!(kernel.info("logger").unwrap().status, Status::Running);
    Ok(())
}

#[test]
fn stop_all_stops_in_reverse_dependency_order() -> TestResult {
    let (kernel, _dir) = running(&["logger", "echo", "kv"], &[]);
    let report = kernel.stop_all();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.stopped, ["logger", "kv", "echo"]);
    assert!(kernel.list().iter().all(|i| i.status == Status::Stopped));
    Ok(())
}

#[test]
fn a_panic_in_handle_is_a_500_and_the_service_keeps_serving() -> TestResult {
    let (kernel, _dir) = running(&["fixture-echo-faulty"], &[]);
    let reply = kernel.request("echo", "panic", b"", None);
    assert_eq!(reply.code, codes::FAILED);
    assert!(
        reply.message.contains("handle panicked on purpose"),
        "{reply}"
    );
    let failed = kernel.request("echo", "fail", b"", None);
    assert_eq!(failed.code, codes::FAILED);
    assert_eq!(
        json(&kernel.request("echo", "echo", b"still here", None))["count"],
        1
    );
    assert_eq!(kernel.info("echo").unwrap().status, Status::Running);
    Ok(())
}

#[test]
fn a_slow_service_gives_its_caller_a_408() -> TestResult {
    let (kernel, _dir) = running(&["fixture-echo-faulty"], &[]);
    let reply = kernel.request("echo", "sleep", b"300", Some(Duration::from_millis(30)));
    assert_eq!(reply.code, codes::TIMEOUT, "{reply}");
    // The service itself is fine: the next request is served once the sleep is over.
    assert!(kernel.request("echo", "echo", b"", None).is_ok());
    Ok(())
}

#[test]
fn an_unknown_service_gives_a_404() -> TestResult {
    let (kernel, _dir) = running(&["echo"], &[]);
    let reply = kernel.request("nope", "echo", b"", None);
    assert_eq!(reply.code, codes::NOT_FOUND);
    assert!(reply.message.contains("`nope`"), "{reply}");
    Ok(())
}

#[test]
fn a_call_loop_is_answered_508_at_once() -> TestResult {
    let (kernel, _dir) = running(&["fixture-relay", "echo"], &[]);
    // relay -> echo is a chain, not a loop.
    let via = kernel.request(
        "relay",
        "go",
        br#"{"to":"echo","payload":"through relay"}"#,
        None,
    );
    assert_eq!(json(&via)["echo"], "through relay");
    // relay -> relay would wait on itself.
    let looped = kernel.request(
        "relay",
        "go",
        br#"{"to":"relay","payload":{"to":"echo"}}"#,
        Some(Duration::from_secs(30)),
    );
    assert_eq!(looped.code, codes::LOOP, "{looped}");
    assert!(looped.message.contains("relay -> relay"), "{looped}");
    Ok(())
}

#[test]
fn a_line_logged_by_a_plugin_reaches_the_subscriber_with_the_service_name() -> TestResult {
    let (kernel, _dir) = running(&["fixture-echo-faulty"], &[]);
    let marker = token("plugin-log");
    assert!(kernel
        .request("echo", "log", marker.as_bytes(), None)
        .is_ok());
    let lines = logged(|l| l.message == marker);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0].service.as_deref(), Some("echo"));
    assert_eq!(lines[0].target, "plugin");
    assert_eq!(lines[0].level, tracing::Level::INFO);
    Ok(())
}

#[test]
fn a_panic_in_start_leaves_the_service_failed_with_the_message() -> TestResult {
    let kernel = kernel();
    let dir = plugin_dir(&["fixture-echo-faulty", "kv"]);
    fs::write(dir.path().join("echo.conf"), r#"{"start":"panic"}"#)?;
    let report = reloader_of(dir.path()).scan(&kernel, None);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let info = kernel.info("echo").unwrap();
    assert_eq!(info.status, Status::Failed);
    assert!(info
        .last_error
        .unwrap()
        .contains("start panicked on purpose"));
    assert_eq!(kernel.info("kv").unwrap().status, Status::Running);
    assert_eq!(
        kernel.request("echo", "echo", b"", None).code,
        codes::NOT_FOUND
    );
    Ok(())
}

#[test]
fn a_full_mailbox_makes_requesters_wait_and_emitters_fail() -> TestResult {
    let kernel = Kernel::new(KernelConfig {
        mailbox_capacity: 1,
        ..Default::default()
    })?;
    load_into(&kernel, &fixture("fixture-echo-faulty"), None)?;
    assert!(kernel.start_all().is_empty());
    {
        // Keeps the executor busy...
        let busy = busy_for(&kernel, "echo", 2000);
        wait_until_busy(&kernel, "echo");
        // ...so the one slot of the mailbox fills up (it may hold the probe already)...
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let refused = loop {
            match kernel.emit("echo", "tick", b"") {
                Ok(()) => assert!(
                    std::time::Instant::now() < deadline,
                    "the mailbox never filled"
                ),
                Err(refused) => break refused,
            }
        };
        // ...so an event is refused, and a request waits, then times out.
        assert!(refused.contains("full"), "{refused}");
        let waited = kernel.request("echo", "echo", b"", Some(Duration::from_millis(50)));
        assert_eq!(waited.code, codes::TIMEOUT, "{waited}");
        assert!(busy.join().unwrap().is_ok());
    }
    // Once drained, everything flows again.
    assert!(kernel.request("echo", "echo", b"", None).is_ok());
    Ok(())
}

#[test]
fn a_service_stuck_in_plugin_code_is_reported_at_stop_and_restartable_once_free() -> TestResult {
    let kernel = Kernel::new(KernelConfig {
        operation_timeout: Duration::from_millis(100),
        ..Default::default()
    })?;
    load_into(&kernel, &fixture("fixture-echo-faulty"), None)?;
    assert!(kernel.start_all().is_empty());
    {
        let _sleeper = busy_for(&kernel, "echo", 2000);
        wait_until_busy(&kernel, "echo");
        let error = kernel.stop("echo").unwrap_err();
        assert!(
            matches!(
                &error,
                KernelError::Stuck {
                    call: host::Call::Handle,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(kernel.info("echo").unwrap().status, Status::Failed);
        let refused = kernel.start("echo").unwrap_err();
        assert!(matches!(&refused, KernelError::Stuck { .. }), "{refused}");
    }
    // The sleep is over and the old instance stops by itself: then a fresh start works.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(error) = kernel.start("echo") {
        assert!(std::time::Instant::now() < deadline, "{error}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(json(&kernel.request("echo", "echo", b"", None))["count"], 1);
    Ok(())
}
