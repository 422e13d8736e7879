//! Scenario files: a cluster, a seed, timed events and expectations, in TOML. The format,
//! every key, op and check, is described in `scenarios/README.md`.
//!
//! `parse` reads a file with serde into `scenario_file::FileToml` and the tables in it,
//! where every key is optional, then checks what serde cannot: which keys each op and
//! check takes, that named servers belong to the cluster, ranges, and references between
//! tables. A bad file gets an error naming the line and what was expected there.

use crate::scenario_file::{
    ClusterToml, EventToml, ExpectToml, FileToml, GRANULARITIES, LaptopToml, MODES, ModseqToml, RangeToml, ServersToml,
};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use tandem_core::{Durability, Flag, Granularity, MailboxKey, Sid, SpecialUse};
use toml::Spanned;

#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub path: Option<PathBuf>,
    pub seed: u64,
    /// Pass every peer message through the wire codec.
    pub wire: bool,
    pub cluster: ClusterSpec,
    pub events: Vec<TimedEvent>,
    pub expects: Vec<Expect>,
    /// After the last event (and the automatic heal), the cluster must converge within
    /// this much simulated time.
    pub settle_ms: u64,
    /// Heal every link and restart every crashed (not lost) server after the last event.
    pub heal_at_end: bool,
    /// A model checker's counterexample (see `check`): the streams whose next event runs,
    /// one per step, from the first event on; the run goes on in time order after it.
    pub schedule: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpec {
    pub servers: Vec<Sid>,
    /// Cluster servers that hold bodies above a size only on demand (see
    /// `tandem_core::partial`: a server's spec has only `body_bytes_max` and
    /// `keep_fetched`).
    pub partial_servers: BTreeMap<Sid, tandem_core::partial::Partial>,
    /// Servers that exist (with links to every server) but are neither started nor
    /// members until a `member_add` names them.
    pub spares: Vec<Sid>,
    pub replicas: u8,
    pub durability: Durability,
    pub log_capacity: usize,
    pub granularity: Granularity,
    /// Default one-way latency range of a link, in milliseconds.
    pub latency_ms: (u64, u64),
    /// None: a full mesh with the default latency.
    pub links: Option<Vec<LinkSpec>>,
    /// Time for a group commit to reach the disk, in microseconds.
    pub disk_latency_us: (u64, u64),
    /// Client request timeout in the servers' configuration.
    pub request_timeout_ms: u64,
    /// How long copies must agree before a master collects tombstones (see
    /// `Config::tombstone_grace_us`).
    pub tombstone_grace_ms: u64,
    /// How long a started server waits to hear every peer before it acts alone (see
    /// `Config::startup_hold_us`).
    pub startup_hold_ms: u64,
    /// Clients retry a delivery that failed for now (or whose server went down before
    /// answering) after this long, at the next server, with the same bytes, as an MTA
    /// does with several MX hosts; None: they give up.
    pub mta_retry_ms: Option<u64>,
    /// User replicas (laptops): servers of their own, outside the cluster, each kept in
    /// sync with its user's mailboxes by a `replicate` op's agent.
    pub laptops: Vec<LaptopSpec>,
}

/// One user replica: a server outside the cluster holding one user's mailboxes.
#[derive(Clone, Debug, PartialEq)]
pub struct LaptopSpec {
    pub sid: Sid,
    pub user: String,
    /// The cluster server its agent talks to, unless a `replicate` op names another.
    pub home: Sid,
    /// One-way latency between the laptop and any cluster server, in milliseconds.
    pub latency_ms: (u64, u64),
    /// What part of its user's mail it holds (None: all).
    pub partial: Option<tandem_core::partial::Partial>,
}

/// The simulator's clock at 0 in seconds since the Unix epoch: a message saved at
/// simulated time t is received at this plus t.
pub const SIM_EPOCH_S: u64 = 1_700_000_000;

/// A laptop's default one-way latency to the cluster: a home connection's.
pub const LAPTOP_LATENCY_MS_DEFAULT: (u64, u64) = (10, 40);

/// The simulator's default tombstone grace: longer than a message can travel here (32
/// relay hops at 100 ms, the slowest latency the explorer draws), short enough that
/// scenarios collect tombstones while they settle.
pub const TOMBSTONE_GRACE_MS_DEFAULT: u64 = 5000;

/// The core's default start-up hold.
pub const STARTUP_HOLD_MS_DEFAULT: u64 = tandem_core::Config::STARTUP_HOLD_US_DEFAULT / 1000;

