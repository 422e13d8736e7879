//! tandem's node: the replication core on real sockets, with a durable store.

pub mod admin;
pub mod backup;
pub mod bodies;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod front;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod imap;
pub mod lmtp;
pub mod metrics;
pub mod migrate;
pub mod node;
pub mod peer;
pub mod record;
pub mod replica_link;
pub mod replicate;
pub mod store;
pub mod tls;
pub mod users;
