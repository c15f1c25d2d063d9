use std::path::Path;

use abi_stable::std_types::RVec;
use plugin_api::abi::RManifest;

use super::{file::check_elf, LoadError, Manifest};

#[test]
fn a_file_without_elf_magic_is_not_a_shared_library() {
    let err = check_elf(Path::new("x.so"), b"#!/bin/sh\necho hi\n").unwrap_err();
    assert!(matches!(err, LoadError::NotSharedLibrary { .. }), "{err}");
}

#[test]
fn an_elf_header_whose_tables_lie_past_the_end_is_truncated() {
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2; // 64-bit
    header[5] = 1; // little-endian
    header[0x28..0x30].copy_from_slice(&4096u64.to_le_bytes()); // e_shoff
    header[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    header[0x3C..0x3E].copy_from_slice(&10u16.to_le_bytes()); // e_shnum
    let err = check_elf(Path::new("x.so"), &header).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Truncated {
                len: 64,
                needed: 4736,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn an_elf_header_with_absurd_offsets_is_truncated_not_a_panic() {
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2;
    header[5] = 1;
    header[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes()); // e_shoff
    header[0x3A..0x3C].copy_from_slice(&u16::MAX.to_le_bytes());
    header[0x3C..0x3E].copy_from_slice(&u16::MAX.to_le_bytes());
    let err = check_elf(Path::new("x.so"), &header).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::Truncated {
                needed: u64::MAX,
                ..
            }
        ),
        "{err}"
    );
}

fn manifest(name: &str, version: &str) -> RManifest {
    RManifest {
        name: name.into(),
        version: version.into(),
        dependencies: RVec::new(),
    }
}

#[test]
fn a_manifest_version_must_be_short_semver() {
    assert!(Manifest::from_raw(&manifest("echo", "1.2.3-rc.1+build.7")).is_ok());
    let error = Manifest::from_raw(&manifest("echo", "one")).unwrap_err();
    assert!(error.contains("not semver"), "{error}");
    let long = format!("1.0.0-{}", "a".repeat(200));
    let error = Manifest::from_raw(&manifest("echo", &long)).unwrap_err();
    assert!(error.contains("longer than"), "{error}");
}
