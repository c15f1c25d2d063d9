//! Hot replace: no request lost, state migrated, rollback at every failing step, rescans.

use std::{
    fs,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use host::{
    kernel::SwapError,
    loader::LoadError,
    reload::{ReloadError, Reloader},
    Call, InstanceError, KernelError, Status,
};

use crate::support::*;

/// echo 1.x running from a plugins directory of its own, persisting with `persisted`, and
/// the reloader of that directory (which has seen it).
fn echo_v1(persisted: &Persisted) -> (host::Kernel, tempfile::TempDir, Reloader) {
    let plugins = plugin_dir(&["echo"]);
    let (kernel, _) = persisted.kernel(plugins.path());
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    (kernel, plugins, reloader)
}

#[test]
fn echo_is_replaced_under_load_without_losing_a_request() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo", "logger"]);
    let (kernel, _) = persisted.kernel(plugins.path());
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    let before = echo_count(&kernel); // logger's greeting, and this one
    let sent = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let v2_seen = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                adopt();
                while !done.load(Ordering::Relaxed) {
                    let reply = kernel.request("echo", "echo", b"load", None);
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !reply.is_ok() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    } else if json(&reply)["version"] == "2.0.0" {
                        v2_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        add_plugin(plugins.path(), "echo-v2");
        let report = reloader.scan(&kernel, None);
        std::thread::sleep(Duration::from_millis(200));
        done.store(true, Ordering::Relaxed);
        report
    });
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let swap = &report.replaced[0];
    assert_eq!((swap.from.as_str(), swap.to.as_str()), ("1.0.0", "2.0.0"));
    assert!(
        swap.unmapped || all_closed_soon(&kernel),
        "the old library is still loaded"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(v2_seen.load(Ordering::Relaxed) > 0);
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 100, "only {sent} requests were sent");
    assert_eq!(echo_count(&kernel), before + sent + 1);
    assert_eq!(kernel.info("echo").unwrap().swaps, 1);
    assert_eq!(kernel.info("logger").unwrap().status, Status::Running);
    Ok(())
}

/// echo v1 running with 3 requests counted; then `prepare` puts a new version in place;
/// the rescan must fail with an error for which `expected` holds, and v1 keeps its count.
fn rolls_back(
    prepare: impl FnOnce(&std::path::Path, &Persisted),
    expected: impl Fn(&ReloadError) -> bool,
) -> TestResult {
    let persisted = Persisted::new();
    let (kernel, plugins, mut reloader) = echo_v1(&persisted);
    for _ in 0..3 {
        echo_count(&kernel);
    }
    prepare(plugins.path(), &persisted);
    let report = reloader.scan(&kernel, None);
    assert!(report.replaced.is_empty());
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        expected(&report.errors[0]),
        "unexpected error: {}",
        report.errors[0]
    );
    let info = kernel.info("echo").unwrap();
    assert_eq!(
        (info.version.as_str(), info.status),
        ("1.0.0", Status::Running)
    );
    // The version refused is closed at once: nothing of it runs, nothing keeps it loaded.
    assert!(info.pinned.is_empty(), "{:?}", info.pinned);
    let reply = json(&kernel.request("echo", "echo", b"", None));
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("1.0.0"), Some(4))
    );
    Ok(())
}

fn faulty_with(conf: &'static str) -> impl FnOnce(&std::path::Path, &Persisted) {
    move |dir, _| {
        fs::write(dir.join("echo.conf"), conf).unwrap();
        add_plugin(dir, "fixture-echo-faulty");
    }
}

fn rolled_back(error: &ReloadError, cause: &str) -> bool {
    matches!(error, ReloadError::Kernel(KernelError::Swap(SwapError::RolledBack { old, new, cause: c, .. }))
        if old == "1.0.0" && new == "9.0.0" && c.to_string().contains(cause))
}

