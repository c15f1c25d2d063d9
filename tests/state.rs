//! Encrypted, crash-safe state: restore on start, save on stop, checkpoints, bad files.

use std::{fs, os::unix::fs::MetadataExt};

use host::{state::StateError, BadStatePolicy, Checkpoint, KernelError, Status};

use crate::support::*;

#[test]
fn a_restarted_host_restores_every_service_state() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo", "kv", "logger"]);
    {
        let (kernel, report) = persisted.kernel(plugins.path());
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        for _ in 0..5 {
            echo_count(&kernel);
        }
        json(&kernel.request("kv", "put", br#"{"op":"put","key":"k","value":"v"}"#, None));
        assert!(kernel.shutdown().failures.is_empty());
    }
    let (kernel, report) = persisted.kernel(plugins.path());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // 5 requests, plus one from the first logger's start, plus one from the second's.
    assert_eq!(echo_count(&kernel), 8);
    let get = kernel.request("kv", "get", br#"{"op":"get","key":"k"}"#, None);
    assert_eq!(json(&get)["value"], "v");
    Ok(())
}

#[test]
fn a_state_file_never_contains_the_plaintext() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["kv"]);
    let (kernel, _) = persisted.kernel(plugins.path());
    let marker = token("PLAINTEXT-MARKER");
    let put = format!(r#"{{"op":"put","key":"{marker}","value":"{marker}"}}"#);
    json(&kernel.request("kv", "put", put.as_bytes(), None));
    assert!(matches!(
        kernel.checkpoint()[..],
        [(_, Ok(Checkpoint::Written))]
    ));
    let sealed = fs::read(persisted.state_file("kv"))?;
    assert!(!sealed.windows(marker.len()).any(|w| w == marker.as_bytes()));
    drop(kernel);
    let sealed = fs::read(persisted.state_file("kv"))?;
    assert!(!sealed.windows(marker.len()).any(|w| w == marker.as_bytes()));
    Ok(())
}

#[test]
fn an_unchanged_service_checkpoint_writes_nothing() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo"]);
    let (kernel, _) = persisted.kernel(plugins.path());
    echo_count(&kernel);
    assert!(matches!(
        kernel.checkpoint()[..],
        [(_, Ok(Checkpoint::Written))]
    ));
    let file = persisted.state_file("echo");
    let (inode, writes) = (fs::metadata(&file)?.ino(), kernel.stats().state_writes);

    assert!(matches!(
        kernel.checkpoint()[..],
        [(_, Ok(Checkpoint::Unchanged))]
    ));
    assert_eq!(fs::metadata(&file)?.ino(), inode, "the file was rewritten");
    assert_eq!(kernel.stats().state_writes, writes);

    echo_count(&kernel);
    assert!(matches!(
        kernel.checkpoint()[..],
        [(_, Ok(Checkpoint::Written))]
    ));
    assert_ne!(fs::metadata(&file)?.ino(), inode);
    Ok(())
}

#[test]
fn a_restored_state_is_not_written_back_unchanged() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo"]);
    drop(persisted.kernel(plugins.path()).0);
    let (kernel, _) = persisted.kernel(plugins.path());
    assert!(matches!(
        kernel.checkpoint()[..],
        [(_, Ok(Checkpoint::Unchanged))]
    ));
    Ok(())
}

