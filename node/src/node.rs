//! The node: one event loop owns the core and feeds it everything that happens (peer
//! messages, links going up and down, admin requests, durable writes, its timer), then
//! drains every output. Writes go to a store thread that commits them in groups and
//! reports back, so the core never hears "durable" before the fsync.

use crate::admin::{self, AdminReply, AdminRequest};
use crate::config::{AdminListen, NodeConfig};
use crate::metrics::Metrics;
use crate::peer::{self, Agreed, LinkEvent, PeerStream};
use crate::store::Store;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tandem_core::io::{ClientReply, ClientRequest, Input, Output, RequestId, WriteId};
use tandem_core::msg::{Envelope, FailKind, WriteResult};
use tandem_core::store::StoreWrite;
use tandem_core::types::*;
use tandem_core::{Flag, Mark, MemberChange, Membership, Server, SpecialUse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant as TokioInstant;
use tracing::{debug, error, info, warn};

/// An admin client has this long to send each line (an idle one cannot hold a slot).
const ADMIN_LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// A TCP admin client has this long to show its token.
const ADMIN_TOKEN_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP admin connections yet to show their token (each for ADMIN_TOKEN_TIMEOUT at
/// most); more are closed at once.
const ADMIN_UNPROVEN_MAX: usize = 1024;
/// The pause after a failed accept (EMFILE): the error repeats until a descriptor is
/// freed, and retrying at once spins a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A peer that comes back is dialled within a second: it holds back after its start
/// until it hears every peer or `startup_hold_ms` (2 s by default) passes, and the
/// higher id of a pair never dials. A refused connection a second costs nothing.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What mail front ends (IMAP, LMTP) ask of the event loop.
#[derive(Clone)]
pub struct NodeHandle {
    events: mpsc::Sender<Event>,
    /// Reads bodies straight from the store, hash-checked, on the caller's side: a
    /// FETCH of a large mailbox then neither waits on nor stalls the event loop.
    bodies: Option<crate::bodies::BodyReader>,
}

/// Sends the event loop an event that carries a reply channel and waits for the answer;
/// None when the loop is gone (the node is stopping).
async fn ask<T>(events: &mpsc::Sender<Event>, event: impl FnOnce(oneshot::Sender<T>) -> Event) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    events.send(event(tx)).await.ok()?;
    rx.await.ok()
}

impl NodeHandle {
    /// A client request through the core; the answer comes once the core gives it.
    pub async fn request(&self, request: ClientRequest) -> ClientReply {
        ask(&self.events, |reply| Event::Client { request, reply })
            .await
            .unwrap_or(ClientReply::Failed { kind: FailKind::Temporary, reason: "the node is stopping".into() })
    }

    /// Message bodies by GUID (those this node holds intact). Read from the store on a
    /// blocking thread and checked against their content address; what that does not
    /// find intact is asked of the core, which holds bodies not yet durable and starts
    /// the repair of a damaged one.
    pub async fn bodies(&self, guids: Vec<Guid>) -> BTreeMap<Guid, tandem_core::Body> {
        let (mut found, rest) = match self.bodies.clone() {
            Some(reader) => {
                let asked = guids.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut found = BTreeMap::new();
                    let mut rest = Vec::new();
                    for guid in asked {
                        match reader.read_verified(guid) {
                            Some(bytes) => {
                                found.insert(guid, bytes);
                            }
                            None => rest.push(guid),
                        }
                    }
                    (found, rest)
                });
                read.await.unwrap_or((BTreeMap::new(), guids))
            }
            None => (BTreeMap::new(), guids),
        };
        if !rest.is_empty() {
            let from_core = ask(&self.events, |reply| Event::Bodies { guids: rest, reply }).await.unwrap_or_default();
            found.extend(from_core);
        }
        found
    }

    /// What changed in a mailbox after the modseq a session has shown; None when the
    /// session must read it whole (see `Server::changes_since`).
    pub async fn changes(
        &self,
        mailbox: MailboxKey,
        uidvalidity: u32,
        since: u64,
    ) -> Option<tandem_core::MailboxChanges> {
        ask(&self.events, |reply| Event::Changes { mailbox, uidvalidity, since, reply }).await.flatten()
    }

    /// A wake-up for each durable change to `mailbox` (the value counts them): an IDLE
    /// session waits on it instead of polling. None when the node is stopping.
    pub async fn watch(&self, mailbox: MailboxKey) -> Option<watch::Receiver<u64>> {
        ask(&self.events, |reply| Event::Watch { mailbox, reply }).await
    }

    /// A wake-up channel for every durable change to any of `user`'s mailboxes (their
    /// messages, names and subscriptions): what a NOTIFY session waits on.
    pub async fn watch_user(&self, user: &str) -> Option<watch::Receiver<u64>> {
        let user: std::sync::Arc<str> = user.into();
        ask(&self.events, |reply| Event::WatchUser { user, reply }).await
    }

    /// What a user's mail takes on this node (for the quota).
    pub async fn usage(&self, user: &str) -> Usage {
        let user = user.to_string();
        ask(&self.events, |reply| Event::Usage { user, reply }).await.unwrap_or_default()
    }

    /// The user's mailboxes as this node has them.
    pub async fn mailboxes(&self, user: &str) -> Vec<tandem_core::Summary> {
        let user = user.to_string();
        ask(&self.events, |reply| Event::Mailboxes { user, reply }).await.unwrap_or_default()
    }

    /// The names of the mailboxes `user` is subscribed to.
    pub async fn subscriptions(&self, user: &str) -> Vec<String> {
        let user = user.to_string();
        ask(&self.events, |reply| Event::Subscriptions { user, reply }).await.unwrap_or_default()
    }

    /// The special uses clients gave `user`'s mailboxes, by name.
    pub async fn special_uses(&self, user: &str) -> BTreeMap<String, SpecialUse> {
        let user = user.to_string();
        ask(&self.events, |reply| Event::SpecialUses { user, reply }).await.unwrap_or_default().into_iter().collect()
    }
}

