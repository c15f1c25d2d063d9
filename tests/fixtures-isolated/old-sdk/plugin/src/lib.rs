//! Test fixture: service `older-sdk`, built against SDK 0.0.9 over the host's ABI (see
//! ../Cargo.toml).

include!("../../../../fixtures/simple_service.rs");
simple_service!("older-sdk", "1.0.0", []);
