//! tandem-core: the sans-IO state machine of tandem's replication protocol (the design in
//! `seed/dovecot-replication-design-2008.txt`, fixed by `DESIGN.md`), and its wire codec.
//!
//! Nothing here reads a clock, opens a socket or a file, spawns a thread or draws global
//! randomness: inputs enter through [`Server::handle`], outputs leave through
//! [`Server::poll_output`], and [`Server::poll_timeout`] says when to call again.
#![forbid(unsafe_code)]

pub mod bugs;
pub mod codec;
pub mod hash;
pub mod io;
pub mod limits;
pub mod mailbox;
pub mod marks;
pub mod membership;
pub mod msg;
pub mod partial;
pub mod record;
pub mod server;
pub mod store;
pub mod types;
pub mod user_replica;
pub mod wire;

pub use bugs::{Bug, MergeRules};
pub use io::*;
pub use marks::{Mark, Marks};
pub use membership::{Member, MemberChange, MemberError, MemberState, Membership};
pub use msg::*;
pub use server::Server;
pub use store::{BodyStore, DiskImage, MemoryBodies, StoreWrite};
pub use types::*;

use std::fmt;

/// This build of the core: its version and a hash of its sources (see `build.rs`).
pub const BUILD: &str = env!("TANDEM_CORE_BUILD");

/// Errors are values: every input a peer, a client or a file can influence is checked
/// and refused with one of these instead of a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    BadFlag(String),
    /// Malformed wire bytes: where, and what the decoder expected there.
    Decode {
        offset: usize,
        expected: String,
    },
    /// A limit was exceeded (literal size, list length, ...).
    TooLarge {
        what: &'static str,
        limit: usize,
    },
    BadRequest(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadFlag(s) => write!(f, "bad flag {s:?}"),
            Error::Decode { offset, expected } => write!(f, "malformed input at byte {offset}: expected {expected}"),
            Error::TooLarge { what, limit } => write!(f, "{what} exceeds the limit of {limit}"),
            Error::BadRequest(s) => write!(f, "bad request: {s}"),
        }
    }
}

impl std::error::Error for Error {}