enum Event {
    Client {
        request: ClientRequest,
        reply: oneshot::Sender<ClientReply>,
    },
    Bodies {
        guids: Vec<Guid>,
        reply: oneshot::Sender<BTreeMap<Guid, tandem_core::Body>>,
    },
    Changes {
        mailbox: MailboxKey,
        uidvalidity: u32,
        since: u64,
        reply: oneshot::Sender<Option<tandem_core::MailboxChanges>>,
    },
    Mailboxes {
        user: String,
        reply: oneshot::Sender<Vec<tandem_core::Summary>>,
    },
    Watch {
        mailbox: MailboxKey,
        reply: oneshot::Sender<watch::Receiver<u64>>,
    },
    WatchUser {
        user: std::sync::Arc<str>,
        reply: oneshot::Sender<watch::Receiver<u64>>,
    },
    Subscriptions {
        user: String,
        reply: oneshot::Sender<Vec<String>>,
    },
    SpecialUses {
        user: String,
        reply: oneshot::Sender<Vec<(String, SpecialUse)>>,
    },
    Connected {
        agreed: Agreed,
        conn: u64,
        outgoing: mpsc::Sender<Envelope>,
    },
    Refused,
    Admin {
        request: AdminRequest,
        reply: oneshot::Sender<AdminReply>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
    Durable {
        upto: WriteId,
        writes: usize,
    },
    /// A commit failed and will be retried (the disk may be full).
    StoreTrouble(String),
    Usage {
        user: String,
        reply: oneshot::Sender<Usage>,
    },
}

enum Answer {
    Admin(oneshot::Sender<AdminReply>),
    Client(oneshot::Sender<ClientReply>),
    /// One request of an admin batch (`AdminRequest::ImportBatch`): the batch's number
    /// and the request's place in it.
    BatchPart(u64, usize),
}

/// An admin batch whose requests are in the core: answered once all are.
struct Batch {
    replies: Vec<Option<AdminReply>>,
    left: usize,
    reply: oneshot::Sender<AdminReply>,
}

struct Pending {
    reply: Answer,
    started: TokioInstant,
    write: bool,
}

struct EventLoop {
    server: Server,
    start: TokioInstant,
    links: BTreeMap<Sid, (u64, mpsc::Sender<Envelope>)>,
    pending: BTreeMap<RequestId, Pending>,
    next_request: RequestId,
    writes: Vec<(WriteId, StoreWrite)>,
    store: std::sync::mpsc::Sender<Vec<(WriteId, StoreWrite)>>,
    metrics: Metrics,
    last_store_warning: Option<TokioInstant>,
    /// The mailboxes IDLE sessions wait on.
    watchers: Watchers<MailboxKey>,
    /// The users NOTIFY sessions wait on.
    user_watchers: Watchers<std::sync::Arc<str>>,
    /// The mailbox each not-yet-durable write changes (consecutive repeats once): a
    /// session reads durable state, so its wake-up comes with `Event::Durable`.
    undurable: std::collections::VecDeque<(WriteId, MailboxKey)>,
    /// Who is dialled and who may connect, kept in step with the core's membership.
    peers: Option<PeerDialer>,
    /// What `tandem backup` reads the store through (None in tests without a store).
    backup_reader: Option<crate::bodies::BodyReader>,
    /// How admin fetches read bodies off the loop, as the front ends do (None in tests
    /// without a store: those read through the core).
    body_reads: Option<NodeHandle>,
    batches: BTreeMap<u64, Batch>,
    next_batch: u64,
    /// Where the core's inputs and outputs are recorded, when `[record]` is set.
    recorder: Option<crate::record::SharedRecorder>,
}

/// The servers this node dials (the lower id dials) and accepts, from the core's
/// membership: configured peers and servers added since, at the address the membership
/// gives (or the configuration's); a retired server is neither dialled nor accepted.
struct PeerDialer {
    cfg: NodeConfig,
    events: mpsc::Sender<Event>,
    links: mpsc::Sender<LinkEvent>,
    conn_ids: Arc<AtomicU64>,
    /// The ids a HELLO is accepted from, shared with the accept loop.
    accepted: Arc<std::sync::RwLock<Vec<Sid>>>,
    dials: BTreeMap<Sid, tokio::task::JoinHandle<()>>,
    /// The membership last acted on.
    seen: Option<Membership>,
}

impl PeerDialer {
    /// Acts on a changed membership; returns the servers retired since the last call.
    fn reconcile(&mut self, members: &Membership) -> Vec<Sid> {
        if self.seen.as_ref() == Some(members) {
            return Vec::new();
        }
        let me = self.cfg.core.sid;
        let before = self.seen.take().unwrap_or_default();
        let retired = members.newly(&before, tandem_core::MemberState::Retired);
        if let Ok(mut accepted) = self.accepted.write() {
            *accepted = members.servers();
        }
        if members.state(me) == Some(tandem_core::MemberState::Retired) {
            warn!("this server is retired from the cluster: it takes no writes; stop it");
        }
        for (sid, member) in members.entries() {
            let gone = member.state == tandem_core::MemberState::Retired;
            if gone {
                if let Some(task) = self.dials.remove(&sid) {
                    task.abort();
                }
                continue;
            }
            if sid <= me || self.dials.contains_key(&sid) {
                continue;
            }
            let address = match self.cfg.peers.iter().find(|p| p.id == sid.0) {
                Some(p) => p.address.to_string(),
                None if !member.address.is_empty() => member.address.clone(),
                None => continue,
            };
            info!(peer = sid.0, %address, "dialling");
            let task = tokio::spawn(dial_peer(
                sid,
                address,
                self.cfg.clone(),
                self.events.clone(),
                self.links.clone(),
                self.conn_ids.clone(),
            ));
            self.dials.insert(sid, task);
        }
        self.seen = Some(members.clone());
        retired
    }
}

/// Watched mailboxes below this many are never pruned (pruning walks them all).
const WATCHERS_PRUNE_MIN: usize = 1024;

/// What a user's mail takes on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub messages: u64,
}

/// A node with no sockets and no disk, for the fuzzer: the core's writes are reported
/// durable at once. It runs on the current runtime until every handle is dropped.
#[cfg(feature = "fuzzing")]
pub fn spawn_in_memory(core: tandem_core::io::Config) -> NodeHandle {
    let (events_tx, mut events) = mpsc::channel::<Event>(1024);
    let (store_tx, store_rx) = std::sync::mpsc::channel::<Vec<(WriteId, StoreWrite)>>();
    let bodies = tandem_core::MemoryBodies::default();
    let mut node = EventLoop::new(Server::new(core, 1, Box::new(bodies.clone())), store_tx);
    let handle = NodeHandle { events: events_tx, bodies: None };
    tokio::spawn(async move {
        node.drain();
        loop {
            // Everything the core asked to write is durable as soon as it is asked.
            let mut upto = None;
            let mut count = 0;
            while let Ok(batch) = store_rx.try_recv() {
                for (_, write) in &batch {
                    bodies.apply(write);
                }
                count += batch.len();
                upto = batch.last().map(|(id, _)| *id).or(upto);
            }
            if let Some(upto) = upto {
                node.on_event(Event::Durable { upto, writes: count });
                continue;
            }
            let deadline = node.start + Duration::from_micros(node.server.poll_timeout().0);
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => node.on_event(event),
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => node.input(Input::Timer),
            }
        }
    });
    handle
}

/// How long a start waits for a store another process holds (an earlier run stopping:
/// it commits what it holds and closes, seconds at most) before refusing to start.
const STORE_HELD_WAIT: Duration = Duration::from_secs(30);

/// How long a start waits for a port another process holds (an earlier run of this
/// node that gave up its store but has not exited yet) before refusing to start.
const PORT_HELD_WAIT: Duration = Duration::from_secs(10);

