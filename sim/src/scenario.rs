//! Scenario files: a cluster, a seed, timed events and expectations, in TOML.
//! `parse` turns a file's text into a [`Scenario`]; a bad file gets an error naming the
//! line and what was expected there.
//!
//! # Format
//!
//! ```toml
//! # comment: which part of the seed this reproduces
//! name = "seed-uid-conflict"         # default: the file stem
//! seed = 7                           # default 1
//! wire = false                       # default false: route peer messages through the codec
//! settle_ms = 30000                  # default 60000
//! heal_at_end = true                 # default true
//!
//! [cluster]
//! servers = 3                        # a count (s1..sN) or a list ["s1", "s2", "s5"]
//! replicas = 1                       # default 1
//! mode = "sync"                      # "sync" (default) | "async"
//! log_capacity = 10000               # default 10000
//! granularity = "mailbox"            # "mailbox" (default) | "user" | "domain" | "global"
//! latency_ms = [1, 5]                # default [1, 5]; a single integer n means [n, n]
//! disk_latency_us = [200, 1000]      # default [200, 1000]
//! request_timeout_ms = 5000          # default 5000
//! # links: omitted = full mesh. Otherwise the list of links that exist:
//! links = [ { a = "s1", b = "s2", latency_ms = [100, 120] }, { a = "s2", b = "s3" } ]
//!
//! [[event]]
//! at_ms = 600                        # required; events are sorted by at_ms (stable)
//! op = "save"                        # required
//! server = "s1"
//! mailbox = "alice/INBOX"            # "user/name", split at the first '/'
//! label = "m1"
//! flags = ["\\Flagged"]
//! size = 2000                        # default 1000
//! id = "save1"                       # optional event id (any event)
//! expect = "ok"                      # optional: ok | temporary | permanent | rejected
//!
//! [[event]]
//! at_ms = 900
//! op = "read"
//! server = "s2"
//! mailbox = "alice/INBOX"
//!
//! [[expect]]
//! check = "present"
//! label = "m1"
//!
//! [[expect]]
//! check = "invariants"
//! ```
//!
//! Event ops and their keys (besides `at_ms`, `op`, `id`, `expect`; `?` = optional):
//!
//! | op | keys |
//! |----|------|
//! | `save` | `server`, `mailbox`, `label?`, `flags?`, `size?` (default 1000) |
//! | `copy` | `server`, `from`, `label`, `to`, `as_label?` |
//! | `expunge` | `server`, `mailbox`, `labels` (or `label`) |
//! | `store` | `server`, `mailbox`, `labels` (or `label`), `add?`, `remove?`, `unchanged_since?` (`"current"` or an integer) |
//! | `read`, `master_move` | `server`, `mailbox` |
//! | `cut`, `restore` | `a`, `b` |
//! | `isolate` | `server` |
//! | `partition` | `groups` (e.g. `[["s1", "s2"], ["s3"]]`) |
//! | `heal` | — |
//! | `flap` | `a`, `b`, `down_ms?` (default 500) |
//! | `crash`, `restart`, `lose`, `replace` | `server` |
//! | `hand_add` | `server`, `mailbox`, `label?` |
//! | `hand_delete` | `server`, `mailbox`, `label` |
//! | `corrupt` | `server`, `label` |
//! | `random_workload` | `until_ms`, `ops_per_s?` (20), `users?` (3), `mailboxes?` (2), `servers?` |
//! | `random_faults` | `until_ms`, `count?` (5), `kinds?` (partition, cut, crash, flap, hand_edit, corrupt, lose; default all but lose) |
//!
//! `[[expect]]` tables have `check = "..."` and:
//!
//! | check | keys |
//! |-------|------|
//! | `invariants` | — |
//! | `invariant` | `name`: no_acked_loss, uids_never_reused, monotonic, flags_agree, convergence |
//! | `root` | `server` |
//! | `uid`, `not_uid` | `label`, `uid` |
//! | `flags` | `label`, `flags` (may be empty) |
//! | `present`, `absent` | `label` |
//! | `mark` | `name` (a [`tandem_core::Mark`] name), `min?` (default 1) |
//! | `exactly_one_ok` | `events` (event ids) |
//! | `count` | `mailbox`, `count` |
//! | `renumbered` | `labels` |
//!
//! Unknown keys anywhere are errors (they are usually typos). Server names must be
//! servers of the cluster.

use std::path::PathBuf;
use tandem_core::{Durability, Flag, Granularity, MailboxKey, Sid};

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
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpec {
    pub servers: Vec<Sid>,
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
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Partition,
    Cut,
    Crash,
    Flap,
    HandEdit,
    Corrupt,
    Lose,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A client delivers a new message; `label` names it for later events.
    Save {
        server: Sid,
        mailbox: MailboxKey,
        label: Option<String>,
        flags: Vec<Flag>,
        size: usize,
    },
    Copy {
        server: Sid,
        from: MailboxKey,
        label: String,
        to: MailboxKey,
        as_label: Option<String>,
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
    /// A client reads the mailbox (the user sees its UIDs).
    Read {
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
    },
    /// IMAP DELETE: every message expunged, the mailbox hidden.
    DeleteMailbox {
        server: Sid,
        mailbox: MailboxKey,
    },
    Cut {
        a: Sid,
        b: Sid,
    },
    Restore {
        a: Sid,
        b: Sid,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// A coverage mark hit at least `min` times in the whole cluster.
    Mark { name: String, min: u64 },
    /// Of these events' client answers exactly one is OK (not rejected, not failed).
    ExactlyOneOk { events: Vec<String> },
    /// Every live server holds this many messages in the mailbox at the end.
    Count { mailbox: MailboxKey, count: usize },
    /// Whether every live server shows the mailbox (after CREATE/DELETE).
    Visible { mailbox: MailboxKey, visible: bool },
    /// Every named message ends on a UID other than the first one a client saw for it.
    Renumbered { labels: Vec<String> },
}

// ---------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------

use std::fmt;
use std::ops::Range;
use std::path::Path;

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

/// Reads a scenario file and parses it.
/// The scenario files (`*.toml`) of a directory, sorted by name.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

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
    let mut cx = Cx { text, path: path.map(Path::to_path_buf), servers: Vec::new() };
    let root: Node = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| cx.line_at(s.start)).unwrap_or(0);
        cx.err(line, format!("TOML syntax: {}", e.message().trim_end()))
    })?;
    let Val::Table(entries) = &root.val else {
        return Err(cx.err(1, "expected a TOML document".to_string()));
    };
    let top = Tab { what: "top level".to_string(), line: 1, entries };
    top.check_keys(&cx, &["name", "seed", "wire", "settle_ms", "heal_at_end", "cluster", "event", "expect"])?;

    let name = match top.get("name") {
        Some(f) => {
            let s = cx.str_of(&top, &f, "a non-empty string")?;
            if s.is_empty() {
                return Err(cx.bad(&top, &f, "a non-empty string"));
            }
            s.to_string()
        }
        None => path
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".to_string()),
    };
    let seed = cx.opt_u64(&top, "seed")?.unwrap_or(1);
    let wire = cx.opt_bool(&top, "wire")?.unwrap_or(false);
    let settle_ms = cx.opt_u64(&top, "settle_ms")?.unwrap_or(60_000);
    let heal_at_end = cx.opt_bool(&top, "heal_at_end")?.unwrap_or(true);

    let cluster = match top.get("cluster") {
        Some(f) => {
            let Val::Table(entries) = &f.node.val else {
                return Err(cx.bad(&top, &f, "a table `[cluster]`"));
            };
            let line = cx.field_line(&top, &f);
            cx.cluster(&Tab { what: "[cluster]".to_string(), line, entries })?
        }
        None => {
            return Err(cx.err(1, "missing `[cluster]` table (at least `servers = N`)".to_string()));
        }
    };
    cx.servers = cluster.servers.clone();

    let event_tabs = cx.array_of_tables(&top, "event", "[[event]]")?;
    let mut events = Vec::with_capacity(event_tabs.len());
    let mut ids: Vec<String> = Vec::new();
    for (i, (line, entries)) in event_tabs.iter().enumerate() {
        let tab = Tab { what: format!("event {}", i + 1), line: *line, entries };
        let ev = cx.event(&tab)?;
        if let Some(id) = &ev.id {
            if ids.contains(id) {
                let f = tab.get("id").expect("id was parsed from this key");
                return Err(cx.err(cx.field_line(&tab, &f), format!("{}: duplicate event id {id:?}", tab.what)));
            }
            ids.push(id.clone());
        }
        events.push(ev);
    }
    events.sort_by_key(|e| e.at_ms);

    let expect_tabs = cx.array_of_tables(&top, "expect", "[[expect]]")?;
    let mut expects = Vec::with_capacity(expect_tabs.len());
    for (i, (line, entries)) in expect_tabs.iter().enumerate() {
        let tab = Tab { what: format!("expect {}", i + 1), line: *line, entries };
        expects.push(cx.expect(&tab, &ids)?);
    }

    Ok(Scenario {
        name,
        path: path.map(Path::to_path_buf),
        seed,
        wire,
        cluster,
        events,
        expects,
        settle_ms,
        heal_at_end,
    })
}