#[test]
fn a_new_version_that_cannot_be_loaded_changes_nothing() -> TestResult {
    rolls_back(
        |dir, _| {
            let bytes = fs::read(fixture("echo-v2")).unwrap();
            fs::write(dir.join("libecho_v2.so"), &bytes[..bytes.len() / 3]).unwrap();
        },
        |e| matches!(e, ReloadError::Load(LoadError::Truncated { path, .. }) if path.ends_with("libecho_v2.so")),
    )
}

#[test]
fn a_new_version_whose_import_refuses_the_state_rolls_back() -> TestResult {
    rolls_back(faulty_with(r#"{"import":"fail"}"#), |e| {
        rolled_back(e, "import refused on purpose")
    })
}

#[test]
fn a_new_version_whose_import_panics_rolls_back() -> TestResult {
    rolls_back(faulty_with(r#"{"import":"panic"}"#), |e| {
        rolled_back(e, "import panicked on purpose")
    })
}

#[test]
fn a_new_version_whose_start_fails_rolls_back() -> TestResult {
    rolls_back(faulty_with(r#"{"start":"fail"}"#), |e| {
        rolled_back(e, "start refused on purpose")
    })
}

#[test]
fn a_state_that_cannot_be_written_keeps_the_old_version_running() -> TestResult {
    rolls_back(
        |dir, persisted| {
            // Even root cannot write into a directory that is a file.
            fs::remove_dir_all(persisted.state_dir()).unwrap();
            fs::write(persisted.state_dir(), b"not a directory").unwrap();
            add_plugin(dir, "echo-v2");
        },
        |e| matches!(e, ReloadError::Kernel(KernelError::Swap(SwapError::Persist { service, .. })) if service == "echo"),
    )
}

#[test]
fn a_rescan_with_nothing_changed_opens_no_library() -> TestResult {
    crate::in_process_only!();
    let plugins = plugin_dir(&["echo", "kv", "logger"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    let opened = kernel.stats().libraries_opened;
    assert_eq!(opened, 3);
    let report = reloader.scan(&kernel, None);
    assert_eq!((report.unchanged, report.errors.len()), (3, 0));
    assert_eq!(kernel.stats().libraries_opened, opened);
    Ok(())
}

#[test]
fn the_highest_version_wins_and_a_removed_file_leaves_its_service_running() -> TestResult {
    let plugins = plugin_dir(&["echo", "echo-v2"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(kernel.info("echo").unwrap().version, "2.0.0");
    for file in ["libecho_v2.so", "libecho.so"] {
        fs::remove_file(plugins.path().join(file))?;
    }
    let report = reloader.scan(&kernel, None);
    // It runs on, and the rescan says it will not come back after a restart.
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::NoPluginFile { service, running: true, .. }] if service == "echo"
        ),
        "{:?}",
        report.errors
    );
    assert!(report.replaced.is_empty());
    assert_eq!(kernel.info("echo").unwrap().version, "2.0.0");
    assert!(kernel.request("echo", "echo", b"", None).is_ok());
    Ok(())
}

#[test]
fn removing_the_running_version_downgrades_to_the_highest_left_which_may_refuse_the_state(
) -> TestResult {
    // faulty 1.x reads the state of 2.x: the downgrade happens, with the state.
    let plugins = plugin_dir(&["fixture-faulty", "fixture-faulty-v2"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    assert_eq!(kernel.info("faulty").unwrap().version, "2.0.0");
    kernel.request("faulty", "count", b"", None);
    fs::remove_file(plugins.path().join("libfixture_faulty_v2.so"))?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (
            report.replaced[0].from.as_str(),
            report.replaced[0].to.as_str()
        ),
        ("2.0.0", "1.0.0")
    );
    let reply = json(&kernel.request("faulty", "count", b"", None));
    assert_eq!(reply["count"], 2, "{reply}");

    // echo 1.x refuses the state of 2.x: the downgrade rolls back, 2.x serves on, and the
    // older file is rejected from then on.
    let plugins = plugin_dir(&["echo"]);
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    echo_count(&kernel);
    let v2 = add_plugin(plugins.path(), "echo-v2");
    assert_eq!(reloader.scan(&kernel, None).replaced.len(), 1);
    fs::remove_file(v2)?;
    let mut report = reloader.scan(&kernel, None);
    // This directory has no file of `faulty`, which runs from the first one.
    report
        .errors
        .retain(|e| !matches!(e, ReloadError::NoPluginFile { service, .. } if service == "faulty"));
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Kernel(KernelError::Swap(
                SwapError::RolledBack { .. }
            ))]
        ),
        "{:?}",
        report.errors
    );
    let reply = json(&kernel.request("echo", "echo", b"", None));
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("2.0.0"), Some(2))
    );
    let mut report = reloader.scan(&kernel, None);
    report
        .errors
        .retain(|e| !matches!(e, ReloadError::NoPluginFile { service, .. } if service == "faulty"));
    assert!(
        matches!(&report.errors[..], [ReloadError::Rejected { service, .. }] if service == "echo"),
        "{:?}",
        report.errors
    );
    assert!(report.replaced.is_empty());
    Ok(())
}

