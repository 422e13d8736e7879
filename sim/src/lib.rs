//! tandem-sim: a seeded, deterministic simulator of a tandem cluster, its scenario
//! runner and its invariant oracle.
#![forbid(unsafe_code)]

pub mod oracle;
pub mod scenario;
pub mod world;

pub use world::{RunOptions, RunReport, run};
