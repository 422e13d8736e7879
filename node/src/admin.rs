//! The admin interface: one JSON object per line each way, on a Unix socket (mode
//! 0600: whoever can open it operates the node) or, when configured, a TCP port where a
//! `TOKEN <token>` line must come first. HTTP requests are refused on both. `tandem
//! status`, `tandem deliver` and `tandem dump` are clients of it.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// A request line is at most this long (a delivered message travels in it).
pub const REQUEST_LEN_MAX: usize = 96 * 1024 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    /// Save a message (its text) into `mailbox` ("user/name").
    Deliver {
        mailbox: String,
        body: String,
        flags: Vec<String>,
    },
    /// The mailbox as this node shows it.
    Dump {
        mailbox: String,
    },
    /// Add and remove flags on UIDs.
    Store {
        mailbox: String,
        uids: Vec<u32>,
        add: Vec<String>,
        remove: Vec<String>,
    },
    Expunge {
        mailbox: String,
        uids: Vec<u32>,
    },
    MasterMove {
        mailbox: String,
    },
    /// The cluster's membership as this node knows it.
    Members,
    /// Add a server (`address`: where the others dial it).
    MemberAdd {
        id: u32,
        address: String,
    },
    /// Retire a server: it hands its work over first, unless `lost` (a server gone for
    /// good, retired at once).
    MemberRemove {
        id: u32,
        lost: bool,
    },
    /// A migrated message (`tandem import`): at `uid` if given (see the core's
    /// `ClientRequest::Import`), else saved at the next UID; `received` is its
    /// INTERNALDATE (seconds since the Unix epoch).
    Import {
        mailbox: String,
        uidvalidity: u32,
        uid: Option<u32>,
        received: u64,
        flags: Vec<String>,
        body_base64: String,
    },
    /// Imports (only) given to the core together and in order, answered together
    /// (`AdminReply::Batch`, one result each): an import's round trips overlap.
    ImportBatch {
        requests: Vec<AdminRequest>,
    },
    /// A migrated mailbox: created, with `uidvalidity` if it has no history yet.
    ImportMailbox {
        mailbox: String,
        uidvalidity: u32,
    },
    /// The user subscribes to the mailbox (IMAP SUBSCRIBE), or unsubscribes.
    Subscribe {
        mailbox: String,
        subscribe: bool,
    },
    /// The visible mailboxes of `user`, or of every user.
    Mailboxes {
        user: Option<String>,
    },
    /// The bodies of messages of a mailbox (those this node holds; a UID it does not
    /// have is left out), at most [`FETCH_UIDS_MAX`] per request.
    Fetch {
        mailbox: String,
        uids: Vec<u32>,
    },
    /// A consistent copy of the node's store into `dir` (a new or empty directory the
    /// node can write), taken while the node runs: see `crate::backup`.
    Backup {
        dir: String,
    },
    /// Switch this connection to the replica link (`crate::replica_link`), as the owner
    /// of this user replica's store: what `tandem replicate` does on the laptop's node.
    Replicate,
}

/// Requests per [`AdminRequest::ImportBatch`].
pub const BATCH_MAX: usize = 64;

/// Bodies per [`AdminRequest::Fetch`].
pub const FETCH_UIDS_MAX: usize = 256;