/// Listens on `addr`, waiting up to [`PORT_HELD_WAIT`] while it is in use.
async fn bind_waiting(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener, String> {
    let started = TokioInstant::now();
    let mut warned = false;
    loop {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < PORT_HELD_WAIT => {
                if !warned {
                    warn!(%addr, what, "the address is in use (an earlier run still stopping?); waiting for it");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.map_err(|e| format!("{what} on {addr}: {e}")),
        }
    }
}

/// Runs a node until `shutdown` resolves or its store fails.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
    // Before the store loads: a SIGHUP's default action would kill the node.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    // Each start-up phase's time is logged: a slow start is the operator's to explain.
    let started = std::time::Instant::now();
    let store = Store::open_waiting(&cfg.data_dir, Default::default(), cfg.body_inline_max_bytes, STORE_HELD_WAIT)
        .map_err(|e| format!("store {}: {e}", cfg.data_dir.display()))?;
    let opened_ms = started.elapsed().as_millis();
    if let Some(taken_unix_s) =
        store.restored_backup_taken().map_err(|e| format!("store {}: {e}", cfg.data_dir.display()))?
    {
        let now_unix_s = crate::record::unix_ms() / 1000;
        let grace_secs = cfg.core.tombstone_grace_us / 1_000_000;
        crate::backup::check_restore_age(taken_unix_s, now_unix_s, grace_secs, cfg.accept_old_backup)
            .map_err(|e| format!("store {}: {e}", cfg.data_dir.display()))?;
        info!(age_s = now_unix_s.saturating_sub(taken_unix_s), "starting on a restored backup");
    }
    let image = store.load().map_err(|e| format!("store {}: {e}", cfg.data_dir.display()))?;
    let loaded_ms = started.elapsed().as_millis();
    let seed: u64 = rand::random();
    let recorder = match &cfg.record {
        None => None,
        Some(rc) => {
            let header = tandem_core::record::Header {
                format: tandem_core::record::FORMAT,
                build: tandem_core::BUILD.into(),
                cfg: cfg.core.clone(),
                seed,
                disk: image.clone(),
                bodies: rc.bodies,
                started_unix_ms: crate::record::unix_ms(),
                resumed: None,
            };
            // Recording is a diagnostic: a node that cannot record still serves mail.
            match crate::record::Recorder::start(rc, header) {
                Ok(recorder) => Some(Arc::new(std::sync::Mutex::new(recorder))),
                Err(e) => {
                    error!(error = %e, "recording the core's inputs is off");
                    None
                }
            }
        }
    };
    let core_bodies: Box<dyn tandem_core::BodyStore> = match &recorder {
        Some(recorder) => Box::new(crate::record::RecordingBodies {
            inner: Box::new(store.body_reader()),
            recorder: recorder.clone(),
        }),
        None => Box::new(store.body_reader()),
    };
    let server = Server::recover(cfg.core.clone(), image, seed, core_bodies);
    let direct_reads = store.body_reader();
    let backup_reader = store.body_reader();
    info!(opened_ms, loaded_ms, recovered_ms = started.elapsed().as_millis() as u64, "store read");
    info!(id = cfg.core.sid.0, listen = %cfg.listen, admin = %cfg.admin, "tandem node starting");

    let (events_tx, mut events) = mpsc::channel::<Event>(1024);
    let (links_tx, mut link_events) = mpsc::channel::<LinkEvent>(4096);
    let (store_tx, store_rx) = std::sync::mpsc::channel::<Vec<(WriteId, StoreWrite)>>();
    let store_thread =
        spawn_store_thread(store, cfg.data_dir.clone(), cfg.body_inline_max_bytes, store_rx, events_tx.clone());

    let peer_listener = bind_waiting(cfg.listen, "listen").await?;
    let admin_listener = AdminListener::bind(&cfg.admin)?;
    let conn_ids = Arc::new(AtomicU64::new(1));
    let accepted = Arc::new(std::sync::RwLock::new(server.members().servers()));
    tokio::spawn(accept_peers(
        peer_listener,
        cfg.clone(),
        accepted.clone(),
        events_tx.clone(),
        links_tx.clone(),
        conn_ids.clone(),
    ));
    // The lower id dials: one connection per pair (see `PeerDialer`).
    let dialer = PeerDialer {
        cfg: cfg.clone(),
        events: events_tx.clone(),
        links: links_tx.clone(),
        conn_ids: conn_ids.clone(),
        accepted,
        dials: BTreeMap::new(),
        seen: None,
    };
    tokio::spawn(serve_admin(admin_listener, events_tx.clone(), cfg.limits.admin_connections_max));
    let handle = NodeHandle { events: events_tx.clone(), bodies: Some(direct_reads) };
    let front = crate::front::Front::new(&cfg);
    tokio::spawn(reload_users_on_hangup(hangups, cfg.users_file.clone(), front.clone()));
    // The plain IMAP port (STARTTLS when a certificate is set) and the implicit-TLS one.
    for (addr, implicit_tls) in [(cfg.imap, false), (cfg.imaps, true)] {
        let Some(addr) = addr else { continue };
        let listener = bind_waiting(addr, "imap").await?;
        info!(%addr, implicit_tls, "IMAP listening");
        let tls = cfg.mail_tls.clone().map(|t| t.0);
        tokio::spawn(crate::imap::serve(listener, handle.clone(), front.clone(), tls, implicit_tls));
    }
    if let Some(addr) = cfg.lmtp {
        let listener = bind_waiting(addr, "lmtp").await?;
        info!(%addr, "LMTP listening");
        let hostname = format!("tandem-{}", cfg.core.sid.0);
        tokio::spawn(crate::lmtp::serve(listener, handle.clone(), front.clone(), hostname));
    }
    if let Some(addr) = cfg.metrics {
        let listener = bind_waiting(addr, "metrics").await?;
        tokio::spawn(serve_metrics(listener, events_tx.clone()));
    }

    let mut node = EventLoop::new(server, store_tx);
    node.recorder = recorder;
    node.peers = Some(dialer);
    node.backup_reader = Some(backup_reader);
    node.body_reads = Some(handle.clone());
    node.drain();
    tokio::pin!(shutdown);
    let mut record_flush = tokio::time::interval(crate::record::FLUSH_EVERY);
    record_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = node.start + Duration::from_micros(node.server.poll_timeout().0);
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down");
                if let Some(recorder) = &node.recorder {
                    crate::record::lock(recorder).finish();
                }
                // The store thread commits what it holds and closes the database when
                // its queue closes; waiting for it makes the next start a clean open
                // rather than a crash recovery. Its reports have nobody to go to.
                drop(node);
                drop(events);
                if !matches!(tokio::task::spawn_blocking(move || store_thread.join()).await, Ok(Ok(()))) {
                    error!("the store thread failed while closing");
                }
                info!("store closed");
                return Ok(());
            }
            Some(event) = events.recv() => node.on_event(event),
            Some(event) = link_events.recv() => node.on_link_event(event),
            _ = tokio::time::sleep_until(deadline) => node.input(Input::Timer),
            _ = record_flush.tick(), if node.recorder.is_some() => {
                if let Some(recorder) = &node.recorder {
                    crate::record::lock(recorder).idle();
                }
            }
        }
    }
}

impl EventLoop {
    fn new(server: Server, store: std::sync::mpsc::Sender<Vec<(WriteId, StoreWrite)>>) -> EventLoop {
        EventLoop {
            server,
            start: TokioInstant::now(),
            links: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_request: 1,
            writes: Vec::new(),
            store,
            metrics: Metrics::default(),
            last_store_warning: None,
            watchers: Watchers::default(),
            user_watchers: Watchers::default(),
            undurable: std::collections::VecDeque::new(),
            peers: None,
            backup_reader: None,
            body_reads: None,
            batches: BTreeMap::new(),
            next_batch: 1,
            recorder: None,
        }
    }

    fn now(&self) -> tandem_core::Instant {
        tandem_core::Instant(self.start.elapsed().as_micros() as u64)
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        if let Some(recorder) = &self.recorder {
            let mut recorder = crate::record::lock(recorder);
            if recorder.wants_rotation() {
                // Between inputs, every output drained: the state a replay resumes from.
                let snapshot = recorder.keeps_bodies().then(|| self.server.snapshot());
                recorder.rotate(snapshot);
            }
            recorder.input(now, &input);
        }
        self.server.handle(now, input);
        self.drain();
    }