/// Starts echo and kv with a bad `echo.state` in place (made by `spoil`); checks that echo is
/// refused with the expected error, that kv runs, and that the file is left byte for byte.
fn refused_with(spoil: impl FnOnce(&Persisted), key: Option<&str>) -> KernelError {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo", "kv"]);
    {
        let (kernel, _) = persisted.kernel(plugins.path());
        echo_count(&kernel);
        json(&kernel.request("kv", "put", br#"{"op":"put","key":"k","value":1}"#, None));
    }
    spoil(&persisted);
    let before = fs::read(persisted.state_file("echo")).unwrap();
    let config =
        persisted.config_with_key(key.unwrap_or(&persisted.key_hex), BadStatePolicy::Refuse);
    let (kernel, mut report) = persisted.kernel_with(plugins.path(), config);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(kernel.info("echo").unwrap().status, Status::Failed);
    assert_eq!(kernel.info("kv").unwrap().status, Status::Running);
    drop(kernel);
    assert_eq!(
        fs::read(persisted.state_file("echo")).unwrap(),
        before,
        "the bad file must be kept as it was"
    );
    match report.errors.remove(0) {
        host::reload::ReloadError::Kernel(error) => error,
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn a_tampered_state_file_is_refused_and_kept() -> TestResult {
    let error = refused_with(
        |p| {
            let mut bytes = fs::read(p.state_file("echo")).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
            fs::write(p.state_file("echo"), bytes).unwrap();
        },
        None,
    );
    assert!(
        matches!(&error, KernelError::State { service, source: StateError::Tampered { .. } } if service == "echo"),
        "{error}"
    );
    assert!(host::error_chain(&error).contains("echo.state"), "{error}");
    Ok(())
}

#[test]
fn a_state_file_renamed_to_another_service_is_refused_and_kept() -> TestResult {
    let error = refused_with(
        |p| {
            fs::copy(p.state_file("kv"), p.state_file("echo"))
                .map(drop)
                .unwrap()
        },
        None,
    );
    assert!(
        matches!(&error, KernelError::State { source: StateError::WrongService { expected, found, .. }, .. } if expected == "echo" && found == "kv"),
        "{error}"
    );
    Ok(())
}

#[test]
fn a_state_file_sealed_with_another_key_is_refused_and_kept() -> TestResult {
    let other = hex_key();
    // kv's file would be refused the same way: without it, kv starts fresh.
    let error = refused_with(
        |p| fs::remove_file(p.state_file("kv")).unwrap(),
        Some(&other),
    );
    assert!(
        matches!(
            &error,
            KernelError::State {
                source: StateError::UnknownKey { .. },
                ..
            }
        ),
        "{error}"
    );
    Ok(())
}

#[test]
fn a_state_its_plugin_refuses_to_import_is_refused_and_kept() -> TestResult {
    // echo 1.x cannot read the state of echo 2.x.
    let error = refused_with(
        |p| {
            let config = p.config(BadStatePolicy::Refuse);
            config
                .state
                .unwrap()
                .save("echo", "2.0.0", br#"{"format":2,"requests":7}"#)
                .unwrap();
        },
        None,
    );
    assert!(
        matches!(&error, KernelError::StartFailed { cause: host::InstanceError::Import(cause), state_file: Some(file), .. }
            if cause.contains("cannot read state of version 2.0.0") && file.ends_with("echo.state")),
        "{error}"
    );
    Ok(())
}

#[test]
fn quarantine_mode_moves_a_bad_file_aside_and_starts_fresh() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo"]);
    drop(persisted.kernel(plugins.path()).0);
    fs::write(persisted.state_file("echo"), b"MKSTATE\0 not really")?;
    let (kernel, report) =
        persisted.kernel_with(plugins.path(), persisted.config(BadStatePolicy::Quarantine));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(echo_count(&kernel), 1);
    let aside: Vec<_> = fs::read_dir(persisted.state_dir())?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("echo.state.bad-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read(persisted.state_dir().join(&aside[0]))?,
        b"MKSTATE\0 not really"
    );
    assert!(logged(|l| l.message.contains("moved aside"))
        .iter()
        .any(|l| l.service.as_deref() == Some("echo")));
    Ok(())
}

#[test]
fn rotating_the_key_reads_old_files_and_reseals_them_with_the_new_key() -> TestResult {
    let persisted = Persisted::new();
    let plugins = plugin_dir(&["echo"]);
    {
        let (kernel, _) = persisted.kernel(plugins.path());
        echo_count(&kernel);
    }
    let new_hex = hex_key();
    let config =
        persisted.config_with_keys(&new_hex, &[&persisted.key_hex], BadStatePolicy::Refuse);
    {
        let (kernel, report) = persisted.kernel_with(plugins.path(), config);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(echo_count(&kernel), 2);
    }
    // Saved at stop with the new key: only the new key opens it now.
    let id = |hex: &str| host::state::StateKey::from_hex(hex, "test").map(|k| k.id_hex());
    let new_only = persisted
        .config_with_key(&new_hex, BadStatePolicy::Refuse)
        .state
        .unwrap();
    let (header, _) = host::state::inspect(new_only.keys(), &persisted.state_file("echo"))?;
    assert_eq!(header.key_id, id(&new_hex)?);
    assert_ne!(header.key_id, id(&persisted.key_hex)?);
    Ok(())
}
