//! The simulated cluster: servers running the real core, a network of links with
//! latencies, disks with group commit, clients, faults, and one seeded RNG driving all
//! of it in virtual time. Same seed, same run.

use crate::oracle::{self, Oracle};
use crate::scenario::*;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use tandem_core::hash::{Fnv64, GuidHasher, fnv64, mix64};
use tandem_core::wire::{Decoder, Encoder};
use tandem_core::*;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub wire: bool,
    /// Keep the whole readable timeline.
    pub trace: bool,
    /// Keep the last lines of the timeline for a failure report.
    pub tail: bool,
    pub seed: Option<u64>,
    /// A deliberately broken protocol variant (needs the `broken` feature).
    pub bug: Option<Bug>,
}

#[derive(Clone, Debug, Default)]
pub struct RunReport {
    pub name: String,
    pub seed: u64,
    pub passed: bool,
    pub failures: Vec<String>,
    pub sim_time_us: u64,
    pub messages: u64,
    pub wire_bytes: u64,
    pub steps: u64,
    pub trace_hash: u64,
    pub trace: Vec<String>,
    pub marks: BTreeMap<String, u64>,
    pub converged_after_us: Option<u64>,
    pub violations: Vec<oracle::Violation>,
    /// Peer messages sent, by command name.
    pub messages_by_kind: BTreeMap<&'static str, u64>,
    /// Fsyncs completed, and those whose writes were all lazy (acknowledged log entries),
    /// for `run --stats`.
    pub fsyncs: u64,
    pub fsyncs_of_lazy_writes: u64,
    /// The GUID each labelled message got.
    pub labels: BTreeMap<String, Guid>,
    /// At the end, each running server's mailboxes: (UID, GUID, flags) in UID order.
    pub final_mailboxes: BTreeMap<Sid, FinalMailboxes>,
}

/// One server's mailboxes at the end of a run: (UID, GUID, flags) in UID order.
pub type FinalMailboxes = BTreeMap<MailboxKey, Vec<(Uid, Guid, Vec<Flag>)>>;

/// Trace lines kept for a failure report when not tracing everything.
const TRACE_TAIL_MAX: usize = 400;
/// Hard cap on simulated events, so a livelock ends as a failure instead of a hang.
const STEPS_MAX: u64 = 50_000_000;

#[derive(Clone, Debug)]
enum Ev {
    Deliver {
        from: Sid,
        to: Sid,
        generation: u64,
        envelope: Envelope,
    },
    Timer {
        server: Sid,
        incarnation: u64,
    },
    Fsync {
        server: Sid,
        incarnation: u64,
        upto: WriteId,
        /// Which of the node's scheduled flushes this is (`Node::flush_seq`): one that
        /// a sooner flush replaced does nothing.
        flush: u64,
    },
    Action {
        action: Action,
        event: Option<usize>,
    },
    Heal {
        end: bool,
    },
    RestoreLink {
        a: Sid,
        b: Sid,
    },
    /// The far end of a `reset` connection notices it.
    ResetNoticed {
        server: Sid,
        peer: Sid,
        generation: u64,
    },
    /// A `slow` fault ends: the link's latency is what it was.
    RestoreLatency {
        a: Sid,
        b: Sid,
    },
    /// A generated client operation or store edit, decided when it runs.
    RandomOp {
        server: Sid,
        mailbox: MailboxKey,
        roll: u32,
    },
    /// A client delivers again what failed for now (see `ClusterSpec::mta_retry_ms`).
    Retry {
        server: Sid,
        retry: Retry,
    },
    /// A laptop's agent request reaches its home server (after the way there).
    AgentRequest {
        tag: AgentTag,
        home: Sid,
        request: ClientRequest,
    },
    /// An answer reaches a laptop's agent (`None`: the connection was lost).
    AgentReply {
        tag: AgentTag,
        reply: Option<ClientReply>,
    },
}

/// A delivery a client will try again if it fails for now, as an MTA does.
#[derive(Clone, Debug)]
struct Retry {
    mailbox: MailboxKey,
    flags: Vec<Flag>,
    body: Body,
    label: Option<String>,
    /// Attempts made so far (1: the first).
    attempts: u32,
}

/// Attempts a client makes at one delivery before it gives up (an MTA bounces later).
const DELIVERY_ATTEMPTS_MAX: u32 = 5;

/// An event in the queue, ordered by time and then by `id` (scheduling order).
#[derive(Clone)]
struct Queued {
    at: Instant,
    id: u64,
    ev: Box<Ev>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.id) == (other.at, other.id)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.id).cmp(&(other.at, other.id))
    }
}

/// The events to come, in (time, id) order: those scheduled as the run goes (a few
/// dozen at a time) in a heap, and a planned workload (thousands, known at once) in a
/// vector sorted latest first, so that the heap's every push and pop stays short. The
/// order taken out is the one a single heap would give.
#[derive(Clone, Default)]
struct EventQueue {
    near: BinaryHeap<Reverse<Queued>>,
    /// Latest first: the next planned event is the last.
    planned: Vec<Queued>,
}

impl EventQueue {
    fn push(&mut self, q: Queued) {
        self.near.push(Reverse(q));
    }

    /// Adds planned events; they are sorted in with the others planned.
    fn plan(&mut self, events: impl IntoIterator<Item = Queued>) {
        self.planned.extend(events);
        self.planned.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Whether the next event is a planned one.
    fn planned_first(&self) -> bool {
        match (self.near.peek(), self.planned.last()) {
            (Some(Reverse(n)), Some(p)) => p < n,
            (None, Some(_)) => true,
            _ => false,
        }
    }

    fn peek(&self) -> Option<&Queued> {
        if self.planned_first() { self.planned.last() } else { self.near.peek().map(|Reverse(q)| q) }
    }

    fn pop(&mut self) -> Option<Queued> {
        if self.planned_first() { self.planned.pop() } else { self.near.pop().map(|Reverse(q)| q) }
    }

    fn iter(&self) -> impl Iterator<Item = &Queued> {
        self.near.iter().map(|Reverse(q)| q).chain(self.planned.iter())
    }

    /// Takes out the event `id`, wherever it is.
    fn remove(&mut self, id: u64) -> Option<Queued> {
        if let Some(i) = self.planned.iter().position(|q| q.id == id) {
            return Some(self.planned.remove(i));
        }
        let mut rest = std::mem::take(&mut self.near).into_vec();
        let found = rest.iter().position(|Reverse(q)| q.id == id).map(|i| rest.swap_remove(i).0);
        self.near = BinaryHeap::from(rest);
        found
    }
}

struct Node {
    server: Option<Server>,
    disk: DiskImage,
    /// The bytes of the bodies `disk` lists: the driver's body store, shared with the
    /// running server, which reads it.
    bodies: MemoryBodies,
    pending: Vec<(WriteId, StoreWrite)>,
    /// Debug builds: the image a fresh start plus every write the server emitted makes,
    /// which must equal the server's own image after every input (one mutation path).
    replayed: Option<DiskImage>,
    fsync_in_flight: bool,
    /// The flush scheduled waits only for lazy writes (`StoreWrite::is_lazy`), at the
    /// end of their hold: a write that needs a flush schedules a sooner one.
    flush_is_lazy: bool,
    flush_seq: u64,
    incarnation: u64,
    lost: bool,
    timer_at: Option<Instant>,
    /// When the node's current store was made (0: at the start of the run).
    store_made_us: u64,
    /// The operator's last backup of the node's store (`tandem backup`): what was
    /// durable then, the bodies with it.
    backup: Option<(DiskImage, MemoryBodies)>,
}

/// A copy of a node that shares nothing with it: its own body store, and its server
/// forked to read from that (what makes cloning a `World` fork it).
impl Clone for Node {
    fn clone(&self) -> Node {
        let bodies = self.bodies.deep_copy();
        Node {
            server: self.server.as_ref().map(|s| s.fork(Box::new(bodies.clone()))),
            disk: self.disk.clone(),
            bodies,
            pending: self.pending.clone(),
            replayed: self.replayed.clone(),
            fsync_in_flight: self.fsync_in_flight,
            flush_is_lazy: self.flush_is_lazy,
            flush_seq: self.flush_seq,
            incarnation: self.incarnation,
            lost: self.lost,
            timer_at: self.timer_at,
            store_made_us: self.store_made_us,
            backup: self.backup.as_ref().map(|(disk, bodies)| (disk.clone(), bodies.deep_copy())),
        }
    }
}

#[derive(Clone)]
struct Link {
    up: bool,
    latency_us: (u64, u64),
    /// The latency the link has when no `slow` fault is on.
    normal_latency_us: (u64, u64),
    /// Per direction (as `last_delivery`): until when envelopes are dropped while the
    /// connection stays up (a `silence` fault).
    silent_until: [Instant; 2],
    generation: u64,
    /// Per direction (from lower id, from higher id): last delivery time, codec state.
    last_delivery: [Instant; 2],
    codec: [(Encoder, Decoder); 2],
    /// After a `reset`: the old connection's generation, the server that has not
    /// noticed the reset yet, and until when it still receives what was in flight.
    lingering: Option<(u64, Sid, Instant)>,
}

/// A client request waiting for its answer.
#[derive(Clone)]
struct Outstanding {
    server: Sid,
    incarnation: u64,
    event: Option<usize>,
    label: Option<String>,
    mailbox: Option<MailboxKey>,
    /// An EXPUNGE's messages as (UID asked for, GUID).
    expunging: Vec<(Uid, Guid)>,
    unchanged_since: Option<ModSeq>,
    /// A STORE's messages as (UID here, GUID) and its deltas.
    storing: Vec<(Uid, Guid)>,
    add: Vec<Flag>,
    remove: Vec<Flag>,
    /// Servers lost for good, and message files deleted by hand, before the request was
    /// made: a copy lost to either later had kept the promise when it was made.
    losses_before: usize,
    hand_deletes_before: usize,
    /// When the client asked.
    issued_us: u64,
    /// A delivery to try again if it fails for now.
    retry: Option<Retry>,
    /// A laptop agent's request: its answer goes to the agent.
    agent: Option<AgentTag>,
    /// A MOVE's copy: the source mailbox and label to expunge once it is answered.
    then_expunge: Option<(MailboxKey, String)>,
}

impl Outstanding {
    /// A request's bookkeeping before the client fills it in.
    fn none() -> Outstanding {
        Outstanding {
            server: Sid(0),
            incarnation: 0,
            event: None,
            label: None,
            mailbox: None,
            expunging: Vec::new(),
            unchanged_since: None,
            storing: Vec::new(),
            add: Vec::new(),
            remove: Vec::new(),
            losses_before: 0,
            hand_deletes_before: 0,
            issued_us: 0,
            retry: None,
            agent: None,
            then_expunge: None,
        }
    }
}

/// One-way trips over its link a laptop's final syncs may take at most (three syncs of
/// up to three rounds, each a list, pulls, pushes, adopts and body fetches).
const LAPTOP_SETTLE_TRIPS: u64 = 120;

/// Cloning a world forks it: the copy shares nothing with it (servers, body stores,
/// queue, oracle), and both go on alike on the same choices.
#[derive(Clone)]
pub struct World {
    scenario: Scenario,
    opts: RunOptions,
    rng: ChaCha8Rng,
    now: Instant,
    /// Scheduled events, earliest first (ties in scheduling order).
    queue: EventQueue,
    next_event: u64,
    nodes: BTreeMap<Sid, Node>,
    links: BTreeMap<(Sid, Sid), Link>,
    pub oracle: Oracle,
    labels: BTreeMap<String, Guid>,
    /// `labels` inverted: the labels of each GUID (no order; only looked up).
    labels_of: HashMap<Guid, Vec<String>, BuildHasherDefault<GuidHasher>>,
    outstanding: BTreeMap<RequestId, Outstanding>,
    next_request: RequestId,
    /// Client answers by event index: (ok, rejected).
    answers: BTreeMap<usize, ClientReply>,
    failures: Vec<String>,
    /// Each running server's term as of its last input (a server's term changes only
    /// there, or when it starts or stops): after every step the common case, every
    /// term alike, is a look at this, not a walk of the nodes.
    live_terms: Vec<(Sid, tandem_core::server::Term)>,
    messages: u64,
    /// Counted per message sent: a short list of the kinds seen, found by the name's
    /// address before its text (a name is one static string), sorted for the report.
    messages_by_kind: Vec<(&'static str, u64)>,
    fsyncs: u64,
    fsyncs_of_lazy_writes: u64,
    wire_bytes: u64,
    steps: u64,
    trace_hash: u64,
    trace: Vec<String>,
    label_counter: u64,
    /// The bytes of each labelled save or import (see `labelled_body`).
    labelled_bytes: BTreeMap<String, Body>,
    /// Deliveries retried while the cluster was whole and agreeing, as (mailbox, body
    /// checksum): each must be stored once (see `oracle::RETRIES_STORED_ONCE`).
    retried_when_whole: BTreeSet<(MailboxKey, u64)>,
    /// The settle phase: clients make no more requests, retries included.
    clients_stopped: bool,
    /// Whether every fault so far was a crash of a server that had handed every change
    /// on, or a restart (see `oracle::RESTARTS_RENUMBER_NOTHING`).
    only_clean_restarts: bool,
    lost_for_good: usize,
    hand_deletes: usize,
    /// The last crash, start, link change or hand edit: a fresh read must show every
    /// save acknowledged after it (before that a master may have moved to a server
    /// without the message, which async mode allows).
    last_fault_us: u64,
    /// Per message, the servers whose copy was destroyed by a hand edit (file deleted or
    /// body corrupted): with servers lost for good, more than `replicas` of them is more
    /// than sync mode promises to survive.
    destroyed_copies: BTreeMap<Guid, BTreeSet<Sid>>,
    seed: u64,
    /// Coverage marks of server incarnations that crashed.
    dead_marks: BTreeMap<String, u64>,
    /// Debugging aid: trace every durable write whose text contains this (TANDEM_WATCH).
    watch: Option<String>,
    config_error: Option<String>,
    /// The `replicate` running for each laptop, and how many ran.
    agents: BTreeMap<Sid, Agent>,
    agent_runs: u64,
    /// Each laptop's agent marks, kept between its runs (the file beside its store).
    laptop_marks: BTreeMap<Sid, user_replica::SyncMarks>,
    /// What each partial laptop has ever held, by (laptop, mailbox, GUID).
    laptop_held: BTreeSet<(Sid, MailboxKey, Guid)>,
    /// Every finished sync, in order.
    sync_reports: Vec<(Sid, user_replica::SyncReport)>,
}

/// A user replica's agent at work (see `tandem_core::user_replica`).
#[derive(Clone)]
struct Agent {
    sync: user_replica::ReplicaSync,
    run: u64,
    home: Sid,
}

/// Which agent request a client request is.
#[derive(Clone, Copy, Debug)]
struct AgentTag {
    laptop: Sid,
    run: u64,
    side: user_replica::Side,
    id: RequestId,
}

/// The live servers not in `retired`, by id (a free function, so that a caller may
/// hold it while it changes other fields of the world).
fn live_members<'a>(nodes: &'a BTreeMap<Sid, Node>, retired: &BTreeSet<Sid>) -> BTreeMap<Sid, &'a Server> {
    nodes
        .iter()
        .filter(|(sid, _)| !retired.contains(sid))
        .filter_map(|(sid, n)| n.server.as_ref().map(|s| (*sid, s)))
        .collect()
}

fn link_key(a: Sid, b: Sid) -> (Sid, Sid) {
    if a < b { (a, b) } else { (b, a) }
}