/// Bytes of bodies per [`AdminRequest::Fetch`] (their stored sizes summed), unless it
/// asks for one UID: what one answer holds in the node's memory, twice (the bytes and
/// their base64).
pub const FETCH_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Splits `uids` (with their sizes) into fetches within [`FETCH_UIDS_MAX`] and
/// [`FETCH_BYTES_MAX`], in order; a message larger than the byte budget goes alone.
pub fn fetch_batches(sized: &[(u32, u64)]) -> Vec<Vec<u32>> {
    let mut batches: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0u64;
    for &(uid, size) in sized {
        let fits = batches
            .last()
            .is_some_and(|last| last.len() < FETCH_UIDS_MAX && bytes.saturating_add(size) <= FETCH_BYTES_MAX);
        if fits {
            bytes = bytes.saturating_add(size);
            if let Some(last) = batches.last_mut() {
                last.push(uid);
            }
        } else {
            bytes = size;
            batches.push(vec![uid]);
        }
    }
    batches
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailboxLine {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub subscribed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FetchedBody {
    pub uid: u32,
    pub body_base64: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberLine {
    pub id: u32,
    /// active, leaving or retired.
    pub state: String,
    pub address: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkStatus {
    pub peer: u32,
    pub connected: bool,
    pub reachable: bool,
    pub backlog: usize,
    /// The peer's store identity as this node last heard it (16 hex digits), if heard:
    /// it changes only when the peer's disk was lost or replaced.
    #[serde(default)]
    pub store: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailboxStatus {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub highest_modseq: u64,
    pub digest: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub id: u32,
    pub root: Option<u32>,
    pub epoch: u64,
    pub masters: Vec<(String, u32)>,
    pub mastered_here: Vec<String>,
    pub links: Vec<LinkStatus>,
    pub mailboxes: Vec<MailboxStatus>,
    pub jobs: usize,
    pub wanted_bodies: usize,
    /// This node's store identity (16 hex digits), drawn when its store was made.
    #[serde(default)]
    pub store: String,
    /// A store made after its cluster had run (a new server, or one started on an empty
    /// disk): how many of its mailboxes no master has confirmed yet (reads that cannot
    /// reach their master are refused from those). None for any other store.
    #[serde(default)]
    pub unconfirmed: Option<usize>,
    /// Whether the store is filled: it has been in a root term and, if a newcomer, every
    /// mailbox it holds is confirmed (at least one). What an operator waits for before
    /// sending clients to a new server. None from an older node.
    #[serde(default)]
    pub filled: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageLine {
    pub uid: u32,
    pub guid: String,
    pub flags: Vec<String>,
    pub modseq: u64,
    /// INTERNALDATE, seconds since the Unix epoch.
    #[serde(default)]
    pub received: u64,
    #[serde(default)]
    pub size: u32,
    /// The body's 64-bit checksum (`tandem_core::hash::body_checksum`), hex: how an
    /// import recognises a message it brought in before.
    #[serde(default)]
    pub checksum: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dump {
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub highest_modseq: u64,
    pub messages: Vec<MessageLine>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminReply {
    Status(Status),
    Dump(Dump),
    Saved {
        uidvalidity: u32,
        uid: u32,
        guid: String,
    },
    Stored {
        modseq: u64,
    },
    Expunged {
        uids: Vec<u32>,
    },
    Moved {
        master: u32,
    },
    Members {
        members: Vec<MemberLine>,
    },
    Mailboxes {
        mailboxes: Vec<MailboxLine>,
    },
    Bodies {
        bodies: Vec<FetchedBody>,
    },
    Batch {
        results: Vec<AdminReply>,
    },
    BackedUp {
        dir: String,
        bytes: u64,
        body_files: u64,
        mailboxes: u64,
        messages: u64,
    },
    /// The connection now speaks the replica link.
    Replicating,
    Error {
        temporary: bool,
        reason: String,
    },
}

/// Where a client finds a node's admin interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAddr {
    /// The node's Unix socket (the default: `<data_dir>/admin.sock`).
    Unix(PathBuf),
    /// A TCP admin port, with the token the node was configured with.
    Tcp { addr: SocketAddr, token: String },
}

impl AdminAddr {
    /// A socket address is TCP (and needs `token`), anything else a socket path.
    pub fn parse(text: &str, token: Option<String>) -> Result<AdminAddr, String> {
        match text.parse::<SocketAddr>() {
            Ok(addr) => match token {
                Some(token) => Ok(AdminAddr::Tcp { addr, token }),
                None => Err(format!("{addr} is a TCP admin port: give its token (--admin-token-file)")),
            },
            Err(_) => Ok(AdminAddr::Unix(PathBuf::from(text))),
        }
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Unix(p) => write!(f, "{}", p.display()),
            AdminAddr::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// The line a TCP admin client sends first.
pub fn token_line(token: &str) -> String {
    format!("TOKEN {token}\n")
}

/// A request line as sent.
fn request_line(request: &AdminRequest) -> Result<String, String> {
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    Ok(line)
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    addr: &AdminAddr,
    request: &AdminRequest,
) -> Result<AdminReply, String> {
    let mut stream = BufReader::new(stream);
    let mut out = match addr {
        AdminAddr::Tcp { token, .. } => token_line(token),
        AdminAddr::Unix(_) => String::new(),
    };
    out.push_str(&request_line(request)?);
    stream.get_mut().write_all(out.as_bytes()).await.map_err(|e| format!("write to {addr}: {e}"))?;
    let mut answer = String::new();
    stream.read_line(&mut answer).await.map_err(|e| format!("read from {addr}: {e}"))?;
    if answer.is_empty() {
        return Err(format!("{addr} closed the connection without answering"));
    }
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from {addr}: {e}"))
}

/// Sends one request to a node's admin interface and waits for its answer.
pub async fn call(addr: &AdminAddr, request: &AdminRequest, timeout: Duration) -> Result<AdminReply, String> {
    let work = async {
        match addr {
            AdminAddr::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
                exchange(stream, addr, request).await
            }
            AdminAddr::Tcp { addr: tcp, .. } => {
                let stream = TcpStream::connect(tcp).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
                exchange(stream, addr, request).await
            }
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("{addr} did not answer in {timeout:?}"))?
}

/// [`call`] for callers without a runtime (tests, the benchmark): one request over a
/// fresh connection, blocking for at most `timeout` per read.
pub fn call_blocking(addr: &AdminAddr, request: &AdminRequest, timeout: Duration) -> Result<AdminReply, String> {
    use std::io::BufRead;
    fn go<S: std::io::Read + std::io::Write>(
        mut stream: S,
        addr: &AdminAddr,
        request: &AdminRequest,
    ) -> Result<AdminReply, String> {
        let mut out = match addr {
            AdminAddr::Tcp { token, .. } => token_line(token),
            AdminAddr::Unix(_) => String::new(),
        };
        out.push_str(&request_line(request)?);
        stream.write_all(out.as_bytes()).map_err(|e| format!("write to {addr}: {e}"))?;
        let mut answer = String::new();
        std::io::BufReader::new(stream).read_line(&mut answer).map_err(|e| format!("read from {addr}: {e}"))?;
        if answer.is_empty() {
            return Err(format!("{addr} closed the connection without answering"));
        }
        serde_json::from_str(&answer).map_err(|e| format!("bad answer from {addr}: {e}: {answer:?}"))
    }
    match addr {
        AdminAddr::Unix(path) => {
            let stream =
                std::os::unix::net::UnixStream::connect(path).map_err(|e| format!("cannot reach {addr}: {e}"))?;
            stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            go(stream, addr, request)
        }
        AdminAddr::Tcp { addr: tcp, .. } => {
            let stream = std::net::TcpStream::connect(tcp).map_err(|e| format!("cannot reach {addr}: {e}"))?;
            stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            go(stream, addr, request)
        }
    }
}

/// True for the first line of an HTTP request: a browser page may post to a loopback
/// port, and nothing it sends may run as an admin command.
pub fn looks_like_http(line: &str) -> bool {
    const METHODS: [&str; 9] =
        ["GET ", "POST ", "PUT ", "HEAD ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE "];
    METHODS.iter().any(|m| line.len() >= m.len() && line[..m.len()].eq_ignore_ascii_case(m))
        || line.contains(" HTTP/1.")
}

/// Compares a presented token with the configured one in time independent of where
/// they differ.
pub fn token_matches(presented: &str, configured: &str) -> bool {
    use hmac::Mac;
    // HMAC keys of any length are valid: new_from_slice cannot fail here.
    let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(b"tandem admin token") else { return false };
    mac.update(configured.as_bytes());
    let expected = mac.finalize().into_bytes();
    let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(b"tandem admin token") else { return false };
    mac.update(presented.as_bytes());
    mac.verify_slice(&expected).is_ok()
}

/// "user/name" -> mailbox key.
pub fn parse_mailbox(text: &str) -> Result<tandem_core::MailboxKey, String> {
    match text.split_once('/') {
        Some((user, name)) if !user.is_empty() && !name.is_empty() => Ok(tandem_core::MailboxKey::new(user, name)),
        _ => Err(format!("{text:?} is not a mailbox (user/name, e.g. alice@example.org/INBOX)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_stay_within_their_count_and_byte_budgets() {
        let mib = 1024 * 1024;
        let sized = [(1, 30 * mib), (2, 30 * mib), (3, 30 * mib), (4, 100 * mib), (5, 1), (6, 1)];
        assert_eq!(fetch_batches(&sized), vec![vec![1, 2], vec![3], vec![4], vec![5, 6]]);
        let many: Vec<(u32, u64)> = (1..=600).map(|uid| (uid, 10)).collect();
        let batches = fetch_batches(&many);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![256, 256, 88]);
        assert_eq!(batches.concat(), (1..=600).collect::<Vec<_>>(), "every UID once, in order");
        assert!(fetch_batches(&[]).is_empty());
    }

    #[test]
    fn http_is_recognised_and_tokens_compare() {
        assert!(looks_like_http("POST / HTTP/1.1\r\n"));
        assert!(looks_like_http("get /x HTTP/1.0"));
        assert!(!looks_like_http("{\"cmd\":\"status\"}"));
        assert!(token_matches("abc", "abc") && !token_matches("abd", "abc") && !token_matches("", "abc"));
        assert_eq!(AdminAddr::parse("/run/a.sock", None), Ok(AdminAddr::Unix("/run/a.sock".into())));
        assert!(AdminAddr::parse("127.0.0.1:7201", None).is_err());
    }
}
