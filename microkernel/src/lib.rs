//! The `microkernel` application: the command line, the daemon (`microkernel run`), the
//! control socket and its client (`ctl`), service-manager notifications, the bench and the
//! plugin scaffold, all built on the engine, the `host` crate.
//!
//! Nothing here is an API for plugins or embedders: it is the binary's, split into a library
//! so that the test suite can drive its parts. Only this crate knows the command line and
//! the control protocol's wire format.

pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod event;
pub mod logs;
pub mod notify;
pub mod scaffold;