impl World {
    pub fn new(scenario: &Scenario, opts: &RunOptions) -> World {
        let seed = opts.seed.unwrap_or(scenario.seed);
        let mut links = BTreeMap::new();
        let spec = &scenario.cluster;
        let mut add = |a: Sid, b: Sid, latency_ms: (u64, u64)| {
            links.insert(
                link_key(a, b),
                Link {
                    up: true,
                    latency_us: (latency_ms.0 * 1000, latency_ms.1.max(latency_ms.0) * 1000),
                    normal_latency_us: (latency_ms.0 * 1000, latency_ms.1.max(latency_ms.0) * 1000),
                    generation: 0,
                    last_delivery: [Instant(0); 2],
                    silent_until: [Instant(0); 2],
                    codec: Default::default(),
                    lingering: None,
                },
            );
        };
        let everyone: Vec<Sid> = spec.servers.iter().chain(&spec.spares).copied().collect();
        match &spec.links {
            None => {
                for (i, &a) in everyone.iter().enumerate() {
                    for &b in &everyone[i + 1..] {
                        add(a, b, spec.latency_ms);
                    }
                }
            }
            Some(list) => {
                for l in list {
                    add(l.a, l.b, l.latency_ms.unwrap_or(spec.latency_ms));
                }
            }
        }
        let mut world = World {
            scenario: scenario.clone(),
            opts: opts.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Instant(0),
            queue: EventQueue::default(),
            next_event: 0,
            nodes: BTreeMap::new(),
            links,
            oracle: Oracle::default(),
            labels: BTreeMap::new(),
            labels_of: HashMap::default(),
            outstanding: BTreeMap::new(),
            next_request: 1,
            answers: BTreeMap::new(),
            failures: Vec::new(),
            live_terms: Vec::new(),
            messages: 0,
            messages_by_kind: Vec::new(),
            fsyncs: 0,
            fsyncs_of_lazy_writes: 0,
            wire_bytes: 0,
            steps: 0,
            trace_hash: 0,
            trace: Vec::new(),
            label_counter: 0,
            labelled_bytes: BTreeMap::new(),
            retried_when_whole: BTreeSet::new(),
            clients_stopped: false,
            only_clean_restarts: true,
            lost_for_good: 0,
            hand_deletes: 0,
            last_fault_us: 0,
            destroyed_copies: BTreeMap::new(),
            seed,
            dead_marks: BTreeMap::new(),
            watch: std::env::var("TANDEM_WATCH").ok().filter(|w| !w.is_empty()),
            config_error: None,
            agents: BTreeMap::new(),
            agent_runs: 0,
            laptop_marks: BTreeMap::new(),
            laptop_held: BTreeSet::new(),
            sync_reports: Vec::new(),
        };
        for sid in everyone.iter().copied().chain(spec.laptops.iter().map(|l| l.sid)) {
            world.nodes.insert(
                sid,
                Node {
                    server: None,
                    disk: DiskImage::default(),
                    bodies: sim_bodies(),
                    pending: Vec::new(),
                    replayed: None,
                    fsync_in_flight: false,
                    flush_is_lazy: false,
                    flush_seq: 0,
                    incarnation: 0,
                    lost: false,
                    timer_at: None,
                    store_made_us: 0,
                    backup: None,
                },
            );
        }
        world
    }

    fn config(&mut self, sid: Sid) -> Config {
        let spec = &self.scenario.cluster;
        if spec.laptops.iter().any(|l| l.sid == sid) {
            // A cluster of its own: it orders its own writes, with no copy to wait for.
            let mut cfg = Config::new(sid, vec![sid]);
            cfg.replicas = 0;
            cfg.user_replica = true;
            cfg.partial = spec.laptops.iter().find(|l| l.sid == sid).and_then(|l| l.partial.clone());
            cfg.request_timeout_us = spec.request_timeout_ms * 1000;
            if let Err(e) = cfg.set_bug(self.opts.bug) {
                self.config_error = Some(e.to_string());
            }
            return cfg;
        }
        // A spare is configured as a new server is: the cluster it joins, and itself.
        let mut servers = spec.servers.clone();
        if !servers.contains(&sid) {
            servers.push(sid);
        }
        let mut cfg = Config::new(sid, servers);
        cfg.partial = spec.partial_servers.get(&sid).cloned();
        cfg.durability = spec.durability;
        cfg.replicas = spec.replicas;
        cfg.log_capacity = spec.log_capacity;
        cfg.granularity = spec.granularity;
        cfg.request_timeout_us = spec.request_timeout_ms * 1000;
        cfg.tombstone_grace_us = spec.tombstone_grace_ms * 1000;
        cfg.startup_hold_us = spec.startup_hold_ms * 1000;
        if let Err(e) = cfg.set_bug(self.opts.bug) {
            self.config_error = Some(e.to_string());
        }
        cfg
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Queued { at, id, ev: Box::new(ev) });
    }

    /// A trace line, formatted only when someone will read it.
    fn note(&mut self, line: impl FnOnce(&World) -> String) {
        if self.opts.trace {
            let l = line(self);
            self.trace.push(l);
        } else if self.opts.tail {
            let l = line(self);
            if self.trace.len() >= TRACE_TAIL_MAX * 2 {
                self.trace.drain(..TRACE_TAIL_MAX);
            }
            self.trace.push(l);
        }
    }

    fn hash_in(&mut self, parts: &[&[u8]]) {
        self.trace_hash = mix64(self.trace_hash ^ fnv64(parts));
    }

    fn ms(&self) -> String {
        format!("{:>9.3}", self.now.0 as f64 / 1000.0)
    }

    /// Runs the scenario to the end and reports.
    pub fn run(mut self) -> RunReport {
        let Some(end_of_events) = self.start() else { return self.report(None) };
        // A model checker's counterexample first runs its steps, in its order.
        for (i, stream) in self.scenario.schedule.clone().iter().enumerate() {
            if !self.failures.is_empty() {
                break;
            }
            if let Some(ms) = schedule_until_ms(stream) {
                self.run_until(Instant::from_millis(ms));
                continue;
            }
            if !self.take(stream) {
                // Another core (a counterexample's bug fixed) decided otherwise before
                // here: the schedule no longer applies, and the rest runs in time order.
                let step = i + 1;
                self.note(|w| {
                    format!("{} schedule step {step}: nothing queued on {stream}; time order from here", w.ms())
                });
                break;
            }
        }
        self.run_until(end_of_events);
        self.settle_and_report()
    }

    /// Starts the servers and schedules the scenario's events; returns when the last of
    /// them is done, or None when the scenario cannot run (the failure is recorded).
    pub fn start(&mut self) -> Option<Instant> {
        for &sid in &self.scenario.cluster.servers.clone() {
            self.start_server(sid, false);
        }
        for sid in self.scenario.cluster.laptops.iter().map(|l| l.sid).collect::<Vec<_>>() {
            self.oracle.set_apart(sid);
            self.start_server(sid, false);
        }
        if let Some(e) = self.config_error.take() {
            self.failures.push(e);
            return None;
        }
        let events = self.scenario.events.clone();
        let mut last_ms = 0;
        for (i, e) in events.iter().enumerate() {
            last_ms = last_ms.max(e.at_ms);
            if let Action::RandomWorkload { until_ms, .. } | Action::RandomFaults { until_ms, .. } = &e.action {
                last_ms = last_ms.max(*until_ms);
            }
            self.schedule(Instant::from_millis(e.at_ms), Ev::Action { action: e.action.clone(), event: Some(i) });
        }
        Some(Instant::from_millis(last_ms + 10))
    }

    /// The end of a run: faults heal (where the scenario says so), clients stop, the
    /// cluster must converge within `settle_ms`, and the oracle checks the stores.
    pub fn settle_and_report(mut self) -> RunReport {
        if self.scenario.heal_at_end {
            self.schedule(self.now, Ev::Heal { end: true });
        }
        // Clients stop; faults heal; the cluster must converge within settle_ms.
        self.clients_stopped = true;
        let settle_deadline = self.now.plus_us(self.scenario.settle_ms * 1000);
        let heal_time = self.now;
        let mut converged_at = None;
        while self.now < settle_deadline && self.failures.is_empty() {
            let next = self.now.plus_us(250_000);
            self.run_until(next);
            if self.converged().is_none() {
                converged_at = Some(self.now);
                break;
            }
        }
        if converged_at.is_none() && self.failures.is_empty() {
            let why = self.converged().unwrap_or_default();
            for (sid, node) in &self.nodes {
                let Some(s) = &node.server else { continue };
                self.failures.push(format!(
                    "  state of {sid}: term {:?}, masters {:?}, jobs {}, dirty {}, wanted bodies {}, backlog {:?}",
                    s.term(),
                    s.mastered_ready(),
                    s.jobs_in_progress(),
                    s.dirty_mailboxes(),
                    s.wanted_bodies(),
                    s.backlog().into_iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>()
                ));
            }
            self.oracle.violations.push(oracle::Violation {
                invariant: oracle::CONVERGENCE,
                time_us: self.now.0,
                detail: format!("not converged {} ms after the heal: {why}", self.scenario.settle_ms),
            });
        }
        if converged_at.is_some() && self.failures.is_empty() && !self.scenario.cluster.laptops.is_empty() {
            // The laptops' final syncs start once the cluster has converged, and take a
            // few round trips each over their links: bounded by the slowest link, not by
            // what the cluster's convergence left of `settle_ms` (explore seed 5174: a
            // link of 2 s each way had 11 s left).
            let slowest_ms = self.scenario.cluster.laptops.iter().map(|l| l.latency_ms.1).max().unwrap_or(0);
            let laptops_deadline =
                self.now.plus_us((self.scenario.settle_ms + LAPTOP_SETTLE_TRIPS * slowest_ms) * 1000);
            self.settle_laptops(laptops_deadline.max(settle_deadline));
        }
        if converged_at.is_some()
            && let Some(why) = self.wrong_text_parts()
        {
            self.oracle.violations.push(oracle::Violation {
                invariant: oracle::CONVERGENCE,
                time_us: self.now.0,
                detail: format!("after the heal: {why}"),
            });
        }
        let stores = live_members(&self.nodes, &self.outside_cluster());
        let check_loss = match self.scenario.cluster.durability {
            Durability::Sync => self.lost_for_good <= usize::from(self.scenario.cluster.replicas),
            Durability::Async => self.lost_for_good == 0,
        };
        // A message more of whose copies were destroyed than sync mode survives is gone
        // for any system: not counted as a loss.
        let survivable = match self.scenario.cluster.durability {
            Durability::Sync => usize::from(self.scenario.cluster.replicas),
            Durability::Async => 0,
        };
        let unrecoverable: BTreeSet<Guid> = self
            .destroyed_copies
            .iter()
            .filter(|(_, servers)| servers.len() + self.lost_for_good > survivable)
            .map(|(guid, _)| *guid)
            .collect();
        let mut oracle = std::mem::take(&mut self.oracle);
        oracle.at_quiescence(self.now.0, &stores, check_loss, &unrecoverable);
        oracle.retries_stored_once(self.now.0, &stores, &self.retried_when_whole);
        if self.only_clean_restarts && self.mark_count(Mark::StartupHoldExpired) == 0 {
            for detail in oracle.moved_from_shown_uids(&stores, 5) {
                let detail = format!("{detail}, in a run whose only faults were clean crashes and restarts");
                oracle.violate(oracle::RESTARTS_RENUMBER_NOTHING, self.now.0, detail);
            }
        }
        self.oracle = oracle;
        self.check_expectations();
        self.report(converged_at.map(|t| t.0 - heal_time.0))
    }

    fn report(mut self, converged_after_us: Option<u64>) -> RunReport {
        for v in &self.oracle.violations {
            self.failures.push(format!(
                "invariant {} broken at {:.3} ms: {}",
                v.invariant,
                v.time_us as f64 / 1000.0,
                v.detail
            ));
        }
        let mut marks: BTreeMap<String, u64> = BTreeMap::new();
        for node in self.nodes.values() {
            if let Some(s) = &node.server {
                for (m, c) in s.marks().iter() {
                    *marks.entry(m.name().to_string()).or_default() += c;
                }
            }
        }
        // Marks of crashed incarnations are lost with them; the scenario marks count what
        // the live servers did.
        let stores: Vec<(Sid, u64)> = self
            .nodes
            .iter()
            .filter_map(|(sid, n)| {
                n.server.as_ref().map(|s| (*sid, s.summaries().iter().fold(0u64, |a, x| a ^ x.digest)))
            })
            .collect();
        for (sid, d) in stores {
            self.hash_in(&[&sid.0.to_le_bytes(), &d.to_le_bytes()]);
        }
        if !self.opts.trace && self.trace.len() > TRACE_TAIL_MAX {
            let cut = self.trace.len() - TRACE_TAIL_MAX;
            self.trace.drain(..cut);
        }
        let marks = self.marks_total(marks);
        let final_mailboxes = self
            .nodes
            .iter()
            .filter_map(|(sid, n)| n.server.as_ref().map(|s| (*sid, s.image())))
            .map(|(sid, image)| {
                let boxes = image
                    .mailboxes
                    .iter()
                    .map(|(k, m)| {
                        (k.clone(), m.messages.values().map(|r| (r.uid, r.guid, r.present_flags())).collect())
                    })
                    .collect();
                (sid, boxes)
            })
            .collect();
        RunReport {
            name: self.scenario.name.clone(),
            seed: self.seed,
            passed: self.failures.is_empty(),
            failures: self.failures,
            sim_time_us: self.now.0,
            messages: self.messages,
            wire_bytes: self.wire_bytes,
            steps: self.steps,
            trace_hash: self.trace_hash,
            trace: self.trace,
            marks,
            converged_after_us,
            violations: self.oracle.violations.clone(),
            fsyncs: self.fsyncs,
            fsyncs_of_lazy_writes: self.fsyncs_of_lazy_writes,
            messages_by_kind: self.messages_by_kind.into_iter().fold(BTreeMap::new(), |mut kinds, (k, n)| {
                *kinds.entry(k).or_default() += n;
                kinds
            }),
            labels: self.labels,
            final_mailboxes,
        }
    }

    /// How often `mark` was hit, by every server incarnation so far.
    fn mark_count(&self, mark: Mark) -> u64 {
        let dead = self.dead_marks.get(mark.name()).copied().unwrap_or(0);
        dead + self.nodes.values().filter_map(|n| n.server.as_ref()).map(|s| s.marks().count(mark)).sum::<u64>()
    }

    fn marks_total(&self, live: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let mut all = self.dead_marks.clone();
        for (k, v) in live {
            *all.entry(k).or_default() += v;
        }
        all
    }
}

// Servers, disks and the network.
impl World {
    fn alive(&self, sid: Sid) -> bool {
        self.nodes.get(&sid).is_some_and(|n| n.server.is_some())
    }

    fn link_usable(&self, a: Sid, b: Sid) -> bool {
        self.links.get(&link_key(a, b)).is_some_and(|l| l.up) && self.alive(a) && self.alive(b)
    }

    fn neighbours(&self, sid: Sid) -> Vec<Sid> {
        self.links
            .keys()
            .filter_map(|(a, b)| {
                if *a == sid {
                    Some(*b)
                } else if *b == sid {
                    Some(*a)
                } else {
                    None
                }
            })
            .collect()
    }

    fn start_server(&mut self, sid: Sid, empty: bool) {
        self.last_fault_us = self.now.0;
        let cfg = self.config(sid);
        let seed = self.rng.random::<u64>();
        let Some(node) = self.nodes.get_mut(&sid) else { return };
        if empty {
            node.disk = DiskImage::default();
            node.bodies = sim_bodies();
            node.store_made_us = self.now.0;
            // A new, empty server under the old id (a replaced disk): what the old one
            // showed no longer binds it, as when a disk is wiped on stop.
            self.oracle.forget_server(sid);
        }
        let Some(node) = self.nodes.get_mut(&sid) else { return };
        node.incarnation += 1;
        node.pending.clear();
        node.fsync_in_flight = false;
        node.flush_is_lazy = false;
        node.timer_at = None;
        node.lost = false;
        let mut server = Server::recover(cfg, node.disk.clone(), seed, Box::new(node.bodies.clone()));
        node.replayed = cfg!(debug_assertions).then(|| node.disk.clone());
        server.keep_notes(self.opts.trace || self.opts.tail);
        let term = server.term();
        node.server = Some(server);
        let incarnation = node.incarnation;
        self.set_live_term(sid, Some(term));
        self.note(|w: &World| format!("{} {sid} starts (incarnation {incarnation})", w.ms()));
        self.drain(sid);
        for n in self.neighbours(sid) {
            if self.link_usable(sid, n) {
                self.bump_link(sid, n);
                self.input(sid, Input::LinkUp { peer: n });
                self.input(n, Input::LinkUp { peer: sid });
            }
        }
    }

    fn stop_server(&mut self, sid: Sid, wipe: bool) {
        self.last_fault_us = self.now.0;
        if !self.alive(sid) {
            if wipe && let Some(node) = self.nodes.get_mut(&sid) {
                node.disk = DiskImage::default();
                node.bodies = sim_bodies();
                node.lost = true;
                self.oracle.forget_server(sid);
            }
            return;
        }
        let neighbours: Vec<Sid> = self.neighbours(sid).into_iter().filter(|n| self.link_usable(sid, *n)).collect();
        let Some(node) = self.nodes.get_mut(&sid) else { return };
        if let Some(server) = node.server.take() {
            for (m, c) in server.marks().iter() {
                *self.dead_marks.entry(m.name().to_string()).or_default() += c;
            }
            self.live_terms.retain(|(s, _)| *s != sid);
        }
        node.pending.clear();
        node.fsync_in_flight = false;
        node.flush_is_lazy = false;
        node.timer_at = None;
        if wipe {
            node.disk = DiskImage::default();
            node.bodies = sim_bodies();
            node.lost = true;
            self.oracle.forget_server(sid);
        }
        // Clients of the server lose their connections: an MTA tries its deliveries again.
        let dropped: Vec<RequestId> =
            self.outstanding.iter().filter(|(_, o)| o.server == sid).map(|(id, _)| *id).collect();
        for id in dropped {
            let Some(o) = self.outstanding.remove(&id) else { continue };
            if let Some(tag) = o.agent {
                self.schedule(self.now, Ev::AgentReply { tag, reply: None });
            }
            if let Some(retry) = o.retry {
                self.retry_later(sid, retry);
            }
        }
        self.note(|w: &World| format!("{} {sid} {}", w.ms(), if wipe { "is lost with its disk" } else { "crashes" }));
        for n in neighbours {
            self.bump_link(sid, n);
            self.input(n, Input::LinkDown { peer: sid });
        }
    }