    /// Carries out every output of the core (str0m style: drain after each input).
    fn drain(&mut self) {
        let mut dropped = Vec::new();
        while let Some(output) = self.server.poll_output() {
            if let Some(recorder) = &self.recorder {
                crate::record::lock(recorder).output(&output);
            }
            match output {
                Output::Send { to, envelope } => {
                    let Some((_, tx)) = self.links.get(&to) else { continue };
                    self.metrics.peer_messages_out += 1;
                    if tx.try_send(envelope).is_err() {
                        dropped.push(to);
                    }
                }
                Output::Reply { id, reply } => self.answer(id, reply),
                Output::Write { id, write } => {
                    if let Some(mailbox) = write.mailbox() {
                        // A repeat of the last mailbox moves its entry on to this write:
                        // the wake-up waits for the last of them.
                        match self.undurable.back_mut() {
                            Some((last_id, last)) if last == mailbox => *last_id = id,
                            _ => self.undurable.push_back((id, mailbox.clone())),
                        }
                    }
                    self.writes.push((id, write));
                }
            }
        }
        if !self.writes.is_empty() {
            let batch = std::mem::take(&mut self.writes);
            if self.store.send(batch).is_err() {
                error!("the store thread is gone");
            }
        }
        for peer in dropped {
            if self.links.remove(&peer).is_some() {
                warn!(peer = peer.0, "peer too slow or gone: dropping the link");
                self.input(Input::LinkDown { peer });
            }
        }
        let retired = match self.peers.as_mut() {
            Some(dialer) => dialer.reconcile(self.server.members()),
            None => Vec::new(),
        };
        for peer in retired {
            // Its connection closes (the link task ends with its queue).
            if self.links.remove(&peer).is_some() {
                info!(peer = peer.0, "retired: link closed");
                self.input(Input::LinkDown { peer });
            }
        }
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Received { peer, conn, envelope } => {
                if self.links.get(&peer).is_some_and(|(c, _)| *c == conn) {
                    self.metrics.peer_messages_in += 1;
                    self.input(Input::Peer { from: peer, envelope });
                }
            }
            LinkEvent::Closed { peer, conn, why } => {
                if self.links.get(&peer).is_some_and(|(c, _)| *c == conn) {
                    self.links.remove(&peer);
                    info!(peer = peer.0, reason = %why, "link down");
                    self.input(Input::LinkDown { peer });
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { agreed, conn, outgoing } => {
                if let Some((old, _)) = self.links.get(&agreed.peer) {
                    // One link per peer: a second authenticated HELLO while the first link
                    // lives is refused (dropping `outgoing` closes it). A dead first link
                    // is noticed by its keepalive and frees the slot.
                    warn!(peer = agreed.peer.0, conn, live = *old, "a second link for a connected peer: refused");
                    self.metrics.handshakes_refused += 1;
                    return;
                }
                info!(peer = agreed.peer.0, conn, deflate = agreed.deflate, "link up");
                self.links.insert(agreed.peer, (conn, outgoing));
                self.input(Input::LinkUp { peer: agreed.peer });
            }
            Event::Refused => self.metrics.handshakes_refused += 1,
            Event::Durable { upto, writes } => {
                self.metrics.store_commits += 1;
                self.metrics.store_writes += writes as u64;
                self.input(Input::Durable { upto });
                self.wake_watchers(upto);
            }
            Event::StoreTrouble(e) => {
                self.metrics.store_failures += 1;
                // Once a minute at most: a full disk fails every retry.
                let now = TokioInstant::now();
                if self.last_store_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                    self.last_store_warning = Some(now);
                    error!(error = %e, "a store commit failed (full disk?): writes wait and are retried, reads go on");
                }
            }
            Event::Usage { user, reply } => {
                let mut usage = Usage::default();
                for (_, m) in self.server.image().mailboxes.iter().filter(|(k, _)| *k.user == *user) {
                    usage.messages += m.messages.len() as u64;
                    usage.bytes += m.messages.values().map(|r| u64::from(r.size)).sum::<u64>();
                }
                let _ = reply.send(usage);
            }
            Event::Metrics { reply } => {
                let _ = reply.send(self.render_metrics());
            }
            Event::Admin { request, reply } => self.on_admin(request, reply),
            Event::Client { request, reply } => self.on_client(request, reply),
            Event::Bodies { guids, reply } => {
                let mut found = BTreeMap::new();
                let mut damaged = Vec::new();
                for guid in guids {
                    match self.server.checked_body(guid) {
                        Ok(Some(bytes)) => {
                            found.insert(guid, bytes);
                        }
                        Ok(None) => {}
                        Err(_) => damaged.push(guid),
                    }
                }
                let _ = reply.send(found);
                // The disk changed a body under us: the core repairs it from a peer.
                for guid in damaged {
                    warn!(%guid, "a stored body is missing or damaged; fetching it from a peer");
                    self.input(Input::External(tandem_core::ExternalEdit::Corrupted { guid }));
                }
            }
            Event::Changes { mailbox, uidvalidity, since, reply } => {
                let _ = reply.send(self.server.changes_since(&mailbox, uidvalidity, since));
            }
            Event::Watch { mailbox, reply } => {
                let _ = reply.send(self.watchers.subscribe(mailbox));
            }
            Event::WatchUser { user, reply } => {
                let _ = reply.send(self.user_watchers.subscribe(user));
            }
            Event::Mailboxes { user, reply } => {
                let _ = reply.send(self.server.visible_summaries(&user));
            }
            Event::Subscriptions { user, reply } => {
                let _ = reply.send(self.server.subscriptions(&user));
            }
            Event::SpecialUses { user, reply } => {
                let _ = reply.send(self.server.special_uses(&user));
            }
        }
    }

    /// Wakes the sessions watching a mailbox that writes up to `upto` changed, and those
    /// watching its user.
    fn wake_watchers(&mut self, upto: WriteId) {
        while let Some((id, _)) = self.undurable.front() {
            if *id > upto {
                break;
            }
            let Some((_, mailbox)) = self.undurable.pop_front() else { break };
            self.user_watchers.wake(&mailbox.user);
            self.watchers.wake(&mailbox);
        }
    }

    fn on_admin(&mut self, request: AdminRequest, reply: oneshot::Sender<AdminReply>) {
        let request = match request {
            AdminRequest::Mailboxes { user } => {
                let _ = reply.send(AdminReply::Mailboxes { mailboxes: self.mailbox_lines(user.as_deref()) });
                return;
            }
            AdminRequest::Fetch { mailbox, uids } => {
                self.fetch_bodies(&mailbox, &uids, reply);
                return;
            }
            AdminRequest::Backup { dir } => {
                self.start_backup(std::path::PathBuf::from(dir), reply);
                return;
            }
            AdminRequest::ImportBatch { requests } => {
                self.start_batch(requests, reply);
                return;
            }
            other => other,
        };
        let members_asked = matches!(request, AdminRequest::Members);
        let client_request = match to_client_request(request) {
            Ok(Some(r)) => r,
            Ok(None) if members_asked => {
                let _ = reply.send(AdminReply::Members { members: member_lines(self.server.members()) });
                return;
            }
            Ok(None) => {
                let _ = reply.send(AdminReply::Status(self.status()));
                return;
            }
            Err(reason) => {
                let _ = reply.send(AdminReply::Error { temporary: false, reason });
                return;
            }
        };
        let id = self.next_request;
        self.next_request += 1;
        let write = !matches!(
            client_request,
            ClientRequest::Read { .. } | ClientRequest::FreshRead { .. } | ClientRequest::FreshStatus { .. }
        );
        self.pending.insert(id, Pending { reply: Answer::Admin(reply), started: TokioInstant::now(), write });
        self.input(Input::Client { id, request: client_request });
    }

    /// The visible mailboxes of `user` (or of everyone), for `tandem export`.
    fn mailbox_lines(&self, user: Option<&str>) -> Vec<admin::MailboxLine> {
        self.server
            .image()
            .mailboxes
            .iter()
            .filter(|(key, m)| m.visible() && user.is_none_or(|u| &*key.user == u))
            .map(|(key, m)| admin::MailboxLine {
                mailbox: key.to_string(),
                uidvalidity: m.uidvalidity,
                uidnext: m.uidnext,
                messages: u32::try_from(m.messages.len()).unwrap_or(u32::MAX),
                subscribed: m.lifecycle.subscribed(),
            })
            .collect()
    }

    /// Answers with the bodies of `uids` in `mailbox` that this node holds intact. The
    /// event loop only looks the GUIDs up: the bytes are read (and encoded) off it, the
    /// way an IMAP FETCH reads them, so that an export of a large mailbox does not stall
    /// the loop that answers peers and clients.
    fn fetch_bodies(&self, mailbox: &str, uids: &[u32], reply: oneshot::Sender<AdminReply>) {
        use base64::Engine;
        if uids.len() > admin::FETCH_UIDS_MAX {
            let reason = format!("at most {} UIDs per fetch", admin::FETCH_UIDS_MAX);
            let _ = reply.send(AdminReply::Error { temporary: false, reason });
            return;
        }
        let key = match admin::parse_mailbox(mailbox) {
            Ok(key) => key,
            Err(reason) => {
                let _ = reply.send(AdminReply::Error { temporary: false, reason });
                return;
            }
        };
        let Some(m) = self.server.image().mailboxes.get(&key) else {
            let _ = reply.send(AdminReply::Error { temporary: false, reason: format!("no mailbox {key}") });
            return;
        };
        let records: Vec<(u32, &tandem_core::MessageRecord)> =
            uids.iter().filter_map(|uid| m.messages.get(uid).map(|record| (*uid, record))).collect();
        let bytes: u64 = records.iter().map(|(_, r)| u64::from(r.size)).sum();
        let wanted: Vec<(u32, Guid)> = records.iter().map(|(uid, r)| (*uid, r.guid)).collect();
        if wanted.len() > 1 && bytes > admin::FETCH_BYTES_MAX {
            let reason = format!(
                "{bytes} bytes of bodies asked for at once: at most {} per fetch (or one message)",
                admin::FETCH_BYTES_MAX
            );
            let _ = reply.send(AdminReply::Error { temporary: false, reason });
            return;
        }
        let Some(handle) = self.body_reads.clone() else {
            let _ = reply.send(AdminReply::Error { temporary: false, reason: "this node has no store".into() });
            return;
        };
        tokio::spawn(async move {
            let found = handle.bodies(wanted.iter().map(|(_, guid)| *guid).collect()).await;
            let mut bodies = Vec::with_capacity(wanted.len());
            for (uid, guid) in wanted {
                let Some(bytes) = found.get(&guid) else {
                    let reason = format!("the body of UID {uid} is not here yet (being fetched or repaired)");
                    let _ = reply.send(AdminReply::Error { temporary: true, reason });
                    return;
                };
                bodies.push(admin::FetchedBody {
                    uid,
                    body_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                });
            }
            let _ = reply.send(AdminReply::Bodies { bodies });
        });
    }

