//! `tandem replicate`: runs a user replica's agent ([`tandem_core::user_replica`])
//! between the user's own store (a laptop's tandem node, reached on its admin socket)
//! and a cluster (reached on its IMAP port over TLS, logged in as the user, then
//! switched to the replica link by `X-REPLICATE`; see [`crate::replica_link`]).
//!
//! The agent's marks (per mailbox, where the two copies last agreed) are kept in a small
//! file written atomically after every change to them: an interrupted sync keeps what
//! it finished, and the next run starts from there.

use crate::admin::{AdminAddr, AdminReply, AdminRequest};
use crate::peer::PeerIo;
use crate::replica_link::{AgentLink, LinkNews};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::user_replica::{ReplicaSync, Side, SyncMarks, SyncReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response line from the IMAP server during login is at most this long.
const LINE_LEN_MAX: usize = 64 * 1024;
/// Untagged lines before a tagged answer at most.
const UNTAGGED_MAX: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A login exchange (the server slows down after failed passwords) must end by then.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait for any answer while requests are outstanding.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How the cluster's IMAP port is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (port 993).
    Implicit,
    /// Plain, then STARTTLS before the password (port 143).
    StartTls,
}

#[derive(Clone, Debug)]
pub struct ClusterLogin {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub user: String,
    pub password: String,
    /// CA certificates to trust (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Ask for COMPRESS=DEFLATE after login (a slow link's bytes).
    pub compress: bool,
}

impl ClusterLogin {
    /// `host`, `host:port` or `[v6]:port`; the port defaults to the TLS mode's.
    pub fn parse_server(text: &str, tls: TlsMode) -> Result<(String, u16), String> {
        let default_port = match tls {
            TlsMode::Implicit => 993,
            TlsMode::StartTls => 143,
        };
        if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| format!("{text}: an unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{text}: a bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{text}: not host[:port]")),
            };
            return Ok((host.to_string(), port));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => {
                Ok((host.to_string(), port.parse().map_err(|_| format!("{text}: a bad port"))?))
            }
            _ if text.is_empty() => Err("an empty server name".into()),
            _ => Ok((text.to_string(), default_port)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    pub cluster: ClusterLogin,
    /// The user replica's node (its admin socket).
    pub replica: AdminAddr,
    pub marks_file: PathBuf,
    pub rounds_max: u32,
}

/// The marks file: the agent's marks, and whose they are.
#[derive(Debug, Serialize, Deserialize)]
struct MarksFile {
    user: String,
    server: String,
    marks: SyncMarks,
}

/// The marks kept for `user` (none yet: a first, whole sync).
pub fn load_marks(path: &Path, user: &str, server: &str) -> Result<SyncMarks, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SyncMarks::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    // A damaged file is not taken for an empty one: without its marks, a message the
    // cluster expunged and has since forgotten would go back up as new mail.
    let file: MarksFile = serde_json::from_str(&text).map_err(|e| {
        format!("{}: {e} (the marks of the last sync; restore it, or sync into a new, empty store)", path.display())
    })?;
    if file.user != user || file.server != server {
        return Err(format!(
            "{} holds the marks of {} on {}, not of {user} on {server}: give each replica its own --marks file",
            path.display(),
            file.user,
            file.server
        ));
    }
    Ok(file.marks)
}

/// Writes the marks atomically: a crash leaves the old file or the new, never a part.
pub fn save_marks(path: &Path, user: &str, server: &str, marks: &SyncMarks) -> Result<(), String> {
    let file = MarksFile { user: user.to_string(), server: server.to_string(), marks: marks.clone() };
    let text = serde_json::to_string(&file).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads one CRLF-ended line byte by byte (nothing past it is consumed: what follows
/// may be TLS, DEFLATE or frames).
async fn read_line<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(|e| format!("read: {e}"))?;
        line.push(byte);
        if line.ends_with(b"\r\n") {
            line.truncate(line.len() - 2);
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() > LINE_LEN_MAX {
            return Err("a response line without end".into());
        }
    }
}

/// Sends command lines (CRLF added).
async fn send<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, lines: &str) -> Result<(), String> {
    stream.write_all(format!("{lines}\r\n").as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("write: {e}"))
}

/// Waits for the tagged answer to `tag`; Err with the server's words unless it is OK.
async fn answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, tag: &str) -> Result<String, String> {
    for _ in 0..UNTAGGED_MAX {
        let line = read_line(stream).await?;
        if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
            return match rest.strip_prefix("OK") {
                Some(ok) => Ok(ok.trim().to_string()),
                None => Err(rest.to_string()),
            };
        }
    }
    Err(format!("no answer to {tag} after {UNTAGGED_MAX} lines"))
}

fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, String> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(crate::tls::client_trusting(ca_file)?)))
}

/// Logs in to the cluster as the user over TLS and switches to the replica link.
pub async fn open_cluster(login: &ClusterLogin) -> Result<Box<dyn PeerIo>, String> {
    let addr = format!("{}:{}", login.host, login.port);
    let work = async {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| format!("{addr}: no connection in {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        let connector = tls_connector(login.ca_file.as_deref())?;
        let name = rustls::pki_types::ServerName::try_from(login.host.clone()).map_err(|e| e.to_string())?;
        let mut stream: Box<dyn PeerIo> = match login.tls {
            TlsMode::Implicit => Box::new(connector.connect(name, tcp).await.map_err(|e| format!("{addr}: TLS: {e}"))?),
            TlsMode::StartTls => {
                let mut plain = tcp;
                greeting(&mut plain).await?;
                send(&mut plain, "s STARTTLS").await?;
                answer(&mut plain, "s").await.map_err(|e| format!("{addr}: STARTTLS: {e}"))?;
                Box::new(connector.connect(name, plain).await.map_err(|e| format!("{addr}: TLS: {e}"))?)
            }
        };
        // The login and the switch go together, before the greeting is read: on a link of
        // a second each way, every round trip saved is a second. The first frame waits
        // for the switch's answer (frames must not reach the IMAP parser).
        use base64::Engine;
        let plain = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{}\0{}", login.user, login.password).as_bytes());
        let version = crate::replica_link::VERSION;
        let switch = format!("r X-REPLICATE {version}{}", if login.compress { " DEFLATE" } else { "" });
        send(&mut stream, &format!("a AUTHENTICATE PLAIN {plain}\r\n{switch}")).await?;
        if login.tls == TlsMode::Implicit {
            greeting(&mut stream).await?;
        }
        answer(&mut stream, "a").await.map_err(|e| format!("{addr}: login as {}: {e}", login.user))?;
        answer(&mut stream, "r").await.map_err(|e| {
            // A server from before link versions does not know the command with one.
            let hint = if e.starts_with("BAD") { " (is the cluster an older tandem release?)" } else { "" };
            format!("{addr}: X-REPLICATE {version}: {e}{hint}")
        })?;
        if login.compress {
            stream = crate::peer::deflated(stream);
        }
        Ok::<_, String>(stream)
    };
    tokio::time::timeout(LOGIN_TIMEOUT, work).await.map_err(|_| format!("{addr}: no login in {LOGIN_TIMEOUT:?}"))?
}

async fn greeting<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<(), String> {
    let line = read_line(stream).await?;
    if line.starts_with("* OK") { Ok(()) } else { Err(format!("the server greets with: {line}")) }
}

/// Opens the replica link on the user replica's own node (its admin interface).
pub async fn open_replica(addr: &AdminAddr) -> Result<Box<dyn PeerIo>, String> {
    let mut stream: Box<dyn PeerIo> = match addr {
        AdminAddr::Unix(path) => {
            Box::new(tokio::net::UnixStream::connect(path).await.map_err(|e| format!("cannot reach {addr}: {e}"))?)
        }
        AdminAddr::Tcp { addr: tcp, token } => {
            let mut s = tokio::net::TcpStream::connect(tcp).await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
            s.write_all(crate::admin::token_line(token).as_bytes()).await.map_err(|e| e.to_string())?;
            Box::new(s)
        }
    };
    let mut line = serde_json::to_string(&AdminRequest::Replicate).map_err(|e| e.to_string())?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await.map_err(|e| format!("write to {addr}: {e}"))?;
    let mut answer = Vec::new();
    loop {
        let byte = stream.read_u8().await.map_err(|e| format!("read from {addr}: {e}"))?;
        if byte == b'\n' {
            break;
        }
        answer.push(byte);
        if answer.len() > LINE_LEN_MAX {
            return Err(format!("{addr}: an answer without end"));
        }
    }
    match serde_json::from_slice::<AdminReply>(&answer) {
        Ok(AdminReply::Replicating) => Ok(stream),
        Ok(AdminReply::Error { reason, .. }) => Err(format!("{addr}: {reason}")),
        Ok(other) => Err(format!("{addr}: unexpected answer {other:?}")),
        Err(e) => Err(format!("{addr}: bad answer: {e}")),
    }
}

/// One sync: both links opened, the agent driven until it is done, the marks saved
/// as they change. Err only when a link cannot be opened or the marks cannot be kept;
/// a sync that ends without converging says so in its report.
pub async fn sync_once(opts: &ReplicateOptions) -> Result<SyncReport, String> {
    let server = format!("{}:{}", opts.cluster.host, opts.cluster.port);
    let user = opts.cluster.user.as_str();
    let marks = load_marks(&opts.marks_file, user, &server)?;
    let replica_stream = open_replica(&opts.replica).await?;
    let cluster_stream = open_cluster(&opts.cluster).await?;
    let (news_tx, mut news) = tokio::sync::mpsc::channel(crate::replica_link::IN_FLIGHT_MAX * 4);
    let replica = AgentLink::start(replica_stream, Side::Replica, news_tx.clone(), REPLY_TIMEOUT);
    let cluster = AgentLink::start(cluster_stream, Side::Cluster, news_tx, REPLY_TIMEOUT);
    let mut agent = ReplicaSync::new(user, marks, opts.rounds_max);
    let mut saved = agent.marks().clone();
    let mut lost = Vec::new();
    loop {
        while let Some((side, id, request)) = agent.poll_request() {
            let link = match side {
                Side::Replica => &replica,
                Side::Cluster => &cluster,
            };
            if !link.send(id, request).await {
                lost.push(format!("the {side:?} link is gone"));
                agent.side_lost(side);
            }
        }
        if agent.is_done() {
            break;
        }
        match news.recv().await {
            Some((side, LinkNews::Reply(frame))) => agent.handle_reply(side, frame.id, frame.reply),
            Some((side, LinkNews::Lost(why))) => {
                lost.push(format!("{side:?}: {why}"));
                agent.side_lost(side);
            }
            None => break,
        }
        if agent.marks() != &saved {
            save_marks(&opts.marks_file, user, &server, agent.marks())?;
            saved = agent.marks().clone();
        }
    }
    if agent.marks() != &saved {
        save_marks(&opts.marks_file, user, &server, agent.marks())?;
    }
    let mut report = agent.report().clone();
    report.failures.extend(lost);
    Ok(report)
}

/// The report as one line for the operator's log.
pub fn summary(report: &SyncReport) -> String {
    format!(
        "{}: {} rounds, {} requests, {} mailbox syncs; pushed {} records and {} bodies ({} bytes), pulled {} records and {} bodies ({} bytes){}{}{}",
        if report.converged { "in sync" } else { "NOT in sync" },
        report.rounds,
        report.requests,
        report.mailboxes_synced,
        report.records_pushed,
        report.bodies_pushed,
        report.body_bytes_pushed,
        report.records_pulled,
        report.bodies_pulled,
        report.body_bytes_pulled,
        if report.bodies_on_demand == 0 {
            String::new()
        } else {
            format!(", {} asked for by a client", report.bodies_on_demand)
        },
        if report.text_parts_pulled == 0 {
            String::new()
        } else {
            format!(
                ", text parts of {} large messages ({} bytes)",
                report.text_parts_pulled, report.text_part_bytes_pulled
            )
        },
        if report.failures.is_empty() { String::new() } else { format!("; {}", report.failures.join("; ")) }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_take_their_mode_s_port() {
        let p = |t| ClusterLogin::parse_server(t, TlsMode::Implicit);
        assert_eq!(p("imap.example.org").unwrap(), ("imap.example.org".to_string(), 993));
        assert_eq!(p("imap.example.org:1993").unwrap(), ("imap.example.org".to_string(), 1993));
        assert_eq!(p("[::1]:994").unwrap(), ("::1".to_string(), 994));
        assert_eq!(ClusterLogin::parse_server("h", TlsMode::StartTls).unwrap().1, 143);
        assert!(p("h:x").is_err());
        assert!(p("").is_err());
    }

    #[test]
    fn marks_belong_to_one_user_on_one_server_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marks.json");
        assert_eq!(load_marks(&path, "alice", "h:993").unwrap(), SyncMarks::default());
        let mut marks = SyncMarks::default();
        marks.mailboxes.insert("INBOX".into(), Default::default());
        save_marks(&path, "alice", "h:993", &marks).unwrap();
        assert_eq!(load_marks(&path, "alice", "h:993").unwrap(), marks);
        assert!(load_marks(&path, "bob", "h:993").unwrap_err().contains("not of bob"));
        std::fs::write(&path, "{\"user\":").unwrap();
        assert!(load_marks(&path, "alice", "h:993").unwrap_err().contains("restore it"));
    }
}