    fn bump_link(&mut self, a: Sid, b: Sid) {
        if let Some(l) = self.links.get_mut(&link_key(a, b)) {
            l.generation += 1;
            l.codec = Default::default();
        }
    }

    fn set_link(&mut self, a: Sid, b: Sid, up: bool) {
        let key = link_key(a, b);
        let Some(link) = self.links.get(&key) else { return };
        if link.up == up {
            return;
        }
        let was_usable = self.link_usable(a, b);
        if let Some(l) = self.links.get_mut(&key) {
            l.up = up;
            if up {
                // A reset connection not yet noticed at its far end is replaced: the new
                // connection's LINK-UP tells that end.
                l.lingering = None;
            }
        }
        let usable = self.link_usable(a, b);
        if was_usable == usable {
            return;
        }
        self.bump_link(a, b);
        self.last_fault_us = self.now.0;
        self.note(|w: &World| format!("{} link {a}-{b} {}", w.ms(), if up { "restored" } else { "cut" }));
        let input = |peer| if usable { Input::LinkUp { peer } } else { Input::LinkDown { peer } };
        self.input(a, input(b));
        self.input(b, input(a));
    }

    /// Feed one input to a live server and drain what it emits.
    fn input(&mut self, sid: Sid, input: Input) {
        let now = self.now;
        let Some(server) = self.nodes.get_mut(&sid).and_then(|n| n.server.as_mut()) else { return };
        server.handle(now, input);
        let term = server.term();
        let notes = server.take_notes();
        self.set_live_term(sid, Some(term));
        self.steps += 1;
        for n in notes {
            self.note(|w: &World| format!("{} {sid} {n}", w.ms()));
        }
        self.drain(sid);
    }

    /// Schedules the node's next flush for what is pending: after the disk's latency if
    /// a write needs it, at the end of the hold if every pending write is lazy (a write
    /// that needs a flush brings one sooner), none if nothing is pending. A flush
    /// scheduled before is replaced.
    fn schedule_flush(&mut self, sid: Sid) {
        let Some(node) = self.nodes.get_mut(&sid) else { return };
        let Some((upto, _)) = node.pending.last() else {
            node.fsync_in_flight = false;
            node.flush_is_lazy = false;
            return;
        };
        let upto = *upto;
        let lazy = node.pending.iter().all(|(_, w)| w.is_lazy());
        let delay = if lazy {
            io::LAZY_WRITE_HOLD_US_MAX
        } else {
            let (lo, hi) = self.scenario.cluster.disk_latency_us;
            self.rng.random_range(lo..=hi.max(lo))
        };
        node.fsync_in_flight = true;
        node.flush_is_lazy = lazy;
        node.flush_seq += 1;
        let event = Ev::Fsync { server: sid, incarnation: node.incarnation, upto, flush: node.flush_seq };
        self.schedule(self.now.plus_us(delay), event);
    }

    fn drain(&mut self, sid: Sid) {
        let mut wrote = false;
        let partial_laptop = self.scenario.cluster.laptops.iter().any(|l| l.sid == sid && l.partial.is_some());
        loop {
            let Some(node) = self.nodes.get_mut(&sid) else { return };
            let Some(server) = node.server.as_mut() else { return };
            let Some(output) = server.poll_output() else { break };
            match output {
                Output::Send { to, envelope } => self.transmit(sid, to, envelope),
                Output::Reply { id, reply } => self.client_reply(sid, id, reply),
                Output::Write { id, write } => {
                    if let Some(w) = &self.watch {
                        let text = format!("{write:?}");
                        if text.contains(w.as_str()) {
                            let line = format!(
                                "{:>9.3} {sid} WRITE {}",
                                self.now.0 as f64 / 1000.0,
                                text.chars().take(300).collect::<String>()
                            );
                            self.trace.push(line);
                        }
                    }
                    let incarnation = node.incarnation;
                    let image = server.image();
                    self.oracle.write(self.now.0, sid, incarnation, image, &write);
                    if partial_laptop && let StoreWrite::PutMessage { mailbox, record } = &write {
                        self.laptop_held.insert((sid, mailbox.clone(), record.guid));
                    }
                    if let Some(replayed) = node.replayed.as_mut() {
                        replayed.apply(&write);
                        wrote = true;
                    }
                    let lazy = write.is_lazy();
                    node.pending.push((id, write));
                    if !node.fsync_in_flight || (node.flush_is_lazy && !lazy) {
                        self.schedule_flush(sid);
                    }
                }
            }
        }
        // The next timer.
        let Some(node) = self.nodes.get_mut(&sid) else { return };
        let Some(server) = node.server.as_ref() else { return };
        if wrote && node.replayed.as_ref().is_some_and(|replayed| replayed != server.image()) {
            let what = image_difference(node.replayed.as_ref(), server.image());
            self.failures.push(format!("{sid}'s image differs from the replay of its writes: {what}"));
            node.replayed = None;
            return;
        }
        let at = server.poll_timeout();
        if node.timer_at.is_none_or(|t| at < t || t < self.now) {
            node.timer_at = Some(at);
            let incarnation = node.incarnation;
            self.schedule(at, Ev::Timer { server: sid, incarnation });
        }
    }

    fn transmit(&mut self, from: Sid, to: Sid, envelope: Envelope) {
        self.messages += 1;
        let kind = envelope.msg.name();
        match self.messages_by_kind.iter_mut().find(|(k, _)| std::ptr::eq(*k, kind) || *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.messages_by_kind.push((kind, 1)),
        }
        let key = link_key(from, to);
        if !self.link_usable(from, to) {
            return;
        }
        let dir = usize::from(from > to);
        let wire = self.opts.wire || self.scenario.wire;
        let Some(link) = self.links.get_mut(&key) else { return };
        if self.now < link.silent_until[dir] {
            // Sent into a connection that carries nothing: lost (see `Action::Silence`).
            return;
        }
        let envelope = if wire {
            let mut bytes = Vec::new();
            link.codec[dir].0.encode(&envelope, &mut bytes);
            self.wire_bytes += bytes.len() as u64;
            match link.codec[dir].1.decode(&bytes) {
                Ok(Some((decoded, used))) if used == bytes.len() => decoded,
                other => {
                    self.failures
                        .push(format!("wire codec failed on {} from {from} to {to}: {other:?}", envelope.msg.name()));
                    return;
                }
            }
        } else {
            envelope
        };
        let (lo, hi) = link.latency_us;
        let generation = link.generation;
        let delay = self.rng.random_range(lo..=hi);
        let Some(link) = self.links.get_mut(&key) else { return };
        let at = self.now.plus_us(delay).max(link.last_delivery[dir]);
        link.last_delivery[dir] = at;
        self.schedule(at, Ev::Deliver { from, to, generation, envelope });
    }

    /// Each running server's protocol state digest (see `Server::state_digest`).
    pub fn server_digests(&self) -> Vec<(Sid, u64)> {
        self.nodes.iter().filter_map(|(sid, n)| n.server.as_ref().map(|s| (*sid, s.state_digest()))).collect()
    }

    /// The stream a queued event belongs to. A model checker may run the next event of
    /// any stream before the others (a message overtaking one on another link, a timer
    /// firing late, a client acting early); within a stream the order stays (one TCP
    /// connection, one disk, one client).
    fn stream_of(&self, ev: &Ev) -> String {
        match ev {
            Ev::Deliver { from, to, .. } => format!("deliver {from}>{to}"),
            Ev::Timer { server, .. } => format!("timer {server}"),
            Ev::Fsync { server, .. } => format!("fsync {server}"),
            Ev::Action { action, .. } if action.is_fault() => "faults".into(),
            Ev::Action { .. } | Ev::RandomOp { .. } | Ev::Retry { .. } => "client".into(),
            Ev::AgentRequest { tag, .. } | Ev::AgentReply { tag, .. } => format!("agent {}", tag.laptop),
            Ev::Heal { .. } | Ev::RestoreLink { .. } | Ev::RestoreLatency { .. } | Ev::ResetNoticed { .. } => {
                "faults".into()
            }
        }
    }

    /// The next event of each stream, by stream name: what may happen next.
    pub fn choices(&self) -> BTreeMap<String, (Instant, u64)> {
        let mut next: BTreeMap<String, (Instant, u64)> = BTreeMap::new();
        for q in self.queue.iter() {
            let stream = self.stream_of(&q.ev);
            let entry = next.entry(stream).or_insert((q.at, q.id));
            if (q.at, q.id) < *entry {
                *entry = (q.at, q.id);
            }
        }
        next
    }

    /// Runs the next event of `stream`; false when the stream has nothing queued. Only a
    /// timer moves the clock (to its deadline): everything else happens now, so that
    /// what a model checker chooses is the order of events, and time passes only as the
    /// servers' own deadlines come due.
    pub fn take(&mut self, stream: &str) -> bool {
        let Some(&(at, id)) = self.choices().get(stream) else { return false };
        let Some(queued) = self.queue.remove(id) else { return false };
        if stream.starts_with("timer ") {
            self.now = self.now.max(at);
        }
        self.run_event(queued.ev);
        true
    }

    /// Runs one event taken off the queue (the clock already set).
    /// Boxed as queued: its fields move out once, where they are used, not the whole event
    /// at each call on the way.
    fn run_event(&mut self, ev: Box<Ev>) {
        self.step(ev);
        // Until the servers agree on one root again after a partition, a server that
        // mastered its side may still answer as master: read-your-writes is promised
        // from then on, as after any other fault.
        if self.roots_disagree() {
            self.last_fault_us = self.now.0;
        }
    }

    /// Whether an invariant broke or the run failed so far, and how.
    pub fn broken(&self) -> Option<String> {
        if let Some(v) = self.oracle.violations.first() {
            return Some(format!("invariant {}: {}", v.invariant, v.detail));
        }
        self.failures.first().cloned()
    }

    /// A hash of the world's state up to a shift in time: every server's protocol state,
    /// what is queued (with its time for timers only), the links and what the oracle
    /// knows, with every instant taken relative to now. Two states that differ only in
    /// when they happen hash alike (the core decides by intervals, not by the clock's
    /// reading); the world's random generator (latencies) is left out, as the checker
    /// chooses the order itself.
    pub fn timeless_key(&self) -> u64 {
        use std::fmt::Write;
        let mut text = String::new();
        for (sid, node) in &self.nodes {
            let _ = write!(text, "{sid}:{}:{}:", node.incarnation, node.lost);
            if let Some(server) = &node.server {
                let _ = server.describe_state(&mut text);
            }
            let _ = write!(text, "|{:?}|", node.pending);
        }
        // Only a timer's time matters: the next event of any other stream may be chosen
        // at any point, whenever it was scheduled for. A set: a server's timer may be
        // queued more than once (each time its deadline moved earlier), and the extra
        // firings find nothing due.
        let queued: BTreeSet<(String, u64, String)> = self
            .queue
            .iter()
            .map(|q| {
                let stream = self.stream_of(&q.ev);
                let due = if stream.starts_with("timer ") { q.at.0.saturating_sub(self.now.0) } else { 0 };
                (stream, due, format!("{:?}", q.ev))
            })
            .collect();
        let _ = write!(text, "{queued:?}");
        for (key, link) in &self.links {
            let _ = write!(text, "{key:?}:{}:{}:{:?};", link.up, link.generation, link.lingering.map(|l| (l.0, l.1)));
        }
        let _ = self.oracle.describe_timeless(&mut text);
        let _ = write!(text, "{:?}{:?}", self.labels, self.outstanding.keys().collect::<Vec<_>>());
        let mut h = Fnv64::default();
        h.write(relative_instants(&text, self.now.0).as_bytes());
        h.0
    }

    /// Runs every event scheduled up to `end`, in time order.
    pub fn run_until(&mut self, end: Instant) {
        while let Some(Queued { at, .. }) = self.queue.peek() {
            let at = *at;
            if at > end || !self.failures.is_empty() {
                break;
            }
            if self.steps >= STEPS_MAX {
                self.failures.push(format!("the run exceeded {STEPS_MAX} steps"));
                break;
            }
            let Some(queued) = self.queue.pop() else { break };
            self.now = self.now.max(at);
            self.run_event(queued.ev);
        }
        self.now = self.now.max(end);
    }

    fn step(&mut self, ev: Box<Ev>) {
        self.oracle.now_us = self.now.0;
        match *ev {
            Ev::Deliver { from, to, generation, envelope } => {
                let link = self.links.get(&link_key(from, to));
                // What was in flight on a reset connection still reaches the end that has
                // not noticed the reset (TCP delivered it before the RST).
                let lingers = link
                    .and_then(|l| l.lingering)
                    .is_some_and(|(g, receiver, until)| g == generation && receiver == to && self.now <= until)
                    && self.alive(from)
                    && self.alive(to);
                let ok = lingers || (link.is_some_and(|l| l.generation == generation) && self.link_usable(from, to));
                if !ok {
                    return;
                }
                let t = self.now.0;
                self.hash_in(&[
                    &t.to_le_bytes(),
                    &from.0.to_le_bytes(),
                    &to.0.to_le_bytes(),
                    envelope.msg.name().as_bytes(),
                ]);
                self.note(|w: &World| format!("{} {from} -> {to} {}", w.ms(), describe(&envelope)));
                self.input(to, Input::Peer { from, envelope });
            }
            Ev::Timer { server, incarnation } => {
                let Some(node) = self.nodes.get_mut(&server) else { return };
                if node.incarnation != incarnation
                    || node.server.is_none()
                    || node.timer_at.is_some_and(|t| t > self.now)
                {
                    return;
                }
                node.timer_at = None;
                self.input(server, Input::Timer);
            }
            Ev::Fsync { server, incarnation, upto, flush } => {
                let Some(node) = self.nodes.get_mut(&server) else { return };
                if node.incarnation != incarnation || node.server.is_none() || node.flush_seq != flush {
                    return;
                }
                // Writes are pending in the order issued: those up to `upto` are a prefix,
                // taken out in place (the vector keeps its room for the next ones).
                debug_assert!(node.pending.windows(2).all(|w| w[0].0 < w[1].0), "pending writes in order");
                let durable = node.pending.partition_point(|(id, _)| *id <= upto);
                self.fsyncs += 1;
                if durable > 0 && node.pending[..durable].iter().all(|(_, w)| w.is_lazy()) {
                    self.fsyncs_of_lazy_writes += 1;
                }
                let mut last = 0;
                for (id, write) in node.pending.drain(..durable) {
                    self.oracle.durable(server, &write);
                    node.bodies.apply(&write);
                    node.disk.apply_owned(write);
                    last = id;
                }
                self.schedule_flush(server);
                if last > 0 {
                    self.input(server, Input::Durable { upto: last });
                    if cfg!(debug_assertions) {
                        self.check_durable_reads(server);
                    }
                }
            }
            Ev::Action { action, event } => self.act(action, event),
            Ev::Heal { end } => {
                let keys: Vec<(Sid, Sid)> = self.links.keys().copied().collect();
                for (a, b) in keys {
                    self.set_link(a, b, true);
                }
                if end {
                    // Crashed servers restart; lost ones are replaced by empty servers (an
                    // operator replaces dead hardware before anyone expects quiescence).
                    // Spares never added stay off, and retired servers stay gone.
                    let retired = self.retired();
                    let down: Vec<(Sid, bool)> = self
                        .nodes
                        .iter()
                        .filter(|(s, n)| n.server.is_none() && n.incarnation > 0 && !retired.contains(s))
                        .map(|(s, n)| (*s, n.lost))
                        .collect();
                    for (sid, lost) in down {
                        self.start_server(sid, lost);
                    }
                }
            }
            Ev::RestoreLink { a, b } => self.set_link(a, b, true),
            Ev::ResetNoticed { server, peer, generation } => {
                let Some(link) = self.links.get_mut(&link_key(server, peer)) else { return };
                if !link.up && link.lingering.is_some_and(|(g, s, _)| g == generation && s == server) {
                    link.lingering = None;
                    self.note(|w: &World| format!("{} {server} notices the reset of its link to {peer}", w.ms()));
                    self.input(server, Input::LinkDown { peer });
                }
            }
            Ev::RestoreLatency { a, b } => {
                if let Some(link) = self.links.get_mut(&link_key(a, b)) {
                    link.latency_us = link.normal_latency_us;
                }
                self.note(|w: &World| format!("{} link {a}-{b} at its normal latency again", w.ms()));
            }
            Ev::RandomOp { server, mailbox, roll } => self.random_op(server, mailbox, roll),
            Ev::Retry { server, retry } => self.deliver_again(server, retry),
            Ev::AgentRequest { tag, home, request } => {
                if !self.alive(home) {
                    self.schedule(self.now, Ev::AgentReply { tag, reply: None });
                    return;
                }
                if let ClientRequest::ReplicaPush { state, .. } = &request {
                    self.check_partial_push(tag.laptop, home, state);
                }
                let o = Outstanding { agent: Some(tag), ..Outstanding::none() };
                self.request(home, request, None, o);
            }
            Ev::AgentReply { tag, reply } => self.agent_reply(tag, reply),
        }
    }