#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    pub a: Sid,
    pub b: Sid,
    pub latency_ms: Option<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TimedEvent {
    pub at_ms: u64,
    /// Name used by expectations such as `exactly_one_ok`.
    pub id: Option<String>,
    pub action: Action,
    /// What the client answer must be.
    pub expect: Option<ReplyExpect>,
    /// Line in the scenario file, for messages.
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum UnchangedSince {
    /// The modseq the executing server shows for the message when the op runs.
    Current,
    Value(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Partition,
    Cut,
    Crash,
    Flap,
    HandEdit,
    Corrupt,
    Lose,
    /// A link's latency rises to seconds for a while.
    Slow,
    /// One direction of a link carries nothing while its connection stays open, until
    /// the side that hears nothing drops it.
    Silence,
    /// A connection reset noticed at one end before the other (see `Action::Reset`).
    Reset,
}

impl Action {
    /// A fault (links, crashes, disks, hand edits, membership) rather than a client's
    /// request.
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            Action::Save { .. }
                | Action::Import { .. }
                | Action::Copy { .. }
                | Action::Expunge { .. }
                | Action::Store { .. }
                | Action::Read { .. }
                | Action::FetchBody { .. }
                | Action::Status { .. }
                | Action::MasterMove { .. }
                | Action::CreateMailbox { .. }
                | Action::DeleteMailbox { .. }
                | Action::RenameMailbox { .. }
                | Action::RandomWorkload { .. }
                | Action::Replicate { .. }
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A user replica's agent syncs the laptop `server` with its user's mailboxes on the
    /// cluster, through `home` (or the laptop's configured home server).
    Replicate {
        server: Sid,
        home: Option<Sid>,
    },
    /// A client delivers a new message; `label` names it for later events.
    Save {
        server: Sid,
        mailbox: MailboxKey,
        label: Option<String>,
        flags: Vec<Flag>,
        size: usize,
    },
    /// A message migrated from another server (`tandem import`) at the UIDVALIDITY and
    /// UID it had there; the same label imported again sends the same bytes (a resumed
    /// import).
    Import {
        server: Sid,
        mailbox: MailboxKey,
        label: String,
        uidvalidity: u32,
        uid: u32,
        flags: Vec<Flag>,
        size: usize,
    },
    /// IMAP COPY, or (`moving`, the file's `move` op) IMAP MOVE as a server does it: the
    /// copy, then, once it is answered, the source's EXPUNGE at the same server.
    Copy {
        server: Sid,
        from: MailboxKey,
        label: String,
        to: MailboxKey,
        as_label: Option<String>,
        moving: bool,
    },
    Expunge {
        server: Sid,
        mailbox: MailboxKey,
        labels: Vec<String>,
    },
    Store {
        server: Sid,
        mailbox: MailboxKey,
        labels: Vec<String>,
        add: Vec<Flag>,
        remove: Vec<Flag>,
        unchanged_since: Option<UnchangedSince>,
    },
    /// A client reads the mailbox (the user sees its UIDs); `fresh`: after every
    /// change the mailbox's master had ordered (`ClientRequest::FreshRead`).
    Read {
        server: Sid,
        mailbox: MailboxKey,
        fresh: bool,
    },
    /// A client reads a message's body (IMAP FETCH BODY[]): on a partial laptop one it
    /// omitted is answered with a temporary failure and brought by its next sync.
    FetchBody {
        server: Sid,
        mailbox: MailboxKey,
        label: String,
    },
    /// A client asks for the mailbox's STATUS counts, fresh as a fresh read is
    /// (`ClientRequest::FreshStatus`).
    Status {
        server: Sid,
        mailbox: MailboxKey,
    },
    MasterMove {
        server: Sid,
        mailbox: MailboxKey,
    },
    /// IMAP CREATE of an empty mailbox.
    CreateMailbox {
        server: Sid,
        mailbox: MailboxKey,
        /// CREATE-SPECIAL-USE: the uses the mailbox is created with (none for a plain
        /// CREATE).
        special_use: SpecialUse,
    },
    /// IMAP DELETE: every message expunged, the mailbox hidden.
    DeleteMailbox {
        server: Sid,
        mailbox: MailboxKey,
    },
    /// IMAP RENAME: every message of `from` moves to `to`, `from` is deleted.
    RenameMailbox {
        server: Sid,
        from: MailboxKey,
        to: MailboxKey,
    },
    Cut {
        a: Sid,
        b: Sid,
    },
    Restore {
        a: Sid,
        b: Sid,
    },
    /// The connection `a`-`b` is reset: `a` notices at once, `b` only after what `a` had
    /// sent before has reached it (its own sends since are lost); both reconnect after
    /// `down_ms`. What `b` acknowledged into the void, `a` sends again: duplicates.
    Reset {
        a: Sid,
        b: Sid,
        down_ms: u64,
    },
    /// Cut every link of the server.
    Isolate {
        server: Sid,
    },
    /// Only links inside a group stay up.
    Partition {
        groups: Vec<Vec<Sid>>,
    },
    /// Restore every link.
    Heal,
    /// The connection breaks and comes back after `down_ms`.
    Flap {
        a: Sid,
        b: Sid,
        down_ms: u64,
    },
    /// The link's latency becomes `delay_ms` (to 1.5 times that) for `for_ms`: a
    /// congested or satellite link.
    Slow {
        a: Sid,
        b: Sid,
        delay_ms: u64,
        for_ms: u64,
    },
    /// What `from` sends to `to` is lost for `for_ms` while the connection stays open
    /// (a half-open TCP connection, a middlebox that drops one direction); then `to`,
    /// having heard nothing, drops the connection and both reconnect.
    Silence {
        from: Sid,
        to: Sid,
        for_ms: u64,
    },
    Crash {
        server: Sid,
    },
    Restart {
        server: Sid,
    },
    /// Permanent loss of the server with its disk.
    Lose {
        server: Sid,
    },
    /// A new, empty server takes the lost one's id and joins.
    Replace {
        server: Sid,
    },
    /// The operator backs the server's store up (`tandem backup`): what is durable now.
    Backup {
        server: Sid,
    },
    /// The operator stops the server and puts its last backup in place of its store; a
    /// `restart` starts it again.
    RestoreBackup {
        server: Sid,
    },
    /// An operator at `server` adds `member` to the cluster (`tandem member add`) and
    /// starts it (empty) if it is a spare that never ran.
    MemberAdd {
        server: Sid,
        member: Sid,
    },
    /// An operator at `server` retires `member`: it hands its work over and retires
    /// itself; `lost`: it is lost for good (with its disk) and retired at once.
    MemberRemove {
        server: Sid,
        member: Sid,
        lost: bool,
    },
    /// A message file dropped into the store by hand.
    HandAdd {
        server: Sid,
        mailbox: MailboxKey,
        label: Option<String>,
    },
    /// A message file deleted by hand.
    HandDelete {
        server: Sid,
        mailbox: MailboxKey,
        label: String,
    },
    /// A message body corrupted on disk.
    Corrupt {
        server: Sid,
        label: String,
    },
    RandomWorkload {
        until_ms: u64,
        ops_per_s: u64,
        users: u32,
        mailboxes: u32,
        servers: Option<Vec<Sid>>,
    },
    RandomFaults {
        until_ms: u64,
        count: u32,
        kinds: Vec<FaultKind>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyExpect {
    Ok,
    Temporary,
    Permanent,
    /// A CONDSTORE STORE that was rejected for at least one message.
    Rejected,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// Every oracle invariant (they are always checked; this just says so).
    Invariants,
    /// One oracle invariant by name: no_acked_loss, uids_never_reused, monotonic,
    /// flags_agree, convergence.
    Invariant(String),
    /// The given server is root on every live server at the end.
    Root { server: Sid },
    /// At the end no live server has the message at this UID.
    NotUid { label: String, uid: u32 },
    /// At the end every live server has the message at this UID.
    Uid { label: String, uid: u32 },
    /// At the end every live server shows exactly these flags on the message.
    Flags { label: String, flags: Vec<Flag> },
    /// Live on every live server at the end.
    Present { label: String },
    /// Live on no server at the end.
    Absent { label: String },
    /// A coverage mark hit at least `min` and at most `max` times in the whole cluster
    /// (`max = 0`: a path that must not be taken, such as a renumbering).
    Mark { name: String, min: u64, max: Option<u64> },
    /// Of these events' client answers exactly one is OK (not rejected, not failed).
    ExactlyOneOk { events: Vec<String> },
    /// Every live server holds this many messages in the mailbox at the end.
    Count { mailbox: MailboxKey, count: usize },
    /// Every live server's copy of the mailbox has this UIDVALIDITY at the end.
    Validity { mailbox: MailboxKey, uidvalidity: u32 },
    /// Every live server holds this many tombstones in the mailbox at the end (0: all
    /// collected).
    Tombstones { mailbox: MailboxKey, count: usize },
    /// Whether every live server shows the mailbox (after CREATE/DELETE).
    Visible { mailbox: MailboxKey, visible: bool },
    /// Whether `server` holds the message's body at the end (a partial server leaves
    /// some out: its record is there either way).
    BodyHeld { server: Sid, label: String, held: bool },
    /// Every named message ends on a UID other than the first one a client saw for it.
    Renumbered { labels: Vec<String> },
    /// Every live server gives the mailbox these special uses (none: no client gave it
    /// one).
    SpecialUse { mailbox: MailboxKey, special_use: SpecialUse },
    /// Every live member's membership gives `server` this state at the end.
    Member { server: Sid, state: tandem_core::MemberState },
}

// ---------------------------------------------------------------------------------------
// The file's keys: where they are, and which each op and check takes
// ---------------------------------------------------------------------------------------

/// The keys of one table, each with where it is written.
type Keys = BTreeMap<Spanned<String>, IgnoredAny>;

/// Where a file's tables and keys are, read apart from their values: serde's errors carry a
/// position but not the table or key they arose in, and `parse` names the line of a key.
#[derive(Deserialize)]
struct Outline {
    #[serde(default)]
    cluster: Keys,
    #[serde(default)]
    event: Vec<Spanned<Keys>>,
    #[serde(default)]
    expect: Vec<Spanned<Keys>>,
}

const EVENT_COMMON: &[&str] = &["at_ms", "op", "id", "expect"];

/// Every op with the keys it takes besides `EVENT_COMMON`.
const OPS: &[(&str, &[&str])] = &[
    ("save", &["server", "mailbox", "label", "flags", "size"]),
    ("import", &["server", "mailbox", "label", "uidvalidity", "uid", "flags", "size"]),
    ("copy", &["server", "from", "label", "to", "as_label"]),
    ("move", &["server", "from", "label", "to", "as_label"]),
    ("expunge", &["server", "mailbox", "labels", "label"]),
    ("store", &["server", "mailbox", "labels", "label", "add", "remove", "unchanged_since"]),
    ("read", &["server", "mailbox", "fresh"]),
    ("fetch_body", &["server", "mailbox", "label"]),
    ("status", &["server", "mailbox"]),
    ("master_move", &["server", "mailbox"]),
    ("create_mailbox", &["server", "mailbox", "special_use"]),
    ("delete_mailbox", &["server", "mailbox"]),
    ("rename_mailbox", &["server", "from", "to"]),
    ("replicate", &["server", "home"]),
    ("cut", &["a", "b"]),
    ("restore", &["a", "b"]),
    ("isolate", &["server"]),
    ("partition", &["groups"]),
    ("heal", &[]),
    ("flap", &["a", "b", "down_ms"]),
    ("reset", &["a", "b", "down_ms"]),
    ("slow", &["a", "b", "delay_ms", "for_ms"]),
    ("silence", &["a", "b", "for_ms"]),
    ("crash", &["server"]),
    ("restart", &["server"]),
    ("lose", &["server"]),
    ("replace", &["server"]),
    ("backup", &["server"]),
    ("restore_backup", &["server"]),
    ("member_add", &["server", "member"]),
    ("member_remove", &["server", "member", "lost"]),
    ("hand_add", &["server", "mailbox", "label"]),
    ("hand_delete", &["server", "mailbox", "label"]),
    ("corrupt", &["server", "label"]),
    ("random_workload", &["until_ms", "ops_per_s", "users", "mailboxes", "servers"]),
    ("random_faults", &["until_ms", "count", "kinds"]),
];

/// Every check with the keys it takes besides `check`.
const CHECKS: &[(&str, &[&str])] = &[
    ("invariants", &[]),
    ("invariant", &["name"]),
    ("root", &["server"]),
    ("not_uid", &["label", "uid"]),
    ("uid", &["label", "uid"]),
    ("flags", &["label", "flags"]),
    ("present", &["label"]),
    ("absent", &["label"]),
    ("mark", &["name", "min", "max"]),
    ("exactly_one_ok", &["events"]),
    ("count", &["mailbox", "count"]),
    ("uidvalidity", &["mailbox", "uidvalidity"]),
    ("tombstones", &["mailbox", "count"]),
    ("visible", &["mailbox", "visible"]),
    ("body_held", &["server", "label", "held"]),
    ("renumbered", &["labels"]),
    ("special_use", &["mailbox", "special_use"]),
    ("member", &["server", "state"]),
];

/// The words of a member's state.
const MEMBER_STATES: &[(&str, tandem_core::MemberState)] = &[
    ("active", tandem_core::MemberState::Active),
    ("leaving", tandem_core::MemberState::Leaving),
    ("retired", tandem_core::MemberState::Retired),
];

const INVARIANTS: &[&str] = &crate::oracle::INVARIANTS;

const ALL_BUT_LOSE: &[FaultKind] =
    &[FaultKind::Partition, FaultKind::Cut, FaultKind::Crash, FaultKind::Flap, FaultKind::HandEdit, FaultKind::Corrupt];

const SERVER: &str = "a server name like \"s2\"";
const MAILBOX: &str = "a mailbox \"user/name\" (both parts non-empty)";
const LABEL: &str = "a message label";

// ---------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------

/// A scenario file that could not be read or parsed: where, and what was expected there.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioError {
    pub path: Option<PathBuf>,
    /// 1-based; 0 when the error concerns the whole file (e.g. it cannot be read).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}:{}: {}", p.display(), self.line, self.message),
            None => write!(f, "<scenario>:{}: {}", self.line, self.message),
        }
    }
}

impl std::error::Error for ScenarioError {}

/// The scenario files (`*.toml`) of a directory, sorted by name.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads a scenario file and parses it.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
        path: Some(path.to_path_buf()),
        line: 0,
        message: format!("cannot read the scenario file: {e}"),
    })?;
    parse(&text, Some(path))
}

