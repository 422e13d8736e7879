//! A scenario file as TOML has it, shared by the parser and the writer: `scenario::parse`
//! reads a file into these tables with serde and then checks what serde cannot, and
//! `scenario_write` fills them in for toml's serializer, so the two agree on every key.

use crate::scenario::{FaultKind, ReplyExpect};
use serde::{Deserialize, Serialize};
use tandem_core::{Durability, Granularity};
use toml::Spanned;

/// A scenario file as written. Every key is optional here: `parse` applies defaults and
/// requirements, and `scenario_write` fills one in to write a file.
#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileToml {
    pub name: Option<String>,
    pub seed: Option<u64>,
    pub wire: Option<bool>,
    pub settle_ms: Option<u64>,
    pub heal_at_end: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<String>,
    pub cluster: Option<ClusterToml>,
    #[serde(default)]
    pub event: Vec<EventToml>,
    #[serde(default)]
    pub expect: Vec<ExpectToml>,
}

#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterToml {
    pub servers: Option<ServersToml>,
    pub replicas: Option<u8>,
    pub mode: Option<String>,
    pub log_capacity: Option<u64>,
    pub granularity: Option<String>,
    pub latency_ms: Option<RangeToml>,
    pub disk_latency_us: Option<RangeToml>,
    pub request_timeout_ms: Option<u64>,
    pub tombstone_grace_ms: Option<u64>,
    pub startup_hold_ms: Option<u64>,
    pub mta_retry_ms: Option<u64>,
    pub spares: Option<Vec<String>>,
    pub links: Option<Vec<Spanned<LinkToml>>>,
    pub laptops: Option<Vec<Spanned<LaptopToml>>>,
    pub partial_servers: Option<Vec<PartialServerToml>>,
}

/// A partial cluster server (`[cluster] partial_servers = [...]`): it holds every record,
/// and the bodies above `body_bytes_max`, outside `mailboxes` or received before
/// `since_ms` only while it masters their save or once a client asks.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialServerToml {
    pub server: String,
    pub body_bytes_max: Option<u32>,
    /// The mailboxes whose bodies it holds, as patterns over `user/mailbox`.
    pub mailboxes: Option<Vec<String>>,
    /// The date from which it holds bodies, in simulated ms.
    pub since_ms: Option<u64>,
    pub keep_fetched: Option<bool>,
}

/// A user replica (`[cluster] laptops = [...]`): its server name, its user, the cluster
/// server its agent talks to, and the latency of the way there.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LaptopToml {
    pub server: String,
    pub user: String,
    pub home: String,
    pub latency_ms: Option<RangeToml>,
    pub partial: Option<PartialToml>,
}

/// A partial laptop (`partial = { ... }`): the mailbox patterns it holds, the simulated
/// time from which it holds the messages received, the body size above which it holds
/// only the record, and whether a body fetched for a read is kept.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialToml {
    pub mailboxes: Option<Vec<String>>,
    pub since_ms: Option<u64>,
    pub body_bytes_max: Option<u32>,
    pub keep_fetched: Option<bool>,
}

#[derive(Deserialize, Serialize)]
#[serde(untagged, expecting = "a server count (1 or more) or a list of server names like [\"s1\", \"s2\"]")]
pub(crate) enum ServersToml {
    Count(u64),
    Names(Vec<String>),
}

/// `n`, meaning from n to n, or `[min, max]`.
#[derive(Deserialize, Serialize)]
#[serde(untagged, expecting = "an integer or a range [min, max] of non-negative integers")]
pub(crate) enum RangeToml {
    Exact(u64),
    Span(u64, u64),
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LinkToml {
    pub a: String,
    pub b: String,
    pub latency_ms: Option<RangeToml>,
}

/// An `[[event]]` table: the keys of every op, checked against its op by `parse`. List
/// entries that can be wrong on their own keep their position, for the line of a message.
#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventToml {
    pub at_ms: Option<u64>,
    pub op: Option<String>,
    pub server: Option<String>,
    pub home: Option<String>,
    pub mailbox: Option<String>,
    pub from: Option<String>,
    pub label: Option<String>,
    pub to: Option<String>,
    pub as_label: Option<String>,
    pub labels: Option<Vec<String>>,
    pub flags: Option<Vec<Spanned<String>>>,
    pub size: Option<u64>,
    /// import: the UIDVALIDITY and UID the message had on the server it came from.
    pub uidvalidity: Option<u64>,
    pub uid: Option<u64>,
    pub add: Option<Vec<Spanned<String>>>,
    pub remove: Option<Vec<Spanned<String>>>,
    pub unchanged_since: Option<ModseqToml>,
    pub a: Option<String>,
    pub b: Option<String>,
    pub groups: Option<Vec<Vec<Spanned<String>>>>,
    pub down_ms: Option<u64>,
    pub delay_ms: Option<u64>,
    pub for_ms: Option<u64>,
    pub fresh: Option<bool>,
    /// create_mailbox: RFC 6154 special-use attributes (CREATE-SPECIAL-USE).
    pub special_use: Option<Vec<String>>,
    pub until_ms: Option<u64>,
    pub ops_per_s: Option<u64>,
    pub users: Option<u64>,
    pub mailboxes: Option<u64>,
    pub servers: Option<Vec<Spanned<String>>>,
    pub count: Option<u64>,
    pub kinds: Option<Vec<FaultKind>>,
    /// member_add, member_remove: the server added or retired.
    pub member: Option<String>,
    /// member_remove: lost for good, retired at once.
    pub lost: Option<bool>,
    pub id: Option<String>,
    pub expect: Option<ReplyExpect>,
}

/// `unchanged_since = "current"` or a modseq.
#[derive(Deserialize, Serialize)]
#[serde(untagged, expecting = "\"current\" or a non-negative integer modseq")]
pub(crate) enum ModseqToml {
    Value(u64),
    Word(String),
}

/// An `[[expect]]` table: the keys of every check, checked against its check by `parse`.
#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExpectToml {
    pub check: Option<String>,
    pub name: Option<String>,
    pub server: Option<String>,
    pub label: Option<String>,
    pub uid: Option<u64>,
    pub flags: Option<Vec<Spanned<String>>>,
    pub min: Option<u64>,
    pub max: Option<u64>,
    pub events: Option<Vec<Spanned<String>>>,
    pub mailbox: Option<String>,
    pub count: Option<u64>,
    pub uidvalidity: Option<u64>,
    pub visible: Option<bool>,
    /// body_held: whether the server holds the body.
    pub held: Option<bool>,
    pub labels: Option<Vec<String>>,
    pub special_use: Option<Vec<String>>,
    /// member: active, leaving or retired.
    pub state: Option<String>,
}

/// The words of `[cluster] mode`.
pub(crate) const MODES: &[(&str, Durability)] = &[("sync", Durability::Sync), ("async", Durability::Async)];

/// The words of `[cluster] granularity`.
pub(crate) const GRANULARITIES: &[(&str, Granularity)] = &[
    ("mailbox", Granularity::Mailbox),
    ("user", Granularity::User),
    ("domain", Granularity::Domain),
    ("global", Granularity::Global),
];