    /// A partial laptop never causes the expunge of mail it did not hold: every expunge its
    /// push carries of a message live on the cluster is of one it held, or one a client
    /// asked to remove (a tombstone the laptop took from the cluster goes back up too)
    /// (issue 17; the broken variant `partial-expunges-unheld` is caught here, and by
    /// no_acked_loss).
    fn check_partial_push(&mut self, laptop: Sid, home: Sid, state: &MailboxState) {
        if !self.scenario.cluster.laptops.iter().any(|l| l.sid == laptop && l.partial.is_some()) {
            return;
        }
        let Some(cluster) = self.stored_mailbox(home, &state.mailbox) else { return };
        let unheld: Vec<Guid> = state
            .tombstones
            .iter()
            // A census's loss kills only its binding (a push may have brought it back).
            .filter(|t| t.by_client() && cluster.messages.has_guid(t.guid))
            .filter(|t| !self.laptop_held.contains(&(laptop, state.mailbox.clone(), t.guid)))
            .filter(|t| !self.oracle.removal_asked(&state.mailbox, t.guid))
            .map(|t| t.guid)
            .collect();
        for guid in unheld {
            let detail = format!("{laptop} pushed an expunge of {guid} in {}, which it never held", state.mailbox);
            self.oracle.violate(oracle::PARTIAL_HOLDS_ITS_OWN, self.now.0, detail);
        }
    }

    /// The end of a run with laptops: each live laptop syncs once more (clients have
    /// stopped), the cluster converges on what they pushed, and every laptop must then
    /// hold exactly its user's mailboxes as the cluster does (DESIGN.md invariant 5 for a
    /// user replica; invariant 1 is the oracle's, as a laptop's saves are acknowledged).
    fn settle_laptops(&mut self, deadline: Instant) {
        const SYNCS_MAX: usize = 3;
        let step_us = 250_000;
        for _ in 0..SYNCS_MAX {
            while !self.agents.is_empty() && self.now < deadline && self.failures.is_empty() {
                self.run_until(self.now.plus_us(step_us));
            }
            let laptops = self.scenario.cluster.laptops.clone();
            for l in &laptops {
                if !self.alive(l.sid) {
                    continue;
                }
                let members = self.member_servers();
                let home = if members.contains_key(&l.home) { Some(l.home) } else { members.keys().next().copied() };
                if let Some(home) = home {
                    self.start_agent(l.sid, Some(home));
                }
            }
            while !self.agents.is_empty() && self.now < deadline && self.failures.is_empty() {
                self.run_until(self.now.plus_us(step_us));
            }
            while self.converged().is_some() && self.now < deadline && self.failures.is_empty() {
                self.run_until(self.now.plus_us(step_us));
            }
            if self.laptops_differ().is_none() {
                return;
            }
        }
        if let Some(why) = self.laptops_differ() {
            self.oracle.violations.push(oracle::Violation {
                invariant: oracle::CONVERGENCE,
                time_us: self.now.0,
                detail: format!("a laptop and the cluster differ after {SYNCS_MAX} final syncs: {why}"),
            });
        }
    }

    /// The first way a live laptop's mailboxes differ from its user's on the cluster
    /// (messages at their UIDs with their flags, UIDVALIDITY, which mailboxes are shown).
    fn laptops_differ(&self) -> Option<String> {
        let members = self.member_servers();
        let (&csid, cluster) = members.iter().next()?;
        type Shown = BTreeMap<String, (u32, Vec<(Uid, Guid, Vec<Flag>)>)>;
        // A partial laptop is compared on the part it holds: the mailboxes its patterns
        // name, the messages inside its window (see `tandem_core::partial`), and a
        // mailbox is shown as the window shows it: one that only messages from before
        // the window keep shown (a client deleted or renamed it away) is not (explore
        // seed 27564: the laptop's own old-dated message pushed into a renamed-away box).
        let shown = |server: &Server, user: &str, partial: Option<&partial::Partial>| -> Shown {
            server
                .image()
                .mailboxes
                .iter()
                .filter(|(k, m)| &*k.user == user && m.visible_by(|r| partial.is_none_or(|p| p.in_window(r))))
                .filter(|(k, _)| partial.is_none_or(|p| p.holds_mailbox(&k.name)))
                .map(|(k, m)| {
                    let messages = m
                        .messages
                        .values()
                        .filter(|r| partial.is_none_or(|p| p.in_window(r)))
                        .map(|r| (r.uid, r.guid, r.present_flags()))
                        .collect();
                    (k.name.to_string(), (m.uidvalidity, messages))
                })
                .collect()
        };
        for l in &self.scenario.cluster.laptops {
            let Some(laptop) = self.nodes.get(&l.sid).and_then(|n| n.server.as_ref()) else { continue };
            let partial = l.partial.as_ref();
            if let Some(p) = partial {
                // What it holds outside its window (its own old-dated mail) is on the
                // cluster too; and every body it does not omit is here.
                for (k, m) in laptop.image().mailboxes.iter().filter(|(k, _)| p.holds_mailbox(&k.name)) {
                    for r in m.messages.values() {
                        let there = cluster.image().mailboxes.get(k).is_some_and(|c| c.messages.has_guid(r.guid));
                        if !there {
                            return Some(format!("{k}: {} holds {} and {csid} does not", l.sid, r.guid));
                        }
                        if !p.omits_body(r.size) && !laptop.image().bodies.contains_key(&r.guid) {
                            return Some(format!("{k}: {} lacks the body of {}", l.sid, r.guid));
                        }
                        if laptop.image().bodies.contains_key(&r.guid) {
                            continue;
                        }
                        // A body it omits (and the cluster holds): its text parts are here
                        // (`wrong_text_parts` checks they are the body's).
                        let lacks = !laptop.image().text_parts.contains_key(&r.guid);
                        if lacks && self.body_on_cluster(r.guid).is_some() {
                            return Some(format!("{k}: {} lacks the text parts of {}", l.sid, r.guid));
                        }
                    }
                }
            }
            let (mine, theirs) = (shown(laptop, &l.user, partial), shown(cluster, &l.user, partial));
            if mine == theirs {
                continue;
            }
            let names = |m: &Shown| m.keys().cloned().collect::<Vec<_>>();
            if names(&mine) != names(&theirs) {
                return Some(format!("{} shows {:?}, {csid} {:?}", l.sid, names(&mine), names(&theirs)));
            }
            for (name, ours) in &mine {
                if theirs.get(name) != Some(ours) {
                    return Some(format!("{}/{name}: {} has {ours:?}, {csid} {:?}", l.user, l.sid, theirs.get(name)));
                }
            }
        }
        None
    }

    /// The first text parts a live server or laptop holds that are not what the driver
    /// cuts from the message's body on the cluster.
    fn wrong_text_parts(&self) -> Option<String> {
        for (sid, node) in &self.nodes {
            let Some(server) = node.server.as_ref() else { continue };
            for (guid, parts) in &server.image().text_parts {
                let Some(body) = self.body_on_cluster(*guid) else { continue };
                if *parts != text_parts_of(&body) {
                    return Some(format!("{sid} holds text parts of {guid} that are not its body's"));
                }
            }
        }
        None
    }

    /// The intact body of `guid` on a live member of the cluster, if one holds it.
    fn body_on_cluster(&self, guid: Guid) -> Option<Body> {
        let members = self.member_servers();
        members.keys().filter_map(|sid| self.nodes.get(sid)).find_map(|n| {
            let body = n.bodies.read(guid)?;
            let record = n.server.as_ref()?.image().bodies.get(&guid)?;
            (body.checksum() == record.checksum).then_some(body)
        })
    }

    /// One way between a laptop and the cluster, drawn from the laptop's latency.
    fn laptop_delay_us(&mut self, laptop: Sid) -> u64 {
        let (lo, hi) = self.scenario.cluster.laptops.iter().find(|l| l.sid == laptop).map_or((1, 1), |l| l.latency_ms);
        self.rng.random_range(lo..=hi.max(lo)) * 1000
    }

    /// A `replicate` op: the laptop's agent starts a sync through `home` (or the
    /// laptop's home server), unless one is running or the laptop is down.
    fn start_agent(&mut self, laptop: Sid, home: Option<Sid>) {
        let Some(spec) = self.scenario.cluster.laptops.iter().find(|l| l.sid == laptop).cloned() else { return };
        if self.agents.contains_key(&laptop) || !self.alive(laptop) {
            self.note(|w: &World| format!("{} {laptop}: no sync now (one is running, or the laptop is down)", w.ms()));
            return;
        }
        self.agent_runs += 1;
        // A laptop works offline between its syncs: it is a side of a partition, whose
        // changes may renumber the cluster's when they meet.
        self.only_clean_restarts = false;
        let marks = self.laptop_marks.get(&laptop).cloned().unwrap_or_default();
        let sync = user_replica::ReplicaSync::new(&spec.user, marks, user_replica::ROUNDS_MAX_DEFAULT);
        let home = home.unwrap_or(spec.home);
        self.note(|w: &World| format!("{} {laptop} starts syncing {} through {home}", w.ms(), spec.user));
        self.agents.insert(laptop, Agent { sync, run: self.agent_runs, home });
        self.pump_agent(laptop);
    }

    /// Sends what the laptop's agent asks: to the laptop at once, to the cluster over the
    /// way there; ends the agent when it is done.
    fn pump_agent(&mut self, laptop: Sid) {
        loop {
            let Some(agent) = self.agents.get_mut(&laptop) else { return };
            if agent.sync.is_done() {
                return self.finish_agent(laptop);
            }
            let Some((side, id, request)) = agent.sync.poll_request() else { return };
            let tag = AgentTag { laptop, run: agent.run, side, id };
            let home = agent.home;
            match side {
                user_replica::Side::Replica if self.alive(laptop) => {
                    let o = Outstanding { agent: Some(tag), ..Outstanding::none() };
                    self.request(laptop, request, None, o);
                }
                user_replica::Side::Replica => self.schedule(self.now, Ev::AgentReply { tag, reply: None }),
                user_replica::Side::Cluster => {
                    let delay = self.laptop_delay_us(laptop);
                    self.schedule(self.now.plus_us(delay), Ev::AgentRequest { tag, home, request });
                }
            }
        }
    }

    fn agent_reply(&mut self, tag: AgentTag, reply: Option<ClientReply>) {
        let Some(agent) = self.agents.get_mut(&tag.laptop) else { return };
        if agent.run != tag.run {
            return;
        }
        match reply {
            Some(reply) => agent.sync.handle_reply(tag.side, tag.id, reply),
            None => agent.sync.side_lost(tag.side),
        }
        self.pump_agent(tag.laptop);
    }

    fn finish_agent(&mut self, laptop: Sid) {
        let Some(agent) = self.agents.remove(&laptop) else { return };
        let report = agent.sync.report().clone();
        self.laptop_marks.insert(laptop, agent.sync.marks().clone());
        self.note(|w: &World| {
            format!(
                "{} {laptop} sync done: converged {}, {} rounds, {} mailboxes, {} records up, {} down, \
                 {} bodies up, {} down, {} requests{}",
                w.ms(),
                report.converged,
                report.rounds,
                report.mailboxes_synced,
                report.records_pushed,
                report.records_pulled,
                report.bodies_pushed,
                report.bodies_pulled,
                report.requests,
                if report.failures.is_empty() { String::new() } else { format!(", failures {:?}", report.failures) }
            )
        });
        self.sync_reports.push((laptop, report));
    }

    /// A client's delivery failed for now or went unanswered: try again later at the
    /// next server (an MTA's next MX host), unless it has tried enough.
    fn retry_later(&mut self, failed_at: Sid, retry: Retry) {
        let Some(delay_ms) = self.scenario.cluster.mta_retry_ms else { return };
        if retry.attempts >= DELIVERY_ATTEMPTS_MAX || self.clients_stopped {
            return;
        }
        let servers: Vec<Sid> = self.nodes.keys().copied().filter(|s| !self.is_laptop(*s)).collect();
        let next = servers.iter().position(|s| *s == failed_at).map_or(0, |i| (i + 1) % servers.len());
        let Some(server) = servers.get(next).copied() else { return };
        self.schedule(self.now.plus_us(delay_ms * 1000), Ev::Retry { server, retry });
    }

    fn deliver_again(&mut self, server: Sid, retry: Retry) {
        if self.clients_stopped {
            return;
        }
        let retry = Retry { attempts: retry.attempts + 1, ..retry };
        // A retry made while every server is up, connected and agreeing must find its
        // first attempt, if that was stored: only a partition can hide it.
        if self.whole() && self.converged().is_none() {
            let checksum = retry.body.checksum();
            self.retried_when_whole.insert((retry.mailbox.clone(), checksum));
        }
        let request = ClientRequest::Save {
            mailbox: retry.mailbox.clone(),
            received: 1_700_000_000 + self.now.0 / 1_000_000,
            flags: retry.flags.clone(),
            body: retry.body.clone(),
            delivery: true,
        };
        let o = Outstanding {
            label: retry.label.clone(),
            mailbox: Some(retry.mailbox.clone()),
            add: retry.flags.clone(),
            retry: Some(retry),
            ..Outstanding::none()
        };
        self.request(server, request, None, o);
    }

    /// Every server up and every link carrying what is sent both ways (none cut, none
    /// silent): a cluster that is not partitioned in any way.
    fn whole(&self) -> bool {
        let retired = self.outside_cluster();
        let in_cluster = |s: &Sid| self.nodes.get(s).is_some_and(|n| n.incarnation > 0) && !retired.contains(s);
        self.nodes.keys().filter(|s| in_cluster(s)).all(|s| self.alive(*s))
            && self
                .links
                .iter()
                .filter(|((a, b), _)| in_cluster(a) && in_cluster(b))
                .all(|(_, l)| l.up && l.silent_until.iter().all(|until| *until <= self.now))
    }

    /// Whether the live servers other than `gone` reach each other over usable links
    /// that do not pass through it.
    fn connected_without(&self, gone: Sid) -> bool {
        let live: Vec<Sid> =
            self.nodes.keys().copied().filter(|s| *s != gone && self.alive(*s) && !self.is_laptop(*s)).collect();
        let Some(&start) = live.first() else { return true };
        let mut seen = BTreeSet::from([start]);
        let mut queue = vec![start];
        while let Some(at) = queue.pop() {
            for &n in &live {
                if !seen.contains(&n) && self.link_usable(at, n) {
                    seen.insert(n);
                    queue.push(n);
                }
            }
        }
        seen.len() == live.len()
    }

    /// Servers some live server knows to be retired: they are out of the cluster, and
    /// no invariant is checked on them any more.
    fn retired(&self) -> BTreeSet<Sid> {
        let mut retired = BTreeSet::new();
        for node in self.nodes.values() {
            let Some(server) = &node.server else { continue };
            for (sid, m) in server.members().entries() {
                if m.state == MemberState::Retired {
                    retired.insert(sid);
                }
            }
        }
        retired
    }

    /// Servers no cluster invariant is checked on: retired members, and user replicas
    /// (laptops), which hold one user's mail and are checked against the cluster apart.
    fn outside_cluster(&self) -> BTreeSet<Sid> {
        let mut outside = self.retired();
        outside.extend(self.scenario.cluster.laptops.iter().map(|l| l.sid));
        outside
    }

    /// Whether `mailbox` on `sid` is a partial laptop's own, outside the patterns it
    /// syncs: nothing of it reaches the cluster, by design.
    fn kept_apart(&self, sid: Sid, mailbox: &MailboxKey) -> bool {
        self.scenario
            .cluster
            .laptops
            .iter()
            .find(|l| l.sid == sid)
            .and_then(|l| l.partial.as_ref())
            .is_some_and(|p| !p.holds_mailbox(&mailbox.name))
    }

    fn is_laptop(&self, sid: Sid) -> bool {
        self.scenario.cluster.laptops.iter().any(|l| l.sid == sid)
    }

