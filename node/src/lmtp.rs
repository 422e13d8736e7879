//! LMTP (RFC 2033) for delivery from an MTA. Each accepted recipient's copy is a SAVE
//! into that user's INBOX through the core; after DATA the node answers once per
//! recipient: 250 when the save is acknowledged under the durability mode, 451 when it
//! is not (the MTA keeps the mail and retries), 550 for unknown users (at RCPT).

use crate::front::Front;
use crate::node::NodeHandle;
use std::time::Duration;
use tandem_core::io::{ClientReply, ClientRequest};
use tandem_core::msg::WriteResult;
use tandem_core::types::MailboxKey;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// A command line (RFC 5321 allows 512 bytes; extensions make them longer).
const LINE_LEN_MAX: usize = 4096;
/// A line of message text: RFC 5322 says 998 bytes, real mail has longer ones. A longer
/// line is not stored: the message is refused as too big, and its bytes are discarded.
const DATA_LINE_LEN_MAX: usize = 1024 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn serve(listener: TcpListener, node: NodeHandle, front: Front, hostname: String) {
    let limits = front.session_limits("421 4.3.2 too many connections, try again later\r\n");
    crate::node::serve_sessions(listener, limits, move |stream, addr| {
        let (node, front, hostname) = (node.clone(), front.clone(), hostname.clone());
        async move {
            if let Err(e) = session(stream, node, front, &hostname).await {
                debug!(%addr, error = %e, "LMTP session ended");
            }
        }
    })
    .await
}