    /// Every request of an import batch goes into the core at once, in order (so a
    /// mailbox's master orders them as sent), and the batch is answered when all are.
    fn start_batch(&mut self, requests: Vec<AdminRequest>, reply: oneshot::Sender<AdminReply>) {
        if requests.len() > admin::BATCH_MAX || requests.iter().any(|r| !matches!(r, AdminRequest::Import { .. })) {
            let reason = format!("a batch holds up to {} imports and nothing else", admin::BATCH_MAX);
            let _ = reply.send(AdminReply::Error { temporary: false, reason });
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        let mut replies = vec![None; requests.len()];
        let mut inputs = Vec::new();
        for (index, request) in requests.into_iter().enumerate() {
            match to_client_request(request) {
                Ok(Some(request)) => inputs.push((index, request)),
                Ok(None) => {}
                Err(reason) => replies[index] = Some(AdminReply::Error { temporary: false, reason }),
            }
        }
        let left = inputs.len();
        self.batches.insert(batch, Batch { replies, left, reply });
        if left == 0 {
            self.finish_batch(batch);
            return;
        }
        for (index, request) in inputs {
            let id = self.next_request;
            self.next_request += 1;
            let answer = Answer::BatchPart(batch, index);
            self.pending.insert(id, Pending { reply: answer, started: TokioInstant::now(), write: true });
            self.input(Input::Client { id, request });
        }
    }

    fn finish_batch(&mut self, batch: u64) {
        let Some(b) = self.batches.remove(&batch) else { return };
        let results = b
            .replies
            .into_iter()
            .map(|r| r.unwrap_or(AdminReply::Error { temporary: true, reason: "not answered".into() }))
            .collect();
        let _ = b.reply.send(AdminReply::Batch { results });
    }

    /// `tandem backup`: the copy runs on a blocking thread; the loop goes on.
    fn start_backup(&self, dir: std::path::PathBuf, reply: oneshot::Sender<AdminReply>) {
        let Some(reader) = self.backup_reader.clone() else {
            let _ = reply.send(AdminReply::Error { temporary: false, reason: "this node has no store".into() });
            return;
        };
        let node_id = self.server.sid().0;
        tokio::task::spawn_blocking(move || {
            let answer = match crate::backup::take(&reader, node_id, &dir) {
                Ok(c) => {
                    info!(dir = %dir.display(), bytes = c.bytes, messages = c.messages, unreadable = c.bodies_unreadable, "backup taken");
                    AdminReply::BackedUp {
                        dir: dir.display().to_string(),
                        bytes: c.bytes,
                        body_files: c.body_files,
                        mailboxes: c.mailboxes,
                        messages: c.messages,
                    }
                }
                Err(reason) => AdminReply::Error { temporary: false, reason },
            };
            let _ = reply.send(answer);
        });
    }

    fn on_client(&mut self, request: ClientRequest, reply: oneshot::Sender<ClientReply>) {
        let id = self.next_request;
        self.next_request += 1;
        let write = !matches!(
            request,
            ClientRequest::Read { .. } | ClientRequest::FreshRead { .. } | ClientRequest::FreshStatus { .. }
        );
        self.pending.insert(id, Pending { reply: Answer::Client(reply), started: TokioInstant::now(), write });
        self.input(Input::Client { id, request });
    }

    fn answer(&mut self, id: RequestId, reply: ClientReply) {
        let Some(p) = self.pending.remove(&id) else { return };
        if p.write {
            self.metrics.observe_ack_ms(p.started.elapsed().as_secs_f64() * 1000.0);
        }
        let failed = matches!(reply, ClientReply::Failed { .. } | ClientReply::Write(WriteResult::Failed { .. }));
        let reply_to = match p.reply {
            Answer::Client(tx) => {
                self.metrics.writes_failed += u64::from(failed && p.write);
                let _ = tx.send(reply);
                return;
            }
            Answer::Admin(tx) => tx,
            Answer::BatchPart(batch, index) => {
                let answer = self.admin_answer(reply);
                let Some(b) = self.batches.get_mut(&batch) else { return };
                if let Some(slot) = b.replies.get_mut(index) {
                    *slot = Some(answer);
                }
                b.left = b.left.saturating_sub(1);
                if b.left == 0 {
                    self.finish_batch(batch);
                }
                return;
            }
        };
        let answer = self.admin_answer(reply);
        let _ = reply_to.send(answer);
    }

    /// A core reply as the admin interface gives it.
    fn admin_answer(&mut self, reply: ClientReply) -> AdminReply {
        match reply {
            ClientReply::Read(view) | ClientReply::FreshRead { view, .. } => {
                let stored = self.server.image().mailboxes.get(&view.mailbox);
                let checksum =
                    |uid: u32| stored.and_then(|m| m.messages.get(&uid)).map(|r| format!("{:016x}", r.checksum));
                AdminReply::Dump(admin::Dump {
                    mailbox: view.mailbox.to_string(),
                    uidvalidity: view.uidvalidity,
                    uidnext: view.uidnext,
                    highest_modseq: view.highest_modseq,
                    messages: view
                        .messages
                        .into_iter()
                        .map(|m| admin::MessageLine {
                            uid: m.uid,
                            guid: m.guid.to_string(),
                            flags: m.flags.iter().map(|f| f.as_str().to_string()).collect(),
                            modseq: m.modseq,
                            received: m.received,
                            size: m.size,
                            checksum: checksum(m.uid).unwrap_or_default(),
                        })
                        .collect(),
                })
            }
            ClientReply::Write(WriteResult::Saved { uidvalidity, uid, guid })
            | ClientReply::Write(WriteResult::Copied { uidvalidity, uid, guid }) => {
                AdminReply::Saved { uidvalidity, uid, guid: guid.to_string() }
            }
            ClientReply::Write(WriteResult::Stored { modseq, .. }) => AdminReply::Stored { modseq },
            ClientReply::Write(WriteResult::Expunged { uids, .. }) => AdminReply::Expunged { uids },
            ClientReply::Write(WriteResult::Failed { kind, reason }) | ClientReply::Failed { kind, reason } => {
                self.metrics.writes_failed += 1;
                AdminReply::Error { temporary: kind == FailKind::Temporary, reason }
            }
            ClientReply::Moved { master } => AdminReply::Moved { master: master.0 },
            ClientReply::Members { members } => AdminReply::Members { members: member_lines(&members) },
            ClientReply::Write(WriteResult::MailboxDone { modseq }) => AdminReply::Stored { modseq },
            // A BARRIER's answer goes to the core's own fresh reads, never to a client.
            ClientReply::Write(WriteResult::Position { highest_modseq, .. }) => {
                AdminReply::Stored { modseq: highest_modseq }
            }
            // The admin interface asks for whole views only.
            ClientReply::FreshStatus { status, .. } => AdminReply::Stored { modseq: status.highest_modseq },
            ClientReply::Write(WriteResult::Merged { modseq, .. }) => AdminReply::Stored { modseq },
            // A user replica's sync is served to its agent, never through the admin interface.
            ClientReply::ReplicaList { .. }
            | ClientReply::ReplicaState { .. }
            | ClientReply::ReplicaBodies { .. }
            | ClientReply::ReplicaTextParts { .. }
            | ClientReply::TextParts { .. }
            | ClientReply::ReplicaAdopted { .. }
            | ClientReply::BodiesKept { .. }
            | ClientReply::Body { .. } => {
                AdminReply::Error { temporary: false, reason: "a user replica's answer is not an admin answer".into() }
            }
        }
    }

    fn status(&self) -> admin::Status {
        let s = &self.server;
        let backlog = s.backlog();
        admin::Status {
            id: s.sid().0,
            root: s.term().root.map(|r| r.0),
            epoch: s.term().epoch,
            masters: s.masters_known().iter().map(|(k, m)| (k.to_string(), m.0)).collect(),
            mastered_here: s.mastered_ready().iter().map(|k| k.to_string()).collect(),
            links: s
                .members()
                .servers()
                .iter()
                .filter(|p| **p != s.sid())
                .map(|p| admin::LinkStatus {
                    peer: p.0,
                    connected: self.links.contains_key(p),
                    reachable: s.is_reachable(*p),
                    backlog: backlog.get(p).copied().unwrap_or(0),
                    store: s.peer_store(*p).map(|id| format!("{id:016x}")),
                })
                .collect(),
            mailboxes: s
                .summaries()
                .into_iter()
                .map(|m| admin::MailboxStatus {
                    mailbox: m.mailbox.to_string(),
                    uidvalidity: m.uidvalidity,
                    uidnext: m.uidnext,
                    messages: m.count,
                    highest_modseq: m.highest_modseq,
                    digest: format!("{:016x}", m.digest),
                })
                .collect(),
            jobs: s.jobs_in_progress(),
            wanted_bodies: s.wanted_bodies(),
            store: format!("{:016x}", s.image().store_id),
            unconfirmed: s.unconfirmed_copies(),
            filled: Some(s.store_filled()),
        }
    }

    fn render_metrics(&self) -> String {
        let s = &self.server;
        let backlog: BTreeMap<u32, usize> = s.backlog().into_iter().map(|(p, n)| (p.0, n)).collect();
        let links: BTreeMap<u32, bool> = s
            .members()
            .servers()
            .iter()
            .filter(|p| **p != s.sid())
            .map(|p| (p.0, self.links.contains_key(p)))
            .collect();
        let marks: Vec<(&str, u64)> = Mark::ALL.iter().map(|m| (m.name(), s.marks().count(*m))).collect();
        self.metrics.render(s.sid().0, &backlog, &links, &marks, s.unconfirmed_copies())
    }
}

fn member_lines(members: &Membership) -> Vec<admin::MemberLine> {
    members
        .entries()
        .map(|(sid, m)| admin::MemberLine { id: sid.0, state: m.state.name().to_string(), address: m.address.clone() })
        .collect()
}

fn flags(names: &[String]) -> Result<Vec<Flag>, String> {
    names.iter().map(|f| Flag::new(f).map_err(|e| format!("bad flag {f:?}: {e:?}"))).collect()
}

/// Wake-up channels by key (a mailbox, a user): a sender whose receivers are all gone
/// is dropped when next woken, and all of them when the map outgrows twice its size after
/// the last pruning.
struct Watchers<K> {
    senders: BTreeMap<K, watch::Sender<u64>>,
    live_after_pruning: usize,
}

impl<K> Default for Watchers<K> {
    fn default() -> Self {
        Watchers { senders: BTreeMap::new(), live_after_pruning: 0 }
    }
}

impl<K: Ord> Watchers<K> {
    fn subscribe(&mut self, key: K) -> watch::Receiver<u64> {
        if self.senders.len() >= WATCHERS_PRUNE_MIN.max(2 * self.live_after_pruning) {
            self.senders.retain(|_, tx| tx.receiver_count() > 0);
            self.live_after_pruning = self.senders.len();
        }
        self.senders.entry(key).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn wake(&mut self, key: &K) {
        let Some(tx) = self.senders.get(key) else { return };
        if tx.receiver_count() == 0 {
            self.senders.remove(key);
        } else {
            tx.send_modify(|changes| *changes = changes.wrapping_add(1));
        }
    }
}

/// Ok(None) for requests the loop answers itself (status).
fn to_client_request(request: AdminRequest) -> Result<Option<ClientRequest>, String> {
    Ok(Some(match request {
        AdminRequest::Status | AdminRequest::Members => return Ok(None),
        AdminRequest::Mailboxes { .. }
        | AdminRequest::Fetch { .. }
        | AdminRequest::Backup { .. }
        | AdminRequest::ImportBatch { .. } => {
            return Err("answered by the event loop".into());
        }
        AdminRequest::Replicate => return Err("the replica link is its own connection's, not a request".into()),
        AdminRequest::Import { mailbox, uidvalidity, uid, received, flags: f, body_base64 } => {
            use base64::Engine;
            let body = base64::engine::general_purpose::STANDARD
                .decode(body_base64.as_bytes())
                .map_err(|e| format!("body_base64: {e}"))?;
            let (mailbox, flags) = (admin::parse_mailbox(&mailbox)?, flags(&f)?);
            match uid {
                Some(uid) => ClientRequest::Import { mailbox, uidvalidity, uid, received, flags, body: body.into() },
                None => ClientRequest::Save { mailbox, received, flags, body: body.into(), delivery: false },
            }
        }
        AdminRequest::Subscribe { mailbox, subscribe } => {
            ClientRequest::Subscription { mailbox: admin::parse_mailbox(&mailbox)?, subscribe }
        }
        // A source mailbox without a UIDVALIDITY (a Maildir Dovecot never opened): a plain
        // CREATE, the mailbox's own UIDVALIDITY kept.
        AdminRequest::ImportMailbox { mailbox, uidvalidity: 0 } => {
            ClientRequest::CreateMailbox { mailbox: admin::parse_mailbox(&mailbox)?, special_use: Default::default() }
        }
        AdminRequest::ImportMailbox { mailbox, uidvalidity } => {
            ClientRequest::ImportMailbox { mailbox: admin::parse_mailbox(&mailbox)?, uidvalidity }
        }
        AdminRequest::MemberAdd { id, address } => {
            ClientRequest::Membership { change: MemberChange::Add { sid: Sid(id), address } }
        }
        AdminRequest::MemberRemove { id, lost: false } => {
            ClientRequest::Membership { change: MemberChange::Leave { sid: Sid(id) } }
        }
        AdminRequest::MemberRemove { id, lost: true } => {
            ClientRequest::Membership { change: MemberChange::Lost { sid: Sid(id) } }
        }
        AdminRequest::Deliver { mailbox, body, flags: f } => ClientRequest::Save {
            mailbox: admin::parse_mailbox(&mailbox)?,
            received: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            flags: flags(&f)?,
            body: body.into_bytes().into(),
            delivery: false,
        },
        AdminRequest::Dump { mailbox } => ClientRequest::Read { mailbox: admin::parse_mailbox(&mailbox)? },
        AdminRequest::Store { mailbox, uids, add, remove } => ClientRequest::Store {
            mailbox: admin::parse_mailbox(&mailbox)?,
            uids,
            add: flags(&add)?,
            remove: flags(&remove)?,
            unchanged_since: None,
        },
        AdminRequest::Expunge { mailbox, uids } => {
            ClientRequest::Expunge { mailbox: admin::parse_mailbox(&mailbox)?, uids }
        }
        AdminRequest::MasterMove { mailbox } => ClientRequest::MasterMove { mailbox: admin::parse_mailbox(&mailbox)? },
    }))
}

/// Group commit: everything queued while the previous transaction committed goes into
/// the next one; lazy writes alone wait for company (`StoreWrite::is_lazy`). A commit
/// that fails (a full disk, an I/O error) is retried with the
/// store reopened, the failed batch first and in order, until it lands: nothing is
/// reported durable that is not, the core's later writes wait behind it, writes get
/// temporary failures by their timeout, and reads go on.
fn spawn_store_thread(
    store: Store,
    path: std::path::PathBuf,
    inline_len_max: u64,
    batches: std::sync::mpsc::Receiver<Vec<(WriteId, StoreWrite)>>,
    events: mpsc::Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let index = store.index().clone();
        let mut store = Some(store);
        let mut backoff = STORE_RETRY_MIN;
        while let Ok(first) = batches.recv() {
            // Moved out of the batches once; a failed commit retries these same writes,
            // with whatever arrived meanwhile appended in order.
            let mut upto = None;
            let mut writes: Vec<StoreWrite> = Vec::new();
            fn absorb(batch: Vec<(WriteId, StoreWrite)>, upto: &mut Option<WriteId>, writes: &mut Vec<StoreWrite>) {
                for (id, write) in batch {
                    *upto = Some(id);
                    writes.push(write);
                }
            }
            absorb(first, &mut upto, &mut writes);
            // Writes nothing waits for (acknowledged log entries) start no commit of
            // their own: they go with the next batch that needs one, or when their
            // hold ends (a fsync fewer per acknowledgement on the master).
            let held_since = std::time::Instant::now();
            let hold = Duration::from_micros(tandem_core::io::LAZY_WRITE_HOLD_US_MAX);
            while writes.iter().all(StoreWrite::is_lazy) {
                let Some(left) = hold.checked_sub(held_since.elapsed()) else { break };
                match batches.recv_timeout(left) {
                    Ok(more) => absorb(more, &mut upto, &mut writes),
                    Err(_) => break,
                }
            }
            loop {
                while let Ok(more) = batches.try_recv() {
                    absorb(more, &mut upto, &mut writes);
                }
                let Some(upto) = upto else { break };
                let result = match &store {
                    Some(s) => s.apply(&writes).map_err(|e| e.to_string()),
                    None => Store::open_with_index(&path, index.clone(), inline_len_max)
                        .map_err(|e| e.to_string())
                        .and_then(|s| {
                            let r = s.apply(&writes).map_err(|e| e.to_string());
                            store = Some(s);
                            r
                        }),
                };
                match result {
                    Ok(()) => {
                        backoff = STORE_RETRY_MIN;
                        if events.blocking_send(Event::Durable { upto, writes: writes.len() }).is_err() {
                            return;
                        }
                        break;
                    }
                    Err(e) => {
                        // redb refuses every later operation after a failed commit: the
                        // next attempt opens the store again.
                        store = None;
                        if events.blocking_send(Event::StoreTrouble(e)).is_err() {
                            return;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(STORE_RETRY_MAX);
                    }
                }
            }
        }
    })
}

async fn accept_peers(
    listener: TcpListener,
    cfg: NodeConfig,
    accepted: Arc<std::sync::RwLock<Vec<Sid>>>,
    events: mpsc::Sender<Event>,
    links: mpsc::Sender<LinkEvent>,
    conn_ids: Arc<AtomicU64>,
) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let (cfg, events, links, conn_ids) = (cfg.clone(), events.clone(), links.clone(), conn_ids.clone());
        let servers: Vec<Sid> = match accepted.read() {
            Ok(ids) => ids.clone(),
            Err(_) => cfg.core.servers.clone(),
        };
        tokio::spawn(async move {
            let me = cfg.core.sid;
            let _ = tcp.set_nodelay(true);
            let handshake = async {
                let (mut stream, certificate): (PeerStream, _) = match &cfg.tls {
                    None => (Box::new(tcp), None),
                    Some(tls) => {
                        let s =
                            tls.acceptor.accept(tcp).await.map_err(|e| peer::Refused(format!("TLS handshake: {e}")))?;
                        let cert =
                            s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
                        if cert.is_none() {
                            return Err(peer::Refused("no client certificate".into()));
                        }
                        (Box::new(s), cert)
                    }
                };
                let agreed = peer::accept_handshake(
                    &mut stream,
                    me,
                    &servers,
                    &cfg.secret,
                    cfg.compression,
                    certificate.as_ref(),
                )
                .await?;
                Ok::<_, peer::Refused>((stream, agreed))
            };
            let (stream, agreed) = match tokio::time::timeout(peer::HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    warn!(%addr, reason = %e, "peer connection refused");
                    let _ = events.send(Event::Refused).await;
                    return;
                }
                Err(_) => {
                    warn!(%addr, "peer handshake timed out");
                    let _ = events.send(Event::Refused).await;
                    return;
                }
            };
            let conn = conn_ids.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(peer::SEND_QUEUE_MAX);
            if events.send(Event::Connected { agreed, conn, outgoing: tx }).await.is_err() {
                return;
            }
            peer::run_link(stream, agreed, conn, rx, links).await;
        });
    }
}