    /// Live servers that are members of the cluster, by id.
    fn member_servers(&self) -> BTreeMap<Sid, &Server> {
        live_members(&self.nodes, &self.outside_cluster())
    }

    /// Whether the live servers are in more than one root term. Asked after every step:
    /// when every live server agrees (nearly always), so do the members among them, and
    /// the retired servers need not be worked out.
    fn roots_disagree(&self) -> bool {
        debug_assert!(
            self.live_terms.iter().map(|(sid, t)| (*sid, *t)).collect::<BTreeMap<_, _>>()
                == self.nodes.iter().filter_map(|(sid, n)| Some((*sid, n.server.as_ref()?.term()))).collect(),
            "the terms kept are the servers' terms"
        );
        if self.live_terms.windows(2).all(|w| w[0].1 == w[1].1) {
            return false;
        }
        // Two servers inside the cluster (see `outside_cluster`) with different terms.
        // Only a server whose term differs from the first inside one's is asked whether
        // it is inside: after every step, a scan of every member table is too dear.
        let mut reference = None;
        for (sid, node) in &self.nodes {
            let Some(server) = node.server.as_ref() else { continue };
            let term = server.term();
            if reference.as_ref() == Some(&term) || self.is_outside_cluster(*sid) {
                continue;
            }
            if reference.is_some() {
                return true;
            }
            reference = Some(term);
        }
        false
    }

    fn set_live_term(&mut self, sid: Sid, term: Option<tandem_core::server::Term>) {
        match (self.live_terms.iter().position(|(s, _)| *s == sid), term) {
            (Some(i), Some(term)) => self.live_terms[i].1 = term,
            (Some(i), None) => {
                self.live_terms.swap_remove(i);
            }
            (None, Some(term)) => self.live_terms.push((sid, term)),
            (None, None) => {}
        }
    }

    /// Whether `sid` is in `outside_cluster()`, without building the set.
    fn is_outside_cluster(&self, sid: Sid) -> bool {
        self.is_laptop(sid)
            || self
                .nodes
                .values()
                .filter_map(|n| n.server.as_ref())
                .any(|s| s.members().state(sid) == Some(MemberState::Retired))
    }

    /// Why the live servers have not converged, or None.
    fn converged(&mut self) -> Option<String> {
        let servers = live_members(&self.nodes, &self.outside_cluster());
        oracle::divergence(&servers)
    }
}

fn describe_request(request: &ClientRequest) -> String {
    match request {
        ClientRequest::Save { mailbox, flags, body, .. } => format!("SAVE {mailbox} {flags:?} ({} bytes)", body.len()),
        ClientRequest::Import { mailbox, uidvalidity, uid, body, .. } => {
            format!("IMPORT {mailbox} UIDVALIDITY {uidvalidity} UID {uid} ({} bytes)", body.len())
        }
        ClientRequest::ImportMailbox { mailbox, uidvalidity } => format!("IMPORT {mailbox} UIDVALIDITY {uidvalidity}"),
        ClientRequest::Copy { src, src_uid, dst } => format!("COPY {src} UID {src_uid} to {dst}"),
        ClientRequest::Expunge { mailbox, uids } => format!("EXPUNGE {mailbox} {uids:?}"),
        ClientRequest::Store { mailbox, uids, add, remove, unchanged_since } => {
            format!("STORE {mailbox} {uids:?} +{add:?} -{remove:?} unchangedsince {unchanged_since:?}")
        }
        ClientRequest::Read { mailbox } => format!("READ {mailbox}"),
        ClientRequest::FreshRead { mailbox } => format!("FRESH-READ {mailbox}"),
        ClientRequest::FreshStatus { mailbox } => format!("FRESH-STATUS {mailbox}"),
        ClientRequest::MasterMove { mailbox } => format!("MASTER-MOVE {mailbox}"),
        ClientRequest::CreateMailbox { mailbox, special_use } if special_use.is_empty() => format!("CREATE {mailbox}"),
        ClientRequest::CreateMailbox { mailbox, special_use } => {
            format!("CREATE {mailbox} (USE ({}))", special_use.names().collect::<Vec<_>>().join(" "))
        }
        ClientRequest::DeleteMailbox { mailbox } => format!("DELETE {mailbox}"),
        ClientRequest::Subscription { mailbox, subscribe: true } => format!("SUBSCRIBE {mailbox}"),
        ClientRequest::Subscription { mailbox, subscribe: false } => format!("UNSUBSCRIBE {mailbox}"),
        ClientRequest::RenameMailbox { from, to } => format!("RENAME {from} to {to}"),
        ClientRequest::Membership { change } => format!("MEMBER {change:?}"),
        ClientRequest::ReplicaList { user, partial: None } => format!("REPLICA-LIST {user}"),
        ClientRequest::ReplicaList { user, partial: Some(p) } => format!("REPLICA-LIST {user} of {p:?}"),
        ClientRequest::ReplicaPull { mailbox, since, partial: None } => {
            format!("REPLICA-PULL {mailbox} since {since:?}")
        }
        ClientRequest::ReplicaPull { mailbox, since, partial: Some(_) } => {
            format!("REPLICA-PULL {mailbox} since {since:?}, the part held")
        }
        ClientRequest::ReplicaKeepBodies { mailbox, bodies } => {
            format!("REPLICA-KEEP-BODIES {mailbox} {}", bodies.len())
        }
        ClientRequest::FetchBody { mailbox, uid } => format!("FETCH {mailbox} UID {uid} BODY[]"),
        ClientRequest::ReplicaBodies { mailbox, guids } => format!("REPLICA-BODIES {mailbox} {} GUIDs", guids.len()),
        ClientRequest::ReplicaTextParts { mailbox, guids } => {
            format!("REPLICA-TEXT-PARTS {mailbox} {} GUIDs", guids.len())
        }
        ClientRequest::ReplicaKeepTextParts { mailbox, parts } => {
            format!("REPLICA-KEEP-TEXT-PARTS {mailbox} {}", parts.len())
        }
        ClientRequest::ReadTextParts { guids } => format!("READ-TEXT-PARTS {} GUIDs", guids.len()),
        ClientRequest::ReplicaPush { state, bodies, from_cluster } => format!(
            "REPLICA-PUSH {} {} messages {} tombstones {} bodies, the cluster's at {from_cluster:?}",
            state.mailbox,
            state.messages.len(),
            state.tombstones.len(),
            bodies.len()
        ),
        ClientRequest::ReplicaAdopt { state, bodies, pushed_upto, from_cluster } => format!(
            "REPLICA-ADOPT {} {} messages {} tombstones {} bodies, pushed up to {pushed_upto}, \
             the cluster's at {from_cluster:?}",
            state.mailbox,
            state.messages.len(),
            state.tombstones.len(),
            bodies.len()
        ),
    }
}