#[test]
fn a_version_that_refused_the_state_is_never_chosen_again_until_its_configuration_changes(
) -> TestResult {
    let persisted = Persisted::new();
    let (kernel, plugins, mut reloader) = echo_v1(&persisted);
    echo_count(&kernel);
    // Version 9 refuses the state it is given.
    fs::write(plugins.path().join("echo.conf"), r#"{"import":"fail"}"#)?;
    add_plugin(plugins.path(), "fixture-echo-faulty");
    let mut report = reloader.scan(&kernel, None);
    // This directory has no file of `faulty`, which runs from the first one.
    report
        .errors
        .retain(|e| !matches!(e, ReloadError::NoPluginFile { service, .. } if service == "faulty"));
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Kernel(KernelError::Swap(
                SwapError::RolledBack { .. }
            ))]
        ),
        "{:?}",
        report.errors
    );
    // Every later rescan says so, and changes nothing.
    for _ in 0..2 {
        let report = reloader.scan(&kernel, None);
        assert!(
            matches!(&report.errors[..], [ReloadError::Rejected { rejection, .. }]
                if rejection.file.version == "9.0.0" && rejection.reason.contains("refused on purpose")),
            "{:?}",
            report.errors
        );
        assert!(report.replaced.is_empty());
    }
    assert_eq!(echo_count(&kernel), 2);
    drop(kernel);

    // At the next start, the rejected file is not chosen: version 1 runs, with its state.
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(
        matches!(&report.errors[..], [ReloadError::Rejected { .. }]),
        "{:?}",
        report.errors
    );
    let reply = json(&kernel.request("echo", "echo", b"", None));
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("1.0.0"), Some(3))
    );

    // A new configuration is a new chance.
    fs::write(plugins.path().join("echo.conf"), "{}")?;
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.replaced[0].to, "9.0.0");
    Ok(())
}

#[test]
fn at_start_a_version_that_fails_falls_back_to_the_last_good_one_and_says_so() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo"]);
    let (kernel, _) = persisted.kernel(plugins.path());
    echo_count(&kernel);
    drop(kernel);
    // Dropped in while the host was down: the highest version, which fails to start.
    fs::write(plugins.path().join("echo.conf"), r#"{"start":"fail"}"#)?;
    add_plugin(plugins.path(), "fixture-echo-faulty");
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Kernel(KernelError::StartFailed { .. })]
        ),
        "{:?}",
        report.errors
    );
    assert!(
        report.fell_back.len() == 1 && report.fell_back[0].contains("fell back to"),
        "{:?}",
        report.fell_back
    );
    let reply = json(&kernel.request("echo", "echo", b"", None));
    assert_eq!(
        (reply["version"].as_str(), reply["count"].as_u64()),
        (Some("1.0.0"), Some(2))
    );
    drop(kernel);
    // Next time, the rejected file is skipped from the start.
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(report.fell_back.is_empty());
    assert!(
        matches!(&report.errors[..], [ReloadError::Rejected { .. }]),
        "{:?}",
        report.errors
    );
    assert_eq!(kernel.info("echo").unwrap().version, "1.0.0");
    Ok(())
}