/// Parses a scenario file's text. `path` is used for the default name (the file stem)
/// and in error messages.
pub fn parse(text: &str, path: Option<&Path>) -> Result<Scenario, ScenarioError> {
    let mut cx = Cx { text, path: path.map(Path::to_path_buf), places: Vec::new() };
    // Every TOML document is a table of keys: failing that, the text is not TOML.
    let root: Keys = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| cx.line_at(s.start));
        cx.err(line, format!("TOML syntax: {}", e.message().trim_end()))
    })?;
    let outline = toml::from_str::<Outline>(text);
    cx.places = places(&root, outline.as_ref().ok());
    let file: FileToml = toml::from_str(text).map_err(|e| cx.serde_error(&e))?;
    let outline = outline.map_err(|e| cx.serde_error(&e))?;

    let top = Tab { cx: &cx, what: "top level".to_string(), line: 1, keys: &root, servers: &[] };
    let name = match file.name {
        Some(name) if name.is_empty() => return Err(top.bad("name", "a non-empty string", name)),
        Some(name) => name,
        None => path
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".to_string()),
    };
    let Some(cluster) = file.cluster else {
        return Err(cx.err(1, "missing `[cluster]` table (at least `servers = N`)".to_string()));
    };
    let line = top.line_of("cluster");
    let cluster = Tab { what: "[cluster]".to_string(), line, keys: &outline.cluster, ..top }.cluster(cluster)?;
    let all_servers: Vec<Sid> =
        cluster.servers.iter().chain(&cluster.spares).copied().chain(cluster.laptops.iter().map(|l| l.sid)).collect();

    let mut events = Vec::with_capacity(file.event.len());
    let mut ids: Vec<String> = Vec::new();
    for (i, (event, at)) in file.event.into_iter().zip(&outline.event).enumerate() {
        let line = cx.line_at(at.span().start);
        let tab = Tab { cx: &cx, what: format!("event {}", i + 1), line, keys: at.get_ref(), servers: &all_servers };
        let event = tab.event(event)?;
        if let Action::Replicate { server, home } = &event.action {
            if !cluster.laptops.iter().any(|l| l.sid == *server) {
                return Err(tab.bad("server", "a laptop of `[cluster] laptops`", server.to_string()));
            }
            if home.is_some_and(|h| !cluster.servers.contains(&h) && !cluster.spares.contains(&h)) {
                return Err(tab.bad("home", "a server of the cluster", home.map(|h| h.to_string())));
            }
        }
        if let Some(id) = &event.id {
            if ids.contains(id) {
                return Err(tab.err(tab.line_of("id"), format!("duplicate event id {id:?}")));
            }
            ids.push(id.clone());
        }
        events.push(event);
    }
    events.sort_by_key(|e| e.at_ms);

    let mut expects = Vec::with_capacity(file.expect.len());
    for (i, (expect, at)) in file.expect.into_iter().zip(&outline.expect).enumerate() {
        let line = cx.line_at(at.span().start);
        let tab = Tab { cx: &cx, what: format!("expect {}", i + 1), line, keys: at.get_ref(), servers: &all_servers };
        expects.push(tab.expect(expect, &ids)?);
    }

    Ok(Scenario {
        name,
        path: path.map(Path::to_path_buf),
        seed: file.seed.unwrap_or(1),
        wire: file.wire.unwrap_or(false),
        cluster,
        events,
        expects,
        settle_ms: file.settle_ms.unwrap_or(60_000),
        heal_at_end: file.heal_at_end.unwrap_or(true),
        schedule: file.schedule,
    })
}