fn describe_view(view: &tandem_core::io::MailboxView) -> String {
    format!(
        "{} UIDVALIDITY {} UIDNEXT {} HIGHESTMODSEQ {}: {}",
        view.mailbox,
        view.uidvalidity,
        view.uidnext,
        view.highest_modseq,
        view.messages
            .iter()
            .map(|m| format!("{}={:08x}{:?}", m.uid, (m.guid.0 >> 96) as u32, m.flags))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn describe_reply(reply: &ClientReply) -> String {
    match reply {
        ClientReply::FreshRead { view, caught_up } => format!(
            "{} {}",
            if *caught_up { "caught up:" } else { "stale (no master position in time):" },
            describe_view(view)
        ),
        ClientReply::Read(view) => describe_view(view),
        ClientReply::Write(WriteResult::Saved { uid, guid, .. }) => {
            format!("OK saved UID {uid} = {:08x}", (guid.0 >> 96) as u32)
        }
        ClientReply::Write(WriteResult::Copied { uid, guid, .. }) => {
            format!("OK copied UID {uid} = {:08x}", (guid.0 >> 96) as u32)
        }
        ClientReply::ReplicaList { summaries, wanted, .. } if wanted.is_empty() => {
            format!("{} mailboxes", summaries.len())
        }
        ClientReply::ReplicaList { summaries, wanted, .. } => {
            format!("{} mailboxes, {} omitted bodies wanted", summaries.len(), wanted.len())
        }
        ClientReply::Body { guid, body } => format!("body of {:08x}, {} bytes", (guid.0 >> 96) as u32, body.len()),
        ClientReply::ReplicaState { state, summary, .. } => format!(
            "{} since: {} messages {} tombstones, highest modseq {}{}",
            state.mailbox,
            state.messages.len(),
            state.tombstones.len(),
            state.highest_modseq,
            if summary.is_none() { " (no such mailbox)" } else { "" }
        ),
        ClientReply::ReplicaBodies { bodies } => format!("{} bodies", bodies.len()),
        ClientReply::ReplicaTextParts { parts } => format!("{} text parts", parts.len()),
        other => format!("{other:?}"),
    }
}

/// A short readable form of a peer message for traces.
pub fn describe(envelope: &Envelope) -> String {
    let via = if envelope.hops > 0 { format!(" (relayed, {} hops)", envelope.hops) } else { String::new() };
    let detail = match &envelope.msg {
        Msg::LinkState { origin, seq, epoch, store, neighbors } => {
            format!("{origin}#{seq} epoch {epoch} store {store:016x} {neighbors:?}")
        }
        Msg::Members { members, .. } => {
            members.entries().map(|(s, m)| format!("{s}:{}", m.state.name())).collect::<Vec<_>>().join(" ")
        }
        Msg::Root { epoch, root } => format!("epoch {epoch} root {root}"),
        Msg::Dropped { epoch } | Msg::Who { epoch, .. } => format!("epoch {epoch}"),
        Msg::MasterIs { key, master, .. } => format!("{key} -> {master}"),
        Msg::MasterMove { tag, key, requester } => format!("#{tag} {key} to {requester}"),
        Msg::MoveDone { tag, key, .. } => format!("#{tag} {key}"),
        Msg::Request { tag, request } => match request {
            WriteRequest::Save { mailbox, guid, .. } => format!("#{tag} {mailbox} {guid}"),
            WriteRequest::Cancel { mailbox, guid, sender_ordered } => {
                format!("#{tag} {mailbox} {guid}{}", if *sender_ordered { " ORDERED" } else { "" })
            }
            WriteRequest::Import { mailbox, guid, uidvalidity, uid, .. } => {
                format!("#{tag} {mailbox} {guid} at {uidvalidity}/{uid}")
            }
            WriteRequest::Copy { src, src_uid, dst, .. } => format!("#{tag} {src} {src_uid} -> {dst}"),
            WriteRequest::Expunge { mailbox, messages } => {
                format!("#{tag} {mailbox} {:?}", messages.iter().map(|m| m.0).collect::<Vec<_>>())
            }
            WriteRequest::Store { mailbox, messages, add, remove, unchanged_since, .. } => {
                let uids: Vec<Uid> = messages.iter().map(|m| m.0).collect();
                format!("#{tag} {mailbox} {uids:?} +{add:?} -{remove:?} unchangedsince {unchanged_since:?}")
            }
            WriteRequest::Mailbox { mailbox, action } => format!("#{tag} {mailbox} {action:?}"),
            WriteRequest::Rename { from, to } => format!("#{tag} {from} -> {to}"),
            WriteRequest::Barrier { mailbox } => format!("#{tag} {mailbox}"),
            WriteRequest::Merge { state, bodies, .. } => format!(
                "#{tag} {} {} messages {} tombstones {} bodies",
                state.mailbox,
                state.messages.len(),
                state.tombstones.len(),
                bodies.len()
            ),
        },
        Msg::Reply { tag, master, result, .. } => format!("#{tag} master {master:?} {result:?}"),
        Msg::Change { seq, change } => match change {
            Change::Save { mailbox, record, .. } | Change::Copy { mailbox, record, .. } => {
                format!("#{seq} {mailbox} UID {} {}", record.uid, record.guid)
            }
            Change::Expunge { mailbox, tombstones, .. } => {
                format!("#{seq} {mailbox} {:?}", tombstones.iter().map(|t| t.uid).collect::<Vec<_>>())
            }
            Change::Store { mailbox, messages, add, remove, stamp, .. } => format!(
                "#{seq} {mailbox} {:?} +{add:?} -{remove:?} modseq {}",
                messages.iter().map(|m| m.0).collect::<Vec<_>>(),
                stamp.modseq
            ),
            Change::Merge { state } if state.retired.is_default() => format!(
                "#{seq} {} UIDs {:?} tombstones {:?}",
                state.mailbox,
                state.messages.iter().map(|m| m.uid).collect::<Vec<_>>(),
                state.tombstones.iter().map(|t| t.uid).collect::<Vec<_>>()
            ),
            Change::Merge { state } => format!(
                "#{seq} {} UIDs {:?} tombstones {:?} collected {:?} at modseq {}",
                state.mailbox,
                state.messages.iter().map(|m| m.uid).collect::<Vec<_>>(),
                state.tombstones.iter().map(|t| t.uid).collect::<Vec<_>>(),
                state.retired.ranges.iter().map(|(a, b)| format!("{a}:{b}")).collect::<Vec<_>>(),
                state.retired.collected
            ),
        },
        Msg::Ack { seqs, refused, .. } if refused.is_empty() => format!("{} entries", seqs.len()),
        Msg::Ack { seqs, refused, .. } => format!("{} entries, {} refused", seqs.len(), refused.len()),
        Msg::MboxRequest { tag, key } => format!("#{tag} {key}"),
        Msg::Mbox { tag, summary } => format!(
            "#{tag} {} uidnext {} count {} hms {} digest {:016x}",
            summary.mailbox, summary.uidnext, summary.count, summary.highest_modseq, summary.digest
        ),
        Msg::MboxDone { tag, count } => format!("#{tag} {count}"),
        Msg::SyncPart { state } => {
            format!(
                "part {} with {} messages, {} tombstones",
                state.mailbox,
                state.messages.len(),
                state.tombstones.len()
            )
        }
        Msg::Sync { reply, state } => format!(
            "{} {} with {} messages, {} tombstones",
            if *reply { "reply" } else { "request" },
            state.mailbox,
            state.messages.len(),
            state.tombstones.len()
        ),
        Msg::Fetch { guid } | Msg::NoBody { guid } => format!("{guid}"),
        Msg::Body { guid, body, .. } => format!("{guid} {} bytes", body.len()),
        Msg::Error { text } => text.clone(),
    };
    format!("{} {detail}{via}", envelope.msg.name())
}

/// A node's body store: in memory, cutting text parts as the simulator's driver does.
fn sim_bodies() -> MemoryBodies {
    MemoryBodies::default().cutting(text_parts_of)
}

/// Bytes of a simulated message's text kept in its text parts (after its header).
pub const TEXT_PART_BYTES: usize = 256;

/// The text parts of a simulated message, as the simulator's driver cuts them for a
/// partial laptop (the node cuts real mail by its MIME parts): its header and the first
/// [`TEXT_PART_BYTES`] of its text, the rest standing for its attachments.
pub fn text_parts_of(body: &[u8]) -> Body {
    let header_end = body.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
    let end = body.len().min(header_end + TEXT_PART_BYTES);
    Body::copy_from_slice(&body[..end])
}

// Clients, faults and expectations.
impl World {
    fn body(&mut self, size: usize, salt: u64) -> Body {
        let mut body = format!("From: sim@example.org\r\nSubject: message {salt}\r\n\r\n").into_bytes();
        // Eight letters per draw from the generator: byte b is the letter b % 26,
        // computed as b - 26 * (b * 79 >> 11) (exact for every byte), which vectorises.
        // Whole 64-bit draws, as one draw per eight letters would take them (the last
        // draw's unused bytes included), so the generator's stream goes on alike.
        let start = body.len();
        if size > start {
            let drawn = (size - start).div_ceil(8) * 8;
            body.resize(start + drawn, 0);
            self.rng.fill_bytes(&mut body[start..]);
            body.truncate(size);
            for b in &mut body[start..] {
                let x = u16::from(*b);
                *b = b'a' + (x - 26 * ((x * 79) >> 11)) as u8;
            }
        }
        body.into()
    }

    /// The bytes of a save or an import: a label saved or imported again sends the same
    /// bytes (an MTA's retry of one delivery, a resumed import); anything else new ones.
    fn labelled_body(&mut self, label: Option<&str>, size: usize) -> Body {
        if let Some(body) = label.and_then(|l| self.labelled_bytes.get(l)) {
            return body.clone();
        }
        self.label_counter += 1;
        let body = self.body(size, self.label_counter);
        if let Some(l) = label {
            self.labelled_bytes.insert(l.to_string(), body.clone());
        }
        body
    }

    /// The UID a server has for a labelled message in a mailbox, if any.
    fn uid_of(&self, sid: Sid, mailbox: &MailboxKey, label: &str) -> Option<Uid> {
        let guid = self.labels.get(label)?;
        let server = self.nodes.get(&sid)?.server.as_ref()?;
        server.image().mailboxes.get(mailbox)?.messages.uids_of(*guid).next()
    }

    /// [`World::request`], and the request's id while its answer is awaited (None: the
    /// server is down, or it answered within the input): what the oracle must know is
    /// pending.
    fn request_awaited(
        &mut self,
        sid: Sid,
        request: ClientRequest,
        event: Option<usize>,
        o: Outstanding,
    ) -> Option<RequestId> {
        let id = self.next_request;
        self.request(sid, request, event, o);
        self.outstanding.contains_key(&id).then_some(id)
    }

    fn request(&mut self, sid: Sid, request: ClientRequest, event: Option<usize>, o: Outstanding) {
        if !self.alive(sid) {
            self.note(|w: &World| format!("{} client at {sid}: server is down", w.ms()));
            if let Some(retry) = o.retry {
                self.retry_later(sid, retry);
            }
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.note(|w: &World| format!("{} client -> {sid} #{id} {}", w.ms(), describe_request(&request)));
        let incarnation = self.nodes.get(&sid).map(|n| n.incarnation).unwrap_or(0);
        let (losses_before, hand_deletes_before) = (self.lost_for_good, self.hand_deletes);
        let issued_us = self.now.0;
        self.outstanding.insert(
            id,
            Outstanding { server: sid, incarnation, event, losses_before, hand_deletes_before, issued_us, ..o },
        );
        self.input(sid, Input::Client { id, request });
    }

    /// Sync mode promises that a client hears of a save only once the master and
    /// `replicas` peers hold the message on disk: count the durable copies right now.
    fn check_copies_at_ack(&mut self, mailbox: &MailboxKey, guid: Guid, lost_meanwhile: usize, issued_us: u64) {
        if self.scenario.cluster.durability != Durability::Sync {
            return;
        }

        let laptops = self.scenario.cluster.laptops.len();
        let copies_needed = (1 + usize::from(self.scenario.cluster.replicas)).min(self.nodes.len() - laptops);
        let copies = self
            .nodes
            .iter()
            .filter(|(sid, _)| !self.is_laptop(**sid))
            .map(|(_, n)| n)
            .filter(|n| {
                // Live here (by the GUID index) with its body, or (rarely) expunged here
                // already, by an EXPUNGE or DELETE its master ordered after the save
                // while the answer was on its way: a tombstone says the copy was here,
                // and its body may have been collected with it.
                n.disk.mailboxes.get(mailbox).is_some_and(|m| {
                    (m.messages.has_guid(guid) && n.disk.bodies.contains_key(&guid))
                        || m.tombstones.values().rev().any(|t| t.guid == guid)
                })
            })
            .count();
        let lost_meanwhile = lost_meanwhile + self.unknown_disk_losses(mailbox, guid, issued_us);
        if copies + lost_meanwhile < copies_needed {
            let detail = format!(
                "message {guid} in {mailbox} acked with {copies} durable copies, sync mode promises {copies_needed}"
            );
            self.oracle.violate(oracle::NO_ACKED_LOSS, self.now.0, detail);
        }
    }

    /// Servers whose disk was replaced since a save was issued (`issued_us`), which do
    /// not hold it, and whose new store some running server has not heard of yet: the
    /// master may be that server, and what it cannot know it cannot count out (the core
    /// forgets an acknowledgement once it hears of the new store). Such a loss is like
    /// any other server's lost for good.
    fn unknown_disk_losses(&self, mailbox: &MailboxKey, guid: Guid, issued_us: u64) -> usize {
        let servers = || self.nodes.iter().filter(|(sid, _)| !self.is_laptop(**sid));
        servers()
            .filter(|(_, n)| n.store_made_us > issued_us)
            .filter(|(_, n)| n.disk.mailboxes.get(mailbox).is_none_or(|m| !m.messages.has_guid(guid)))
            .filter_map(|(sid, n)| Some((*sid, n.server.as_ref()?)))
            .filter(|(sid, s)| {
                let store = s.image().store_id;
                servers()
                    .filter(|(other, _)| *other != sid)
                    .filter_map(|(_, n)| n.server.as_ref())
                    .any(|other| other.peer_store(*sid) != Some(store))
            })
            .count()
    }

    /// A running server's copy of a mailbox.
    fn stored_mailbox(&self, sid: Sid, mailbox: &MailboxKey) -> Option<&tandem_core::store::StoredMailbox> {
        self.nodes.get(&sid).and_then(|n| n.server.as_ref()).and_then(|s| s.image().mailboxes.get(mailbox))
    }

    fn client_reply(&mut self, sid: Sid, id: RequestId, reply: ClientReply) {
        let Some(o) = self.outstanding.remove(&id) else { return };
        let copy_asked = self.oracle.request_answered(id);
        let incarnation = self.nodes.get(&sid).map(|n| n.incarnation).unwrap_or(0);
        if o.server != sid || o.incarnation != incarnation {
            return;
        }
        let t = self.now.0;
        self.trace_hash = mix64(self.trace_hash ^ reply_hash(t, &reply));
        self.note(|w: &World| format!("{} {sid} -> client #{id} {}", w.ms(), describe_reply(&reply)));
        if let Some(tag) = o.agent {
            // Through the queue, never at once: the agent's next request must not run
            // inside this server's input.
            let delay = if tag.side == user_replica::Side::Cluster { self.laptop_delay_us(tag.laptop) } else { 0 };
            self.schedule(self.now.plus_us(delay), Ev::AgentReply { tag, reply: Some(reply) });
            return;
        }
        let temporary = matches!(
            reply,
            ClientReply::Write(WriteResult::Failed { kind: FailKind::Temporary, .. })
                | ClientReply::Failed { kind: FailKind::Temporary, .. }
        );
        if temporary && let Some(retry) = o.retry.clone() {
            self.retry_later(sid, retry);
        }
        if o.mailbox.as_ref().is_some_and(|m| self.kept_apart(sid, m)) {
            // A partial laptop's own folder, outside what it syncs: its mail is the
            // laptop's alone (a folder of the same name on the cluster is another one),
            // and no cluster invariant is about it.
            if let (
                ClientReply::Write(WriteResult::Saved { guid, .. } | WriteResult::Copied { guid, .. }),
                Some(label),
            ) = (&reply, &o.label)
            {
                self.set_label(label.clone(), *guid);
            }
            if let Some(e) = o.event {
                self.answers.insert(e, reply);
            }
            return;
        }
        match &reply {
            ClientReply::Read(view) => self.oracle.view(t, sid, view),
            ClientReply::FreshStatus { status, caught_up } => {
                let whole = self.whole();
                if *caught_up && whole && self.lost_for_good == 0 && self.hand_deletes == 0 {
                    self.oracle.fresh_status(t, sid, status, o.issued_us, self.last_fault_us);
                }
            }
            ClientReply::FreshRead { view, caught_up } => {
                self.oracle.view(t, sid, view);
                // Lost servers and deleted files may take acknowledged mail with them,
                // which a read cannot be asked to show.
                // A server cut off is the master of its own side (the design's answer to a
                // partition), so only a whole cluster owes a read every acknowledged save.
                let whole = self.whole();
                if *caught_up && whole && self.lost_for_good == 0 && self.hand_deletes == 0 {
                    self.oracle.fresh_view(t, sid, view, o.issued_us, self.last_fault_us);
                }
            }
            ClientReply::Write(
                WriteResult::Saved { uidvalidity, uid, guid } | WriteResult::Copied { uidvalidity, uid, guid },
            ) => {
                if let Some(mailbox) = &o.mailbox {
                    if matches!(reply, ClientReply::Write(WriteResult::Copied { .. })) {
                        // A copy back of a message expunged there takes a GUID derived
                        // from the source's (`Guid::copied_back`), which a laptop and the
                        // cluster derive alike: a COPY brought that one to the mailbox too
                        // (focus leave seeds 38471, 41072: the cluster's copy expunged,
                        // the laptop's pushed after).
                        self.oracle.copy_answered(mailbox, *guid, copy_asked.as_ref());
                    }
                    self.oracle.saved(t, sid, mailbox, (*uidvalidity, *uid, *guid), o.issued_us);
                    self.oracle.saved_flags(mailbox, *guid, &o.add);
                    let copies_lost =
                        (self.lost_for_good - o.losses_before) + (self.hand_deletes - o.hand_deletes_before);
                    // UID 0: an EXPUNGE removed the message (and maybe its body) while the
                    // answer waited for its copies; there is nothing left to count.
                    // A laptop is a cluster of one: its copies are the cluster's business
                    // once its agent pushed them.
                    if *uid != 0 && !self.is_laptop(sid) {
                        self.check_copies_at_ack(mailbox, *guid, copies_lost, o.issued_us);
                    }
                }
                if let Some(label) = &o.label {
                    self.set_label(label.clone(), *guid);
                }
                if let Some((mailbox, label)) = o.then_expunge.clone()
                    && *uid != 0
                {
                    // A MOVE: the source's EXPUNGE right after the copy's answer, as the
                    // node's IMAP session does it; through the queue, never inside this
                    // server's input.
                    let action = Action::Expunge { server: sid, mailbox, labels: vec![label] };
                    self.schedule(self.now, Ev::Action { action, event: None });
                }
            }
            ClientReply::Body { guid, body } => {
                // The bytes the client saved under that label, and no others.
                let saved = o.label.as_ref().filter(|l| self.labels.get(*l) == Some(guid));
                if let Some(want) = saved.and_then(|l| self.labelled_bytes.get(l))
                    && want.as_ref() != body.as_ref()
                {
                    let detail = format!("{sid} gave other bytes for {guid} than were saved");
                    self.oracle.violate(oracle::NO_ACKED_LOSS, t, detail);
                }
            }
            ClientReply::Write(WriteResult::Expunged { uids, .. }) => {
                // Acknowledged is what the answer names: a UID it leaves out was not there
                // to expunge at the master (expunged before, or its mailbox being deleted:
                // explore seed 359095, a DELETE that then failed), and a client is told of
                // no EXPUNGE for it.
                if let Some(mailbox) = &o.mailbox {
                    let gone: Vec<(Uid, Guid)> =
                        o.expunging.iter().filter(|(u, _)| uids.contains(u)).copied().collect();
                    self.oracle.expunge_acked(sid, mailbox, &gone, o.issued_us);
                    let asked: Vec<Guid> = o.expunging.iter().map(|m| m.1).collect();
                    self.oracle.expunge_answered(t, mailbox, &asked);
                }
            }
            ClientReply::Write(result @ WriteResult::Stored { rejected, .. }) => {
                self.oracle.stored(t, sid, o.unchanged_since, result);
                if let Some(mailbox) = &o.mailbox {
                    let done: Vec<Guid> =
                        o.storing.iter().filter(|(u, _)| !rejected.contains(u)).map(|m| m.1).collect();
                    self.oracle.store_acked(mailbox, &done, &o.add, &o.remove);
                }
            }
            _ => {}
        }
        if let Some(e) = o.event {
            self.answers.insert(e, reply);
        }
    }

    fn act(&mut self, action: Action, event: Option<usize>) {
        let none = Outstanding::none;
        let unclean = match &action {
            Action::Cut { .. }
            | Action::Isolate { .. }
            | Action::Partition { .. }
            | Action::Flap { .. }
            | Action::Reset { .. }
            | Action::Slow { .. }
            | Action::Silence { .. }
            | Action::Lose { .. }
            | Action::Replace { .. }
            | Action::RestoreBackup { .. }
            | Action::HandAdd { .. }
            | Action::HandDelete { .. }
            | Action::Corrupt { .. }
            | Action::MemberRemove { lost: true, .. } => true,
            // A crash of a server whose changes had not all reached the others (async
            // mode may lose them; in any mode its disk may hold a UID it gave and that
            // only it knows, logged or owed by a SYNC after a log overflow): what
            // happens then is a partition's business.
            // So is one that splits the others (the only relay between them).
            Action::Crash { server } => {
                self.nodes.get(server).is_some_and(|n| {
                    n.server.as_ref().is_some_and(|s| {
                        // A log that overflowed holds no entry for a change it owes: the
                        // mailbox is marked for a SYNC instead.
                        let owed = s.image().logs.values().any(|l| !l.entries.is_empty() || !l.overflowed.is_empty());
                        !n.pending.is_empty() || owed || s.dirty_mailboxes() > 0
                    })
                }) || !self.connected_without(*server)
            }
            _ => false,
        };
        if unclean {
            self.only_clean_restarts = false;
        }
        match action {
            Action::Save { server, mailbox, label, flags, size } => {
                let body = self.labelled_body(label.as_deref(), size);
                let label = label.or_else(|| Some(format!("auto{}", self.label_counter)));
                let retry = self.scenario.cluster.mta_retry_ms.map(|_| Retry {
                    mailbox: mailbox.clone(),
                    flags: flags.clone(),
                    body: body.clone(),
                    label: label.clone(),
                    attempts: 1,
                });
                let request = ClientRequest::Save {
                    mailbox: mailbox.clone(),
                    received: 1_700_000_000 + self.now.0 / 1_000_000,
                    flags: flags.clone(),
                    body,
                    delivery: true,
                };
                let o = Outstanding { label, mailbox: Some(mailbox), add: flags, retry, ..none() };
                self.request(server, request, event, o);
            }
            Action::Import { server, mailbox, label, uidvalidity, uid, flags, size } => {
                let body = self.labelled_body(Some(&label), size);
                let request = ClientRequest::Import {
                    mailbox: mailbox.clone(),
                    uidvalidity,
                    uid,
                    received: 1_700_000_000 + self.now.0 / 1_000_000,
                    flags: flags.clone(),
                    body,
                };
                let o = Outstanding { label: Some(label), mailbox: Some(mailbox), add: flags, ..none() };
                self.request(server, request, event, o);
            }
            Action::Copy { server, from, label, to, as_label, moving } => {
                let Some(uid) = self.uid_of(server, &from, &label) else { return self.skip(server, &label, event) };
                let guid = self.labels.get(&label).copied();
                if let Some(guid) = guid {
                    self.oracle.copy_requested(&to, guid);
                }
                let then_expunge = moving.then(|| (from.clone(), label));
                let request = ClientRequest::Copy { src: from, src_uid: uid, dst: to.clone() };
                let o = Outstanding { label: as_label, mailbox: Some(to.clone()), then_expunge, ..none() };
                if let (Some(id), Some(guid)) = (self.request_awaited(server, request, event, o), guid) {
                    self.oracle.copy_pending(id, &to, guid);
                }
            }
            Action::Expunge { server, mailbox, labels } => {
                let found: Vec<(Uid, Guid)> = labels
                    .iter()
                    .filter_map(|l| Some((self.uid_of(server, &mailbox, l)?, *self.labels.get(l)?)))
                    .collect();
                if found.is_empty() {
                    return self.skip(server, &labels.join(","), event);
                }
                let request =
                    ClientRequest::Expunge { mailbox: mailbox.clone(), uids: found.iter().map(|f| f.0).collect() };
                // An EXPUNGE whose answer is lost (a crash, a timeout) may still have
                // taken effect: those messages are no longer owed to anyone.
                self.oracle.expunge_requested(self.now.0, &mailbox, &found);
                self.request(
                    server,
                    request,
                    event,
                    Outstanding { mailbox: Some(mailbox), expunging: found, ..none() },
                );
            }
            Action::Store { server, mailbox, labels, add, remove, unchanged_since } => {
                let storing: Vec<(Uid, Guid)> = labels
                    .iter()
                    .filter_map(|l| Some((self.uid_of(server, &mailbox, l)?, *self.labels.get(l)?)))
                    .collect();
                let uids: Vec<Uid> = storing.iter().map(|m| m.0).collect();
                if uids.is_empty() {
                    return self.skip(server, &labels.join(","), event);
                }
                let since = match unchanged_since {
                    None => None,
                    Some(UnchangedSince::Value(v)) => Some(v),
                    Some(UnchangedSince::Current) => self
                        .nodes
                        .get(&server)
                        .and_then(|n| n.server.as_ref())
                        .and_then(|s| s.image().mailboxes.get(&mailbox))
                        .map(|m| uids.iter().filter_map(|u| m.messages.get(u)).map(|r| r.modseq).max().unwrap_or(0)),
                };
                let guids: Vec<Guid> = storing.iter().map(|m| m.1).collect();
                self.oracle.store_requested(&mailbox, &guids, &add, &remove);
                let request = ClientRequest::Store {
                    mailbox: mailbox.clone(),
                    uids,
                    add: add.clone(),
                    remove: remove.clone(),
                    unchanged_since: since,
                };
                let o = Outstanding { mailbox: Some(mailbox), unchanged_since: since, storing, add, remove, ..none() };
                self.request(server, request, event, o);
            }
            Action::Read { server, mailbox, fresh } => {
                let request = if fresh {
                    ClientRequest::FreshRead { mailbox: mailbox.clone() }
                } else {
                    ClientRequest::Read { mailbox: mailbox.clone() }
                };
                self.request(server, request, event, Outstanding { mailbox: Some(mailbox), ..none() })
            }
            Action::FetchBody { server, mailbox, label } => {
                let Some(uid) = self.uid_of(server, &mailbox, &label) else { return self.skip(server, &label, event) };
                let request = ClientRequest::FetchBody { mailbox: mailbox.clone(), uid };
                self.request(
                    server,
                    request,
                    event,
                    Outstanding { label: Some(label), mailbox: Some(mailbox), ..none() },
                )
            }
            Action::Status { server, mailbox } => {
                let request = ClientRequest::FreshStatus { mailbox: mailbox.clone() };
                self.request(server, request, event, Outstanding { mailbox: Some(mailbox), ..none() })
            }
            Action::CreateMailbox { server, mailbox, special_use } => {
                let o = Outstanding { mailbox: Some(mailbox.clone()), ..none() };
                self.request(server, ClientRequest::CreateMailbox { mailbox, special_use }, event, o)
            }
            Action::DeleteMailbox { server, mailbox } => {
                // Everything in it may go: the oracle treats it as an expunge of all.
                self.oracle.mailbox_delete_requested(&mailbox);
                let o = Outstanding { mailbox: Some(mailbox.clone()), ..none() };
                self.request(server, ClientRequest::DeleteMailbox { mailbox }, event, o)
            }
            Action::Replicate { server, home } => self.start_agent(server, home),
            Action::RenameMailbox { server, from, to } => {
                // Its messages may end in `to` (or stay, if the rename is refused).
                let moving: BTreeSet<Guid> = self
                    .nodes
                    .values()
                    .filter_map(|n| n.server.as_ref())
                    .filter_map(|s| s.image().mailboxes.get(&from))
                    .flat_map(|m| m.messages.values().map(|r| r.guid))
                    .collect();
                self.oracle.rename_requested(&from, &to, moving);
                let o = Outstanding { mailbox: Some(from.clone()), ..none() };
                let request = ClientRequest::RenameMailbox { from: from.clone(), to: to.clone() };
                if let Some(id) = self.request_awaited(server, request, event, o) {
                    self.oracle.rename_pending(id, &from, &to);
                }
            }
            Action::MasterMove { server, mailbox } => {
                self.request(server, ClientRequest::MasterMove { mailbox }, event, none())
            }
            Action::Cut { a, b } => self.set_link(a, b, false),
            Action::Restore { a, b } => self.set_link(a, b, true),
            Action::Isolate { server } => {
                for n in self.neighbours(server) {
                    self.set_link(server, n, false);
                }
            }
            Action::Partition { groups } => {
                let group_of = |s: Sid| groups.iter().position(|g| g.contains(&s));
                let keys: Vec<(Sid, Sid)> = self.links.keys().copied().collect();
                for (a, b) in keys {
                    let same = group_of(a).is_some() && group_of(a) == group_of(b);
                    self.set_link(a, b, same);
                }
            }
            Action::Heal => self.step(Box::new(Ev::Heal { end: false })),
            Action::Flap { a, b, down_ms } => {
                self.set_link(a, b, false);
                self.schedule(self.now.plus_us(down_ms * 1000), Ev::RestoreLink { a, b });
            }
            Action::Reset { a, b, down_ms } => {
                // `a` sees the connection fail at once; `b` only once what `a` had sent
                // before has reached it (and its own sends since are lost). `a` then
                // resends what `b` acknowledged into the void: duplicates at `b`.
                if !self.link_usable(a, b) {
                    return;
                }
                let key = link_key(a, b);
                let Some(link) = self.links.get(&key) else { return };
                let generation = link.generation;
                let notice = self.now.plus_us(link.latency_us.1.min(down_ms * 500).max(1));
                if let Some(l) = self.links.get_mut(&key) {
                    l.up = false;
                    l.lingering = Some((generation, b, notice));
                }
                self.bump_link(a, b);
                self.last_fault_us = self.now.0;
                self.note(|w: &World| format!("{} link {a}-{b} reset ({a} notices at once)", w.ms()));
                self.input(a, Input::LinkDown { peer: b });
                self.schedule(notice, Ev::ResetNoticed { server: b, peer: a, generation });
                self.schedule(self.now.plus_us(down_ms.max(1) * 1000), Ev::RestoreLink { a, b });
            }
            Action::Slow { a, b, delay_ms, for_ms } => {
                let Some(link) = self.links.get_mut(&link_key(a, b)) else { return };
                let delay_us = delay_ms * 1000;
                link.latency_us = (delay_us, delay_us + delay_us / 2);
                self.note(|w: &World| format!("{} link {a}-{b} slows to {delay_ms} ms for {for_ms} ms", w.ms()));
                self.schedule(self.now.plus_us(for_ms * 1000), Ev::RestoreLatency { a, b });
            }
            Action::Silence { from, to, for_ms } => {
                let Some(link) = self.links.get_mut(&link_key(from, to)) else { return };
                let until = self.now.plus_us(for_ms * 1000);
                link.silent_until[usize::from(from > to)] = until;
                self.last_fault_us = self.now.0;
                self.note(|w: &World| format!("{} link {from} -> {to} goes silent for {for_ms} ms", w.ms()));
                // The side that hears nothing declares the peer dead and drops the
                // connection (the node's dead-peer timeout); both sides reconnect.
                self.schedule(until, Ev::Action { action: Action::Flap { a: from, b: to, down_ms: 100 }, event: None });
            }
            Action::Crash { server } => self.stop_server(server, false),
            Action::Restart { server } => {
                if !self.alive(server) && !self.nodes.get(&server).is_some_and(|n| n.lost) {
                    self.start_server(server, false);
                }
            }
            Action::Lose { server } => {
                if !self.nodes.get(&server).is_some_and(|n| n.lost) {
                    self.lost_for_good += 1;
                }
                self.stop_server(server, true);
            }
            Action::Backup { server } => {
                // One read snapshot of what is durable, with the bodies it lists, as
                // `tandem backup` copies it (`DiskImage::backup_copy`: no store identity,
                // a newcomer).
                let Some(node) = self.nodes.get_mut(&server) else { return };
                node.backup = Some((node.disk.backup_copy(), node.bodies.deep_copy()));
                self.note(|w: &World| format!("{} backup of {server}'s store", w.ms()));
            }
            Action::RestoreBackup { server } => {
                if self.nodes.get(&server).is_none_or(|n| n.backup.is_none()) {
                    return self.skip(server, "a backup", event);
                }
                // The server stops, its store is replaced by the copy, and it starts again
                // (a `restart` event): what it made durable since the backup is lost, as a
                // lost disk's is.
                self.stop_server(server, false);
                let Some(node) = self.nodes.get_mut(&server) else { return };
                let Some((disk, bodies)) = node.backup.as_ref() else { return };
                node.disk = disk.clone();
                node.bodies = bodies.deep_copy();
                node.store_made_us = self.now.0;
                if !node.lost {
                    self.lost_for_good += 1;
                }
                node.lost = false;
                self.oracle.forget_server(server);
                self.note(|w: &World| format!("{} {server}'s store restored from its backup", w.ms()));
            }
            Action::Replace { server } => {
                if !self.alive(server) {
                    self.start_server(server, true);
                }
            }
            Action::MemberAdd { server, member } => {
                let address = format!("sim-{}", member.0);
                let change = MemberChange::Add { sid: member, address };
                self.request(server, ClientRequest::Membership { change }, event, none());
                // The operator starts the new server once it is added.
                if self.nodes.get(&member).is_some_and(|n| n.incarnation == 0 && n.server.is_none()) {
                    self.start_server(member, true);
                }
            }
            Action::MemberRemove { server, member, lost } => {
                if lost && !self.nodes.get(&member).is_some_and(|n| n.lost) {
                    // Retired as lost: what only it held is gone, as with any server lost
                    // for good. The machine is given up, not destroyed: it stops with its
                    // disk, and a scenario may start it again (the operator's mistake: it
                    // was only cut off), to find itself out of the cluster.
                    self.lost_for_good += 1;
                    self.oracle.forget_server(member);
                    self.stop_server(member, false);
                }
                let change =
                    if lost { MemberChange::Lost { sid: member } } else { MemberChange::Leave { sid: member } };
                self.request(server, ClientRequest::Membership { change }, event, none());
            }
            Action::HandAdd { server, mailbox, label } => {
                self.last_fault_us = self.now.0;
                self.label_counter += 1;
                let guid = Guid(u128::from(self.rng.random::<u64>()) << 64 | u128::from(self.label_counter));
                if let Some(label) = label {
                    self.set_label(label, guid);
                }
                let body = self.body(800, self.label_counter);
                self.note(|w: &World| format!("{} hand edit on {server}: new file in {mailbox}", w.ms()));
                self.input(
                    server,
                    Input::External(ExternalEdit::Added { mailbox, guid, received: 1_700_000_000, body }),
                );
            }
            Action::HandDelete { server, mailbox, label } => {
                self.last_fault_us = self.now.0;
                let Some(uid) = self.uid_of(server, &mailbox, &label) else { return self.skip(server, &label, event) };
                self.note(|w: &World| format!("{} hand edit on {server}: file of {mailbox} UID {uid} deleted", w.ms()));
                self.hand_deletes += 1;
                if let Some(&guid) = self.labels.get(&label) {
                    self.destroyed_copies.entry(guid).or_default().insert(server);
                }
                self.input(server, Input::External(ExternalEdit::Removed { mailbox, uid }));
            }
            Action::Corrupt { server, label } => {
                self.last_fault_us = self.now.0;
                let Some(&guid) = self.labels.get(&label) else { return self.skip(server, &label, event) };
                // Only a body already on disk can be damaged there; one still being
                // written would be written whole over the damage.
                let node = self.nodes.get(&server).filter(|n| n.server.is_some());
                let pending = node.is_some_and(|n| {
                    n.pending.iter().any(|(_, w)| matches!(w, StoreWrite::PutBody { guid: g, .. } if *g == guid))
                });
                let body = node.filter(|_| !pending).and_then(|n| n.bodies.read(guid));
                let Some(body) = body else { return self.skip(server, &label, event) };
                let mut damaged = body.to_vec();
                if let Some(first) = damaged.first_mut() {
                    *first ^= 0x20;
                } else {
                    damaged.push(b'!');
                }
                if let Some(n) = self.nodes.get(&server) {
                    n.bodies.overwrite(guid, damaged.into());
                }
                self.destroyed_copies.entry(guid).or_default().insert(server);
                self.note(|w: &World| format!("{} disk corruption on {server}: body of {label}", w.ms()));
                self.input(server, Input::External(ExternalEdit::Corrupted { guid }));
            }
            Action::RandomWorkload { until_ms, ops_per_s, users, mailboxes, servers } => {
                self.plan_workload(until_ms, ops_per_s, users, mailboxes, servers)
            }
            Action::RandomFaults { until_ms, count, kinds } => self.plan_faults(until_ms, count, kinds),
        }
    }

    fn skip(&mut self, server: Sid, what: &str, event: Option<usize>) {
        let what = what.to_string();
        self.note(|w: &World| format!("{} client at {server}: skipped, {what} not there", w.ms()));
        if let Some(e) = event {
            self.answers.insert(e, ClientReply::Failed { kind: FailKind::Permanent, reason: "skipped".into() });
        }
    }

    /// Live servers that are members (not retired).
    fn live_servers(&self) -> Vec<Sid> {
        self.member_servers().into_keys().collect()
    }

    fn set_label(&mut self, label: String, guid: Guid) {
        if let Some(old) = self.labels.insert(label.clone(), guid)
            && let Some(list) = self.labels_of.get_mut(&old)
        {
            list.retain(|l| *l != label);
        }
        self.labels_of.entry(guid).or_default().push(label);
    }

    /// A random label of a message the server holds in the mailbox: the first message
    /// with a label at or after a random UID (wrapping round), then one of its labels.
    /// An index walk, not a collection of every label: the mailbox grows all run long.
    fn random_label_at(&mut self, sid: Sid, mailbox: &MailboxKey) -> Option<String> {
        let server = self.nodes.get(&sid)?.server.as_ref()?;
        let messages = &server.image().mailboxes.get(mailbox)?.messages;
        let (first, last) = (*messages.keys().next()?, *messages.keys().next_back()?);
        let from = self.rng.random_range(first..=last);
        let labelled = messages
            .uids_in(from, Uid::MAX)
            .chain(messages.uids_in(first, from.saturating_sub(1)).take_while(|u| *u < from))
            .filter_map(|uid| messages.get(&uid))
            .find_map(|r| self.labels_of.get(&r.guid).filter(|labels| !labels.is_empty()))?;
        let i = self.rng.random_range(0..labelled.len());
        Some(labelled[i].clone())
    }

    fn plan_workload(&mut self, until_ms: u64, ops_per_s: u64, users: u32, mailboxes: u32, servers: Option<Vec<Sid>>) {
        let servers = servers.unwrap_or_else(|| self.scenario.cluster.servers.clone());
        let gap_us = 1_000_000 / ops_per_s.max(1);
        let mut t = self.now.0;
        let end = until_ms * 1000;
        let mut planned = Vec::new();
        while t < end {
            t += self.rng.random_range(gap_us / 2..=gap_us * 3 / 2).max(1);
            let server = servers[self.rng.random_range(0..servers.len())];
            let user = format!("user{}", self.rng.random_range(1..=users.max(1)));
            let name = match self.rng.random_range(0..mailboxes.max(1)) {
                0 => "INBOX".to_string(),
                n => format!("Box{n}"),
            };
            let mailbox = MailboxKey::new(&user, &name);
            let roll = self.rng.random_range(0..100u32);
            let id = self.next_event;
            self.next_event += 1;
            planned.push(Queued { at: Instant(t), id, ev: Box::new(Ev::RandomOp { server, mailbox, roll }) });
        }
        self.queue.plan(planned);
    }

    fn plan_faults(&mut self, until_ms: u64, count: u32, kinds: Vec<FaultKind>) {
        if kinds.is_empty() {
            return;
        }
        let servers = self.scenario.cluster.servers.clone();
        let start = self.now.0;
        let end = (until_ms * 1000).max(start + 1);
        let mut planned_losses = self.lost_for_good;
        for _ in 0..count {
            let at = Instant(self.rng.random_range(start..end));
            let kind = kinds[self.rng.random_range(0..kinds.len())];
            let a = servers[self.rng.random_range(0..servers.len())];
            let b = servers[self.rng.random_range(0..servers.len())];
            let heal_after = self.rng.random_range(500_000..5_000_000u64);
            match kind {
                FaultKind::Partition => {
                    let mut left = Vec::new();
                    let mut right = Vec::new();
                    for &s in &servers {
                        if self.rng.random_bool(0.5) { left.push(s) } else { right.push(s) }
                    }
                    self.schedule(
                        at,
                        Ev::Action { action: Action::Partition { groups: vec![left, right] }, event: None },
                    );
                    self.schedule(at.plus_us(heal_after), Ev::Heal { end: false });
                }
                FaultKind::Cut if a != b => {
                    self.schedule(at, Ev::Action { action: Action::Cut { a, b }, event: None });
                    self.schedule(at.plus_us(heal_after), Ev::RestoreLink { a, b });
                }
                FaultKind::Flap if a != b => self.schedule(
                    at,
                    Ev::Action { action: Action::Flap { a, b, down_ms: heal_after / 5000 }, event: None },
                ),
                FaultKind::Reset if a != b => self.schedule(
                    at,
                    Ev::Action { action: Action::Reset { a, b, down_ms: heal_after / 5000 }, event: None },
                ),
                FaultKind::Slow if a != b => {
                    let (delay_ms, for_ms) = (self.rng.random_range(500..4_000u64), heal_after / 1000);
                    self.schedule(at, Ev::Action { action: Action::Slow { a, b, delay_ms, for_ms }, event: None });
                }
                FaultKind::Silence if a != b => {
                    let action = Action::Silence { from: a, to: b, for_ms: heal_after / 1000 };
                    self.schedule(at, Ev::Action { action, event: None });
                }
                FaultKind::Crash => {
                    self.schedule(at, Ev::Action { action: Action::Crash { server: a }, event: None });
                    self.schedule(
                        at.plus_us(heal_after),
                        Ev::Action { action: Action::Restart { server: a }, event: None },
                    );
                }
                FaultKind::Lose => {
                    let budget = match self.scenario.cluster.durability {
                        Durability::Sync => usize::from(self.scenario.cluster.replicas),
                        Durability::Async => 0,
                    };
                    if planned_losses < budget {
                        planned_losses += 1;
                        self.schedule(at, Ev::Action { action: Action::Lose { server: a }, event: None });
                        self.schedule(
                            at.plus_us(heal_after),
                            Ev::Action { action: Action::Replace { server: a }, event: None },
                        );
                    }
                }
                FaultKind::HandEdit => {
                    self.schedule(
                        at,
                        Ev::RandomOp { server: a, mailbox: MailboxKey::new("user1", "INBOX"), roll: 1000 },
                    );
                }
                FaultKind::Corrupt => {
                    self.schedule(
                        at,
                        Ev::RandomOp { server: a, mailbox: MailboxKey::new("user1", "INBOX"), roll: 1001 },
                    );
                }
                _ => {}
            }
        }
    }
}

impl World {
    fn random_op(&mut self, server: Sid, mailbox: MailboxKey, roll: u32) {
        let flags = ["\\Seen", "\\Flagged", "\\Answered", "$Work"];
        let flag =
            |w: &mut World| Flag::new(flags[w.rng.random_range(0..flags.len())]).ok().into_iter().collect::<Vec<_>>();
        let action = match roll {
            0..45 => {
                let f = if self.rng.random_bool(0.3) { flag(self) } else { Vec::new() };
                Action::Save { server, mailbox, label: None, flags: f, size: self.rng.random_range(200..3000) }
            }
            // A quarter of the fresh reads (by the clock, leaving the generator's
            // sequence as it was) ask for STATUS counts instead.
            45..65 => match self.rng.random_bool(0.5) {
                true if (self.now.0 / 1000).is_multiple_of(4) => Action::Status { server, mailbox },
                fresh => Action::Read { server, mailbox, fresh },
            },
            65..82 => {
                let Some(label) = self.random_label_at(server, &mailbox) else { return };
                let (add, remove) =
                    if self.rng.random_bool(0.5) { (flag(self), Vec::new()) } else { (Vec::new(), flag(self)) };
                let unchanged_since = self.rng.random_bool(0.2).then_some(UnchangedSince::Current);
                Action::Store { server, mailbox, labels: vec![label], add, remove, unchanged_since }
            }
            82..88 => {
                let Some(label) = self.random_label_at(server, &mailbox) else { return };
                Action::Expunge { server, mailbox, labels: vec![label] }
            }
            88..94 => {
                let Some(label) = self.random_label_at(server, &mailbox) else { return };
                let to = MailboxKey::new(&mailbox.user, if &*mailbox.name == "INBOX" { "Box1" } else { "INBOX" });
                self.label_counter += 1;
                let as_label = Some(format!("auto{}", self.label_counter));
                Action::Copy { server, from: mailbox, label, to, as_label, moving: false }
            }
            94..100 => Action::MasterMove { server, mailbox },
            1000 => {
                if self.rng.random_bool(0.5) {
                    self.label_counter += 1;
                    Action::HandAdd { server, mailbox, label: Some(format!("auto{}", self.label_counter)) }
                } else {
                    let Some(label) = self.random_label_at(server, &mailbox) else { return };
                    Action::HandDelete { server, mailbox, label }
                }
            }
            _ => {
                let Some(label) = self.random_label_at(server, &mailbox) else { return };
                Action::Corrupt { server, label }
            }
        };
        self.act(action, None);
    }

    /// Live servers' view of a labelled message: (server, mailbox, record).
    fn copies_of(&self, label: &str) -> Vec<(Sid, MailboxKey, MessageRecord)> {
        let Some(guid) = self.labels.get(label) else { return Vec::new() };
        let mut out = Vec::new();
        for (sid, node) in &self.nodes {
            let Some(server) = &node.server else { continue };
            for (k, m) in &server.image().mailboxes {
                for r in m.messages.values() {
                    if r.guid == *guid {
                        out.push((*sid, k.clone(), r.clone()));
                    }
                }
            }
        }
        out
    }

    fn check_expectations(&mut self) {
        let live = self.live_servers();
        let expects = self.scenario.expects.clone();
        let mut failures = Vec::new();
        for (i, e) in self.scenario.events.iter().enumerate() {
            let Some(want) = e.expect else { continue };
            let got = self.answers.get(&i);
            let ok = match (want, got) {
                (ReplyExpect::Ok, Some(ClientReply::Write(WriteResult::Stored { rejected, .. }))) => {
                    rejected.is_empty()
                }
                (
                    ReplyExpect::Ok,
                    Some(ClientReply::Write(WriteResult::Failed { .. }) | ClientReply::Failed { .. }),
                ) => false,
                (ReplyExpect::Ok, Some(_)) => true,
                (ReplyExpect::Rejected, Some(ClientReply::Write(WriteResult::Stored { rejected, .. }))) => {
                    !rejected.is_empty()
                }
                (
                    ReplyExpect::Temporary,
                    Some(ClientReply::Write(WriteResult::Failed { kind: FailKind::Temporary, .. })),
                )
                | (ReplyExpect::Temporary, Some(ClientReply::Failed { kind: FailKind::Temporary, .. })) => true,
                (
                    ReplyExpect::Permanent,
                    Some(ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, .. })),
                )
                | (ReplyExpect::Permanent, Some(ClientReply::Failed { kind: FailKind::Permanent, .. })) => true,
                _ => false,
            };
            if !ok {
                failures.push(format!("line {}: expected the answer to be {want:?}, got {got:?}", e.line));
            }
        }
        for e in expects {
            match e {
                Expect::Invariants => {}
                Expect::Invariant(name) => {
                    if self.oracle.violated(&name) {
                        failures.push(format!("expected invariant {name} to hold"));
                    }
                }
                Expect::Root { server } => {
                    for sid in &live {
                        let root = self.nodes.get(sid).and_then(|n| n.server.as_ref()).and_then(|s| s.term().root);
                        if root != Some(server) {
                            failures.push(format!("expected root {server}, {sid} has {root:?}"));
                        }
                    }
                }
                Expect::Member { server, state } => {
                    for sid in &live {
                        let got =
                            self.nodes.get(sid).and_then(|n| n.server.as_ref()).and_then(|s| s.members().state(server));
                        if got != Some(state) {
                            failures.push(format!("expected {server} {}, {sid} has it {got:?}", state.name()));
                        }
                    }
                }
                Expect::NotUid { label, uid } => {
                    for (sid, k, r) in self.copies_of(&label) {
                        if r.uid == uid {
                            failures.push(format!("{label} still has UID {uid} in {k} on {sid}"));
                        }
                    }
                }
                Expect::Uid { label, uid } => {
                    let copies = self.copies_of(&label);
                    if copies.len() < live.len() || copies.iter().any(|c| c.2.uid != uid) {
                        failures.push(format!(
                            "expected {label} at UID {uid} everywhere, found {:?}",
                            copies.iter().map(|c| (c.0, c.2.uid)).collect::<Vec<_>>()
                        ));
                    }
                }
                Expect::Flags { label, flags } => {
                    let mut want: Vec<Flag> = flags.clone();
                    want.sort();
                    let copies = self.copies_of(&label);
                    if copies.is_empty() {
                        failures.push(format!("{label} is on no server"));
                    }
                    for (sid, _, r) in copies {
                        if r.present_flags() != want {
                            failures
                                .push(format!("{label} on {sid} has flags {:?}, expected {want:?}", r.present_flags()));
                        }
                    }
                }
                Expect::Present { label } => {
                    let holders: BTreeSet<Sid> = self.copies_of(&label).iter().map(|c| c.0).collect();
                    for sid in &live {
                        if !holders.contains(sid) {
                            failures.push(format!("{label} is missing on {sid}"));
                        }
                    }
                }
                Expect::Absent { label } => {
                    if let Some((sid, k, r)) = self.copies_of(&label).first() {
                        failures.push(format!("{label} is still live in {k} at UID {} on {sid}", r.uid));
                    }
                }
                Expect::Mark { name, min, max } => {
                    let mut total = self.dead_marks.get(&name).copied().unwrap_or(0);
                    for node in self.nodes.values() {
                        if let (Some(s), Some(m)) = (&node.server, Mark::from_name(&name)) {
                            total += s.marks().count(m);
                        }
                    }
                    if total < min {
                        failures.push(format!("coverage mark {name} hit {total} times, expected at least {min}"));
                    }
                    if let Some(max) = max.filter(|max| total > *max) {
                        failures.push(format!("coverage mark {name} hit {total} times, expected at most {max}"));
                    }
                }
                Expect::ExactlyOneOk { events } => {
                    let oks = events
                        .iter()
                        .filter(|id| {
                            let idx = self.scenario.events.iter().position(|e| e.id.as_deref() == Some(id.as_str()));
                            match idx.and_then(|i| self.answers.get(&i)) {
                                Some(ClientReply::Write(WriteResult::Stored { rejected, .. })) => rejected.is_empty(),
                                Some(ClientReply::Write(WriteResult::Failed { .. }))
                                | Some(ClientReply::Failed { .. })
                                | None => false,
                                Some(_) => true,
                            }
                        })
                        .count();
                    if oks != 1 {
                        failures.push(format!("expected exactly one of {events:?} to succeed, {oks} did"));
                    }
                }
                Expect::Count { mailbox, count } => {
                    for sid in &live {
                        let n = self.stored_mailbox(*sid, &mailbox).map(|m| m.messages.len()).unwrap_or(0);
                        if n != count {
                            failures.push(format!("{mailbox} on {sid} holds {n} messages, expected {count}"));
                        }
                    }
                }
                Expect::Validity { mailbox, uidvalidity } => {
                    for sid in &live {
                        let v = self.stored_mailbox(*sid, &mailbox).map(|m| m.uidvalidity);
                        if v != Some(uidvalidity) {
                            failures.push(format!("{mailbox} on {sid} has UIDVALIDITY {v:?}, expected {uidvalidity}"));
                        }
                    }
                }
                Expect::Tombstones { mailbox, count } => {
                    for sid in &live {
                        let n = self.stored_mailbox(*sid, &mailbox).map(|m| m.tombstones.len()).unwrap_or(0);
                        if n != count {
                            failures.push(format!("{mailbox} on {sid} holds {n} tombstones, expected {count}"));
                        }
                    }
                }
                Expect::SpecialUse { mailbox, special_use } => {
                    for sid in &live {
                        let given = self.stored_mailbox(*sid, &mailbox).and_then(|m| m.lifecycle.special_use());
                        if given.unwrap_or_default() != special_use {
                            failures
                                .push(format!("{mailbox} on {sid}: special use {given:?}, expected {special_use:?}"));
                        }
                    }
                }
                Expect::Visible { mailbox, visible } => {
                    for sid in &live {
                        let shown = self.stored_mailbox(*sid, &mailbox).is_some_and(|m| m.visible());
                        if shown != visible {
                            failures.push(format!("{mailbox} on {sid}: shown {shown}, expected {visible}"));
                        }
                    }
                }
                Expect::BodyHeld { server, label, held } => {
                    let Some(guid) = self.labels.get(&label).copied() else {
                        failures.push(format!("{label} was never saved"));
                        continue;
                    };
                    match self.nodes.get(&server).and_then(|n| n.server.as_ref()) {
                        None => failures.push(format!("{server} is not running at the end")),
                        Some(s) => {
                            let here = s.image().bodies.contains_key(&guid);
                            let record = self.copies_of(&label).iter().any(|(sid, _, _)| *sid == server);
                            if !record {
                                failures.push(format!("{server} holds no record of {label}"));
                            } else if here != held {
                                failures.push(format!("{server} holds the body of {label}: {here}, expected {held}"));
                            }
                        }
                    }
                }
                Expect::Renumbered { labels } => {
                    for label in labels {
                        let Some(guid) = self.labels.get(&label).copied() else {
                            failures.push(format!("{label} was never saved"));
                            continue;
                        };
                        for (sid, k, r) in self.copies_of(&label) {
                            match self.oracle.first_uid(&k, guid) {
                                Some(first) if first != r.uid => {}
                                Some(first) => {
                                    failures.push(format!("{label} on {sid} still has its first UID {first}"))
                                }
                                None => failures.push(format!("no client ever saw {label}")),
                            }
                        }
                    }
                }
            }
        }
        self.failures.extend(failures);
    }
}

/// Runs one scenario.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> RunReport {
    World::new(scenario, opts).run()
}

