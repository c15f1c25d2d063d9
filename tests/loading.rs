//! Loading, checking and really unloading plugin libraries.

use std::{fs, path::Path};

use host::{
    kernel::DependencyError,
    loader::{is_mapped, LoadError, Loader, PluginFile},
    KernelError,
};

use crate::support::*;

fn load_error(path: &Path) -> LoadError {
    let loader = Loader::new(None, None).unwrap();
    load(&loader, path).expect_err("the load should fail")
}

#[test]
fn a_file_that_is_not_a_shared_library_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notes.so");
    fs::write(&path, "just some text\n")?;
    let error = load_error(&path);
    assert!(
        matches!(&error, LoadError::NotSharedLibrary { path: p } if *p == path),
        "{error}"
    );
    assert!(error.to_string().contains("notes.so"));
    Ok(())
}

#[test]
fn a_truncated_library_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let bytes = fs::read(fixture("echo"))?;
    let path = dir.path().join("libecho.so");
    fs::write(&path, &bytes[..bytes.len() / 2])?;
    let error = load_error(&path);
    assert!(matches!(error, LoadError::Truncated { .. }), "{error}");
    assert!(error.to_string().contains("libecho.so"), "{error}");
    Ok(())
}

#[test]
fn a_shared_library_that_is_not_a_plugin_is_refused() -> TestResult {
    // The C library is a shared library that exports no plugin root module.
    let libc = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
        "/usr/lib64/libm.so.6",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("libm is installed");
    let error = load_error(libc);
    assert!(
        matches!(&error, LoadError::NotAPlugin { symbol, .. } if symbol == plugin_api::abi::ROOT_MODULE_SYMBOL),
        "{error}"
    );
    Ok(())
}

#[test]
fn a_plugin_with_a_mismatching_abi_is_refused_naming_the_mismatch() -> TestResult {
    let error = load_error(&fixture("fixture-abi-mismatch"));
    let LoadError::AbiMismatch {
        summary, report, ..
    } = &error
    else {
        panic!("expected an ABI mismatch, got {error}");
    };
    assert_eq!(
        summary,
        "the return type of `manifest`: expected type `RManifest`, found `RString`"
    );
    assert!(report.len() > summary.len());
    assert!(error.to_string().contains("libfixture_abi_mismatch.so"));
    Ok(())
}

