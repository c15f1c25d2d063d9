//! Test fixture: service `old`, built against ABI 0.0.5 (see ../Cargo.toml).

include!("../../../../fixtures/simple_service.rs");
simple_service!("old", "1.0.0", []);
