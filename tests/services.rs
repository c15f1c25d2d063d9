//! Services at work: dependency order, requests through the kernel, failures of plugins.
