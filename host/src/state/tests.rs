use std::{fs, os::unix::fs::PermissionsExt};

use super::{store::inspect, KeyError, KeyRing, StateError, StateKey, StateStore};

fn ring() -> KeyRing {
    KeyRing::new(StateKey::generate(), Vec::new())
}

#[test]
fn saved_state_opens_with_its_version_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(&dir.path().join("state"), ring()).unwrap();
    store
        .save("kv", "1.2.3", b"{\"marker\":\"PLAINTEXT-MARKER\"}")
        .unwrap();
    let saved = store.load("kv").unwrap().unwrap();
    assert_eq!(saved.version, "1.2.3");
    assert_eq!(saved.bytes, b"{\"marker\":\"PLAINTEXT-MARKER\"}");

    let raw = fs::read(store.path("kv")).unwrap();
    assert!(!raw.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));
    let mode = fs::metadata(store.path("kv")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    assert!(store.load("echo").unwrap().is_none());
}

#[test]
fn every_write_uses_a_fresh_nonce() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    store.save("kv", "1.0.0", b"same").unwrap();
    let first = fs::read(store.path("kv")).unwrap();
    store.save("kv", "1.0.0", b"same").unwrap();
    let second = fs::read(store.path("kv")).unwrap();
    assert_ne!(first, second);
}

#[test]
fn a_flipped_bit_anywhere_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    store.save("kv", "1.0.0", b"hello world").unwrap();
    let good = fs::read(store.path("kv")).unwrap();
    // The exporter's version (header) and the ciphertext.
    let version_at = 8 + 2 + 8 + 1 + 2 + 1;
    for at in [version_at, good.len() - 1, good.len() - 20] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        fs::write(store.path("kv"), &bad).unwrap();
        let err = store.load("kv").unwrap_err();
        assert!(
            matches!(err, StateError::Tampered { .. }),
            "byte {at}: {err}"
        );
    }
}

#[test]
fn a_file_renamed_to_another_service_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    store.save("kv", "1.0.0", b"x").unwrap();
    fs::rename(store.path("kv"), store.path("echo")).unwrap();
    let err = store.load("echo").unwrap_err();
    assert!(
        matches!(&err, StateError::WrongService { expected, found, .. } if expected == "echo" && found == "kv"),
        "{err}"
    );
}

#[test]
fn old_keys_open_files_and_unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let old_hex = "11".repeat(32);
    let old = || StateKey::from_hex(&old_hex, "test").unwrap();
    StateStore::new(dir.path(), KeyRing::new(old(), vec![]))
        .unwrap()
        .save("kv", "1.0.0", b"sealed with the old key")
        .unwrap();

    let rotated =
        StateStore::new(dir.path(), KeyRing::new(StateKey::generate(), vec![old()])).unwrap();
    assert_eq!(
        rotated.load("kv").unwrap().unwrap().bytes,
        b"sealed with the old key"
    );

    let stranger = StateStore::new(dir.path(), ring()).unwrap();
    let err = stranger.load("kv").unwrap_err();
    assert!(
        matches!(&err, StateError::UnknownKey { key_id, .. } if *key_id == old().id_hex()),
        "{err}"
    );
}

#[test]
fn truncated_and_foreign_files_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    store.save("kv", "1.0.0", b"hello").unwrap();
    let good = fs::read(store.path("kv")).unwrap();
    fs::write(store.path("kv"), &good[..30]).unwrap();
    assert!(matches!(
        store.load("kv").unwrap_err(),
        StateError::Truncated { .. }
    ));
    fs::write(store.path("kv"), b"{\"not\":\"sealed\"}").unwrap();
    assert!(matches!(
        store.load("kv").unwrap_err(),
        StateError::NotAStateFile { .. }
    ));
}

#[test]
fn quarantine_moves_the_file_aside_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    fs::write(store.path("kv"), b"garbage").unwrap();
    let moved = store.quarantine("kv").unwrap();
    assert!(!store.path("kv").exists());
    assert!(moved
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("kv.state.bad-"));
    assert_eq!(fs::read(moved).unwrap(), b"garbage");
}

