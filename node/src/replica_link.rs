//! The link a user replica's agent (`tandem replicate`) speaks to each side: length-
//! prefixed frames, each a core `ClientRequest` or `ClientReply` with the agent's request
//! id, encoded by the record codec. The cluster serves it on the IMAP port after a
//! logged-in user sends `X-REPLICATE` (so TLS, the password check, its throttle and the
//! per-user session limit are the IMAP port's own); the laptop's node serves it on its
//! admin socket after a `{"cmd":"replicate"}` line (whoever can open that socket owns
//! the store).
//!
//! What a side answers is gated by who asks ([`Gate`]): a user reaches only the replica
//! requests of their own mailboxes, and never `ReplicaAdopt` (taking a state as decided,
//! which only a user replica's own store does) nor anything else a master or an operator
//! does. Requests are answered as they finish, up to [`IN_FLIGHT_MAX`] at once: the agent
//! pipelines, so a slow link pays its latency per round, not per message.

use crate::codec::{Bincode, RecordCodec};
use crate::node::NodeHandle;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tandem_core::io::{ClientReply, ClientRequest, RequestId};
use tandem_core::msg::FailKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

/// The replica link's version, named in the switch (`tag X-REPLICATE <version>
/// [DEFLATE]`): frames carry records and tombstones in the record codec, whose meaning
/// changes between versions (3: a deletion's tombstone fate; 2: a record's pushed bit in
/// its size and the pushed tombstone fate; 1, unnamed, before). A cluster refuses an agent of another version
/// with an answer that names both, rather than let it misread a size.
pub const VERSION: u32 = 3;

/// A frame's encoded length at most: a push or an adopt carries at most 128 MiB of
/// bodies (the core's `check_adopted_state`) and a state piece beside them.
pub const FRAME_LEN_MAX: usize = 160 * 1024 * 1024;
/// Requests of one link answered at once at most; the link is read no further until
/// one is done.
pub const IN_FLIGHT_MAX: usize = 16;
/// A link with no frame for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Each read or write of a frame's bytes must progress within this (a slow link moves
/// a large frame in many steps, each of which counts on its own).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: RequestId,
    pub request: ClientRequest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyFrame {
    pub id: RequestId,
    pub reply: ClientReply,
}

/// Who is asking, and so what may be answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// A logged-in user on a cluster server: their own mailboxes' list, pulls, bodies and
    /// pushes.
    User(std::sync::Arc<str>),
    /// The owner of a user replica's store (its admin socket): every replica request,
    /// the adopt included.
    Owner,
}

impl Gate {
    /// Why `request` is refused, if it is.
    pub fn refusal(&self, request: &ClientRequest) -> Option<String> {
        let owner_of = |user: &str| match self {
            Gate::User(login) => (user != &**login).then(|| format!("{user}'s mail is not {login}'s to replicate")),
            Gate::Owner => None,
        };
        match request {
            ClientRequest::ReplicaList { user, .. } => owner_of(user),
            ClientRequest::ReplicaPull { mailbox, .. }
            | ClientRequest::ReplicaBodies { mailbox, .. }
            | ClientRequest::ReplicaTextParts { mailbox, .. } => owner_of(&mailbox.user),
            ClientRequest::ReplicaPush { state, .. } => owner_of(&state.mailbox.user),
            ClientRequest::ReplicaKeepBodies { mailbox, .. } | ClientRequest::ReplicaKeepTextParts { mailbox, .. } => {
                match self {
                    Gate::Owner => None,
                    Gate::User(_) => Some(format!("{mailbox}: the cluster's bodies are not given to it by a replica")),
                }
            }
            ClientRequest::ReplicaAdopt { state, .. } => match self {
                Gate::Owner => None,
                Gate::User(_) => Some(format!(
                    "a user replica never decides for the cluster: {} is merged by its master (push it)",
                    state.mailbox
                )),
            },
            _ => Some("only a user replica's sync is served on this link: a user replica is master of nothing".into()),
        }
    }
}

