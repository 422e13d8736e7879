//! The admin interface: one JSON object per line each way, on a loopback TCP port.
//! `tandem status`, `tandem deliver` and `tandem dump` are clients of it.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkStatus {
    pub peer: u32,
    pub connected: bool,
    pub reachable: bool,
    pub backlog: usize,
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
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageLine {
    pub uid: u32,
    pub guid: String,
    pub flags: Vec<String>,
    pub modseq: u64,
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
    Saved { uidvalidity: u32, uid: u32, guid: String },
    Stored { modseq: u64 },
    Expunged { uids: Vec<u32> },
    Moved { master: u32 },
    Error { temporary: bool, reason: String },
}

/// Sends one request to a node's admin port and waits for its answer.
pub async fn call(addr: SocketAddr, request: &AdminRequest, timeout: Duration) -> Result<AdminReply, String> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
        let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(|e| format!("write to {addr}: {e}"))?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await.map_err(|e| format!("read from {addr}: {e}"))?;
        if answer.is_empty() {
            return Err(format!("{addr} closed the connection without answering"));
        }
        serde_json::from_str(&answer).map_err(|e| format!("bad answer from {addr}: {e}"))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| format!("{addr} did not answer in {timeout:?}"))?
}

/// [`call`] for callers without a runtime (tests, the benchmark): one request over a
/// fresh connection, blocking for at most `timeout` per read.
pub fn call_blocking(addr: SocketAddr, request: &AdminRequest, timeout: Duration) -> Result<AdminReply, String> {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("cannot reach {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(request).map_err(|e| e.to_string())?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(|e| format!("write to {addr}: {e}"))?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer).map_err(|e| format!("read from {addr}: {e}"))?;
    if answer.is_empty() {
        return Err(format!("{addr} closed the connection without answering"));
    }
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from {addr}: {e}: {answer:?}"))
}

/// "user/name" -> mailbox key.
pub fn parse_mailbox(text: &str) -> Result<tandem_core::MailboxKey, String> {
    match text.split_once('/') {
        Some((user, name)) if !user.is_empty() && !name.is_empty() => Ok(tandem_core::MailboxKey::new(user, name)),
        _ => Err(format!("{text:?} is not a mailbox (user/name, e.g. alice@example.org/INBOX)")),
    }
}