/// The first part of two images that differs, for a failure message.
impl World {
    /// Debug builds: what a server shows a reader is exactly what its disk holds now
    /// (it is told of every write on disk; later writes are in its image only).
    fn check_durable_reads(&mut self, sid: Sid) {
        let Some(node) = self.nodes.get(&sid) else { return };
        let Some(server) = node.server.as_ref() else { return };
        let keys: BTreeSet<&MailboxKey> = server.image().mailboxes.keys().chain(node.disk.mailboxes.keys()).collect();
        for key in keys {
            let expected = match node.disk.mailboxes.get(key).filter(|m| m.visible()) {
                Some(m) => ClientReply::Read(tandem_core::server::mailbox_view(key, m)),
                None => ClientReply::Failed { kind: FailKind::Permanent, reason: format!("no mailbox {key}") },
            };
            let shown = server.read(key);
            if shown != expected {
                self.failures.push(format!(
                    "{sid} shows {key} otherwise than its disk holds it: shown {shown:?}, on disk {expected:?}"
                ));
                return;
            }
        }
    }
}

fn image_difference(replayed: Option<&DiskImage>, image: &DiskImage) -> String {
    let Some(replayed) = replayed else { return "no replay".into() };
    for (k, m) in &image.mailboxes {
        match replayed.mailboxes.get(k) {
            None => return format!("mailbox {k} is not in the writes"),
            Some(r) if r != m => return format!("mailbox {k}: image {m:?} writes {r:?}"),
            _ => {}
        }
    }
    if let Some(k) = replayed.mailboxes.keys().find(|k| !image.mailboxes.contains_key(*k)) {
        return format!("mailbox {k} is only in the writes");
    }
    if replayed.bodies != image.bodies {
        return "bodies".into();
    }
    if replayed.logs != image.logs {
        return format!("logs: image {:?} writes {:?}", image.logs, replayed.logs);
    }
    if replayed.collected != image.collected {
        return format!("collected bindings: image {:?} writes {:?}", image.collected, replayed.collected);
    }
    format!(
        "epoch {}/{} link_seq {}/{} incarnation {}/{}",
        image.epoch, replayed.epoch, image.link_seq, replayed.link_seq, image.incarnation, replayed.incarnation
    )
}

