//! `unipeer bench ...`: benchmarks that print a table, with ratios against a baseline run in
//! the same invocation.

pub mod auth;
pub mod boot;
pub mod cluster;
pub mod jobs;
pub mod linux_baseline;
pub mod overlay;
