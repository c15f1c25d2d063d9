//! The integration tests: one binary, one module per area. The plugin fixtures are built once
//! per run (see `support`).

mod support;

mod bench;
mod cli;
mod endurance;
mod etcd;
mod fleet;
mod isolation;
mod loading;
mod markers;
mod misbehaviour;
mod operations;
mod out_of_tree;
mod paths;
mod reload;
mod services;
mod state;