async fn dial_peer(
    peer: Sid,
    address: String,
    cfg: NodeConfig,
    events: mpsc::Sender<Event>,
    links: mpsc::Sender<LinkEvent>,
    conn_ids: Arc<AtomicU64>,
) {
    let mut backoff = DIAL_BACKOFF_MIN;
    loop {
        let attempt = async {
            let tcp = TcpStream::connect(address.as_str()).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let mut stream: PeerStream = match &cfg.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let name = crate::tls::server_name(peer.0)?;
                    Box::new(tls.connector.connect(name, tcp).await.map_err(|e| format!("TLS handshake: {e}"))?)
                }
            };
            let agreed = peer::dial_handshake(&mut stream, cfg.core.sid, peer, &cfg.secret, cfg.compression)
                .await
                .map_err(|e| e.0)?;
            Ok::<_, String>((stream, agreed))
        };
        match tokio::time::timeout(peer::HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok((stream, agreed))) => {
                backoff = DIAL_BACKOFF_MIN;
                let conn = conn_ids.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(peer::SEND_QUEUE_MAX);
                if events.send(Event::Connected { agreed, conn, outgoing: tx }).await.is_err() {
                    return;
                }
                peer::run_link(stream, agreed, conn, rx, links.clone()).await;
            }
            Ok(Err(e)) => debug!(peer = peer.0, %address, error = %e, "dial failed"),
            Err(_) => debug!(peer = peer.0, "dial timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
    }
}