/// The trace hash of a client reply at `t`. A read's view is hashed field by field (a
/// word at a time): formatting a whole mailbox's view as text, as the other replies are,
/// cost a tenth of the simulator's time.
fn reply_hash(t: u64, reply: &ClientReply) -> u64 {
    let mut h = Fnv64::default();
    h.write(&t.to_le_bytes());
    let (view, kind) = match reply {
        ClientReply::Read(view) => (view, "Read"),
        ClientReply::FreshRead { view, caught_up: true } => (view, "FreshRead"),
        ClientReply::FreshRead { view, caught_up: false } => (view, "StaleRead"),
        _ => {
            let _ = std::fmt::Write::write_fmt(&mut h, format_args!("{reply:?}"));
            return h.0;
        }
    };
    let _ = std::fmt::Write::write_fmt(&mut h, format_args!("{kind} {}", view.mailbox));
    let mut x = mix64(h.0 ^ u64::from(view.uidvalidity));
    x = mix64(x ^ u64::from(view.uidnext));
    x = mix64(x ^ view.highest_modseq);
    for m in &view.messages {
        x = mix64(x ^ u64::from(m.uid));
        x = mix64(x ^ (m.guid.0 as u64));
        x = mix64(x ^ ((m.guid.0 >> 64) as u64));
        x = mix64(x ^ m.modseq);
        x = mix64(x ^ m.received);
        x = mix64(x ^ u64::from(m.size));
        for f in &m.flags {
            x = mix64(x ^ fnv64(&[f.as_str().as_bytes()]));
        }
        x = mix64(x ^ m.flags.len() as u64);
    }
    x
}

/// A schedule step that runs every event up to `ms` in time order (a checker's start).
pub fn schedule_until(ms: u64) -> String {
    format!("until {ms} ms")
}

/// The time of a step made by [`schedule_until`].
fn schedule_until_ms(step: &str) -> Option<u64> {
    step.strip_prefix("until ")?.strip_suffix(" ms")?.parse().ok()
}

/// `text` with every `Instant(N)` written as its distance from `now` (see
/// `World::timeless_key`).
fn relative_instants(text: &str, now: u64) -> String {
    const MARK: &str = "Instant(";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let (head, tail) = rest.split_at(at + MARK.len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<u64>() {
            Ok(n) if n >= now => out.push_str(&format!("+{}", n - now)),
            Ok(n) => out.push_str(&format!("-{}", now - n)),
            Err(_) => {}
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}