#[test]
fn a_plugin_built_against_another_abi_is_refused_naming_both_abi_versions() -> TestResult {
    let error = load_error(&fixture("fixture-old-abi"));
    assert!(
        matches!(&error, LoadError::VersionMismatch { host, plugin, .. } if host == plugin_api::abi::ABI_VERSION && plugin == "0.0.5"),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("ABI 0.0.5")
            && message.contains(&format!("ABI {}", plugin_api::abi::ABI_VERSION)),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_plugin_built_against_an_older_sdk_of_the_same_abi_loads_and_serves() -> TestResult {
    let kernel = kernel();
    let loaded = load(kernel.loader(), &fixture("fixture-old-sdk"))?;
    assert_eq!(loaded.manifest().name, "older-sdk");
    kernel.register(loaded, None)?;
    kernel.start("older-sdk")?;
    assert!(kernel.request("older-sdk", "ping", b"", None).is_ok());
    Ok(())
}

#[test]
fn a_plugin_with_an_invalid_service_name_is_refused() -> TestResult {
    let error = load_error(&fixture("fixture-bad-name"));
    assert!(
        matches!(&error, LoadError::InvalidManifest { reason, .. } if reason.contains("\"Bad Name\"")),
        "{error}"
    );
    Ok(())
}

#[test]
fn two_plugins_with_the_same_name_are_refused() -> TestResult {
    let kernel = kernel();
    let dir = plugin_dir(&["echo"]);
    let first = dir.path().join("libecho.so");
    let second = dir.path().join("libecho-copy.so");
    fs::copy(&first, &second)?;
    load_into(&kernel, &first, None)?;
    let error = load_into(&kernel, &second, None).unwrap_err();
    assert!(
        matches!(&error, KernelError::DuplicateService { service, first: f, second: s } if service == "echo" && *f == first && *s == second),
        "{error}"
    );
    Ok(())
}

#[test]
fn a_dependency_cycle_is_refused_naming_the_cycle() -> TestResult {
    let kernel = kernel();
    let dir = plugin_dir(&["fixture-cycle-a", "fixture-cycle-b", "kv"]);
    for file in fs::read_dir(dir.path())? {
        load_into(&kernel, &file?.path(), None)?;
    }
    let failures = kernel.start_all();
    assert_eq!(failures.len(), 2, "{failures:?}");
    let cycle = vec![
        "cycle-a".to_owned(),
        "cycle-b".to_owned(),
        "cycle-a".to_owned(),
    ];
    for (_, error) in &failures {
        assert!(
            matches!(error, KernelError::Dependency(DependencyError::Cycle { cycle: c }) if *c == cycle),
            "{error}"
        );
    }
    assert_eq!(kernel.info("kv").unwrap().status, host::Status::Running);
    assert_eq!(kernel.info("cycle-a").unwrap().status, host::Status::Failed);
    Ok(())
}

#[test]
fn a_missing_dependency_is_refused_naming_both_services() -> TestResult {
    let kernel = kernel();
    load_into(&kernel, &fixture("logger"), None)?;
    let failures = kernel.start_all();
    assert!(
        matches!(&failures[..], [(s, KernelError::Dependency(DependencyError::Missing { service, dependency }))]
            if s == "logger" && service == "logger" && dependency == "echo"),
        "{failures:?}"
    );
    Ok(())
}

#[test]
fn a_closed_library_is_gone_from_the_address_space() -> TestResult {
    let loader = Loader::new(None, None)?;
    let library = load(&loader, &fixture("echo"))?;
    let shadow = library.shadow_path().to_owned();
    assert!(
        is_mapped(&shadow)?,
        "the library should be mapped while open"
    );
    // Another test's thread that has not said it is the host's yet keeps it, for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut library = library;
    let closed = loop {
        match library.close(&|_| false) {
            Ok(closed) => break closed,
            Err((kept, threads)) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "pinned by {threads:?}"
                );
                library = kept;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    assert!(closed, "close reports the library unmapped");
    assert!(!is_mapped(&shadow)?);
    Ok(())
}

fn mappings_under(dir: &Path) -> usize {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    let dir = dir.to_string_lossy();
    maps.lines().filter(|line| line.contains(&*dir)).count()
}

#[test]
fn a_thousand_load_run_unload_cycles_leave_no_mapping_behind() -> TestResult {
    let shadow_parent = tempfile::tempdir()?;
    let kernel = host::Kernel::new(host::KernelConfig {
        shadow_dir: Some(shadow_parent.path().to_owned()),
        ..Default::default()
    })?;
    let plugin = fixture("fixture-relay");
    let file = PluginFile::read(&plugin)?;
    assert_eq!(mappings_under(shadow_parent.path()), 0);
    for _ in 0..1000 {
        let library = load_file(kernel.loader(), &file)?;
        kernel.register(library, None)?;
        kernel.start("relay")?;
        let report = kernel.shutdown();
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }
    assert!(all_closed_soon(&kernel));
    assert_eq!(mappings_under(shadow_parent.path()), 0);
    assert_eq!(kernel.stats().libraries_opened, 1000);
    Ok(())
}

#[test]
fn a_path_that_is_not_a_regular_file_is_refused_without_waiting() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fifo = dir.path().join("libfifo.so");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU)?;
    // Opening a FIFO for reading would wait for a writer; it is refused at once instead.
    let error = PluginFile::read(&fifo).unwrap_err();
    assert!(
        matches!(&error, LoadError::Read { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput),
        "{error}"
    );
    Ok(())
}

#[test]
fn a_file_larger_than_any_plugin_is_refused_unread() -> TestResult {
    let dir = tempfile::tempdir()?;
    let huge = dir.path().join("libhuge.so");
    // Sparse: nothing is written, and reading it would take gigabytes.
    fs::File::create(&huge)?.set_len(host::loader::MAX_PLUGIN_SIZE + 1)?;
    let error = PluginFile::read(&huge).unwrap_err();
    assert!(matches!(&error, LoadError::TooLarge { .. }), "{error}");
    Ok(())
}

/// Two builds of the tokio fixture (same version, other bytes), and the number of mappings
/// of the loader's private copies while one library is loaded.
fn tokio_builds() -> (tempfile::TempDir, [std::path::PathBuf; 2]) {
    let builds = tempfile::tempdir().unwrap();
    let a = builds.path().join("a.so");
    let b = builds.path().join("b.so");
    fs::copy(fixture("fixture-tokio"), &a).unwrap();
    let mut other = fs::read(fixture("fixture-tokio")).unwrap();
    other.extend_from_slice(b"another build of the same version");
    fs::write(&b, other).unwrap();
    (builds, [a, b])
}

fn shadow_mappings(kernel: &host::Kernel) -> usize {
    let shadow = kernel.loader().shadow_dir().to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains(&shadow))
        .count()
}

#[test]
fn a_hundred_swaps_of_a_plugin_with_a_tokio_runtime_leave_no_old_library_loaded() -> TestResult {
    let kernel = kernel();
    let (_builds, builds) = tokio_builds();
    kernel.register(load(kernel.loader(), &builds[0])?, None)?;
    kernel.start("tokio")?;
    let one_library = shadow_mappings(&kernel);
    assert!(one_library > 0);
    for swap in 1..=100 {
        let reply = kernel.request("tokio", "count", b"", None);
        assert_eq!(reply.data, swap.to_string().as_bytes(), "{reply:?}");
        kernel.replace(load(kernel.loader(), &builds[swap % 2])?, None)?;
    }
    // The new versions' runtimes (threads started in their `start`) pin no older version.
    assert!(all_closed_soon(&kernel), "{:?}", kernel.info("tokio"));
    assert_eq!(kernel.info("tokio").unwrap().pinned, Vec::<String>::new());
    assert_eq!(shadow_mappings(&kernel), one_library);
    assert_eq!(kernel.request("tokio", "count", b"", None).data, b"101");
    Ok(())
}

#[test]
fn a_version_that_leaves_a_thread_running_stays_loaded_and_the_next_ones_do_not() -> TestResult {
    let kernel = kernel();
    let (_builds, builds) = tokio_builds();
    // This version's `stop` leaves a thread of its own running.
    kernel.register(load(kernel.loader(), &builds[0])?, Some("leak".into()))?;
    kernel.start("tokio")?;
    kernel.replace(load(kernel.loader(), &builds[1])?, None)?;
    kernel.replace(load(kernel.loader(), &builds[0])?, None)?;
    // The versions that joined their runtime close once its threads have ended; the leaking
    // one stays.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while kernel.sweep() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(kernel.sweep(), 1, "only the leaking version stays");
    let pinned = kernel.info("tokio").unwrap().pinned;
    assert!(
        matches!(&pinned[..], [one] if one.contains("leaked-thread")),
        "{pinned:?}"
    );
    Ok(())
}

#[test]
fn a_plugins_tracing_and_log_records_reach_the_host_with_their_targets_from_any_thread(
) -> TestResult {
    capture_logs();
    let kernel = kernel();
    load_into(&kernel, &fixture("fixture-tokio"), None)?;
    kernel.start("tokio")?;
    let token = token("forwarded");
    let reply = kernel.request("tokio", "log", token.as_bytes(), None);
    assert!(reply.is_ok(), "{reply}");
    let ours = |l: &LogLine| l.message.contains(&token);
    let lines = logged(ours);
    let from = |module: &str, level: tracing::Level, message: &str| {
        lines.iter().any(|l| {
            l.target == "plugin"
                && l.service.as_deref() == Some("tokio")
                && l.module.as_deref() == Some(module)
                && l.level == level
                && l.message.starts_with(message)
        })
    };
    assert!(
        from(
            "fixture_tokio::net",
            tracing::Level::INFO,
            &format!("tracing says {token} token={token}")
        ),
        "{lines:?}"
    );
    assert!(
        from(
            "fixture_tokio::db",
            tracing::Level::WARN,
            &format!("log says {token}")
        ),
        "{lines:?}"
    );
    // Above the default level (info): not even formatted.
    assert!(
        !lines.iter().any(|l| l.message.contains("debug says")),
        "{lines:?}"
    );
    Ok(())
}