/// Accepts connections and runs `session` for each. A connection over `connections_max`
/// in all or `per_ip_max` from its address gets `refuse`'s line and is closed at once,
/// so that the others are told rather than left waiting for a greeting.
pub(crate) async fn serve_sessions<F, Fut>(listener: TcpListener, limits: SessionLimits, mut session: F)
where
    F: FnMut(TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let counts = Arc::new(std::sync::Mutex::new(ConnectionCounts::default()));
    loop {
        let (mut stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Replies are small and a client may pipeline: without this, Nagle holds the
        // second reply until the client's delayed ACK (40 ms per pipelined command).
        let _ = stream.set_nodelay(true);
        let admitted = counts.lock().map(|mut c| c.admit(addr.ip(), &limits)).unwrap_or(false);
        if !admitted {
            let refuse = limits.refuse;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(refuse.as_bytes())).await;
            });
            continue;
        }
        let work = session(stream, addr);
        // Given back when the session ends, however it ends (a panic included).
        let slot = Admitted { counts: counts.clone(), ip: addr.ip() };
        tokio::spawn(async move {
            let _slot = slot;
            work.await;
        });
    }
}

/// Connection limits of one listener and the line a refused connection gets.
#[derive(Clone, Copy)]
pub(crate) struct SessionLimits {
    pub connections_max: usize,
    pub per_ip_max: usize,
    pub refuse: &'static str,
}

/// A session's place in its listener's counts.
struct Admitted {
    counts: Arc<std::sync::Mutex<ConnectionCounts>>,
    ip: std::net::IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock() {
            c.release(self.ip);
        }
    }
}

#[derive(Default)]
struct ConnectionCounts {
    total: usize,
    per_ip: BTreeMap<std::net::IpAddr, usize>,
}

impl ConnectionCounts {
    fn admit(&mut self, ip: std::net::IpAddr, limits: &SessionLimits) -> bool {
        let here = self.per_ip.get(&ip).copied().unwrap_or(0);
        if self.total >= limits.connections_max || here >= limits.per_ip_max {
            return false;
        }
        self.total += 1;
        self.per_ip.insert(ip, here + 1);
        true
    }

    fn release(&mut self, ip: std::net::IpAddr) {
        self.total = self.total.saturating_sub(1);
        match self.per_ip.get_mut(&ip) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// The admin listener: a Unix socket (mode 0600) or a TCP port with its token.
enum AdminListener {
    Unix(tokio::net::UnixListener),
    Tcp(TcpListener, String),
}

impl AdminListener {
    fn bind(place: &AdminListen) -> Result<AdminListener, String> {
        match place {
            AdminListen::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("admin socket dir {}: {e}", dir.display()))?;
                }
                // A socket left by a node that did not stop cleanly.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                let listener = tokio::net::UnixListener::bind(path)
                    .map_err(|e| format!("admin socket {}: {e}", path.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("admin socket {}: {e}", path.display()))?;
                Ok(AdminListener::Unix(listener))
            }
            AdminListen::Tcp { addr, token } => {
                if !addr.ip().is_loopback() {
                    warn!(
                        %addr,
                        "the admin port listens beyond loopback: anyone who can reach it and learns the token \
                         operates this node; prefer the Unix socket"
                    );
                }
                let std = std::net::TcpListener::bind(addr).map_err(|e| format!("admin on {addr}: {e}"))?;
                std.set_nonblocking(true).map_err(|e| format!("admin on {addr}: {e}"))?;
                let listener = TcpListener::from_std(std).map_err(|e| format!("admin on {addr}: {e}"))?;
                Ok(AdminListener::Tcp(listener, token.clone()))
            }
        }
    }
}