// --- A TOML value tree that keeps byte spans -------------------------------------------
//
// toml 0.8 hands out spans through serde's `Spanned` protocol (a struct with these private
// names). We speak it ourselves instead of using `toml::Spanned<T>` so that values without
// a span (implicit tables such as `cluster.servers = 3`) still parse.

const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME_FIELD: &str = "$__toml_private_datetime";

#[derive(Clone, Debug)]
struct Node {
    span: Option<Range<usize>>,
    val: Val,
}

#[derive(Clone, Debug)]
enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<(Key, Node)>),
}

#[derive(Clone, Debug)]
struct Key {
    span: Option<Range<usize>>,
    name: String,
}

/// A value deserialized without asking for its span (the inside of a spanned value).
struct Bare(Node);

struct NodeVisitor {
    spanned: bool,
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, NodeVisitor { spanned: true })
    }
}

impl<'de> serde::Deserialize<'de> for Bare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bare, D::Error> {
        d.deserialize_any(NodeVisitor { spanned: false }).map(Bare)
    }
}

fn bare(val: Val) -> Node {
    Node { span: None, val }
}

impl<'de> serde::de::Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(bare(Val::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(bare(Val::Int(v)))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v).map(|v| bare(Val::Int(v))).map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(bare(Val::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(bare(Val::Str(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(bare(Val::Str(v)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(bare(Val::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        use serde::de::Error as _;
        let Some(first) = map.next_key::<Key>()? else {
            return Ok(bare(Val::Table(Vec::new())));
        };
        if self.spanned && first.span.is_none() && first.name == SPANNED_START {
            let start: usize = map.next_value()?;
            let end = match map.next_key::<Key>()? {
                Some(k) if k.name == SPANNED_END => map.next_value::<usize>()?,
                _ => return Err(A::Error::custom("malformed spanned value")),
            };
            let inner = match map.next_key::<Key>()? {
                Some(k) if k.name == SPANNED_VALUE => map.next_value::<Bare>()?.0,
                _ => return Err(A::Error::custom("malformed spanned value")),
            };
            return Ok(Node { span: Some(start..end), val: inner.val });
        }
        if first.span.is_none() && first.name == DATETIME_FIELD {
            let s: String = map.next_value()?;
            return Ok(bare(Val::Datetime(s)));
        }
        let mut entries = vec![(first, map.next_value::<Node>()?)];
        while let Some(k) = map.next_key::<Key>()? {
            let v = map.next_value::<Node>()?;
            entries.push((k, v));
        }
        Ok(bare(Val::Table(entries)))
    }
}

struct KeyVisitor;

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, KeyVisitor)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        Ok(Key { span: None, name: v.to_string() })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        use serde::de::Error as _;
        let mut start = None;
        let mut end = None;
        let mut name = None;
        while let Some(k) = map.next_key::<String>()? {
            match k.as_str() {
                SPANNED_START => start = Some(map.next_value::<usize>()?),
                SPANNED_END => end = Some(map.next_value::<usize>()?),
                SPANNED_VALUE => name = Some(map.next_value::<String>()?),
                _ => return Err(A::Error::custom("malformed spanned key")),
            }
        }
        match (start, end, name) {
            (Some(s), Some(e), Some(name)) => Ok(Key { span: Some(s..e), name }),
            _ => Err(A::Error::custom("malformed spanned key")),
        }
    }
}

// --- Semantic layer ----------------------------------------------------------------------

type Entries = [(Key, Node)];

/// A table being read: its name in messages, the line of its header, its entries.
struct Tab<'a> {
    what: String,
    line: usize,
    entries: &'a [(Key, Node)],
}

/// One key of a table with its value.
struct Field<'a> {
    key: &'a Key,
    node: &'a Node,
}