/// Where a table or key starts: (byte offset, table, key).
type Place = (usize, String, Option<String>);

/// Every table and key of the file, by position.
fn places(root: &Keys, outline: Option<&Outline>) -> Vec<Place> {
    fn add(places: &mut Vec<Place>, table: &str, keys: &Keys) {
        places.extend(keys.keys().map(|k| (k.span().start, table.to_string(), Some(k.get_ref().clone()))));
    }
    let mut places = Vec::new();
    add(&mut places, "top level", root);
    if let Some(outline) = outline {
        add(&mut places, "[cluster]", &outline.cluster);
        for (kind, tables) in [("event", &outline.event), ("expect", &outline.expect)] {
            for (i, table) in tables.iter().enumerate() {
                let name = format!("{kind} {}", i + 1);
                places.push((table.span().start, name.clone(), None));
                add(&mut places, &name, table.get_ref());
            }
        }
    }
    places.sort_by_key(|p| p.0);
    places
}

/// The text being parsed, for the positions in messages.
struct Cx<'t> {
    text: &'t str,
    path: Option<PathBuf>,
    places: Vec<Place>,
}

impl Cx<'_> {
    fn line_at(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn err(&self, line: usize, message: String) -> ScenarioError {
        ScenarioError { path: self.path.clone(), line, message }
    }

    /// A serde error, with the table and key it arose in: the last place at or before it.
    fn serde_error(&self, e: &toml::de::Error) -> ScenarioError {
        let message = e.message().trim_end();
        let Some(at) = e.span().map(|s| s.start) else { return self.err(0, message.to_string()) };
        let message = match self.places.iter().rev().find(|p| p.0 <= at) {
            // An unknown field's message names it already.
            Some((_, table, Some(key))) if !message.contains(&format!("`{key}`")) => {
                format!("{table}: `{key}`: {message}")
            }
            Some((_, table, _)) => format!("{table}: {message}"),
            None => message.to_string(),
        };
        self.err(self.line_at(at), message)
    }
}

/// A table being checked: its name in messages, its first line, where its keys are, and
/// the servers of the cluster (empty until the cluster is known).
struct Tab<'a> {
    cx: &'a Cx<'a>,
    what: String,
    line: usize,
    keys: &'a Keys,
    servers: &'a [Sid],
}