async fn serve_admin(listener: AdminListener, events: mpsc::Sender<Event>, connections_max: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(connections_max));
    // Connections still to show their token hold no slot of the operator's, only one of
    // these, and for ADMIN_TOKEN_TIMEOUT at most.
    let unproven = Arc::new(tokio::sync::Semaphore::new(ADMIN_UNPROVEN_MAX));
    loop {
        let accepted: std::io::Result<(Box<dyn crate::peer::PeerIo>, Option<String>)> = match &listener {
            AdminListener::Unix(l) => {
                l.accept().await.map(|(s, _)| (Box::new(s) as Box<dyn crate::peer::PeerIo>, None))
            }
            AdminListener::Tcp(l, token) => {
                l.accept().await.map(|(s, _)| (Box::new(s) as Box<dyn crate::peer::PeerIo>, Some(token.clone())))
            }
        };
        let (stream, token) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let (events, slots) = (events.clone(), slots.clone());
        match token {
            None => {
                tokio::spawn(admin_session(stream, None, slots, events));
            }
            Some(token) => {
                let Ok(permit) = unproven.clone().try_acquire_owned() else { continue };
                tokio::spawn(async move {
                    let _unproven = permit;
                    admin_session(stream, Some(token), slots, events).await;
                });
            }
        }
    }
}

async fn admin_reply<W: tokio::io::AsyncWrite + Unpin>(write: &mut W, reply: &AdminReply) -> bool {
    let Ok(mut text) = serde_json::to_string(reply) else { return false };
    text.push('\n');
    tokio::time::timeout(ADMIN_LINE_TIMEOUT, write.write_all(text.as_bytes())).await.is_ok_and(|r| r.is_ok())
}

async fn admin_session(
    stream: Box<dyn crate::peer::PeerIo>,
    token: Option<String>,
    slots: Arc<tokio::sync::Semaphore>,
    events: mpsc::Sender<Event>,
) {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read.take(admin::REQUEST_LEN_MAX as u64));
    let mut line = String::new();
    if let Some(token) = &token {
        let first = tokio::time::timeout(ADMIN_TOKEN_TIMEOUT, (&mut reader).take(512).read_line(&mut line)).await;
        let presented = line.trim_end().strip_prefix("TOKEN ").unwrap_or_default();
        if !matches!(first, Ok(Ok(n)) if n > 0) || !admin::token_matches(presented, token) {
            let reason = if admin::looks_like_http(&line) {
                "HTTP is not spoken here"
            } else {
                "send TOKEN <admin token> first"
            };
            warn!(reason, "an admin connection without the right token: refused");
            admin_reply(&mut write, &AdminReply::Error { temporary: false, reason: reason.into() }).await;
            return;
        }
    }
    let Ok(_permit) = slots.try_acquire_owned() else {
        let busy = AdminReply::Error { temporary: true, reason: "too many admin connections".into() };
        admin_reply(&mut write, &busy).await;
        return;
    };
    loop {
        line.clear();
        match tokio::time::timeout(ADMIN_LINE_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        if admin::looks_like_http(&line) {
            warn!("an HTTP request on the admin interface: refused");
            let refused = AdminReply::Error { temporary: false, reason: "HTTP is not spoken here".into() };
            admin_reply(&mut write, &refused).await;
            return;
        }
        let reply = match serde_json::from_str::<AdminRequest>(&line) {
            Ok(AdminRequest::Replicate) => {
                // The agent waits for this answer before its first frame: nothing of it
                // can sit in the line reader's buffer.
                if !reader.buffer().is_empty() {
                    let early = AdminReply::Error { temporary: false, reason: "frames before the answer".into() };
                    admin_reply(&mut write, &early).await;
                    return;
                }
                if !admin_reply(&mut write, &AdminReply::Replicating).await {
                    return;
                }
                let stream = reader.into_inner().into_inner().unsplit(write);
                let node = NodeHandle { events, bodies: None };
                if let Err(e) = crate::replica_link::serve(stream, crate::replica_link::Gate::Owner, node).await {
                    debug!(error = %e, "a replica link on the admin interface ended");
                }
                return;
            }
            Ok(request) => {
                let Some(reply) = ask(&events, |reply| Event::Admin { request, reply }).await else { return };
                reply
            }
            Err(e) => AdminReply::Error { temporary: false, reason: format!("bad request: {e}") },
        };
        if !admin_reply(&mut write, &reply).await {
            return;
        }
    }
}

/// A minimal HTTP/1.0 responder: every GET gets the exposition.
async fn serve_metrics(listener: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let events = events.clone();
        tokio::spawn(async move {
            let mut head = vec![0u8; 4096];
            let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await else { return };
            let Some(body) = ask(&events, |reply| Event::Metrics { reply }).await else { return };
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// SIGHUP reads the users file again (passwords changed, users added or removed) without
/// a restart; a file that does not load is reported and the users stay as they were.
async fn reload_users_on_hangup(
    hangups: std::io::Result<tokio::signal::unix::Signal>,
    path: Option<std::path::PathBuf>,
    front: crate::front::Front,
) {
    let mut hangups = match hangups {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the users file is read at start only");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let Some(path) = &path else {
            info!("SIGHUP: no users_file configured, nothing to read again");
            continue;
        };
        match crate::users::Users::load(path) {
            Ok(users) => {
                let count = users.len();
                front.replace_users(users);
                info!(file = %path.display(), users = count, "SIGHUP: users file read again");
            }
            Err(e) => tracing::warn!(error = %e, "SIGHUP: users file not read again; the users stay as they were"),
        }
    }
}

#[cfg(test)]
mod store_thread_tests {
    use super::*;
    use crate::store::Store;

    type Batches = std::sync::mpsc::Sender<Vec<(WriteId, StoreWrite)>>;

    fn store_thread() -> (tempfile::TempDir, Batches, mpsc::Receiver<Event>, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (batches_tx, batches_rx) = std::sync::mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel(16);
        let thread = spawn_store_thread(store, dir.path().to_path_buf(), 0, batches_rx, events_tx);
        (dir, batches_tx, events_rx, thread)
    }

    fn acked(seq: u64) -> StoreWrite {
        StoreWrite::LogAcked { peer: Sid(2), seqs: vec![seq] }
    }

    fn durable(events: &mut mpsc::Receiver<Event>) -> (WriteId, usize) {
        match events.blocking_recv() {
            Some(Event::Durable { upto, writes }) => (upto, writes),
            Some(_) => panic!("expected a durable report"),
            None => panic!("the store thread ended"),
        }
    }

    #[test]
    fn a_lazy_write_waits_for_the_next_write_that_needs_a_commit() {
        let (_dir, batches, mut events, thread) = store_thread();
        batches.send(vec![(1, acked(1))]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        batches.send(vec![(2, StoreWrite::Epoch { epoch: 3 })]).unwrap();
        // One commit for both, reported once: the lazy write started none of its own
        // (the hold is a second; the second batch came well within it).
        assert_eq!(durable(&mut events), (2, 2));
        drop(batches);
        thread.join().unwrap();
        assert!(events.blocking_recv().is_none(), "nothing more was committed");
    }

    #[test]
    fn a_lazy_write_alone_is_committed_when_its_hold_ends() {
        let (_dir, batches, mut events, thread) = store_thread();
        let sent = std::time::Instant::now();
        batches.send(vec![(1, acked(1)), (2, acked(2))]).unwrap();
        assert_eq!(durable(&mut events), (2, 2));
        let hold = Duration::from_micros(tandem_core::io::LAZY_WRITE_HOLD_US_MAX);
        assert!(sent.elapsed() >= hold, "held for its hold, not committed at once");
        drop(batches);
        thread.join().unwrap();
    }

    #[test]
    fn a_lazy_write_held_at_shutdown_is_committed() {
        let (dir, batches, mut events, thread) = store_thread();
        batches.send(vec![(1, StoreWrite::Epoch { epoch: 9 })]).unwrap();
        assert_eq!(durable(&mut events), (1, 1));
        batches.send(vec![(2, acked(1))]).unwrap();
        drop(batches);
        assert_eq!(durable(&mut events), (2, 1));
        thread.join().unwrap();
        let image = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(image.epoch, 9);
    }
}
