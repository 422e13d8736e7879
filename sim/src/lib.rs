//! tandem-sim: a seeded, deterministic simulator of a tandem cluster, its scenario
//! runner and its invariant oracle.
#![forbid(unsafe_code)]

pub mod explore;
pub mod oracle;
pub mod scenario;
mod scenario_file;
pub mod scenario_write;
pub mod shrink;
pub mod world;

pub use world::{RunOptions, RunReport, run};