#[test]
fn inspect_reads_the_header_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ring();
    let id = keys.current().id_hex();
    let store = StateStore::new(dir.path(), keys).unwrap();
    store.save("echo", "2.0.0", b"{\"count\":3}").unwrap();
    let keys = KeyRing::new(StateKey::from_hex(&"00".repeat(32), "t").unwrap(), vec![]);
    assert!(inspect(&keys, &store.path("echo")).is_err());
    let (header, bytes) = inspect(store.keys(), &store.path("echo")).unwrap();
    assert_eq!(
        (header.service.as_str(), header.exported_by.as_str()),
        ("echo", "2.0.0")
    );
    assert_eq!(header.key_id, id);
    assert_eq!(bytes, b"{\"count\":3}");
}

#[test]
fn key_files_must_be_private_and_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.key");
    let key = StateKey::write_new(&path).unwrap();
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(StateKey::from_file(&path).unwrap().id(), key.id());
    assert!(matches!(
        StateKey::write_new(&path).unwrap_err(),
        KeyError::Exists { .. }
    ));

    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = StateKey::from_file(&path).unwrap_err();
    assert!(
        matches!(err, KeyError::Permissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"));

    assert!(matches!(
        StateKey::from_hex("abcd", "env").unwrap_err(),
        KeyError::Format { .. }
    ));
    assert!(matches!(
        StateKey::from_hex(&"zz".repeat(32), "env").unwrap_err(),
        KeyError::Format { .. }
    ));
}

#[test]
fn leftovers_of_interrupted_saves_are_removed_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    store.save("kv", "1.0.0", b"x").unwrap();
    fs::write(dir.path().join(".kv.state.tmp-Ab12Cd"), b"half a write").unwrap();
    // Files the host did not write, some with names close to its own.
    let others = [
        ".lock",
        ".kv.state.backup-by-operator",
        ".kv.state.Ab12Cd",
        ".kv.state.tmp-toolong1",
        ".kv.state.tmp-",
        ".Bad Name.state.tmp-abc123",
    ];
    for name in others {
        fs::write(dir.path().join(name), b"").unwrap();
    }
    let removed = store.remove_leftovers();
    assert_eq!(removed, vec![dir.path().join(".kv.state.tmp-Ab12Cd")]);
    assert!(store.load("kv").unwrap().is_some());
    for name in others {
        assert!(dir.path().join(name).exists(), "{name} was removed");
    }
}

#[test]
fn a_version_too_long_for_the_header_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::new(dir.path(), ring()).unwrap();
    let err = store.save("kv", &"9".repeat(300), b"x").unwrap_err();
    assert!(
        matches!(
            err,
            StateError::HeaderField {
                field: "version",
                ..
            }
        ),
        "{err}"
    );
    assert!(!store.path("kv").exists());
}

mod fuzz {
    //! Property tests of the state-file parser: whatever the bytes, opening a file never
    //! panics, and a file changed anywhere never opens to other content.
    //! `PROPTEST_CASES=100000 cargo test -p host --lib fuzz` runs a longer search.

    use std::path::Path;

    use proptest::prelude::*;

    use super::super::store::{open, seal};
    use super::ring;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(
            with_magic in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            // Half of the inputs get past the magic and the format version.
            let mut data = if with_magic { b"MKSTATE\0\x01\x00".to_vec() } else { Vec::new() };
            data.extend(tail);
            let keys = ring();
            let _ = open(&keys, Path::new("fuzz.state"), &data, Some("kv"));
            let _ = open(&keys, Path::new("fuzz.state"), &data, None);
        }

        #[test]
        fn a_sealed_file_changed_anywhere_never_opens_to_other_content(
            content in proptest::collection::vec(any::<u8>(), 0..256),
            service in "[a-z][a-z0-9_-]{0,20}",
            version in "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let keys = ring();
            let sealed = seal(&keys, &service, &version, &content).unwrap();
            let (header, opened) = open(&keys, Path::new("f"), &sealed, Some(&service)).unwrap();
            prop_assert_eq!(&opened, &content);
            prop_assert_eq!(&header.exported_by, &version);
            let mut damaged = sealed.clone();
            for (at, byte) in edits {
                let at = at.index(damaged.len());
                damaged[at] ^= byte | 1;
            }
            if let Some(cut) = cut {
                damaged.truncate(cut.index(damaged.len()));
            }
            // Two edits of one byte can cancel out (the 100 000-case run found that).
            prop_assume!(damaged != sealed);
            prop_assert!(open(&keys, Path::new("f"), &damaged, Some(&service)).is_err());
        }
    }
}