/// Writes one frame (4-byte big-endian length, then the encoded value) and flushes it
/// (through TLS and DEFLATE: the other side must see it now).
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(write: &mut W, value: &T) -> Result<(), String> {
    let bytes = Bincode::encode(value)?;
    if bytes.len() > FRAME_LEN_MAX {
        return Err(format!("a frame of {} bytes is over the limit of {FRAME_LEN_MAX}", bytes.len()));
    }
    let len = u32::try_from(bytes.len()).map_err(|_| "frame too long".to_string())?;
    let work = async {
        write.write_all(&len.to_be_bytes()).await?;
        for chunk in bytes.chunks(1024 * 1024) {
            tokio::time::timeout(STALL_TIMEOUT, write.write_all(chunk))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))??;
        }
        write.flush().await
    };
    work.await.map_err(|e| format!("write: {e}"))
}

/// Reads one frame; None at a clean end of the stream (before a frame's first byte).
/// Waits up to `idle` for the frame to begin.
pub async fn read_frame<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    read: &mut R,
    idle: Duration,
) -> Result<Option<T>, String> {
    let mut len = [0u8; 4];
    let first = tokio::time::timeout(idle, read.read(&mut len[..1]))
        .await
        .map_err(|_| format!("no frame for {idle:?}"))?
        .map_err(|e| format!("read: {e}"))?;
    if first == 0 {
        return Ok(None);
    }
    tokio::time::timeout(STALL_TIMEOUT, read.read_exact(&mut len[1..]))
        .await
        .map_err(|_| "a frame's length stalled".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_LEN_MAX {
        return Err(format!("a frame of {len} bytes is over the limit of {FRAME_LEN_MAX}"));
    }
    // Grown as bytes arrive, never to a length the peer only announced.
    let mut bytes = Vec::with_capacity(len.min(1024 * 1024));
    let mut chunk = vec![0u8; len.min(256 * 1024)];
    while bytes.len() < len {
        let want = (len - bytes.len()).min(chunk.len());
        let n = tokio::time::timeout(STALL_TIMEOUT, read.read(&mut chunk[..want]))
            .await
            .map_err(|_| "a frame stalled".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the link closed inside a frame".into());
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    Bincode::decode(&bytes).map(Some).map_err(|e| format!("a bad frame: {e}"))
}

/// Serves an agent's requests on `stream` until it closes, idles out or sends a bad
/// frame. Each request is gated, then given to the core; answers go back as they come.
pub async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    gate: Gate,
    node: NodeHandle,
) -> Result<(), String> {
    let (mut read, mut write) = tokio::io::split(stream);
    let (replies_tx, mut replies_rx) = mpsc::channel::<ReplyFrame>(IN_FLIGHT_MAX);
    let writer = tokio::spawn(async move {
        while let Some(frame) = replies_rx.recv().await {
            write_frame(&mut write, &frame).await?;
        }
        Ok(())
    });
    let slots = std::sync::Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let read_result = loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        let frame: RequestFrame = match read_frame(&mut read, IDLE_TIMEOUT).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if writer.is_finished() {
            break Ok(());
        }
        let (node, replies, gate) = (node.clone(), replies_tx.clone(), gate.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = match gate.refusal(&frame.request) {
                Some(reason) => {
                    tracing::warn!(?gate, reason, "a replica request refused");
                    ClientReply::Failed { kind: FailKind::Permanent, reason }
                }
                None => node.request(frame.request).await,
            };
            let _ = replies.send(ReplyFrame { id: frame.id, reply }).await;
        });
    };
    drop(replies_tx);
    // What is in flight is still answered when the agent only closed its half.
    let written = writer.await.map_err(|e| e.to_string())?;
    read_result.and(written)
}

/// The agent's end of a link: requests go out through a writer task, replies come back
/// tagged with the side into one channel the agent's loop waits on.
pub struct AgentLink {
    requests: mpsc::Sender<RequestFrame>,
}

/// What a side's link reports to the agent's loop.
#[derive(Debug)]
pub enum LinkNews {
    Reply(Box<ReplyFrame>),
    /// The link failed or closed, and why.
    Lost(String),
}