impl<'a> Tab<'a> {
    fn get(&self, name: &str) -> Option<Field<'a>> {
        self.entries.iter().find(|(k, _)| k.name == name).map(|(key, node)| Field { key, node })
    }

    fn check_keys(&self, cx: &Cx<'_>, allowed: &[&str]) -> Result<(), ScenarioError> {
        for (k, _) in self.entries {
            if !allowed.contains(&k.name.as_str()) {
                let line = k.span.as_ref().map(|s| cx.line_at(s.start)).unwrap_or(self.line);
                return Err(cx.err(
                    line,
                    format!("{}: unknown key `{}` (expected one of: {})", self.what, k.name, allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

fn describe(v: &Val) -> String {
    match v {
        Val::Str(s) => format!("{s:?}"),
        Val::Int(i) => i.to_string(),
        Val::Float(x) => format!("the float {x}"),
        Val::Bool(b) => b.to_string(),
        Val::Datetime(d) => format!("the datetime {d}"),
        Val::Array(_) => "an array".to_string(),
        Val::Table(_) => "a table".to_string(),
    }
}

const EVENT_COMMON: &[&str] = &["at_ms", "op", "id", "expect"];

const OPS: &[(&str, &[&str])] = &[
    ("save", &["server", "mailbox", "label", "flags", "size"]),
    ("copy", &["server", "from", "label", "to", "as_label"]),
    ("expunge", &["server", "mailbox", "labels", "label"]),
    ("store", &["server", "mailbox", "labels", "label", "add", "remove", "unchanged_since"]),
    ("read", &["server", "mailbox"]),
    ("master_move", &["server", "mailbox"]),
    ("create_mailbox", &["server", "mailbox"]),
    ("delete_mailbox", &["server", "mailbox"]),
    ("cut", &["a", "b"]),
    ("restore", &["a", "b"]),
    ("isolate", &["server"]),
    ("partition", &["groups"]),
    ("heal", &[]),
    ("flap", &["a", "b", "down_ms"]),
    ("crash", &["server"]),
    ("restart", &["server"]),
    ("lose", &["server"]),
    ("replace", &["server"]),
    ("hand_add", &["server", "mailbox", "label"]),
    ("hand_delete", &["server", "mailbox", "label"]),
    ("corrupt", &["server", "label"]),
    ("random_workload", &["until_ms", "ops_per_s", "users", "mailboxes", "servers"]),
    ("random_faults", &["until_ms", "count", "kinds"]),
];

const CHECKS: &[(&str, &[&str])] = &[
    ("invariants", &[]),
    ("invariant", &["name"]),
    ("root", &["server"]),
    ("not_uid", &["label", "uid"]),
    ("uid", &["label", "uid"]),
    ("flags", &["label", "flags"]),
    ("present", &["label"]),
    ("absent", &["label"]),
    ("mark", &["name", "min"]),
    ("exactly_one_ok", &["events"]),
    ("count", &["mailbox", "count"]),
    ("visible", &["mailbox", "visible"]),
    ("renumbered", &["labels"]),
];

const INVARIANTS: &[&str] = &["no_acked_loss", "uids_never_reused", "monotonic", "flags_agree", "convergence"];

const FAULT_KINDS: &[(&str, FaultKind)] = &[
    ("partition", FaultKind::Partition),
    ("cut", FaultKind::Cut),
    ("crash", FaultKind::Crash),
    ("flap", FaultKind::Flap),
    ("hand_edit", FaultKind::HandEdit),
    ("corrupt", FaultKind::Corrupt),
    ("lose", FaultKind::Lose),
];

struct Cx<'t> {
    text: &'t str,
    path: Option<PathBuf>,
    servers: Vec<Sid>,
}

impl Cx<'_> {
    fn line_at(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn err(&self, line: usize, message: String) -> ScenarioError {
        ScenarioError { path: self.path.clone(), line, message }
    }

    /// The line of a field's value (or its key, or its table).
    fn field_line(&self, tab: &Tab<'_>, f: &Field<'_>) -> usize {
        self.node_line(f.node).or_else(|| f.key.span.as_ref().map(|s| self.line_at(s.start))).unwrap_or(tab.line)
    }

    fn node_line(&self, n: &Node) -> Option<usize> {
        n.span.as_ref().map(|s| self.line_at(s.start))
    }

    /// "`key` must be EXPECTED; got VALUE" at the value's line.
    fn bad(&self, tab: &Tab<'_>, f: &Field<'_>, expected: &str) -> ScenarioError {
        self.err(
            self.field_line(tab, f),
            format!("{}: `{}` must be {expected}; got {}", tab.what, f.key.name, describe(&f.node.val)),
        )
    }

    /// Like `bad`, for an element of an array value.
    fn bad_item(&self, tab: &Tab<'_>, f: &Field<'_>, item: &Node, expected: &str) -> ScenarioError {
        let line = self.node_line(item).unwrap_or_else(|| self.field_line(tab, f));
        self.err(
            line,
            format!("{}: each entry of `{}` must be {expected}; got {}", tab.what, f.key.name, describe(&item.val)),
        )
    }

    fn missing(&self, tab: &Tab<'_>, key: &str, expected: &str) -> ScenarioError {
        self.err(tab.line, format!("{}: missing `{key}` ({expected})", tab.what))
    }

    fn req<'a>(&self, tab: &Tab<'a>, key: &str, expected: &str) -> Result<Field<'a>, ScenarioError> {
        tab.get(key).ok_or_else(|| self.missing(tab, key, expected))
    }

    fn str_of<'a>(&self, tab: &Tab<'_>, f: &Field<'a>, expected: &str) -> Result<&'a str, ScenarioError> {
        match &f.node.val {
            Val::Str(s) => Ok(s),
            _ => Err(self.bad(tab, f, expected)),
        }
    }

    fn u64_of(&self, tab: &Tab<'_>, f: &Field<'_>) -> Result<u64, ScenarioError> {
        match f.node.val {
            Val::Int(i) if i >= 0 => Ok(i as u64),
            _ => Err(self.bad(tab, f, "a non-negative integer")),
        }
    }

    fn opt_u64(&self, tab: &Tab<'_>, key: &str) -> Result<Option<u64>, ScenarioError> {
        tab.get(key).map(|f| self.u64_of(tab, &f)).transpose()
    }

    fn req_u64(&self, tab: &Tab<'_>, key: &str) -> Result<u64, ScenarioError> {
        let f = self.req(tab, key, "a non-negative integer")?;
        self.u64_of(tab, &f)
    }

    /// An integer in `lo..=hi`.
    fn opt_int_in(&self, tab: &Tab<'_>, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, ScenarioError> {
        let Some(f) = tab.get(key) else { return Ok(None) };
        match f.node.val {
            Val::Int(i) if i >= 0 && (i as u64) >= lo && (i as u64) <= hi => Ok(Some(i as u64)),
            _ => Err(self.bad(tab, &f, &format!("an integer from {lo} to {hi}"))),
        }
    }

    fn req_int_in(&self, tab: &Tab<'_>, key: &str, lo: u64, hi: u64) -> Result<u64, ScenarioError> {
        match self.opt_int_in(tab, key, lo, hi)? {
            Some(v) => Ok(v),
            None => Err(self.missing(tab, key, &format!("an integer from {lo} to {hi}"))),
        }
    }

    fn opt_bool(&self, tab: &Tab<'_>, key: &str) -> Result<Option<bool>, ScenarioError> {
        let Some(f) = tab.get(key) else { return Ok(None) };
        match f.node.val {
            Val::Bool(b) => Ok(Some(b)),
            _ => Err(self.bad(tab, &f, "true or false")),
        }
    }

    fn opt_string(&self, tab: &Tab<'_>, key: &str, expected: &str) -> Result<Option<String>, ScenarioError> {
        let Some(f) = tab.get(key) else { return Ok(None) };
        match &f.node.val {
            Val::Str(s) if !s.is_empty() => Ok(Some(s.clone())),
            _ => Err(self.bad(tab, &f, expected)),
        }
    }

    fn req_string(&self, tab: &Tab<'_>, key: &str, expected: &str) -> Result<String, ScenarioError> {
        match self.opt_string(tab, key, expected)? {
            Some(s) => Ok(s),
            None => Err(self.missing(tab, key, expected)),
        }
    }

    /// One of `choices`, by name.
    fn choice<T: Copy>(
        &self,
        tab: &Tab<'_>,
        key: &str,
        choices: &[(&str, T)],
        default: Option<T>,
    ) -> Result<T, ScenarioError> {
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
        let expected = format!("one of {}", names.join(", "));
        let Some(f) = tab.get(key) else {
            return default.ok_or_else(|| self.missing(tab, key, &expected));
        };
        if let Val::Str(s) = &f.node.val
            && let Some((_, v)) = choices.iter().find(|(n, _)| n == s)
        {
            return Ok(*v);
        }
        Err(self.bad(tab, &f, &expected))
    }

    fn array_of<'a>(&self, tab: &Tab<'_>, f: &Field<'a>, expected: &str) -> Result<&'a [Node], ScenarioError> {
        match &f.node.val {
            Val::Array(items) => Ok(items),
            _ => Err(self.bad(tab, f, expected)),
        }
    }

    fn opt_str_list(
        &self,
        tab: &Tab<'_>,
        key: &str,
        expected_item: &str,
    ) -> Result<Option<Vec<String>>, ScenarioError> {
        let Some(f) = tab.get(key) else { return Ok(None) };
        let items = self.array_of(tab, &f, &format!("a list of {expected_item}s"))?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match &item.val {
                Val::Str(s) if !s.is_empty() => out.push(s.clone()),
                _ => return Err(self.bad_item(tab, &f, item, expected_item)),
            }
        }
        Ok(Some(out))
    }

    /// `[[name]]` tables: (header line, entries) each.
    fn array_of_tables<'a>(
        &self,
        top: &Tab<'a>,
        key: &str,
        header: &str,
    ) -> Result<Vec<(usize, &'a Entries)>, ScenarioError> {
        let Some(f) = top.get(key) else { return Ok(Vec::new()) };
        let expected = format!("a list of `{header}` tables");
        let items = self.array_of(top, &f, &expected)?;
        // Fallback lines: the n-th `[[name]]` header in the text.
        let headers: Vec<usize> = self
            .text
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                let l = l.trim_start();
                l.strip_prefix("[[").map(|r| r.trim_start().starts_with(key)).unwrap_or(false)
                    && l.split(']').next().map(|h| h.trim_start_matches('[').trim() == key).unwrap_or(false)
            })
            .map(|(i, _)| i + 1)
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Val::Table(entries) = &item.val else {
                return Err(self.bad(top, &f, &expected));
            };
            let line = self
                .node_line(item)
                .or_else(|| headers.get(i).copied())
                .or_else(|| entries.first().and_then(|(k, _)| k.span.as_ref()).map(|s| self.line_at(s.start)))
                .unwrap_or_else(|| self.field_line(top, &f));
            out.push((line, entries.as_slice()));
        }
        Ok(out)
    }

    fn sid_of(&self, tab: &Tab<'_>, f: &Field<'_>, item: Option<&Node>, known: bool) -> Result<Sid, ScenarioError> {
        let node = item.unwrap_or(f.node);
        let fail = |what: &str| match item {
            Some(it) => self.bad_item(tab, f, it, what),
            None => self.bad(tab, f, what),
        };
        let Val::Str(s) = &node.val else {
            return Err(fail("a server name like \"s2\""));
        };
        let sid = parse_sid(s).ok_or_else(|| fail("a server name like \"s2\""))?;
        if known && !self.servers.contains(&sid) {
            let names: Vec<String> = self.servers.iter().map(|s| s.to_string()).collect();
            return Err(fail(&format!("a server of the cluster ({})", names.join(", "))));
        }
        Ok(sid)
    }

    fn server(&self, tab: &Tab<'_>, key: &str) -> Result<Sid, ScenarioError> {
        let f = self.req(tab, key, "a server name like \"s2\"")?;
        self.sid_of(tab, &f, None, true)
    }

    fn server_list(&self, tab: &Tab<'_>, f: &Field<'_>) -> Result<Vec<Sid>, ScenarioError> {
        let items = self.array_of(tab, f, "a list of server names like [\"s1\", \"s2\"]")?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let sid = self.sid_of(tab, f, Some(item), true)?;
            if out.contains(&sid) {
                return Err(self.bad_item(tab, f, item, "a server not already listed"));
            }
            out.push(sid);
        }
        Ok(out)
    }

    fn mailbox(&self, tab: &Tab<'_>, key: &str) -> Result<MailboxKey, ScenarioError> {
        const EXPECTED: &str = "a mailbox \"user/name\" (both parts non-empty)";
        let f = self.req(tab, key, EXPECTED)?;
        let s = self.str_of(tab, &f, EXPECTED)?;
        match s.split_once('/') {
            Some((user, name)) if !user.is_empty() && !name.is_empty() && !s.chars().any(char::is_control) => {
                Ok(MailboxKey::new(user, name))
            }
            _ => Err(self.bad(tab, &f, EXPECTED)),
        }
    }

    fn flags(&self, tab: &Tab<'_>, key: &str) -> Result<Vec<Flag>, ScenarioError> {
        const EXPECTED: &str = "a flag like \"\\\\Seen\" or a keyword like \"$Junk\"";
        let Some(f) = tab.get(key) else { return Ok(Vec::new()) };
        let items = self.array_of(tab, &f, "a list of flags like [\"\\\\Seen\"]")?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Val::Str(s) = &item.val else {
                return Err(self.bad_item(tab, &f, item, EXPECTED));
            };
            let flag = Flag::new(s).map_err(|_| self.bad_item(tab, &f, item, EXPECTED))?;
            out.push(flag);
        }
        Ok(out)
    }

    /// `key = [lo, hi]` or `key = n`.
    fn range(&self, tab: &Tab<'_>, key: &str) -> Result<Option<(u64, u64)>, ScenarioError> {
        const EXPECTED: &str = "an integer or a range [min, max] of non-negative integers with min <= max";
        let Some(f) = tab.get(key) else { return Ok(None) };
        match &f.node.val {
            Val::Int(i) if *i >= 0 => Ok(Some((*i as u64, *i as u64))),
            Val::Array(items) if items.len() == 2 => match (&items[0].val, &items[1].val) {
                (Val::Int(a), Val::Int(b)) if *a >= 0 && a <= b => Ok(Some((*a as u64, *b as u64))),
                _ => Err(self.bad(tab, &f, EXPECTED)),
            },
            _ => Err(self.bad(tab, &f, EXPECTED)),
        }
    }

    /// `labels = [...]` or `label = "x"` (exactly one of them).
    fn labels(&self, tab: &Tab<'_>) -> Result<Vec<String>, ScenarioError> {
        match (tab.get("labels"), tab.get("label")) {
            (Some(f), Some(_)) => {
                Err(self
                    .err(self.field_line(tab, &f), format!("{}: give either `labels` or `label`, not both", tab.what)))
            }
            (Some(f), None) => {
                let list = self.opt_str_list(tab, "labels", "a message label")?.unwrap_or_default();
                if list.is_empty() {
                    return Err(self.bad(tab, &f, "a non-empty list of message labels"));
                }
                Ok(list)
            }
            (None, Some(_)) => Ok(vec![self.req_string(tab, "label", "a message label")?]),
            (None, None) => Err(self.missing(tab, "labels", "a list of message labels, or `label`")),
        }
    }

    fn cluster(&self, tab: &Tab<'_>) -> Result<ClusterSpec, ScenarioError> {
        tab.check_keys(
            self,
            &[
                "servers",
                "replicas",
                "mode",
                "log_capacity",
                "granularity",
                "latency_ms",
                "disk_latency_us",
                "request_timeout_ms",
                "links",
            ],
        )?;
        const SERVERS: &str = "a server count (1 or more) or a list of server names like [\"s1\", \"s2\"]";
        let f = self.req(tab, "servers", SERVERS)?;
        let mut servers = match &f.node.val {
            Val::Int(n) if *n >= 1 && *n <= 10_000 => (1..=*n as u32).map(Sid).collect::<Vec<_>>(),
            Val::Array(items) if !items.is_empty() => {
                let mut out = Vec::new();
                for item in items {
                    let sid = self.sid_of(tab, &f, Some(item), false)?;
                    if out.contains(&sid) {
                        return Err(self.bad_item(tab, &f, item, "a server not already listed"));
                    }
                    out.push(sid);
                }
                out
            }
            _ => return Err(self.bad(tab, &f, SERVERS)),
        };
        servers.sort();
        let durability = self.choice(
            tab,
            "mode",
            &[("sync", Durability::Sync), ("async", Durability::Async)],
            Some(Durability::Sync),
        )?;
        let replicas = self.opt_int_in(tab, "replicas", 0, u8::MAX as u64)?.unwrap_or(1) as u8;
        if durability == Durability::Sync && replicas as usize >= servers.len() {
            let line = tab.get("replicas").map(|f| self.field_line(tab, &f)).unwrap_or(tab.line);
            return Err(self.err(
                line,
                format!(
                    "[cluster]: `replicas` must be less than the number of servers ({}) in sync mode, \
                     or no save could ever be acknowledged; got {replicas}",
                    servers.len()
                ),
            ));
        }
        let log_capacity = self.opt_int_in(tab, "log_capacity", 1, u32::MAX as u64)?.unwrap_or(10_000) as usize;
        let granularity = self.choice(
            tab,
            "granularity",
            &[
                ("mailbox", Granularity::Mailbox),
                ("user", Granularity::User),
                ("domain", Granularity::Domain),
                ("global", Granularity::Global),
            ],
            Some(Granularity::Mailbox),
        )?;
        let latency_ms = self.range(tab, "latency_ms")?.unwrap_or((1, 5));
        let disk_latency_us = self.range(tab, "disk_latency_us")?.unwrap_or((200, 1000));
        let request_timeout_ms = self.opt_int_in(tab, "request_timeout_ms", 1, u64::MAX >> 1)?.unwrap_or(5000);

        let cx = Cx { text: self.text, path: self.path.clone(), servers: servers.clone() };
        let links = match tab.get("links") {
            None => None,
            Some(f) => {
                const LINK: &str = "a link table like { a = \"s1\", b = \"s2\" }";
                let items = cx.array_of(tab, &f, &format!("a list of links, each {LINK}"))?;
                let mut links: Vec<LinkSpec> = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let Val::Table(entries) = &item.val else {
                        return Err(cx.bad_item(tab, &f, item, LINK));
                    };
                    let line = cx.node_line(item).unwrap_or_else(|| cx.field_line(tab, &f));
                    let lt = Tab { what: format!("[cluster] link {}", i + 1), line, entries };
                    lt.check_keys(&cx, &["a", "b", "latency_ms"])?;
                    let a = cx.server(&lt, "a")?;
                    let b = cx.server(&lt, "b")?;
                    if a == b {
                        return Err(
                            cx.err(line, format!("{}: `a` and `b` must be different servers; got {a} twice", lt.what))
                        );
                    }
                    if links.iter().any(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a)) {
                        return Err(cx.err(line, format!("{}: the link {a}-{b} is listed twice", lt.what)));
                    }
                    let latency_ms = cx.range(&lt, "latency_ms")?;
                    links.push(LinkSpec { a, b, latency_ms });
                }
                Some(links)
            }
        };
        Ok(ClusterSpec {
            servers,
            replicas,
            durability,
            log_capacity,
            granularity,
            latency_ms,
            links,
            disk_latency_us,
            request_timeout_ms,
        })
    }

    fn two_servers(&self, tab: &Tab<'_>) -> Result<(Sid, Sid), ScenarioError> {
        let a = self.server(tab, "a")?;
        let b = self.server(tab, "b")?;
        if a == b {
            let f = tab.get("b").expect("b was parsed");
            return Err(self.bad(tab, &f, "a server other than `a`"));
        }
        Ok((a, b))
    }

    fn event(&self, tab: &Tab<'_>) -> Result<TimedEvent, ScenarioError> {
        let op_names: Vec<&str> = OPS.iter().map(|(n, _)| *n).collect();
        let op_expected = format!("one of {}", op_names.join(", "));
        let f = self.req(tab, "op", &op_expected)?;
        let op = match &f.node.val {
            Val::Str(s) => OPS.iter().find(|(n, _)| n == s),
            _ => None,
        };
        let Some((op, keys)) = op else {
            return Err(self.bad(tab, &f, &op_expected));
        };
        let allowed: Vec<&str> = EVENT_COMMON.iter().chain(keys.iter()).copied().collect();
        let tab = &Tab { what: format!("{} ({op})", tab.what), line: tab.line, entries: tab.entries };
        tab.check_keys(self, &allowed)?;
        let at_ms = self.req_u64(tab, "at_ms")?;
        let id = self.opt_string(tab, "id", "a non-empty event id")?;
        let expect = match tab.get("expect") {
            None => None,
            Some(_) => Some(self.choice(
                tab,
                "expect",
                &[
                    ("ok", ReplyExpect::Ok),
                    ("temporary", ReplyExpect::Temporary),
                    ("permanent", ReplyExpect::Permanent),
                    ("rejected", ReplyExpect::Rejected),
                ],
                None,
            )?),
        };
        const LABEL: &str = "a message label";
        let until = |cx: &Self| -> Result<u64, ScenarioError> {
            let until_ms = cx.req_u64(tab, "until_ms")?;
            if until_ms < at_ms {
                let f = tab.get("until_ms").expect("until_ms was parsed");
                return Err(cx.bad(tab, &f, &format!("at or after `at_ms` ({at_ms})")));
            }
            Ok(until_ms)
        };
        let action = match *op {
            "save" => Action::Save {
                server: self.server(tab, "server")?,
                mailbox: self.mailbox(tab, "mailbox")?,
                label: self.opt_string(tab, "label", LABEL)?,
                flags: self.flags(tab, "flags")?,
                size: self.opt_int_in(tab, "size", 0, u32::MAX as u64)?.unwrap_or(1000) as usize,
            },
            "copy" => Action::Copy {
                server: self.server(tab, "server")?,
                from: self.mailbox(tab, "from")?,
                label: self.req_string(tab, "label", LABEL)?,
                to: self.mailbox(tab, "to")?,
                as_label: self.opt_string(tab, "as_label", LABEL)?,
            },
            "expunge" => Action::Expunge {
                server: self.server(tab, "server")?,
                mailbox: self.mailbox(tab, "mailbox")?,
                labels: self.labels(tab)?,
            },
            "store" => {
                let server = self.server(tab, "server")?;
                let mailbox = self.mailbox(tab, "mailbox")?;
                let labels = self.labels(tab)?;
                if tab.get("add").is_none() && tab.get("remove").is_none() {
                    return Err(self.missing(tab, "add", "flags to add; or `remove`, flags to remove"));
                }
                let add = self.flags(tab, "add")?;
                let remove = self.flags(tab, "remove")?;
                let unchanged_since = match tab.get("unchanged_since") {
                    None => None,
                    Some(f) => match &f.node.val {
                        Val::Str(s) if s == "current" => Some(UnchangedSince::Current),
                        Val::Int(i) if *i >= 0 => Some(UnchangedSince::Value(*i as u64)),
                        _ => return Err(self.bad(tab, &f, "\"current\" or a non-negative integer modseq")),
                    },
                };
                Action::Store { server, mailbox, labels, add, remove, unchanged_since }
            }
            "read" => Action::Read { server: self.server(tab, "server")?, mailbox: self.mailbox(tab, "mailbox")? },
            "master_move" => {
                Action::MasterMove { server: self.server(tab, "server")?, mailbox: self.mailbox(tab, "mailbox")? }
            }
            "create_mailbox" => {
                Action::CreateMailbox { server: self.server(tab, "server")?, mailbox: self.mailbox(tab, "mailbox")? }
            }
            "delete_mailbox" => {
                Action::DeleteMailbox { server: self.server(tab, "server")?, mailbox: self.mailbox(tab, "mailbox")? }
            }
            "cut" => {
                let (a, b) = self.two_servers(tab)?;
                Action::Cut { a, b }
            }
            "restore" => {
                let (a, b) = self.two_servers(tab)?;
                Action::Restore { a, b }
            }
            "isolate" => Action::Isolate { server: self.server(tab, "server")? },
            "partition" => {
                const GROUPS: &str = "a list of server groups like [[\"s1\", \"s2\"], [\"s3\"]]";
                let f = self.req(tab, "groups", GROUPS)?;
                let items = self.array_of(tab, &f, GROUPS)?;
                if items.is_empty() {
                    return Err(self.bad(tab, &f, GROUPS));
                }
                let mut groups: Vec<Vec<Sid>> = Vec::with_capacity(items.len());
                for item in items {
                    let Val::Array(members) = &item.val else {
                        return Err(self.bad_item(tab, &f, item, "a list of server names"));
                    };
                    if members.is_empty() {
                        return Err(self.bad_item(tab, &f, item, "a non-empty list of server names"));
                    }
                    let mut group = Vec::with_capacity(members.len());
                    for m in members {
                        let sid = self.sid_of(tab, &f, Some(m), true)?;
                        if group.contains(&sid) || groups.iter().any(|g| g.contains(&sid)) {
                            return Err(self.bad_item(tab, &f, m, "a server in no other group"));
                        }
                        group.push(sid);
                    }
                    groups.push(group);
                }
                Action::Partition { groups }
            }
            "heal" => Action::Heal,
            "flap" => {
                let (a, b) = self.two_servers(tab)?;
                Action::Flap { a, b, down_ms: self.opt_u64(tab, "down_ms")?.unwrap_or(500) }
            }
            "crash" => Action::Crash { server: self.server(tab, "server")? },
            "restart" => Action::Restart { server: self.server(tab, "server")? },
            "lose" => Action::Lose { server: self.server(tab, "server")? },
            "replace" => Action::Replace { server: self.server(tab, "server")? },
            "hand_add" => Action::HandAdd {
                server: self.server(tab, "server")?,
                mailbox: self.mailbox(tab, "mailbox")?,
                label: self.opt_string(tab, "label", LABEL)?,
            },
            "hand_delete" => Action::HandDelete {
                server: self.server(tab, "server")?,
                mailbox: self.mailbox(tab, "mailbox")?,
                label: self.req_string(tab, "label", LABEL)?,
            },
            "corrupt" => {
                Action::Corrupt { server: self.server(tab, "server")?, label: self.req_string(tab, "label", LABEL)? }
            }
            "random_workload" => Action::RandomWorkload {
                until_ms: until(self)?,
                ops_per_s: self.opt_int_in(tab, "ops_per_s", 1, 1_000_000)?.unwrap_or(20),
                users: self.opt_int_in(tab, "users", 1, 1_000_000)?.unwrap_or(3) as u32,
                mailboxes: self.opt_int_in(tab, "mailboxes", 1, 1_000_000)?.unwrap_or(2) as u32,
                servers: match tab.get("servers") {
                    None => None,
                    Some(f) => {
                        let list = self.server_list(tab, &f)?;
                        if list.is_empty() {
                            return Err(self.bad(tab, &f, "a non-empty list of server names"));
                        }
                        Some(list)
                    }
                },
            },
            "random_faults" => {
                let until_ms = until(self)?;
                let count = self.opt_int_in(tab, "count", 0, 1_000_000)?.unwrap_or(5) as u32;
                let kinds = match tab.get("kinds") {
                    None => FAULT_KINDS.iter().map(|(_, k)| *k).filter(|k| *k != FaultKind::Lose).collect(),
                    Some(f) => {
                        let names: Vec<String> = FAULT_KINDS.iter().map(|(n, _)| format!("{n:?}")).collect();
                        let expected = format!("one of {}", names.join(", "));
                        let items = self.array_of(tab, &f, &format!("a list of fault kinds, each {expected}"))?;
                        let mut kinds = Vec::with_capacity(items.len());
                        for item in items {
                            let kind = match &item.val {
                                Val::Str(s) => FAULT_KINDS.iter().find(|(n, _)| n == s).map(|(_, k)| *k),
                                _ => None,
                            };
                            let Some(kind) = kind else {
                                return Err(self.bad_item(tab, &f, item, &expected));
                            };
                            if !kinds.contains(&kind) {
                                kinds.push(kind);
                            }
                        }
                        if kinds.is_empty() {
                            return Err(self.bad(
                                tab,
                                &f,
                                &format!("a non-empty list of fault kinds, each {expected}"),
                            ));
                        }
                        kinds
                    }
                };
                Action::RandomFaults { until_ms, count, kinds }
            }
            other => unreachable!("op {other} is in OPS but not handled"),
        };
        Ok(TimedEvent { at_ms, id, action, expect, line: tab.line })
    }

    fn expect(&self, tab: &Tab<'_>, ids: &[String]) -> Result<Expect, ScenarioError> {
        let names: Vec<&str> = CHECKS.iter().map(|(n, _)| *n).collect();
        let expected = format!("one of {}", names.join(", "));
        let f = self.req(tab, "check", &expected)?;
        let check = match &f.node.val {
            Val::Str(s) => CHECKS.iter().find(|(n, _)| n == s),
            _ => None,
        };
        let Some((check, keys)) = check else {
            return Err(self.bad(tab, &f, &expected));
        };
        let allowed: Vec<&str> = std::iter::once("check").chain(keys.iter().copied()).collect();
        let tab = &Tab { what: format!("{} ({check})", tab.what), line: tab.line, entries: tab.entries };
        tab.check_keys(self, &allowed)?;
        const LABEL: &str = "a message label";
        Ok(match *check {
            "invariants" => Expect::Invariants,
            "invariant" => {
                let expected = format!("one of {}", INVARIANTS.join(", "));
                let f = self.req(tab, "name", &expected)?;
                match &f.node.val {
                    Val::Str(s) if INVARIANTS.contains(&s.as_str()) => Expect::Invariant(s.clone()),
                    _ => return Err(self.bad(tab, &f, &expected)),
                }
            }
            "root" => Expect::Root { server: self.server(tab, "server")? },
            "not_uid" => Expect::NotUid {
                label: self.req_string(tab, "label", LABEL)?,
                uid: self.req_int_in(tab, "uid", 1, u32::MAX as u64)? as u32,
            },
            "uid" => Expect::Uid {
                label: self.req_string(tab, "label", LABEL)?,
                uid: self.req_int_in(tab, "uid", 1, u32::MAX as u64)? as u32,
            },
            "flags" => {
                let label = self.req_string(tab, "label", LABEL)?;
                if tab.get("flags").is_none() {
                    return Err(self.missing(tab, "flags", "a list of flags, possibly empty"));
                }
                Expect::Flags { label, flags: self.flags(tab, "flags")? }
            }
            "present" => Expect::Present { label: self.req_string(tab, "label", LABEL)? },
            "absent" => Expect::Absent { label: self.req_string(tab, "label", LABEL)? },
            "mark" => {
                let marks: Vec<&str> = tandem_core::Mark::ALL.iter().map(|m| m.name()).collect();
                let expected = format!("a coverage mark name, one of {}", marks.join(", "));
                let f = self.req(tab, "name", &expected)?;
                let name = match &f.node.val {
                    Val::Str(s) if tandem_core::Mark::from_name(s).is_some() => s.clone(),
                    _ => return Err(self.bad(tab, &f, &expected)),
                };
                Expect::Mark { name, min: self.opt_u64(tab, "min")?.unwrap_or(1) }
            }
            "exactly_one_ok" => {
                let f = self.req(tab, "events", "a list of event ids")?;
                let items = self.array_of(tab, &f, "a list of event ids")?;
                if items.is_empty() {
                    return Err(self.bad(tab, &f, "a non-empty list of event ids"));
                }
                let mut events = Vec::with_capacity(items.len());
                for item in items {
                    match &item.val {
                        Val::Str(s) if ids.contains(s) => events.push(s.clone()),
                        _ => {
                            let known = if ids.is_empty() {
                                "no event has an `id`".to_string()
                            } else {
                                format!("known: {}", ids.join(", "))
                            };
                            return Err(self.bad_item(tab, &f, item, &format!("the `id` of an event ({known})")));
                        }
                    }
                }
                Expect::ExactlyOneOk { events }
            }
            "count" => {
                Expect::Count { mailbox: self.mailbox(tab, "mailbox")?, count: self.req_u64(tab, "count")? as usize }
            }
            "visible" => {
                let f = self.req(tab, "visible", "true or false")?;
                let visible = match &f.node.val {
                    Val::Bool(b) => *b,
                    _ => return Err(self.bad(tab, &f, "true or false")),
                };
                Expect::Visible { mailbox: self.mailbox(tab, "mailbox")?, visible }
            }
            "renumbered" => {
                let f = self.req(tab, "labels", "a non-empty list of message labels")?;
                let labels = self.opt_str_list(tab, "labels", LABEL)?.unwrap_or_default();
                if labels.is_empty() {
                    return Err(self.bad(tab, &f, "a non-empty list of message labels"));
                }
                Expect::Renumbered { labels }
            }
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
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"# comment: the seed's UID conflict
name = "seed-uid-conflict"
seed = 7
wire = true
settle_ms = 30000
heal_at_end = false

[cluster]
servers = 3
replicas = 1
mode = "async"
log_capacity = 50
granularity = "user"
latency_ms = 2
disk_latency_us = [100, 300]
request_timeout_ms = 4000
links = [ { a = "s1", b = "s2", latency_ms = [100, 120] }, { a = "s2", b = "s3" } ]

[[event]]
at_ms = 900
op = "read"
server = "s2"
mailbox = "alice/INBOX"

[[event]]
at_ms = 600                        # sorted before the read
op = "save"
server = "s1"
mailbox = "alice/INBOX"
label = "m1"
flags = ["\\Flagged", "$Junk"]
size = 2000
id = "save1"
expect = "ok"

[[event]]
at_ms = 900
op = "isolate"
server = "s3"

[[expect]]
check = "present"
label = "m1"

[[expect]]
check = "exactly_one_ok"
events = ["save1"]

[[expect]]
check = "invariants"
"#;

    fn mb(s: &str) -> MailboxKey {
        let (u, n) = s.split_once('/').unwrap();
        MailboxKey::new(u, n)
    }

    fn fl(s: &str) -> Flag {
        Flag::new(s).unwrap()
    }

    fn err_of(text: &str) -> ScenarioError {
        match parse(text, Some(Path::new("t.toml"))) {
            Ok(s) => panic!("expected an error, parsed {s:?}"),
            Err(e) => e,
        }
    }

    fn assert_err(text: &str, line: usize, needles: &[&str]) {
        let e = err_of(text);
        assert_eq!(e.line, line, "wrong line for error: {e}");
        for n in needles {
            assert!(e.message.contains(n), "error {e} lacks {n:?}");
        }
    }

    const HEAD: &str = "[cluster]\nservers = 3\n";

    #[test]
    fn example_parses_to_expected_structure() {
        let s = parse(EXAMPLE, None).unwrap();
        let expected = Scenario {
            name: "seed-uid-conflict".into(),
            path: None,
            seed: 7,
            wire: true,
            cluster: ClusterSpec {
                servers: vec![Sid(1), Sid(2), Sid(3)],
                replicas: 1,
                durability: Durability::Async,
                log_capacity: 50,
                granularity: Granularity::User,
                latency_ms: (2, 2),
                links: Some(vec![
                    LinkSpec { a: Sid(1), b: Sid(2), latency_ms: Some((100, 120)) },
                    LinkSpec { a: Sid(2), b: Sid(3), latency_ms: None },
                ]),
                disk_latency_us: (100, 300),
                request_timeout_ms: 4000,
            },
            events: vec![
                TimedEvent {
                    at_ms: 600,
                    id: Some("save1".into()),
                    action: Action::Save {
                        server: Sid(1),
                        mailbox: mb("alice/INBOX"),
                        label: Some("m1".into()),
                        flags: vec![fl("\\Flagged"), fl("$Junk")],
                        size: 2000,
                    },
                    expect: Some(ReplyExpect::Ok),
                    line: 25,
                },
                TimedEvent {
                    at_ms: 900,
                    id: None,
                    action: Action::Read { server: Sid(2), mailbox: mb("alice/INBOX") },
                    expect: None,
                    line: 19,
                },
                TimedEvent { at_ms: 900, id: None, action: Action::Isolate { server: Sid(3) }, expect: None, line: 36 },
            ],
            expects: vec![
                Expect::Present { label: "m1".into() },
                Expect::ExactlyOneOk { events: vec!["save1".into()] },
                Expect::Invariants,
            ],
            settle_ms: 30000,
            heal_at_end: false,
        };
        assert_eq!(s, expected);
    }

    #[test]
    fn doc_example_parses() {
        let src = include_str!("scenario.rs");
        let example: String = src
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.strip_prefix("//!").unwrap().strip_prefix(' ').unwrap_or("")))
            .collect();
        let s = parse(&example, None).unwrap();
        assert_eq!(s.name, "seed-uid-conflict");
        assert_eq!(s.cluster.links.as_ref().map(Vec::len), Some(2));
        assert_eq!(s.events.len(), 2);
        assert_eq!(s.expects, vec![Expect::Present { label: "m1".into() }, Expect::Invariants]);
    }

    #[test]
    fn defaults_apply() {
        let s = parse("[cluster]\nservers = [\"s5\", \"s2\"]\n", Some(Path::new("/x/my-case.toml"))).unwrap();
        assert_eq!(s.name, "my-case");
        assert_eq!(s.path.as_deref(), Some(Path::new("/x/my-case.toml")));
        assert_eq!((s.seed, s.wire, s.settle_ms, s.heal_at_end), (1, false, 60_000, true));
        let c = &s.cluster;
        assert_eq!(c.servers, vec![Sid(2), Sid(5)]);
        assert_eq!((c.replicas, c.durability, c.log_capacity), (1, Durability::Sync, 10_000));
        assert_eq!((c.granularity, c.latency_ms, c.disk_latency_us), (Granularity::Mailbox, (1, 5), (200, 1000)));
        assert_eq!((c.request_timeout_ms, c.links.clone()), (5000, None));
        assert!(s.events.is_empty() && s.expects.is_empty());
    }

    #[test]
    fn dotted_keys_without_spans_parse() {
        let s = parse("cluster.servers = 2\ncluster.mode = \"async\"\n", None).unwrap();
        assert_eq!(s.cluster.servers, vec![Sid(1), Sid(2)]);
        assert_eq!(s.cluster.durability, Durability::Async);
        // A typo inside such a table is still caught.
        let e = parse("cluster.servers = 2\ncluster.mdoe = \"async\"\n", None).unwrap_err();
        assert!(e.message.contains("unknown key `mdoe`"), "{e}");
    }

    #[test]
    fn every_op_parses() {
        let text = format!(
            r#"{HEAD}
[[event]]
at_ms = 1
op = "save"
server = "s1"
mailbox = "alice/INBOX"
[[event]]
at_ms = 2
op = "copy"
server = "s2"
from = "alice/INBOX"
label = "m1"
to = "alice/Archive/2008"
as_label = "c1"
[[event]]
at_ms = 3
op = "expunge"
server = "s1"
mailbox = "alice/INBOX"
labels = ["m1", "m2"]
[[event]]
at_ms = 4
op = "expunge"
server = "s1"
mailbox = "alice/INBOX"
label = "m3"
[[event]]
at_ms = 5
op = "store"
server = "s3"
mailbox = "alice/INBOX"
label = "m1"
add = ["\\Seen"]
remove = ["\\Flagged"]
unchanged_since = "current"
[[event]]
at_ms = 6
op = "store"
server = "s3"
mailbox = "alice/INBOX"
labels = ["m1"]
remove = []
unchanged_since = 12
[[event]]
at_ms = 7
op = "read"
server = "s1"
mailbox = "bob/INBOX"
[[event]]
at_ms = 8
op = "master_move"
server = "s2"
mailbox = "bob/INBOX"
[[event]]
at_ms = 9
op = "cut"
a = "s1"
b = "s2"
[[event]]
at_ms = 10
op = "restore"
a = "s2"
b = "s1"
[[event]]
at_ms = 11
op = "isolate"
server = "s3"
[[event]]
at_ms = 12
op = "partition"
groups = [["s1", "s2"], ["s3"]]
[[event]]
at_ms = 13
op = "heal"
[[event]]
at_ms = 14
op = "flap"
a = "s1"
b = "s3"
[[event]]
at_ms = 15
op = "flap"
a = "s1"
b = "s3"
down_ms = 40
[[event]]
at_ms = 16
op = "crash"
server = "s1"
[[event]]
at_ms = 17
op = "restart"
server = "s1"
[[event]]
at_ms = 18
op = "lose"
server = "s2"
[[event]]
at_ms = 19
op = "replace"
server = "s2"
[[event]]
at_ms = 20
op = "hand_add"
server = "s2"
mailbox = "alice/INBOX"
label = "h1"
[[event]]
at_ms = 21
op = "hand_add"
server = "s2"
mailbox = "alice/INBOX"
[[event]]
at_ms = 22
op = "hand_delete"
server = "s3"
mailbox = "alice/INBOX"
label = "m1"
[[event]]
at_ms = 23
op = "corrupt"
server = "s3"
label = "m1"
[[event]]
at_ms = 24
op = "random_workload"
until_ms = 1000
[[event]]
at_ms = 25
op = "random_workload"
until_ms = 1000
ops_per_s = 50
users = 5
mailboxes = 3
servers = ["s1", "s3"]
[[event]]
at_ms = 26
op = "random_faults"
until_ms = 2000
[[event]]
at_ms = 27
op = "random_faults"
until_ms = 2000
count = 9
kinds = ["lose", "hand_edit", "corrupt", "partition", "cut", "crash", "flap"]
[[event]]
at_ms = 28
op = "create_mailbox"
server = "s1"
mailbox = "alice/Projects"
[[event]]
at_ms = 29
op = "delete_mailbox"
server = "s2"
mailbox = "alice/Projects"
"#
        );
        let s = parse(&text, None).unwrap();
        let (s1, s2, s3) = (Sid(1), Sid(2), Sid(3));
        let inbox = mb("alice/INBOX");
        let all_but_lose = vec![
            FaultKind::Partition,
            FaultKind::Cut,
            FaultKind::Crash,
            FaultKind::Flap,
            FaultKind::HandEdit,
            FaultKind::Corrupt,
        ];
        let expected = vec![
            Action::Save { server: s1, mailbox: inbox.clone(), label: None, flags: vec![], size: 1000 },
            Action::Copy {
                server: s2,
                from: inbox.clone(),
                label: "m1".into(),
                to: mb("alice/Archive/2008"),
                as_label: Some("c1".into()),
            },
            Action::Expunge { server: s1, mailbox: inbox.clone(), labels: vec!["m1".into(), "m2".into()] },
            Action::Expunge { server: s1, mailbox: inbox.clone(), labels: vec!["m3".into()] },
            Action::Store {
                server: s3,
                mailbox: inbox.clone(),
                labels: vec!["m1".into()],
                add: vec![fl("\\Seen")],
                remove: vec![fl("\\Flagged")],
                unchanged_since: Some(UnchangedSince::Current),
            },
            Action::Store {
                server: s3,
                mailbox: inbox.clone(),
                labels: vec!["m1".into()],
                add: vec![],
                remove: vec![],
                unchanged_since: Some(UnchangedSince::Value(12)),
            },
            Action::Read { server: s1, mailbox: mb("bob/INBOX") },
            Action::MasterMove { server: s2, mailbox: mb("bob/INBOX") },
            Action::Cut { a: s1, b: s2 },
            Action::Restore { a: s2, b: s1 },
            Action::Isolate { server: s3 },
            Action::Partition { groups: vec![vec![s1, s2], vec![s3]] },
            Action::Heal,
            Action::Flap { a: s1, b: s3, down_ms: 500 },
            Action::Flap { a: s1, b: s3, down_ms: 40 },
            Action::Crash { server: s1 },
            Action::Restart { server: s1 },
            Action::Lose { server: s2 },
            Action::Replace { server: s2 },
            Action::HandAdd { server: s2, mailbox: inbox.clone(), label: Some("h1".into()) },
            Action::HandAdd { server: s2, mailbox: inbox.clone(), label: None },
            Action::HandDelete { server: s3, mailbox: inbox.clone(), label: "m1".into() },
            Action::Corrupt { server: s3, label: "m1".into() },
            Action::RandomWorkload { until_ms: 1000, ops_per_s: 20, users: 3, mailboxes: 2, servers: None },
            Action::RandomWorkload {
                until_ms: 1000,
                ops_per_s: 50,
                users: 5,
                mailboxes: 3,
                servers: Some(vec![s1, s3]),
            },
            Action::RandomFaults { until_ms: 2000, count: 5, kinds: all_but_lose },
            Action::RandomFaults {
                until_ms: 2000,
                count: 9,
                kinds: vec![
                    FaultKind::Lose,
                    FaultKind::HandEdit,
                    FaultKind::Corrupt,
                    FaultKind::Partition,
                    FaultKind::Cut,
                    FaultKind::Crash,
                    FaultKind::Flap,
                ],
            },
            Action::CreateMailbox { server: s1, mailbox: mb("alice/Projects") },
            Action::DeleteMailbox { server: s2, mailbox: mb("alice/Projects") },
        ];
        let got: Vec<Action> = s.events.iter().map(|e| e.action.clone()).collect();
        assert_eq!(got, expected);
        assert_eq!(s.events.iter().map(|e| e.at_ms).collect::<Vec<_>>(), (1..=29).collect::<Vec<_>>());
        // Every op in the table is exercised.
        for (op, _) in OPS {
            assert!(text.contains(&format!("op = \"{op}\"")), "op {op} untested");
        }
    }

    #[test]
    fn every_check_parses() {
        let text = format!(
            r#"{HEAD}
[[event]]
at_ms = 1
op = "heal"
id = "a"
[[event]]
at_ms = 1
op = "heal"
id = "b"
[[expect]]
check = "invariants"
[[expect]]
check = "invariant"
name = "flags_agree"
[[expect]]
check = "root"
server = "s2"
[[expect]]
check = "not_uid"
label = "m2"
uid = 2
[[expect]]
check = "uid"
label = "m1"
uid = 1
[[expect]]
check = "flags"
label = "m1"
flags = []
[[expect]]
check = "flags"
label = "m1"
flags = ["\\Answered", "\\Seen"]
[[expect]]
check = "present"
label = "m1"
[[expect]]
check = "absent"
label = "m3"
[[expect]]
check = "mark"
name = "root_elected"
[[expect]]
check = "mark"
name = "full_sync"
min = 3
[[expect]]
check = "exactly_one_ok"
events = ["a", "b"]
[[expect]]
check = "count"
mailbox = "alice/INBOX"
count = 4
[[expect]]
check = "renumbered"
labels = ["m2", "m3"]
[[expect]]
check = "visible"
mailbox = "alice/Archive"
visible = false
"#
        );
        let s = parse(&text, None).unwrap();
        assert_eq!(
            s.expects,
            vec![
                Expect::Invariants,
                Expect::Invariant("flags_agree".into()),
                Expect::Root { server: Sid(2) },
                Expect::NotUid { label: "m2".into(), uid: 2 },
                Expect::Uid { label: "m1".into(), uid: 1 },
                Expect::Flags { label: "m1".into(), flags: vec![] },
                Expect::Flags { label: "m1".into(), flags: vec![fl("\\Answered"), fl("\\Seen")] },
                Expect::Present { label: "m1".into() },
                Expect::Absent { label: "m3".into() },
                Expect::Mark { name: "root_elected".into(), min: 1 },
                Expect::Mark { name: "full_sync".into(), min: 3 },
                Expect::ExactlyOneOk { events: vec!["a".into(), "b".into()] },
                Expect::Count { mailbox: mb("alice/INBOX"), count: 4 },
                Expect::Renumbered { labels: vec!["m2".into(), "m3".into()] },
                Expect::Visible { mailbox: mb("alice/Archive"), visible: false },
            ]
        );
    }

    #[test]
    fn events_sort_stably_by_time() {
        let text = format!(
            "{HEAD}[[event]]\nat_ms = 50\nop = \"heal\"\nid = \"late\"\n\
             [[event]]\nat_ms = 10\nop = \"heal\"\nid = \"x\"\n\
             [[event]]\nat_ms = 10\nop = \"heal\"\nid = \"y\"\n"
        );
        let s = parse(&text, None).unwrap();
        let ids: Vec<_> = s.events.iter().map(|e| e.id.clone().unwrap()).collect();
        assert_eq!(ids, ["x", "y", "late"]);
        let lines: Vec<_> = s.events.iter().map(|e| e.line).collect();
        assert_eq!(lines, [7, 11, 3]);
    }

    #[test]
    fn error_toml_syntax_line() {
        // Line 4 has an unterminated string.
        assert_err("[cluster]\nservers = 3\n\nname = \"oops\n", 4, &["TOML syntax"]);
        assert_err("seed = 1\n[cluster]\nservers = = 3\n", 3, &["TOML syntax"]);
    }

    #[test]
    fn error_unknown_op_line() {
        let text = format!("{HEAD}\n[[event]]\nat_ms = 1\nop = \"heal\"\n\n[[event]]\nat_ms = 2\nop = \"explode\"\n");
        assert_err(&text, 10, &["event 2", "`op`", "\"explode\"", "save"]);
    }

    #[test]
    fn error_unknown_key_line() {
        let text = format!("{HEAD}\n[[event]]\nat_ms = 1\nop = \"save\"\nsever = \"s1\"\nmailbox = \"a/b\"\n");
        assert_err(&text, 7, &["event 1", "unknown key `sever`", "server"]);
        assert_err("seeed = 3\n[cluster]\nservers = 3\n", 1, &["unknown key `seeed`"]);
        assert_err("[cluster]\nservers = 3\nreplica = 1\n", 3, &["[cluster]", "unknown key `replica`"]);
        let text = format!("{HEAD}[[expect]]\ncheck = \"present\"\nlabel = \"m1\"\nuid = 3\n");
        assert_err(&text, 6, &["expect 1", "unknown key `uid`"]);
        let text = "[cluster]\nservers = 2\nlinks = [{ a = \"s1\", b = \"s2\", latncy_ms = 3 }]\n";
        assert_err(text, 3, &["link 1", "unknown key `latncy_ms`"]);
    }

    #[test]
    fn error_unknown_server_line() {
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"crash\"\n\nserver = \"s4\"\n");
        assert_err(&text, 7, &["event 1", "`server`", "\"s4\"", "s1, s2, s3"]);
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"isolate\"\nserver = \"x\"\n");
        let e = err_of(&text);
        assert_eq!(e.line, 6);
        assert_eq!(e.message, "event 1 (isolate): `server` must be a server name like \"s2\"; got \"x\"");
        let text = format!(
            "{HEAD}[[event]]\nat_ms = 1\nop = \"partition\"\ngroups = [\n  [\"s1\"],\n  [\"s2\", \"s9\"],\n]\n"
        );
        assert_err(&text, 8, &["`groups`", "\"s9\""]);
        let text = "[cluster]\nservers = 2\nlinks = [\n  { a = \"s1\", b = \"s3\" },\n]\n";
        assert_err(text, 4, &["`b`", "\"s3\""]);
        let text = format!("{HEAD}[[expect]]\ncheck = \"root\"\nserver = \"s0\"\n");
        assert_err(&text, 5, &["`server`", "\"s0\""]);
    }

    #[test]
    fn error_bad_flag_line() {
        let text = format!(
            "{HEAD}[[event]]\nat_ms = 1\nop = \"store\"\nserver = \"s1\"\nmailbox = \"a/INBOX\"\nlabel = \"m\"\nadd = [\"\\\\Seen\",\n  \"bad flag\"]\n"
        );
        assert_err(&text, 10, &["`add`", "\"bad flag\""]);
    }

    #[test]
    fn error_bad_mailbox_line() {
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"read\"\nserver = \"s1\"\nmailbox = \"noslash\"\n");
        assert_err(&text, 7, &["`mailbox`", "\"noslash\"", "user/name"]);
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"read\"\nserver = \"s1\"\nmailbox = \"/INBOX\"\n");
        assert_err(&text, 7, &["`mailbox`"]);
    }

    #[test]
    fn error_unknown_mark_line() {
        let text = format!(
            "{HEAD}[[expect]]\ncheck = \"invariants\"\n[[expect]]\ncheck = \"mark\"\nname = \"root_elekted\"\n"
        );
        assert_err(&text, 7, &["expect 2", "\"root_elekted\"", "root_elected"]);
    }

    #[test]
    fn error_exactly_one_ok_missing_id_line() {
        let text = format!(
            "{HEAD}[[event]]\nat_ms = 1\nop = \"heal\"\nid = \"st1\"\n[[expect]]\ncheck = \"exactly_one_ok\"\nevents = [\"st1\",\n  \"st2\"]\n"
        );
        assert_err(&text, 10, &["`events`", "\"st2\"", "st1"]);
    }

    #[test]
    fn error_missing_key_names_event_line() {
        let text = format!("{HEAD}\n[[event]]\nat_ms = 1\nop = \"save\"\nmailbox = \"a/b\"\n");
        assert_err(&text, 4, &["event 1", "missing `server`"]);
        assert_err("seed = 2\n", 1, &["missing `[cluster]`"]);
        let text = format!("{HEAD}\n[[event]]\nop = \"heal\"\n");
        assert_err(&text, 4, &["missing `at_ms`"]);
    }

    #[test]
    fn other_errors() {
        let text = format!(
            "{HEAD}[[event]]\nat_ms = 1\nop = \"heal\"\nid = \"a\"\n[[event]]\nat_ms = 2\nop = \"heal\"\nid = \"a\"\n"
        );
        assert_err(&text, 10, &["duplicate event id"]);
        assert_err("[cluster]\nservers = 2\nreplicas = 2\n", 3, &["replicas"]);
        assert_err("[cluster]\nservers = 2\nlatency_ms = [5, 1]\n", 3, &["latency_ms"]);
        assert_err("[cluster]\nservers = [\"s1\", \"s1\"]\n", 2, &["already listed"]);
        assert_err("[cluster]\nservers = 0\n", 2, &["servers"]);
        let text = format!("{HEAD}[[event]]\nat_ms = -1\nop = \"heal\"\n");
        assert_err(&text, 4, &["`at_ms`", "non-negative"]);
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"cut\"\na = \"s1\"\nb = \"s1\"\n");
        assert_err(&text, 7, &["`b`"]);
        let text = format!("{HEAD}[[expect]]\ncheck = \"invariant\"\nname = \"no_loss\"\n");
        assert_err(&text, 5, &["no_acked_loss"]);
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"random_faults\"\nuntil_ms = 10\nkinds = [\"meteor\"]\n");
        assert_err(&text, 7, &["`kinds`", "\"meteor\""]);
    }

    #[test]
    fn error_display_is_path_line_message() {
        let e = ScenarioError { path: Some(PathBuf::from("scenarios/x.toml")), line: 12, message: "boom".into() };
        assert_eq!(e.to_string(), "scenarios/x.toml:12: boom");
        let text = format!("{HEAD}[[event]]\nat_ms = 1\nop = \"isolate\"\nserver = \"x\"\n");
        let e = err_of(&text);
        assert_eq!(e.to_string(), "t.toml:6: event 1 (isolate): `server` must be a server name like \"s2\"; got \"x\"");
    }

    #[test]
    fn load_reports_missing_file() {
        let e = load(Path::new("/nonexistent/dir/x.toml")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(e.to_string().starts_with("/nonexistent/dir/x.toml:0: cannot read"));
    }

    #[test]
    fn every_scenario_file_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let files = files_in(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        assert!(!files.is_empty(), "no scenario files in {}", dir.display());
        let mut failures = Vec::new();
        for f in &files {
            match load(f) {
                Ok(s) => {
                    assert_eq!(
                        s.name,
                        f.file_stem().unwrap().to_string_lossy(),
                        "{}: name differs from the file stem",
                        f.display()
                    );
                    assert!(!s.expects.is_empty(), "{}: no [[expect]]", f.display());
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        assert!(failures.is_empty(), "scenario files fail to parse:\n{}", failures.join("\n"));
    }
}
