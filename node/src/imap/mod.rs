//! IMAP4rev1 on a node. imap-codec parses commands (its Fragmentizer handles literals and
//! lets an oversize literal be refused before it is read); responses are written by
//! `wire`. Every write goes through the core (SAVE, COPY, EXPUNGE, STORE), so it
//! replicates, and is answered only when the core answers it under the durability mode.
//!
//! A selected session keeps the UIDs it has shown (its sequence numbers) and the
//! HIGHESTMODSEQ it has shown. Before each command, and every 500 ms during IDLE, it
//! asks the node what changed after that modseq (the core's `changes_since`: a lookup
//! when nothing did, else a range of the mailbox's modseq index) and reports it — new
//! messages (EXISTS), removed ones (EXPUNGE, held back during commands that use sequence
//! numbers), and flag changes (FETCH) — whether made by this session, another one,
//! another server, or a UID renumbering after a conflict. When the changes do not add up
//! to the mailbox's message count (a tombstone collected meanwhile), or the UIDVALIDITY
//! changed, it reads the mailbox whole instead.

mod address;
mod catenate;
mod esearch;
mod listext;
pub(crate) mod mime;
mod multiappend;
mod notify;
pub(crate) mod parsed;
pub(crate) mod recent;
pub(crate) mod session;
mod special_use;
pub(crate) mod text_parts;
pub(crate) mod thread;
mod utf7;
mod wire;

pub use session::serve;