/// One line, CRLF or LF ended, at most LINE_LEN_MAX bytes; None at end of stream.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    let read = tokio::time::timeout(IDLE_TIMEOUT, (&mut *r).take(LINE_LEN_MAX as u64 + 1).read_until(b'\n', &mut line))
        .await
        .map_err(|_| "idle too long".to_string())?
        .map_err(|e| e.to_string())?;
    if read == 0 {
        return Ok(None);
    }
    if line.len() > LINE_LEN_MAX {
        return Err("line too long".into());
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The address inside `FROM:<...>` / `TO:<...>`, parameters ignored.
fn path_arg(rest: &str) -> Option<String> {
    let start = rest.find('<')?;
    let end = rest[start..].find('>')? + start;
    Some(rest[start + 1..end].to_string())
}

/// One LMTP session on any byte stream (a TCP connection; the fuzzer's pipe).
pub(crate) async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    node: NodeHandle,
    front: Front,
    hostname: &str,
) -> Result<(), String> {
    let size_max = front.limits.message_size_max;
    let (read, mut write) = tokio::io::split(stream);
    let mut r = BufReader::new(read);
    let send = |mut text: String| {
        text.push_str("\r\n");
        text
    };
    write.write_all(send(format!("220 {hostname} tandem LMTP ready")).as_bytes()).await.map_err(|e| e.to_string())?;
    let mut greeted = false;
    let mut sender: Option<String> = None;
    // (as written, the user it names)
    let mut recipients: Vec<(String, String)> = Vec::new();
    while let Some(line) = read_line(&mut r).await? {
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("LHLO") {
            greeted = true;
            format!("250-{hostname}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {size_max}")
        } else if upper.starts_with("MAIL FROM:") {
            if !greeted {
                "503 5.5.1 LHLO first".into()
            } else if declared_size(&line[10..]).is_some_and(|n| n > size_max) {
                format!("552 5.3.4 message size exceeds the limit of {size_max} bytes")
            } else {
                sender = Some(path_arg(&line[10..]).unwrap_or_default());
                recipients.clear();
                "250 2.1.0 OK".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            match (&sender, path_arg(&line[8..])) {
                (None, _) => "503 5.5.1 MAIL first".into(),
                (_, None) => "501 5.1.3 bad recipient address".into(),
                (_, Some(rcpt)) => match front.users().recipient(&rcpt, front.limits.lmtp_local_part_ignore_case) {
                    // One copy per user however often the user is named (each RCPT still
                    // gets its answer after DATA, as LMTP wants).
                    // Duplicates cost a line each: bounded too.
                    Some(_) if recipients.len() >= front.limits.recipients_max.saturating_mul(4) => {
                        "452 4.5.3 too many recipients".into()
                    }
                    Some(user) if recipients.iter().any(|(_, u)| u == user) => {
                        recipients.push((rcpt.clone(), user.to_string()));
                        "250 2.1.5 OK".into()
                    }
                    Some(_) if distinct(&recipients) >= front.limits.recipients_max => {
                        "452 4.5.3 too many recipients".into()
                    }
                    Some(user) => {
                        recipients.push((rcpt.clone(), user.to_string()));
                        "250 2.1.5 OK".into()
                    }
                    None => format!("550 5.1.1 <{rcpt}> no such user here"),
                },
            }
        } else if upper == "DATA" {
            if recipients.is_empty() {
                "503 5.5.1 no valid recipients".into()
            } else {
                write.write_all(b"354 go ahead, end with <CRLF>.<CRLF>\r\n").await.map_err(|e| e.to_string())?;
                // One shared body for every recipient: cloning it is a reference count.
                let body = read_data(&mut r, size_max).await?.map(tandem_core::Body::from);
                let mut replies = Vec::new();
                let mut answered: Vec<(String, String)> = Vec::new();
                for (rcpt, user) in std::mem::take(&mut recipients) {
                    if let Some((_, reply)) = answered.iter().find(|(u, _)| *u == user) {
                        // The same answer for a user named twice: delivered once.
                        let reply = reply.replace(&format!("<{user}>"), &format!("<{rcpt}>"));
                        replies.push(reply);
                        continue;
                    }
                    let reply = match &body {
                        None => format!("552 5.3.4 message exceeds the limit of {size_max} bytes"),
                        Some(bytes) => match front.within_quota(&node, &user, bytes.len() as u64, 1).await {
                            Ok(()) => deliver(&node, &user, bytes.clone()).await,
                            Err(why) => format!("552 5.2.2 <{user}> mailbox full: {why}"),
                        },
                    };
                    answered.push((user, reply.clone()));
                    replies.push(reply);
                }
                sender = None;
                replies.join("\r\n")
            }
        } else if upper == "RSET" {
            sender = None;
            recipients.clear();
            "250 2.0.0 OK".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 bye\r\n").await.map_err(|e| e.to_string())?;
            return Ok(());
        } else if upper.starts_with("HELO") || upper.starts_with("EHLO") {
            "500 5.5.1 this is LMTP: use LHLO".into()
        } else {
            "500 5.5.2 command not recognized".into()
        };
        write.write_all(send(reply).as_bytes()).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Users among the recipients, each counted once.
fn distinct(recipients: &[(String, String)]) -> usize {
    let users: std::collections::BTreeSet<&str> = recipients.iter().map(|(_, u)| u.as_str()).collect();
    users.len()
}

/// The SIZE= parameter of MAIL FROM (RFC 1870), if given.
fn declared_size(rest: &str) -> Option<usize> {
    rest.split_ascii_whitespace()
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("SIZE"))
        .and_then(|(_, v)| v.parse().ok())
}

/// The message after DATA, dot-unstuffed; None (after reading it all, keeping none of
/// it) when it exceeds `size_max` or has a line over [`DATA_LINE_LEN_MAX`].
async fn read_data<R: AsyncBufRead + Unpin>(r: &mut R, size_max: usize) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    let mut too_big = false;
    let mut line = Vec::new();
    // A line longer than the limit arrives in pieces; only a piece that starts a line
    // can be the final dot.
    let mut at_line_start = true;
    loop {
        line.clear();
        let n =
            tokio::time::timeout(IDLE_TIMEOUT, (&mut *r).take(DATA_LINE_LEN_MAX as u64).read_until(b'\n', &mut line))
                .await
                .map_err(|_| "idle too long".to_string())?
                .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during DATA".into());
        }
        let complete = line.last() == Some(&b'\n');
        if at_line_start && (line == b".\r\n" || line == b".\n") {
            return Ok(if too_big { None } else { Some(body) });
        }
        if !complete {
            too_big = true;
        }
        let piece = if at_line_start && line.starts_with(b"..") { &line[1..] } else { &line[..] };
        at_line_start = complete;
        if too_big || body.len() + piece.len() > size_max {
            too_big = true;
            body = Vec::new();
            continue;
        }
        body.extend_from_slice(piece);
    }
}

async fn deliver(node: &NodeHandle, user: &str, body: tandem_core::Body) -> String {
    let received = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // A delivery: an MTA retries a 451, and the mailbox's master answers a retry with the
    // message its first attempt stored, if it was stored after all.
    let mailbox = MailboxKey::new(user, "INBOX");
    let request = ClientRequest::Save { mailbox, received, flags: vec![], body, delivery: true };
    match node.request(request).await {
        ClientReply::Write(WriteResult::Saved { uid, guid, .. }) => {
            info!(user, uid, %guid, "delivered");
            format!("250 2.0.0 <{user}> saved as UID {uid}")
        }
        // A failure for now may come after the master stored the message (its answer, or
        // its copies' acknowledgements, came too late): "not stored" would be a promise
        // this node cannot keep. What it can promise is that the retry is not stored twice.
        ClientReply::Write(WriteResult::Failed { reason, .. }) | ClientReply::Failed { reason, .. } => format!(
            "451 4.3.0 <{user}> not confirmed, try again later (a retry of the same message is not stored twice): {reason}"
        ),
        other => format!("451 4.3.0 <{user}> not stored: {other:?}"),
    }
}