impl AgentLink {
    /// Starts the link's tasks on `stream`; its news go to `news` tagged with `side`.
    pub fn start<S: AsyncRead + AsyncWrite + Send + 'static, Tag: Copy + Send + 'static>(
        stream: S,
        side: Tag,
        news: mpsc::Sender<(Tag, LinkNews)>,
        reply_timeout: Duration,
    ) -> AgentLink {
        let (mut read, mut write) = tokio::io::split(stream);
        let (requests_tx, mut requests_rx) = mpsc::channel::<RequestFrame>(IN_FLIGHT_MAX * 4);
        let lost = news.clone();
        tokio::spawn(async move {
            while let Some(frame) = requests_rx.recv().await {
                if let Err(e) = write_frame(&mut write, &frame).await {
                    let _ = lost.send((side, LinkNews::Lost(e))).await;
                    return;
                }
            }
            let _ = write.shutdown().await;
        });
        tokio::spawn(async move {
            loop {
                match read_frame::<_, ReplyFrame>(&mut read, reply_timeout).await {
                    Ok(Some(frame)) => {
                        if news.send((side, LinkNews::Reply(Box::new(frame)))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = news.send((side, LinkNews::Lost("the other side closed the link".into()))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = news.send((side, LinkNews::Lost(e))).await;
                        return;
                    }
                }
            }
        });
        AgentLink { requests: requests_tx }
    }

    /// Queues a request; false when the link is gone.
    pub async fn send(&self, id: RequestId, request: ClientRequest) -> bool {
        self.requests.send(RequestFrame { id, request }).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::MailboxKey;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_lengths_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let frame = RequestFrame { id: 7, request: ClientRequest::ReplicaList { user: "alice".into(), partial: None } };
        write_frame(&mut a, &frame).await.unwrap();
        let got: Option<RequestFrame> = read_frame(&mut b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, Some(frame));
        a.write_all(&(FRAME_LEN_MAX as u32 + 1).to_be_bytes()).await.unwrap();
        let e = read_frame::<_, RequestFrame>(&mut b, Duration::from_secs(1)).await.unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
        drop(a);
        let end = read_frame::<_, RequestFrame>(&mut b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(end, None);
    }

    #[test]
    fn a_user_reaches_only_their_own_mailboxes_and_never_adopts() {
        let alice = Gate::User("alice".into());
        let own = MailboxKey::new("alice", "INBOX");
        let other = MailboxKey::new("bob", "INBOX");
        assert_eq!(alice.refusal(&ClientRequest::ReplicaList { user: "alice".into(), partial: None }), None);
        assert!(alice.refusal(&ClientRequest::ReplicaList { user: "bob".into(), partial: None }).is_some());
        assert_eq!(
            alice.refusal(&ClientRequest::ReplicaPull { mailbox: own.clone(), since: None, partial: None }),
            None
        );
        assert!(
            alice.refusal(&ClientRequest::ReplicaPull { mailbox: other.clone(), since: None, partial: None }).is_some()
        );
        assert!(alice.refusal(&ClientRequest::ReplicaBodies { mailbox: other.clone(), guids: vec![] }).is_some());
        let texts = |mailbox: &MailboxKey| ClientRequest::ReplicaTextParts { mailbox: mailbox.clone(), guids: vec![] };
        assert_eq!(alice.refusal(&texts(&own)), None);
        assert!(alice.refusal(&texts(&other)).is_some());
        let keep_texts = ClientRequest::ReplicaKeepTextParts { mailbox: own.clone(), parts: vec![] };
        assert!(alice.refusal(&keep_texts).is_some(), "only the replica's owner gives it text parts");
        assert_eq!(Gate::Owner.refusal(&keep_texts), None);
        assert!(alice.refusal(&ClientRequest::ReadTextParts { guids: vec![] }).is_some());
        let state = tandem_core::MailboxState::empty(own.clone(), 1);
        let push = ClientRequest::ReplicaPush { state: state.clone(), bodies: vec![], from_cluster: vec![] };
        assert_eq!(alice.refusal(&push), None);
        let adopt = ClientRequest::ReplicaAdopt { state, bodies: vec![], pushed_upto: 0, from_cluster: vec![] };
        assert!(alice.refusal(&adopt).is_some());
        assert_eq!(Gate::Owner.refusal(&adopt), None);
        let master = ClientRequest::MasterMove { mailbox: own };
        assert!(alice.refusal(&master).is_some());
        assert!(Gate::Owner.refusal(&master).is_some());
    }
}
