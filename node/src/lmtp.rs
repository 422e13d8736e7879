//! LMTP (RFC 2033) for delivery from an MTA. Each accepted recipient's copy is a SAVE
//! into that user's INBOX through the core; after DATA the node answers once per
//! recipient: 250 when the save is acknowledged under the durability mode, 451 when it
//! is not (the MTA keeps the mail and retries), 550 for unknown users (at RCPT).

use crate::node::NodeHandle;
use crate::users::Users;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::io::{ClientReply, ClientRequest};
use tandem_core::msg::WriteResult;
use tandem_core::types::MailboxKey;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

const LINE_LEN_MAX: usize = 4096;
const MESSAGE_SIZE_MAX: usize = 64 * 1024 * 1024;
const RECIPIENTS_MAX: usize = 1000;
const SESSIONS_MAX: usize = 256;
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn serve(listener: TcpListener, node: NodeHandle, users: Arc<Users>, hostname: String) {
    crate::node::serve_sessions(listener, SESSIONS_MAX, move |stream, addr| {
        let (node, users, hostname) = (node.clone(), users.clone(), hostname.clone());
        async move {
            if let Err(e) = session(stream, node, users, &hostname).await {
                debug!(%addr, error = %e, "LMTP session ended");
            }
        }
    })
    .await
}

/// One line, CRLF or LF ended, at most LINE_LEN_MAX bytes; None at end of stream.
async fn read_line(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<Option<String>, String> {
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

async fn session(stream: TcpStream, node: NodeHandle, users: Arc<Users>, hostname: &str) -> Result<(), String> {
    let (read, mut write) = stream.into_split();
    let mut r = BufReader::new(read);
    let send = |mut text: String| {
        text.push_str("\r\n");
        text
    };
    write.write_all(send(format!("220 {hostname} tandem LMTP ready")).as_bytes()).await.map_err(|e| e.to_string())?;
    let mut greeted = false;
    let mut sender: Option<String> = None;
    let mut recipients: Vec<String> = Vec::new();
    while let Some(line) = read_line(&mut r).await? {
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("LHLO") {
            greeted = true;
            format!("250-{hostname}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {MESSAGE_SIZE_MAX}")
        } else if upper.starts_with("MAIL FROM:") {
            if !greeted {
                "503 5.5.1 LHLO first".into()
            } else {
                sender = Some(path_arg(&line[10..]).unwrap_or_default());
                recipients.clear();
                "250 2.1.0 OK".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            match (&sender, path_arg(&line[8..])) {
                (None, _) => "503 5.5.1 MAIL first".into(),
                (_, None) => "501 5.1.3 bad recipient address".into(),
                (_, Some(_)) if recipients.len() >= RECIPIENTS_MAX => "452 4.5.3 too many recipients".into(),
                (_, Some(rcpt)) if users.exists(&rcpt) => {
                    recipients.push(rcpt);
                    "250 2.1.5 OK".into()
                }
                (_, Some(rcpt)) => format!("550 5.1.1 <{rcpt}> no such user here"),
            }
        } else if upper == "DATA" {
            if recipients.is_empty() {
                "503 5.5.1 no valid recipients".into()
            } else {
                write.write_all(b"354 go ahead, end with <CRLF>.<CRLF>\r\n").await.map_err(|e| e.to_string())?;
                let body = read_data(&mut r).await?;
                let mut replies = Vec::new();
                for rcpt in std::mem::take(&mut recipients) {
                    replies.push(match &body {
                        None => "552 5.3.4 message too big".to_string(),
                        Some(bytes) => deliver(&node, &rcpt, bytes.clone()).await,
                    });
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

/// The message after DATA, dot-unstuffed; None (after reading it all) when too large.
async fn read_data(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    let mut too_big = false;
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(IDLE_TIMEOUT, r.read_until(b'\n', &mut line))
            .await
            .map_err(|_| "idle too long".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during DATA".into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(if too_big { None } else { Some(body) });
        }
        let line = if line.starts_with(b"..") { &line[1..] } else { &line[..] };
        if body.len() + line.len() > MESSAGE_SIZE_MAX {
            too_big = true;
            body.clear();
        }
        if !too_big {
            body.extend_from_slice(line);
        }
    }
}

async fn deliver(node: &NodeHandle, user: &str, body: Vec<u8>) -> String {
    let received = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let request = ClientRequest::Save { mailbox: MailboxKey::new(user, "INBOX"), received, flags: vec![], body };
    match node.request(request).await {
        ClientReply::Write(WriteResult::Saved { uid, guid, .. }) => {
            info!(user, uid, %guid, "delivered");
            format!("250 2.0.0 <{user}> saved as UID {uid}")
        }
        ClientReply::Write(WriteResult::Failed { reason, .. }) | ClientReply::Failed { reason, .. } => {
            format!("451 4.3.0 <{user}> not stored, try again later: {reason}")
        }
        other => format!("451 4.3.0 <{user}> not stored: {other:?}"),
    }
}