impl Tab<'_> {
    fn err(&self, line: usize, message: String) -> ScenarioError {
        self.cx.err(line, format!("{}: {message}", self.what))
    }

    /// The line of `key`, or the table's when the key is absent.
    fn line_of(&self, key: &str) -> usize {
        self.keys.get_key_value(key).map_or(self.line, |(k, _)| self.cx.line_at(k.span().start))
    }

    /// "`key` must be EXPECTED; got VALUE" at the key's line.
    fn bad(&self, key: &str, expected: &str, got: impl fmt::Debug) -> ScenarioError {
        self.err(self.line_of(key), format!("`{key}` must be {expected}; got {got:?}"))
    }

    /// Like `bad`, for one entry of a list.
    fn bad_item(&self, key: &str, item: &Spanned<String>, expected: &str) -> ScenarioError {
        let line = self.cx.line_at(item.span().start);
        self.err(line, format!("each entry of `{key}` must be {expected}; got {:?}", item.get_ref()))
    }

    fn missing(&self, key: &str, expected: &str) -> ScenarioError {
        self.err(self.line, format!("missing `{key}` ({expected})"))
    }

    fn req<T>(&self, value: Option<T>, key: &str, expected: &str) -> Result<T, ScenarioError> {
        value.ok_or_else(|| self.missing(key, expected))
    }

    /// Keys that the table's op or check does not take (serde knows only those of all of
    /// them), the first written first.
    fn check_keys(&self, allowed: &[&str]) -> Result<(), ScenarioError> {
        let unknown =
            self.keys.keys().filter(|k| !allowed.contains(&k.get_ref().as_str())).min_by_key(|k| k.span().start);
        let Some(key) = unknown else { return Ok(()) };
        let allowed: Vec<String> = allowed.iter().map(|k| format!("`{k}`")).collect();
        let message = format!("unknown field `{}`, expected one of {}", key.get_ref(), allowed.join(", "));
        Err(self.err(self.cx.line_at(key.span().start), message))
    }

    /// One of `choices`, by name.
    fn choice<T: Copy>(
        &self,
        name: Option<String>,
        key: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, ScenarioError> {
        let Some(name) = name else { return Ok(None) };
        match choices.iter().find(|(n, _)| *n == name) {
            Some((_, choice)) => Ok(Some(*choice)),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                Err(self.bad(key, &format!("one of {}", names.join(", ")), name))
            }
        }
    }

    fn int_in(&self, value: Option<u64>, key: &str, range: RangeInclusive<u64>) -> Result<Option<u64>, ScenarioError> {
        match value {
            Some(n) if !range.contains(&n) => {
                Err(self.bad(key, &format!("an integer from {} to {}", range.start(), range.end()), n))
            }
            value => Ok(value),
        }
    }

    fn range(&self, value: Option<RangeToml>, key: &str) -> Result<Option<(u64, u64)>, ScenarioError> {
        match value {
            None => Ok(None),
            Some(RangeToml::Exact(n)) => Ok(Some((n, n))),
            Some(RangeToml::Span(lo, hi)) if lo <= hi => Ok(Some((lo, hi))),
            Some(RangeToml::Span(lo, hi)) => Err(self.bad(key, "a range [min, max] with min <= max", [lo, hi])),
        }
    }

    /// A non-empty string, if given.
    fn label(&self, value: Option<&str>, key: &str) -> Result<Option<String>, ScenarioError> {
        match value {
            Some("") => Err(self.bad(key, LABEL, "")),
            value => Ok(value.map(str::to_string)),
        }
    }

    fn req_label(&self, value: Option<&str>, key: &str) -> Result<String, ScenarioError> {
        self.req(self.label(value, key)?, key, LABEL)
    }

    /// A non-empty list of labels.
    fn label_list(&self, list: Option<Vec<String>>, key: &str) -> Result<Vec<String>, ScenarioError> {
        const LABELS: &str = "a non-empty list of message labels";
        match self.req(list, key, LABELS)? {
            list if list.is_empty() || list.iter().any(String::is_empty) => Err(self.bad(key, LABELS, list)),
            list => Ok(list),
        }
    }

    /// `labels = [...]` or `label = "x"`, exactly one of them.
    fn labels(&self, labels: Option<Vec<String>>, label: Option<&str>) -> Result<Vec<String>, ScenarioError> {
        match (labels, label) {
            (Some(_), Some(_)) => {
                Err(self.err(self.line_of("labels"), "give either `labels` or `label`, not both".into()))
            }
            (None, Some(label)) => Ok(vec![self.req_label(Some(label), "label")?]),
            (labels, None) => self.label_list(labels, "labels"),
        }
    }

    /// The server called `name` if the cluster has it, or what was expected.
    fn known_server(&self, name: &str) -> Result<Sid, String> {
        let sid = parse_sid(name).ok_or_else(|| SERVER.to_string())?;
        if self.servers.contains(&sid) {
            return Ok(sid);
        }
        let names: Vec<String> = self.servers.iter().map(Sid::to_string).collect();
        Err(format!("a server of the cluster ({})", names.join(", ")))
    }

    fn server(&self, name: Option<&str>, key: &str) -> Result<Sid, ScenarioError> {
        let name = self.req(name, key, SERVER)?;
        self.known_server(name).map_err(|expected| self.bad(key, &expected, name))
    }

    /// Servers of the cluster, none of them in `taken` (which gets them).
    fn servers_of(
        &self,
        items: &[Spanned<String>],
        key: &str,
        taken: &mut Vec<Sid>,
    ) -> Result<Vec<Sid>, ScenarioError> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let sid = self.known_server(item.get_ref()).map_err(|expected| self.bad_item(key, item, &expected))?;
            if taken.contains(&sid) {
                return Err(self.bad_item(key, item, "a server not already listed"));
            }
            taken.push(sid);
            out.push(sid);
        }
        Ok(out)
    }

    fn two_servers(&self, a: Option<&str>, b: Option<&str>) -> Result<(Sid, Sid), ScenarioError> {
        let (a, b) = (self.server(a, "a")?, self.server(b, "b")?);
        if a == b {
            return Err(self.bad("b", "a server other than `a`", b.to_string()));
        }
        Ok((a, b))
    }

    /// `special_use = ["\\Sent", ...]`: RFC 6154 uses; none when the key is absent.
    fn special_use(&self, names: Option<Vec<String>>) -> Result<SpecialUse, ScenarioError> {
        let mut special_use = SpecialUse::NONE;
        for name in names.iter().flatten() {
            let Some(one) = SpecialUse::named(name) else {
                return Err(self.bad("special_use", "a list of RFC 6154 uses such as \"\\\\Sent\"", name));
            };
            special_use = special_use.union(one);
        }
        Ok(special_use)
    }

    fn mailbox(&self, value: Option<&str>, key: &str) -> Result<MailboxKey, ScenarioError> {
        let s = self.req(value, key, MAILBOX)?;
        match s.split_once('/') {
            Some((user, name)) if !user.is_empty() && !name.is_empty() && !s.chars().any(char::is_control) => {
                Ok(MailboxKey::new(user, name))
            }
            _ => Err(self.bad(key, MAILBOX, s)),
        }
    }

    fn flags(&self, list: Option<Vec<Spanned<String>>>, key: &str) -> Result<Vec<Flag>, ScenarioError> {
        const FLAG: &str = "a flag like \"\\\\Seen\" or a keyword like \"$Junk\"";
        let flag = |item: &Spanned<String>| Flag::new(item.get_ref()).map_err(|_| self.bad_item(key, item, FLAG));
        list.unwrap_or_default().iter().map(flag).collect()
    }

    fn cluster(&self, cluster: ClusterToml) -> Result<ClusterSpec, ScenarioError> {
        const SERVERS: &str = "a server count (1 or more) or a list of server names like [\"s1\", \"s2\"]";
        let mut servers: Vec<Sid> = match self.req(cluster.servers, "servers", SERVERS)? {
            ServersToml::Count(n) if (1..=10_000).contains(&n) => (1..=n as u32).map(Sid).collect(),
            ServersToml::Count(n) => return Err(self.bad("servers", SERVERS, n)),
            ServersToml::Names(names) if names.is_empty() => return Err(self.bad("servers", SERVERS, names)),
            ServersToml::Names(names) => {
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let sid = parse_sid(&name).ok_or_else(|| self.bad("servers", SERVERS, &name))?;
                    if out.contains(&sid) {
                        return Err(self.bad("servers", "a list of servers, none already listed", &name));
                    }
                    out.push(sid);
                }
                out
            }
        };
        servers.sort();
        let mut spares: Vec<Sid> = Vec::new();
        for name in cluster.spares.unwrap_or_default() {
            const SPARE: &str = "a list of server names, none of them in `servers`";
            let sid = parse_sid(&name).ok_or_else(|| self.bad("spares", SPARE, &name))?;
            if servers.contains(&sid) || spares.contains(&sid) {
                return Err(self.bad("spares", SPARE, &name));
            }
            spares.push(sid);
        }
        spares.sort();
        let durability = self.choice(cluster.mode, "mode", MODES)?.unwrap_or(Durability::Sync);
        let replicas = cluster.replicas.unwrap_or(1);
        if durability == Durability::Sync && usize::from(replicas) >= servers.len() {
            let count = servers.len();
            return Err(self.err(
                self.line_of("replicas"),
                format!(
                    "`replicas` must be less than the number of servers ({count}) in sync mode, \
                     or no save could ever be acknowledged; got {replicas}"
                ),
            ));
        }
        let log_capacity = self.int_in(cluster.log_capacity, "log_capacity", 1..=u32::MAX.into())?.unwrap_or(10_000);
        let request_timeout_ms = self.int_in(cluster.request_timeout_ms, "request_timeout_ms", 1..=u64::MAX >> 1)?;
        let tombstone_grace_ms = self.int_in(cluster.tombstone_grace_ms, "tombstone_grace_ms", 0..=u64::MAX >> 12)?;
        let startup_hold_ms = self.int_in(cluster.startup_hold_ms, "startup_hold_ms", 0..=u64::MAX >> 12)?;
        let mta_retry_ms = self.int_in(cluster.mta_retry_ms, "mta_retry_ms", 1..=u64::MAX >> 12)?;
        let with_spares: Vec<Sid> = servers.iter().chain(&spares).copied().collect();
        let links = match cluster.links {
            None => None,
            Some(items) => {
                let no_keys = Keys::new();
                let mut links: Vec<LinkSpec> = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let line = self.cx.line_at(item.span().start);
                    let what = format!("[cluster] link {}", i + 1);
                    let tab = Tab { what, line, keys: &no_keys, servers: &with_spares, ..*self };
                    let link = item.into_inner();
                    let (a, b) = (tab.server(Some(&link.a), "a")?, tab.server(Some(&link.b), "b")?);
                    if a == b {
                        return Err(tab.err(line, format!("`a` and `b` must be different servers; got {a} twice")));
                    }
                    if links.iter().any(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a)) {
                        return Err(tab.err(line, format!("the link {a}-{b} is listed twice")));
                    }
                    links.push(LinkSpec { a, b, latency_ms: tab.range(link.latency_ms, "latency_ms")? });
                }
                Some(links)
            }
        };
        Ok(ClusterSpec {
            replicas,
            durability,
            log_capacity: log_capacity as usize,
            granularity: self
                .choice(cluster.granularity, "granularity", GRANULARITIES)?
                .unwrap_or(Granularity::Mailbox),
            latency_ms: self.range(cluster.latency_ms, "latency_ms")?.unwrap_or((1, 5)),
            links,
            disk_latency_us: self.range(cluster.disk_latency_us, "disk_latency_us")?.unwrap_or((200, 1000)),
            request_timeout_ms: request_timeout_ms.unwrap_or(5000),
            tombstone_grace_ms: tombstone_grace_ms.unwrap_or(TOMBSTONE_GRACE_MS_DEFAULT),
            startup_hold_ms: startup_hold_ms.unwrap_or(STARTUP_HOLD_MS_DEFAULT),
            mta_retry_ms,
            laptops: self.laptops(cluster.laptops, &with_spares)?,
            partial_servers: {
                let mut partial = BTreeMap::new();
                for p in cluster.partial_servers.unwrap_or_default() {
                    const PARTIAL: &str = "a server of the cluster, listed once";
                    let sid = parse_sid(&p.server).ok_or_else(|| self.bad("partial_servers", PARTIAL, &p.server))?;
                    if !with_spares.contains(&sid) || partial.contains_key(&sid) {
                        return Err(self.bad("partial_servers", PARTIAL, &p.server));
                    }
                    let spec = tandem_core::partial::Partial {
                        body_bytes_max: p.body_bytes_max,
                        mailboxes: p.mailboxes.unwrap_or_default(),
                        since_s: p.since_ms.map_or(0, |ms| SIM_EPOCH_S + ms / 1000),
                        keep_fetched: p.keep_fetched.unwrap_or(true),
                    };
                    const RULE: &str = "a partial server with body_bytes_max, mailboxes or since_ms, within bounds";
                    if spec.is_whole() || spec.check_on(false).is_err() {
                        return Err(self.bad("partial_servers", RULE, &p.server));
                    }
                    partial.insert(sid, spec);
                }
                partial
            },
            servers,
            spares,
        })
    }

    fn laptops(
        &self,
        items: Option<Vec<Spanned<LaptopToml>>>,
        cluster: &[Sid],
    ) -> Result<Vec<LaptopSpec>, ScenarioError> {
        let mut laptops: Vec<LaptopSpec> = Vec::new();
        let no_keys = Keys::new();
        for (i, item) in items.unwrap_or_default().into_iter().enumerate() {
            let line = self.cx.line_at(item.span().start);
            let tab =
                Tab { what: format!("[cluster] laptop {}", i + 1), line, keys: &no_keys, servers: cluster, ..*self };
            let laptop = item.into_inner();
            let sid = parse_sid(&laptop.server).ok_or_else(|| tab.bad("server", SERVER, &laptop.server))?;
            if cluster.contains(&sid) || laptops.iter().any(|l| l.sid == sid) {
                return Err(tab.bad("server", "a server name of its own (not a cluster server's)", &laptop.server));
            }
            if laptop.user.is_empty() || laptop.user.contains('/') {
                return Err(tab.bad("user", "a user name (non-empty, no '/')", &laptop.user));
            }
            let home = tab.server(Some(&laptop.home), "home")?;
            let latency_ms = tab.range(laptop.latency_ms, "latency_ms")?.unwrap_or(LAPTOP_LATENCY_MS_DEFAULT);
            let partial = match laptop.partial {
                None => None,
                Some(p) => {
                    let partial = tandem_core::partial::Partial {
                        mailboxes: p.mailboxes.unwrap_or_default(),
                        since_s: p.since_ms.map_or(0, |ms| SIM_EPOCH_S + ms / 1000),
                        body_bytes_max: p.body_bytes_max,
                        keep_fetched: p.keep_fetched.unwrap_or(true),
                    };
                    partial.check().map_err(|why| tab.err(line, format!("partial: {why}")))?;
                    Some(partial)
                }
            };
            laptops.push(LaptopSpec { sid, user: laptop.user, home, latency_ms, partial });
        }
        Ok(laptops)
    }

    fn event(&self, event: EventToml) -> Result<TimedEvent, ScenarioError> {
        let names: Vec<&str> = OPS.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        let op = self.req(event.op, "op", &expected)?;
        let Some((op, keys)) = OPS.iter().find(|(n, _)| *n == op) else {
            return Err(self.bad("op", &expected, op));
        };
        let tab = &Tab { what: format!("{} ({op})", self.what), ..*self };
        tab.check_keys(&[EVENT_COMMON, keys].concat())?;
        let at_ms = tab.req(event.at_ms, "at_ms", "a non-negative integer")?;
        let id = match event.id {
            Some(id) if id.is_empty() => return Err(tab.bad("id", "a non-empty event id", id)),
            id => id,
        };
        let server = || tab.server(event.server.as_deref(), "server");
        let mailbox = || tab.mailbox(event.mailbox.as_deref(), "mailbox");
        let until_ms = || match tab.req(event.until_ms, "until_ms", "a non-negative integer")? {
            until if until < at_ms => Err(tab.bad("until_ms", &format!("at or after `at_ms` ({at_ms})"), until)),
            until => Ok(until),
        };
        let action = match *op {
            "save" => Action::Save {
                server: server()?,
                mailbox: mailbox()?,
                label: tab.label(event.label.as_deref(), "label")?,
                flags: tab.flags(event.flags, "flags")?,
                size: tab.int_in(event.size, "size", 0..=u32::MAX.into())?.unwrap_or(1000) as usize,
            },
            "import" => Action::Import {
                server: server()?,
                mailbox: mailbox()?,
                label: tab.req_label(event.label.as_deref(), "label")?,
                uidvalidity: tab.int_in(event.uidvalidity, "uidvalidity", 1..=u32::MAX.into())?.unwrap_or(1) as u32,
                uid: tab.int_in(event.uid, "uid", 1..=u32::MAX.into())?.unwrap_or(1) as u32,
                flags: tab.flags(event.flags, "flags")?,
                size: tab.int_in(event.size, "size", 0..=u32::MAX.into())?.unwrap_or(1000) as usize,
            },
            "copy" | "move" => Action::Copy {
                server: server()?,
                from: tab.mailbox(event.from.as_deref(), "from")?,
                label: tab.req_label(event.label.as_deref(), "label")?,
                to: tab.mailbox(event.to.as_deref(), "to")?,
                as_label: tab.label(event.as_label.as_deref(), "as_label")?,
                moving: *op == "move",
            },
            "expunge" => Action::Expunge {
                server: server()?,
                mailbox: mailbox()?,
                labels: tab.labels(event.labels, event.label.as_deref())?,
            },
            "store" => {
                let (server, mailbox) = (server()?, mailbox()?);
                let labels = tab.labels(event.labels, event.label.as_deref())?;
                if event.add.is_none() && event.remove.is_none() {
                    return Err(tab.missing("add", "flags to add; or `remove`, flags to remove"));
                }
                let unchanged_since = match event.unchanged_since {
                    None => None,
                    Some(ModseqToml::Value(modseq)) => Some(UnchangedSince::Value(modseq)),
                    Some(ModseqToml::Word(w)) if w == "current" => Some(UnchangedSince::Current),
                    Some(ModseqToml::Word(w)) => {
                        return Err(tab.bad("unchanged_since", "\"current\" or a non-negative integer modseq", w));
                    }
                };
                let (add, remove) = (tab.flags(event.add, "add")?, tab.flags(event.remove, "remove")?);
                Action::Store { server, mailbox, labels, add, remove, unchanged_since }
            }
            "read" => Action::Read { server: server()?, mailbox: mailbox()?, fresh: event.fresh.unwrap_or(false) },
            "fetch_body" => Action::FetchBody {
                server: server()?,
                mailbox: mailbox()?,
                label: tab.req_label(event.label.as_deref(), "label")?,
            },
            "status" => Action::Status { server: server()?, mailbox: mailbox()? },
            "master_move" => Action::MasterMove { server: server()?, mailbox: mailbox()? },
            "create_mailbox" => Action::CreateMailbox {
                server: server()?,
                mailbox: mailbox()?,
                special_use: tab.special_use(event.special_use)?,
            },
            "delete_mailbox" => Action::DeleteMailbox { server: server()?, mailbox: mailbox()? },
            "replicate" => Action::Replicate {
                server: server()?,
                home: match event.home.as_deref() {
                    None => None,
                    home => Some(tab.server(home, "home")?),
                },
            },
            "rename_mailbox" => Action::RenameMailbox {
                server: server()?,
                from: tab.mailbox(event.from.as_deref(), "from")?,
                to: tab.mailbox(event.to.as_deref(), "to")?,
            },
            "cut" | "restore" | "flap" | "reset" => {
                let (a, b) = tab.two_servers(event.a.as_deref(), event.b.as_deref())?;
                match *op {
                    "cut" => Action::Cut { a, b },
                    "restore" => Action::Restore { a, b },
                    "reset" => Action::Reset { a, b, down_ms: event.down_ms.unwrap_or(500) },
                    _ => Action::Flap { a, b, down_ms: event.down_ms.unwrap_or(500) },
                }
            }
            "slow" => {
                let (a, b) = tab.two_servers(event.a.as_deref(), event.b.as_deref())?;
                let delay_ms = tab.req(event.delay_ms, "delay_ms", "a latency in milliseconds")?;
                Action::Slow { a, b, delay_ms, for_ms: event.for_ms.unwrap_or(5000) }
            }
            "silence" => {
                let (from, to) = tab.two_servers(event.a.as_deref(), event.b.as_deref())?;
                Action::Silence { from, to, for_ms: event.for_ms.unwrap_or(5000) }
            }
            "isolate" => Action::Isolate { server: server()? },
            "partition" => {
                const GROUPS: &str = "a non-empty list of non-empty server groups like [[\"s1\", \"s2\"], [\"s3\"]]";
                let groups = tab.req(event.groups, "groups", GROUPS)?;
                if groups.is_empty() || groups.iter().any(Vec::is_empty) {
                    return Err(tab.err(tab.line_of("groups"), format!("`groups` must be {GROUPS}")));
                }
                let mut taken = Vec::new();
                let groups: Result<_, _> = groups.iter().map(|g| tab.servers_of(g, "groups", &mut taken)).collect();
                Action::Partition { groups: groups? }
            }
            "heal" => Action::Heal,
            "crash" => Action::Crash { server: server()? },
            "restart" => Action::Restart { server: server()? },
            "lose" => Action::Lose { server: server()? },
            "replace" => Action::Replace { server: server()? },
            "backup" => Action::Backup { server: server()? },
            "restore_backup" => Action::RestoreBackup { server: server()? },
            "member_add" | "member_remove" => {
                let (server, member) = (server()?, tab.server(event.member.as_deref(), "member")?);
                match *op {
                    "member_add" => Action::MemberAdd { server, member },
                    _ => Action::MemberRemove { server, member, lost: event.lost.unwrap_or(false) },
                }
            }
            "hand_add" => Action::HandAdd {
                server: server()?,
                mailbox: mailbox()?,
                label: tab.label(event.label.as_deref(), "label")?,
            },
            "hand_delete" => Action::HandDelete {
                server: server()?,
                mailbox: mailbox()?,
                label: tab.req_label(event.label.as_deref(), "label")?,
            },
            "corrupt" => Action::Corrupt { server: server()?, label: tab.req_label(event.label.as_deref(), "label")? },
            "random_workload" => Action::RandomWorkload {
                until_ms: until_ms()?,
                ops_per_s: tab.int_in(event.ops_per_s, "ops_per_s", 1..=1_000_000)?.unwrap_or(20),
                users: tab.int_in(event.users, "users", 1..=1_000_000)?.unwrap_or(3) as u32,
                mailboxes: tab.int_in(event.mailboxes, "mailboxes", 1..=1_000_000)?.unwrap_or(2) as u32,
                servers: match event.servers {
                    Some(list) if list.is_empty() => {
                        return Err(tab.bad("servers", "a non-empty list of server names", Vec::<String>::new()));
                    }
                    Some(list) => Some(tab.servers_of(&list, "servers", &mut Vec::new())?),
                    None => None,
                },
            },
            "random_faults" => {
                let kinds = match event.kinds {
                    None => ALL_BUT_LOSE.to_vec(),
                    Some(list) if list.is_empty() => {
                        return Err(tab.bad("kinds", "a non-empty list of fault kinds", list));
                    }
                    Some(list) => list.iter().fold(Vec::new(), |mut kinds, k| {
                        if !kinds.contains(k) {
                            kinds.push(*k);
                        }
                        kinds
                    }),
                };
                let count = tab.int_in(event.count, "count", 0..=1_000_000)?.unwrap_or(5) as u32;
                Action::RandomFaults { until_ms: until_ms()?, count, kinds }
            }
            other => unreachable!("op {other} is in OPS but not handled"),
        };
        Ok(TimedEvent { at_ms, id, action, expect: event.expect, line: self.line })
    }

    fn expect(&self, expect: ExpectToml, ids: &[String]) -> Result<Expect, ScenarioError> {
        let names: Vec<&str> = CHECKS.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        let check = self.req(expect.check, "check", &expected)?;
        let Some((check, keys)) = CHECKS.iter().find(|(n, _)| *n == check) else {
            return Err(self.bad("check", &expected, check));
        };
        let tab = &Tab { what: format!("{} ({check})", self.what), ..*self };
        tab.check_keys(&[&["check"], *keys].concat())?;
        let label = || tab.req_label(expect.label.as_deref(), "label");
        let uid = || match tab.int_in(expect.uid, "uid", 1..=u32::MAX.into())? {
            Some(uid) => Ok(uid as u32),
            None => Err(tab.missing("uid", "an integer from 1 to 4294967295")),
        };
        Ok(match *check {
            "invariants" => Expect::Invariants,
            "invariant" => {
                let expected = format!("one of {}", INVARIANTS.join(", "));
                match tab.req(expect.name, "name", &expected)? {
                    name if INVARIANTS.contains(&name.as_str()) => Expect::Invariant(name),
                    name => return Err(tab.bad("name", &expected, name)),
                }
            }
            "root" => Expect::Root { server: tab.server(expect.server.as_deref(), "server")? },
            "member" => Expect::Member {
                server: tab.server(expect.server.as_deref(), "server")?,
                state: tab
                    .choice(expect.state, "state", MEMBER_STATES)?
                    .ok_or_else(|| tab.missing("state", "active, leaving or retired"))?,
            },
            "not_uid" => Expect::NotUid { label: label()?, uid: uid()? },
            "uid" => Expect::Uid { label: label()?, uid: uid()? },
            "flags" => {
                let label = label()?;
                let flags = tab.req(expect.flags, "flags", "a list of flags, possibly empty")?;
                Expect::Flags { label, flags: tab.flags(Some(flags), "flags")? }
            }
            "present" => Expect::Present { label: label()? },
            "absent" => Expect::Absent { label: label()? },
            "mark" => {
                let marks: Vec<&str> = tandem_core::Mark::ALL.iter().map(|m| m.name()).collect();
                let expected = format!("a coverage mark name, one of {}", marks.join(", "));
                let name = tab.req(expect.name, "name", &expected)?;
                if tandem_core::Mark::from_name(&name).is_none() {
                    return Err(tab.bad("name", &expected, name));
                }
                let (min, max) = (expect.min.unwrap_or(if expect.max.is_some() { 0 } else { 1 }), expect.max);
                if max.is_some_and(|max| max < min) {
                    return Err(tab.bad("max", &format!("at least min ({min})"), max.unwrap_or(0)));
                }
                Expect::Mark { name, min, max }
            }
            "exactly_one_ok" => {
                let events = tab.req(expect.events, "events", "a list of event ids")?;
                if events.is_empty() {
                    return Err(tab.bad("events", "a non-empty list of event ids", Vec::<String>::new()));
                }
                let known = match ids {
                    [] => "no event has an `id`".to_string(),
                    ids => format!("known: {}", ids.join(", ")),
                };
                let expected = format!("the `id` of an event ({known})");
                let known_id = |id: Spanned<String>| {
                    if ids.contains(id.get_ref()) {
                        Ok(id.into_inner())
                    } else {
                        Err(tab.bad_item("events", &id, &expected))
                    }
                };
                Expect::ExactlyOneOk { events: events.into_iter().map(known_id).collect::<Result<_, _>>()? }
            }
            "count" => Expect::Count {
                mailbox: tab.mailbox(expect.mailbox.as_deref(), "mailbox")?,
                count: tab.req(expect.count, "count", "a non-negative integer")? as usize,
            },
            "uidvalidity" => Expect::Validity {
                mailbox: tab.mailbox(expect.mailbox.as_deref(), "mailbox")?,
                uidvalidity: tab.req(expect.uidvalidity, "uidvalidity", "an integer")?.min(u32::MAX.into()) as u32,
            },
            "tombstones" => Expect::Tombstones {
                mailbox: tab.mailbox(expect.mailbox.as_deref(), "mailbox")?,
                count: tab.req(expect.count, "count", "a non-negative integer")? as usize,
            },
            "visible" => {
                let visible = tab.req(expect.visible, "visible", "true or false")?;
                Expect::Visible { mailbox: tab.mailbox(expect.mailbox.as_deref(), "mailbox")?, visible }
            }
            "body_held" => Expect::BodyHeld {
                server: tab.server(expect.server.as_deref(), "server")?,
                label: label()?,
                held: tab.req(expect.held, "held", "true or false")?,
            },
            "renumbered" => Expect::Renumbered { labels: tab.label_list(expect.labels, "labels")? },
            "special_use" => Expect::SpecialUse {
                mailbox: tab.mailbox(expect.mailbox.as_deref(), "mailbox")?,
                special_use: tab.special_use(expect.special_use)?,
            },
            other => unreachable!("check {other} is in CHECKS but not handled"),
        })
    }
}

/// "s<N>" with N >= 1 written without leading zeros.
fn parse_sid(s: &str) -> Option<Sid> {
    let n: u32 = s.strip_prefix('s')?.parse().ok()?;
    (n >= 1 && format!("s{n}") == s).then_some(Sid(n))
}

#[cfg(test)]
mod tests;
