//! tandem-sim: a seeded, deterministic simulator of a tandem cluster, its scenario
//! runner and its invariant oracle.
#![forbid(unsafe_code)]

pub mod check;
pub mod explore;
pub mod focus;
pub mod incident;
pub mod oracle;
pub mod replay;
pub mod scenario;
mod scenario_file;
pub mod scenario_write;
pub mod shrink;
pub mod world;

pub use world::{RunOptions, RunReport, run};

/// `println!` for the command line: a closed standard output (`tandem-sim run | head`)
/// ends the program quietly with 141, as a Unix tool ends on SIGPIPE, instead of
/// panicking in `println!`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*)
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(141);
        }
    }};
}