#[test]
fn a_replace_that_could_not_save_the_state_is_tried_again_at_the_next_rescan() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, plugins, mut reloader) = echo_v1(&persisted);
    echo_count(&kernel);
    // The state file briefly cannot be replaced (a directory stands in its way).
    let blocker = persisted.state_file("echo");
    let _ = fs::remove_file(&blocker);
    fs::create_dir_all(blocker.join("in-the-way"))?;
    add_plugin(plugins.path(), "echo-v2");
    let report = reloader.scan(&kernel, None);
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Kernel(KernelError::Swap(
                SwapError::Persist { .. }
            ))]
        ),
        "{:?}",
        report.errors
    );
    assert_eq!(kernel.info("echo").unwrap().version, "1.0.0");
    fs::remove_dir_all(&blocker)?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.replaced[0].to, "2.0.0");
    Ok(())
}

#[test]
fn removing_a_duplicate_as_told_lets_the_next_rescan_apply_the_upgrade() -> TestResult {
    let plugins = plugin_dir(&["echo"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    let v2 = add_plugin(plugins.path(), "echo-v2");
    let mut altered = fs::read(&v2)?;
    altered.extend_from_slice(b"another build");
    let twin = plugins.path().join("libecho_v2_rebuilt.so");
    fs::write(&twin, altered)?;
    let report = reloader.scan(&kernel, None);
    assert!(
        matches!(&report.errors[..], [ReloadError::SameVersion { .. }]),
        "{:?}",
        report.errors
    );
    fs::remove_file(twin)?;
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.replaced[0].to, "2.0.0");
    Ok(())
}

#[test]
fn a_service_waiting_for_a_dependency_starts_when_it_arrives() -> TestResult {
    let plugins = plugin_dir(&["fixture-echo-needs-kv"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    let report = reloader.scan(&kernel, None);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(kernel.info("echo").unwrap().status, Status::Failed);
    add_plugin(plugins.path(), "kv");
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (report.added.as_slice(), report.restarted.as_slice()),
        (&["kv".to_owned()][..], &["echo".to_owned()][..])
    );
    let echo = kernel.info("echo").unwrap();
    assert_eq!((echo.status, echo.last_error), (Status::Running, None));
    Ok(())
}

#[test]
fn the_same_version_with_different_contents_is_an_error_naming_both_files() -> TestResult {
    let plugins = plugin_dir(&["echo"]);
    let mut altered = fs::read(plugins.path().join("libecho.so"))?;
    altered.extend_from_slice(b"trailing bytes change the digest, not the library");
    fs::write(plugins.path().join("libecho-rebuilt.so"), altered)?;
    let kernel = kernel();
    let report = reloader_of(plugins.path()).scan(&kernel, None);
    assert!(
        matches!(&report.errors[..], [ReloadError::SameVersion { service, first, second, .. }]
            if service == "echo" && first.ends_with("libecho-rebuilt.so") && second.ends_with("libecho.so")),
        "{:?}",
        report.errors
    );
    let message = report.errors[0].to_string();
    assert!(
        message.contains("libecho.so") && message.contains("libecho-rebuilt.so"),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_new_service_dropped_in_is_started_after_its_dependencies() -> TestResult {
    let plugins = plugin_dir(&["kv"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    add_plugin(plugins.path(), "logger");
    add_plugin(plugins.path(), "echo");
    let report = reloader.scan(&kernel, None);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.added, ["echo", "logger"]);
    assert_eq!(kernel.info("logger").unwrap().status, Status::Running);
    Ok(())
}

#[test]
fn a_stuck_service_fails_the_replace_and_the_checkpoint_in_time_and_keeps_its_version() -> TestResult
{
    crate::in_process_only!();
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["fixture-echo-faulty"]);
    let mut config = persisted.config(host::BadStatePolicy::Refuse);
    config.operation_timeout = Duration::from_millis(100);
    let (kernel, _) = persisted.kernel_with(plugins.path(), config);
    {
        let sleeper = busy_for(&kernel, "echo", 2000);
        wait_until_busy(&kernel, "echo");
        let checkpoint = kernel.checkpoint();
        assert!(
            matches!(&checkpoint[..], [(_, Err(KernelError::Instance { cause, .. }))] if cause.contains("did not get to it")),
            "{checkpoint:?}"
        );
        let library = load(kernel.loader(), &fixture("fixture-echo-faulty")).unwrap();
        let error = kernel.replace(library, None).unwrap_err();
        assert!(
            matches!(
                &error,
                KernelError::Swap(SwapError::Export {
                    cause: host::OperationError::Unanswered {
                        why: host::Unanswered::NoAnswer,
                        doing: host::Call::Handle,
                        ..
                    },
                    ..
                })
            ),
            "{error}"
        );
        assert!(sleeper.join().unwrap().is_ok());
    }
    // Once the sleep is over, the same instance serves: nothing was held or stopped.
    assert_eq!(json(&kernel.request("echo", "echo", b"", None))["count"], 1);
    assert_eq!(kernel.info("echo").unwrap().swaps, 0);
    Ok(())
}

#[test]
fn a_new_version_whose_dependencies_do_not_run_is_refused_before_anything_stops() -> TestResult {
    rolls_back(
        |dir, _| {
            add_plugin(dir, "fixture-echo-needs-kv");
        },
        |e| {
            matches!(e, ReloadError::Kernel(KernelError::Dependency(host::kernel::DependencyError::Missing { service, dependency }))
                if service == "echo" && dependency == "kv")
        },
    )
}

#[test]
fn a_new_version_refusing_the_state_leaves_the_old_instance_serving_without_a_restart() -> TestResult
{
    let persisted = Persisted::new();
    // This echo refuses any state it is given (at its first start it is given none): had
    // it been stopped for the new version, it could not come back.
    let plugins = plugin_dir(&["fixture-echo-faulty"]);
    fs::write(plugins.path().join("echo.conf"), r#"{"import":"fail"}"#)?;
    let (kernel, _) = persisted.kernel(plugins.path());
    assert_eq!(echo_count(&kernel), 1);

    let again = load(kernel.loader(), &fixture("fixture-echo-faulty"))?;
    let error = kernel
        .replace(again, Some(r#"{"import":"fail"}"#.into()))
        .unwrap_err();
    assert!(
        matches!(&error, KernelError::Swap(SwapError::RolledBack { cause: InstanceError::Import(cause), .. })
            if cause.contains("import refused")),
        "{error}"
    );
    // The same instance: it imported nothing, and counts on.
    assert_eq!(kernel.info("echo").unwrap().status, Status::Running);
    assert_eq!(echo_count(&kernel), 2);
    Ok(())
}

#[test]
fn when_both_versions_fail_the_service_is_down_but_its_state_is_on_disk() -> TestResult {
    let persisted = Persisted::new();
    // This echo refuses any state it is given; at its first start it is given none.
    let plugins = plugin_dir(&["fixture-echo-faulty"]);
    fs::write(plugins.path().join("echo.conf"), r#"{"import":"fail"}"#)?;
    let (kernel, _) = persisted.kernel(plugins.path());
    assert_eq!(echo_count(&kernel), 1);
    assert_eq!(echo_count(&kernel), 2);

    // The new version imports the state, then fails to start: the old one has stopped by
    // then, and cannot come back (it refuses the state).
    let again = load(kernel.loader(), &fixture("fixture-echo-faulty"))?;
    let error = kernel
        .replace(again, Some(r#"{"start":"fail"}"#.into()))
        .unwrap_err();
    assert!(
        matches!(&error, KernelError::Swap(SwapError::RollbackFailed { cause: InstanceError::Start(cause), rollback: InstanceError::Import(rollback), .. })
            if cause.contains("start") && rollback.contains("import refused")),
        "{error}"
    );
    assert_eq!(kernel.info("echo").unwrap().status, Status::Failed);
    assert_eq!(
        kernel.request("echo", "echo", b"", None).code,
        plugin_api::codes::NOT_FOUND
    );
    drop(kernel);

    // The state written before the old version stopped is intact: a host whose echo can
    // import it carries on from there.
    fs::remove_file(plugins.path().join("echo.conf"))?;
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(echo_count(&kernel), 3);
    Ok(())
}

#[test]
fn a_rollback_brings_the_old_version_back_with_its_own_configuration() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["fixture-echo-faulty"]);
    // The running version accepts state; the one replacing it is told to refuse it.
    let (kernel, _) = persisted.kernel(plugins.path());
    echo_count(&kernel);
    let again = load(kernel.loader(), &fixture("fixture-echo-faulty"))?;
    let error = kernel
        .replace(again, Some(r#"{"import":"fail"}"#.into()))
        .unwrap_err();
    assert!(
        matches!(&error, KernelError::Swap(SwapError::RolledBack { .. })),
        "{error}"
    );
    assert_eq!(echo_count(&kernel), 2);
    Ok(())
}

#[test]
fn a_new_version_stuck_in_start_is_given_up_and_never_serves() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo"]);
    let mut config = persisted.config(host::BadStatePolicy::Refuse);
    config.operation_timeout = Duration::from_millis(100);
    let (kernel, _) = persisted.kernel_with(plugins.path(), config);
    assert_eq!(echo_count(&kernel), 1);
    let stuck = load(kernel.loader(), &fixture("fixture-echo-faulty"))?;
    let error = kernel
        .replace(stuck, Some(r#"{"start":"sleep","sleep_ms":400}"#.into()))
        .unwrap_err();
    assert!(
        matches!(
            &error,
            KernelError::Swap(SwapError::RolledBack {
                cause: InstanceError::Timeout {
                    call: Call::Start,
                    ..
                },
                ..
            })
        ),
        "{error}"
    );
    // Long after the stuck start has returned, every request is still served by version 1.
    std::thread::sleep(Duration::from_millis(600));
    for expected in 2..12 {
        let reply = json(&kernel.request("echo", "echo", b"", None));
        assert_eq!(
            (reply["version"].as_str(), reply["count"].as_u64()),
            (Some("1.0.0"), Some(expected))
        );
    }
    Ok(())
}

#[test]
fn a_file_rejected_for_a_timeout_is_tried_again_with_a_longer_operation_timeout() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["fixture-echo-faulty"]);
    fs::write(
        plugins.path().join("echo.conf"),
        r#"{"start":"sleep","sleep_ms":1500}"#,
    )?;
    let with_timeout = |timeout: Duration| {
        let mut config = persisted.config(host::BadStatePolicy::Refuse);
        config.operation_timeout = timeout;
        persisted.kernel_with(plugins.path(), config)
    };
    let (kernel, report) = with_timeout(Duration::from_millis(300));
    assert!(
        matches!(
            &report.errors[..],
            [ReloadError::Kernel(KernelError::StartFailed {
                cause: InstanceError::Timeout { .. },
                ..
            })]
        ),
        "{:?}",
        report.errors
    );
    drop(kernel);
    let (kernel, report) = with_timeout(Duration::from_millis(300));
    assert!(
        matches!(
            &report.errors[..],
            [
                ReloadError::Rejected { .. },
                ReloadError::NothingToRun { .. }
            ]
        ),
        "{:?}",
        report.errors
    );
    drop(kernel);
    // The host's timeout was too short, not the file wrong.
    let (kernel, report) = with_timeout(Duration::from_secs(10));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(kernel.info("echo").unwrap().status, Status::Running);
    Ok(())
}

#[test]
fn a_file_that_runs_is_no_longer_shown_rejected() -> TestResult {
    let plugins = plugin_dir(&["echo"]);
    let kernel = kernel();
    let mut reloader = reloader_of(plugins.path());
    reloader.scan(&kernel, None);
    fs::write(plugins.path().join("echo.conf"), r#"{"start":"fail"}"#)?;
    add_plugin(plugins.path(), "fixture-echo-faulty");
    reloader.scan(&kernel, None);
    assert_eq!(reloader.verdicts().rejected_lines("echo").len(), 1);
    fs::write(plugins.path().join("echo.conf"), "{}")?;
    let report = reloader.scan(&kernel, None);
    assert_eq!(report.replaced[0].to, "9.0.0");
    assert!(reloader.verdicts().rejected_lines("echo").is_empty());
    Ok(())
}

#[test]
fn at_start_a_duplicate_version_runs_the_last_good_file_and_names_both() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["kv", "logger", "echo"]);
    let (kernel, _) = persisted.kernel(plugins.path());
    drop(kernel);
    let mut twin = fs::read(plugins.path().join("libkv.so"))?;
    twin.extend_from_slice(b"another build of the same version");
    fs::write(plugins.path().join("libkv-b.so"), twin)?;
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(
        matches!(&report.errors[..], [ReloadError::SameVersion { .. }]),
        "{:?}",
        report.errors
    );
    let kv = kernel.info("kv").unwrap();
    assert_eq!(
        (kv.status, kv.path.file_name().unwrap().to_str()),
        (Status::Running, Some("libkv.so"))
    );
    Ok(())
}

#[test]
fn a_service_whose_files_are_all_rejected_says_where_its_last_good_file_went() -> TestResult {
    let persisted = Persisted::new();
    let (kernel, plugins, mut reloader) = echo_v1(&persisted);
    let v2 = add_plugin(plugins.path(), "echo-v2");
    assert_eq!(reloader.scan(&kernel, None).replaced.len(), 1);
    // v2 removed: v1 refuses v2's state and is rejected; v2 serves on from memory.
    fs::remove_file(&v2)?;
    reloader.scan(&kernel, None);
    drop(kernel);
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(kernel.info("echo").is_none());
    let nothing = report
        .errors
        .iter()
        .find(|e| matches!(e, ReloadError::NothingToRun { .. }))
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("{:?}", report.errors));
    assert!(
        nothing.contains("libecho_v2.so") && nothing.contains("not in the plugins directory"),
        "{nothing}"
    );
    Ok(())
}

#[test]
fn every_replace_writes_the_live_state_so_back_to_back_replaces_lose_no_acknowledged_put(
) -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["kv"]);
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // Two builds of kv, replacing each other: no checkpoint runs in this kernel (nothing
    // ticks) and no probe checkpoints before loading, so each file seen below is the one the
    // replace wrote itself.
    let builds = tempfile::tempdir()?;
    let a = builds.path().join("a.so");
    let b = builds.path().join("b.so");
    fs::copy(fixture("kv"), &a)?;
    let mut other = fs::read(fixture("kv"))?;
    other.extend_from_slice(b"another build of the same version");
    fs::write(&b, other)?;
    for tick in 1..=10u64 {
        let put = format!(r#"{{"op":"put","key":"tick","value":{tick}}}"#);
        assert!(kernel
            .request("kv", "request", put.as_bytes(), None)
            .is_ok());
        let build = if tick % 2 == 0 { &a } else { &b };
        kernel.replace(load(kernel.loader(), build)?, None)?;
        let saved = kernel.state_store().unwrap().load("kv")?.unwrap();
        let saved: serde_json::Value = serde_json::from_slice(&saved.bytes)?;
        assert_eq!(saved["tick"], tick, "after replace {tick}");
    }
    assert_eq!(kernel.info("kv").unwrap().swaps, 10);
    Ok(())
}
