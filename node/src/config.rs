//! The node's TOML configuration. Unknown keys and bad values are errors that name the
//! key; everything but the server id, the listen address and the peers has a default.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tandem_core::io::Config as CoreConfig;
use tandem_core::types::{Durability, Granularity, Sid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: u32,
    listen: SocketAddr,
    #[serde(default)]
    admin: Option<SocketAddr>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    replicas: Option<u8>,
    /// This node is a user replica (a laptop's store): see the core's
    /// `Config::user_replica`. It has no peers; `tandem replicate` syncs it.
    #[serde(default)]
    user_replica: Option<bool>,
    /// A user replica that holds part of its user's mail (`partial = { mailboxes
    /// (patterns), since_s (seconds since the Unix epoch), body_bytes_max, keep_fetched }`),
    /// or a cluster server that holds every record but only some bodies on demand (those
    /// above `body_bytes_max`, outside `mailboxes`, patterns over `user/mailbox`, or
    /// received before `since_s`): see the core's `partial` module.
    #[serde(default)]
    partial: Option<tandem_core::partial::Partial>,
    #[serde(default)]
    log_capacity: Option<usize>,
    #[serde(default)]
    granularity: Option<String>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
    #[serde(default)]
    tombstone_grace_secs: Option<u64>,
    #[serde(default)]
    body_inline_max_bytes: Option<u64>,
    #[serde(default)]
    startup_hold_ms: Option<u64>,
    #[serde(default)]
    fresh_read_ms: Option<u64>,
    #[serde(default)]
    retry_window_s: Option<u64>,
    #[serde(default)]
    compression: Option<bool>,
    #[serde(default)]
    metrics: Option<SocketAddr>,
    #[serde(default)]
    log_format: Option<String>,
    #[serde(default)]
    imap: Option<SocketAddr>,
    #[serde(default)]
    lmtp: Option<SocketAddr>,
    #[serde(default)]
    users_file: Option<PathBuf>,
    #[serde(default)]
    imaps: Option<SocketAddr>,
    #[serde(default)]
    mail_tls_cert: Option<PathBuf>,
    #[serde(default)]
    mail_tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    admin_socket: Option<PathBuf>,
    #[serde(default)]
    admin_token_file: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext_auth: Option<bool>,
    #[serde(default)]
    allow_plain_peer_links: Option<bool>,
    #[serde(default)]
    plaintext_auth_on_loopback: Option<bool>,
    #[serde(default)]
    special_use: Option<BTreeMap<String, String>>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    record: Option<RecordFileConfig>,
    #[serde(default)]
    peer: Vec<PeerConfig>,
}

/// The `[record]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFileConfig {
    dir: PathBuf,
    #[serde(default)]
    max_mb: Option<u64>,
    #[serde(default)]
    bodies: Option<bool>,
}

/// Recording the core's inputs for replay (`crate::record`); off unless configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordConfig {
    pub dir: PathBuf,
    /// What the directory's recordings may take together; the oldest go first.
    pub max_bytes: u64,
    /// Keep body bytes (replayable) or only their hashes and sizes (no mail in the file).
    pub bodies: bool,
}

/// `record.max_mb` when not given, and its bounds.
pub const RECORD_MB_DEFAULT: u64 = 1024;
const RECORD_MB_MIN: u64 = 1;
const RECORD_MB_MAX: u64 = 1 << 20;

/// Bounds on what clients, senders and connections may use, each with a safe default
/// (the `[limits]` table; README's Security section lists them).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted by APPEND and LMTP, in bytes.
    pub message_size_max: usize,
    /// IMAP command line (without literals) after login, in bytes.
    pub imap_line_len_max: usize,
    /// A whole command before login, literals included, in bytes.
    pub imap_prelogin_len_max: usize,
    /// Sessions per listener (IMAP, IMAPS, LMTP each).
    pub connections_max: usize,
    /// Sessions per client IP address on one listener.
    pub connections_per_ip_max: usize,
    /// IMAP sessions logged in as one user on this node.
    pub connections_per_user_max: usize,
    /// Time to log in after connecting.
    pub login_timeout_s: u64,
    /// A logged-in session with no command for this long is logged out (RFC 3501: at
    /// least 30 minutes). IDLE is exempt: it waits for the client's DONE.
    pub autologout_s: u64,
    /// LMTP recipients per transaction (duplicates collapse into one).
    pub recipients_max: usize,
    /// Mailbox name length in bytes and hierarchy depth.
    pub mailbox_name_len_max: usize,
    pub mailbox_depth_max: usize,
    /// Mailboxes one user may have.
    pub mailboxes_per_user_max: usize,
    /// Admin connections served at once.
    pub admin_connections_max: usize,
    /// Per-user storage quota in bytes and messages; 0 is unlimited.
    pub quota_bytes: u64,
    pub quota_messages: u64,
    /// LMTP: compare the local part of a recipient without case (the domain always is).
    pub lmtp_local_part_ignore_case: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            message_size_max: 50 * 1024 * 1024,
            imap_line_len_max: 64 * 1024,
            // RFC 2971 lets a client send ID with 30 pairs of up to 1024 bytes before login.
            imap_prelogin_len_max: 64 * 1024,
            connections_max: 1024,
            connections_per_ip_max: 64,
            connections_per_user_max: 32,
            login_timeout_s: 60,
            autologout_s: 30 * 60,
            recipients_max: 100,
            mailbox_name_len_max: 1024,
            mailbox_depth_max: 32,
            mailboxes_per_user_max: 2000,
            admin_connections_max: 16,
            quota_bytes: 0,
            quota_messages: 0,
            lmtp_local_part_ignore_case: true,
        }
    }
}

impl Limits {
    fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("limits.message_size_max", self.message_size_max as u64),
            ("limits.imap_line_len_max", self.imap_line_len_max as u64),
            ("limits.imap_prelogin_len_max", self.imap_prelogin_len_max as u64),
            ("limits.connections_max", self.connections_max as u64),
            ("limits.connections_per_ip_max", self.connections_per_ip_max as u64),
            ("limits.connections_per_user_max", self.connections_per_user_max as u64),
            ("limits.login_timeout_s", self.login_timeout_s),
            ("limits.autologout_s", self.autologout_s),
            ("limits.recipients_max", self.recipients_max as u64),
            ("limits.mailbox_name_len_max", self.mailbox_name_len_max as u64),
            ("limits.mailbox_depth_max", self.mailbox_depth_max as u64),
            ("limits.mailboxes_per_user_max", self.mailboxes_per_user_max as u64),
            ("limits.admin_connections_max", self.admin_connections_max as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if self.message_size_max > tandem_core::wire::LITERAL_LEN_MAX {
            return Err(bad(
                "limits.message_size_max",
                format!("at most {} bytes (what a peer link carries)", tandem_core::wire::LITERAL_LEN_MAX),
            ));
        }
        // The core refuses longer names and deeper ones from every client and peer.
        if self.mailbox_name_len_max > tandem_core::limits::MAILBOX_NAME_LEN_MAX {
            return Err(bad(
                "limits.mailbox_name_len_max",
                format!("at most {} bytes", tandem_core::limits::MAILBOX_NAME_LEN_MAX),
            ));
        }
        if self.mailbox_depth_max > tandem_core::limits::MAILBOX_DEPTH_MAX {
            return Err(bad("limits.mailbox_depth_max", format!("at most {}", tandem_core::limits::MAILBOX_DEPTH_MAX)));
        }
        if self.autologout_s < 30 * 60 {
            return Err(bad("limits.autologout_s", "RFC 3501 wants at least 30 minutes (1800)"));
        }
        Ok(())
    }
}

/// Where the admin interface listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminListen {
    /// A Unix socket, mode 0600: whoever may open it is the node's operator.
    Unix(PathBuf),
    /// TCP, only with a token every connection must present first.
    Tcp { addr: SocketAddr, token: String },
}

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminListen::Unix(p) => write!(f, "{}", p.display()),
            AdminListen::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u32,
    pub address: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything a node needs, checked.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub core: CoreConfig,
    pub listen: SocketAddr,
    /// The admin interface: a Unix socket unless a TCP address is configured.
    pub admin: AdminListen,
    pub data_dir: PathBuf,
    /// New bodies up to this size are stored in the database, larger ones in files
    /// (see `crate::bodies`); 0 puts every body in a file.
    pub body_inline_max_bytes: u64,
    pub secret: Vec<u8>,
    pub compression: bool,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub peers: Vec<PeerConfig>,
    /// Mutual TLS on peer links, when `tls_cert`, `tls_key` and `tls_ca` are set.
    pub tls: Option<crate::tls::Tls>,
    pub imap: Option<SocketAddr>,
    /// IMAP over implicit TLS (needs `mail_tls_cert`); the plain port offers STARTTLS
    /// whenever a certificate is configured.
    pub imaps: Option<SocketAddr>,
    pub mail_tls: Option<crate::tls::MailTls>,
    pub lmtp: Option<SocketAddr>,
    pub users: std::sync::Arc<crate::users::Users>,
    /// Where `users` was read from: SIGHUP reads it again.
    pub users_file: Option<PathBuf>,
    pub limits: Limits,
    /// LOGIN and AUTHENTICATE PLAIN on a plain, non-loopback IMAP connection while TLS
    /// is configured (Dovecot's `disable_plaintext_auth = no`).
    pub allow_plaintext_auth: bool,
    /// Loopback clients count as secure (they cross no network) unless a plain TCP
    /// forwarder on this host makes remote clients look local: then set it false.
    pub plaintext_auth_on_loopback: bool,
    /// SPECIAL-USE (RFC 6154): mailbox name -> its attribute, said in LIST. By name,
    /// as Dovecot's default configuration does, so it needs no replicated state.
    pub special_use: BTreeMap<String, &'static str>,
    pub record: Option<RecordConfig>,
    /// Start on a restored backup older than the tombstone grace (`tandem node
    /// --accept-old-backup`; see `backup::check_restore_age`). Never from the file: a
    /// one-time decision, not a setting to forget.
    pub accept_old_backup: bool,
}

/// RFC 6154's special-use attributes.
pub const SPECIAL_USES: [&str; 7] = ["\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"];
/// At most this many mailbox names have a special use.
const SPECIAL_USE_NAMES_MAX: usize = 64;

/// The names Dovecot's example configuration gives a special use (Thunderbird, Apple
/// Mail and Outlook find these by it), and Archive.
pub fn special_use_default() -> BTreeMap<String, &'static str> {
    [
        ("Drafts", "\\Drafts"),
        ("Sent", "\\Sent"),
        ("Sent Messages", "\\Sent"),
        ("Trash", "\\Trash"),
        ("Junk", "\\Junk"),
        ("Archive", "\\Archive"),
    ]
    .into_iter()
    .map(|(n, u)| (n.to_string(), u))
    .collect()
}

fn special_use(given: Option<BTreeMap<String, String>>) -> Result<BTreeMap<String, &'static str>, ConfigError> {
    let Some(given) = given else { return Ok(special_use_default()) };
    if given.len() > SPECIAL_USE_NAMES_MAX {
        return Err(bad("special_use", format!("at most {SPECIAL_USE_NAMES_MAX} names")));
    }
    let mut out = BTreeMap::new();
    for (name, attribute) in given {
        if name.is_empty() || name.len() > 255 || name.contains(['*', '%', '\r', '\n']) {
            return Err(bad("special_use", format!("{name:?} is not a mailbox name")));
        }
        let Some(known) = SPECIAL_USES.iter().find(|u| u.eq_ignore_ascii_case(&attribute)) else {
            return Err(bad("special_use", format!("{attribute:?} is none of {}", SPECIAL_USES.join(" "))));
        };
        out.insert(name, *known);
    }
    Ok(out)
}

/// The smallest secret accepted: a cluster secret is a key, not a password.
const SECRET_LEN_MIN: usize = 16;
/// How long every peer must agree on a mailbox before its tombstones are collected
/// (see `tandem_core::Config::tombstone_grace_us`).
const TOMBSTONE_GRACE_SECS_DEFAULT: u64 = 3600;
const TOMBSTONE_GRACE_SECS_MIN: u64 = 10;
/// A start-up hold longer than this would hold writes past any request's timeout.
const STARTUP_HOLD_MS_MAX: u64 = 60_000;
/// A fresh read (SELECT, STATUS) waits for its master's position at most this long:
/// below a round trip it would always be stale, above a minute a client gives up.
const FRESH_READ_MS_MIN: u64 = 10;
const FRESH_READ_MS_MAX: u64 = 60_000;
/// How far apart a SAVE and its retry may be received (`retry_window_s`): 30 days,
/// longer than any MTA keeps a message queued.
const RETRY_WINDOW_S_MAX: u64 = 30 * 86_400;

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("key `{key}`: {why}"))
}

/// A secret from a file the world cannot read: a key others can read is no key.
fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(format!(
                "{} is readable or writable by every user (mode {mode:o}): chmod 600 it",
                path.display()
            ));
        }
    }
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim_ascii().to_vec())
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        NodeConfig::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses a configuration; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<NodeConfig, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        if file.id == 0 || file.id >= 1 << 16 {
            return Err(bad("id", format!("{} is not a server id (1 to 65535)", file.id)));
        }
        let mut servers = vec![Sid(file.id)];
        for (i, p) in file.peer.iter().enumerate() {
            if p.id == 0 || p.id >= 1 << 16 {
                return Err(bad(&format!("peer[{i}].id"), format!("{} is not a server id (1 to 65535)", p.id)));
            }
            if servers.contains(&Sid(p.id)) {
                return Err(bad(&format!("peer[{i}].id"), format!("server id {} appears twice", p.id)));
            }
            servers.push(Sid(p.id));
        }
        servers.sort();
        let mut core = CoreConfig::new(Sid(file.id), servers);
        core.durability = match file.mode.as_deref() {
            None | Some("sync") => Durability::Sync,
            Some("async") => Durability::Async,
            Some(other) => return Err(bad("mode", format!("{other:?} is neither \"sync\" nor \"async\""))),
        };
        core.granularity = match file.granularity.as_deref() {
            None | Some("mailbox") => Granularity::Mailbox,
            Some("user") => Granularity::User,
            Some("domain") => Granularity::Domain,
            Some("global") => Granularity::Global,
            Some(other) => {
                return Err(bad("granularity", format!("{other:?} is not mailbox, user, domain or global")));
            }
        };
        if file.user_replica == Some(true) {
            if !file.peer.is_empty() {
                return Err(bad(
                    "user_replica",
                    "a user replica is a cluster of its own: it has no peers (`tandem replicate` syncs it)",
                ));
            }
            core.user_replica = true;
        }
        if let Some(partial) = file.partial {
            partial.check_on(core.user_replica).map_err(|why| bad("partial", why))?;
            core.partial = Some(partial);
        }
        if let Some(r) = file.replicas {
            if usize::from(r) > file.peer.len() {
                return Err(bad(
                    "replicas",
                    format!("{r} replicas need at least {r} peers, {} configured", file.peer.len()),
                ));
            }
            core.replicas = r;
        } else {
            core.replicas = u8::from(!file.peer.is_empty());
        }
        if let Some(c) = file.log_capacity {
            if c == 0 {
                return Err(bad("log_capacity", "must be at least 1"));
            }
            core.log_capacity = c;
        }
        if let Some(ms) = file.request_timeout_ms {
            if ms == 0 {
                return Err(bad("request_timeout_ms", "must be at least 1"));
            }
            core.request_timeout_us = ms.saturating_mul(1000);
        }
        // An hour by default: far longer than a message can stay on its way between
        // peers (a dead link is noticed within seconds), and an hour of tombstones is
        // nothing to store.
        core.tombstone_grace_us = TOMBSTONE_GRACE_SECS_DEFAULT * 1_000_000;
        if let Some(secs) = file.tombstone_grace_secs {
            if secs < TOMBSTONE_GRACE_SECS_MIN {
                return Err(bad(
                    "tombstone_grace_secs",
                    format!("must be at least {TOMBSTONE_GRACE_SECS_MIN} (longer than a message stays on its way)"),
                ));
            }
            core.tombstone_grace_us = secs.saturating_mul(1_000_000);
        }
        if let Some(ms) = file.startup_hold_ms {
            if ms > STARTUP_HOLD_MS_MAX {
                return Err(bad("startup_hold_ms", format!("must be at most {STARTUP_HOLD_MS_MAX}")));
            }
            core.startup_hold_us = ms.saturating_mul(1000);
        }
        if let Some(ms) = file.fresh_read_ms {
            if !(FRESH_READ_MS_MIN..=FRESH_READ_MS_MAX).contains(&ms) {
                return Err(bad(
                    "fresh_read_ms",
                    format!(
                        "must be from {FRESH_READ_MS_MIN} to {FRESH_READ_MS_MAX} (a SELECT waits at most this long)"
                    ),
                ));
            }
            core.fresh_read_us = ms.saturating_mul(1000);
        }
        if let Some(seconds) = file.retry_window_s {
            if seconds > RETRY_WINDOW_S_MAX {
                return Err(bad(
                    "retry_window_s",
                    format!("must be at most {RETRY_WINDOW_S_MAX} (30 days; 0 turns recognising retries off)"),
                ));
            }
            core.retry_window_s = seconds;
        }
        let secret = match &file.secret_file {
            None => {
                if !file.peer.is_empty() {
                    return Err(bad("secret_file", "required when peers are configured"));
                }
                Vec::new()
            }
            Some(p) => {
                let secret = read_secret_file(&base.join(p)).map_err(|e| bad("secret_file", e))?;
                if secret.len() < SECRET_LEN_MIN {
                    return Err(bad("secret_file", format!("the secret must be at least {SECRET_LEN_MIN} bytes")));
                }
                secret
            }
        };
        let log_format = match file.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(bad("log_format", format!("{other:?} is neither \"text\" nor \"json\""))),
        };
        let tls = match (&file.tls_cert, &file.tls_key, &file.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(
                crate::tls::Tls::load(&base.join(cert), &base.join(key), &base.join(ca))
                    .map_err(|e| bad("tls_cert", e))?,
            ),
            _ => return Err(bad("tls_cert", "tls_cert, tls_key and tls_ca go together")),
        };
        // Without TLS only the handshake is authenticated: anyone on the path could change
        // the traffic after it. Loopback has no path; anything else needs TLS or the
        // operator's word that the network is private (a VPN, a dedicated cable).
        let off_loopback = !file.listen.ip().is_loopback() || file.peer.iter().any(|p| !p.address.ip().is_loopback());
        if tls.is_none() && off_loopback && !file.peer.is_empty() && !file.allow_plain_peer_links.unwrap_or(false) {
            return Err(bad(
                "tls_cert",
                "peer links beyond loopback need mutual TLS (tls_cert, tls_key, tls_ca), \
                 or allow_plain_peer_links = true on a network no one else can touch",
            ));
        }
        if (file.imap.is_some() || file.imaps.is_some() || file.lmtp.is_some()) && file.users_file.is_none() {
            return Err(bad("users_file", "required when imap, imaps or lmtp is set"));
        }
        let mail_tls = match (&file.mail_tls_cert, &file.mail_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(
                crate::tls::client_facing(&base.join(cert), &base.join(key)).map_err(|e| bad("mail_tls_cert", e))?,
            ),
            _ => return Err(bad("mail_tls_cert", "mail_tls_cert and mail_tls_key go together")),
        };
        if file.imaps.is_some() && mail_tls.is_none() {
            return Err(bad("imaps", "needs mail_tls_cert and mail_tls_key"));
        }
        let users = match &file.users_file {
            None => crate::users::Users::default(),
            Some(p) => crate::users::Users::load(&base.join(p)).map_err(|e| bad("users_file", e))?,
        };
        file.limits.check()?;
        let body_inline_max_bytes = file.body_inline_max_bytes.unwrap_or(crate::bodies::INLINE_BODY_LEN_MAX_DEFAULT);
        if body_inline_max_bytes > crate::bodies::INLINE_BODY_LEN_MAX_LIMIT {
            return Err(bad(
                "body_inline_max_bytes",
                format!("must be at most {} (larger bodies belong in files)", crate::bodies::INLINE_BODY_LEN_MAX_LIMIT),
            ));
        }
        let data_dir = base.join(file.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("tandem-{}", file.id))));
        let admin = match (file.admin, &file.admin_token_file) {
            (None, None) => AdminListen::Unix(
                file.admin_socket.map(|p| base.join(p)).unwrap_or_else(|| data_dir.join("admin.sock")),
            ),
            (None, Some(_)) => return Err(bad("admin_token_file", "only with a TCP `admin` address")),
            (Some(_), None) => {
                return Err(bad(
                    "admin",
                    "a TCP admin port needs admin_token_file (or leave `admin` out: the Unix socket needs none)",
                ));
            }
            (Some(addr), Some(token_file)) => {
                let token = read_secret_file(&base.join(token_file)).map_err(|e| bad("admin_token_file", e))?;
                if token.len() < SECRET_LEN_MIN {
                    return Err(bad("admin_token_file", format!("the token must be at least {SECRET_LEN_MIN} bytes")));
                }
                let token = String::from_utf8(token).map_err(|_| bad("admin_token_file", "the token must be text"))?;
                AdminListen::Tcp { addr, token }
            }
        };
        let record = match file.record {
            None => None,
            Some(r) => {
                let max_mb = r.max_mb.unwrap_or(RECORD_MB_DEFAULT);
                if !(RECORD_MB_MIN..=RECORD_MB_MAX).contains(&max_mb) {
                    return Err(bad("record.max_mb", format!("must be {RECORD_MB_MIN} to {RECORD_MB_MAX}")));
                }
                Some(RecordConfig { dir: base.join(r.dir), max_bytes: max_mb << 20, bodies: r.bodies.unwrap_or(false) })
            }
        };
        Ok(NodeConfig {
            core,
            listen: file.listen,
            admin,
            data_dir,
            body_inline_max_bytes,
            secret,
            compression: file.compression.unwrap_or(false),
            metrics: file.metrics,
            log_format,
            peers: file.peer,
            tls,
            imap: file.imap,
            imaps: file.imaps,
            mail_tls,
            lmtp: file.lmtp,
            users: std::sync::Arc::new(users),
            users_file: file.users_file.as_ref().map(|p| base.join(p)),
            limits: file.limits,
            allow_plaintext_auth: file.allow_plaintext_auth.unwrap_or(false),
            plaintext_auth_on_loopback: file.plaintext_auth_on_loopback.unwrap_or(true),
            special_use: special_use(file.special_use)?,
            record,
            accept_old_backup: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, Path::new("/nonexistent"))
    }

    #[test]
    fn a_minimal_file_works() {
        let c = parse("id = 1\nlisten = \"127.0.0.1:7101\"\n").unwrap();
        assert_eq!(c.core.servers, vec![Sid(1)]);
        assert_eq!(c.core.replicas, 0);
        assert_eq!(c.admin, AdminListen::Unix(PathBuf::from("/nonexistent/tandem-1/admin.sock")));
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("id = 1\nlisten = \"127.0.0.1:7101\"\nmode = \"fast\"\n").unwrap_err();
        assert!(e.0.contains("`mode`"), "{e}");
        let e = parse("id = 1\nlisten = \"127.0.0.1:7101\"\nreplica = 2\n").unwrap_err();
        assert!(e.0.contains("replica"), "{e}");
        let e = parse("id = 1\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(e.0.contains("listen"), "{e}");
        let e = parse("id = 1\nlisten = \"127.0.0.1:1\"\n[[peer]]\nid = 2\naddress = \"127.0.0.1:2\"\n").unwrap_err();
        assert!(e.0.contains("`secret_file`"), "{e}");
        let e = parse("id = 70000\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.0.contains("`id`"), "{e}");
        let e = parse("id = 1\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n").unwrap_err();
        assert!(e.0.contains("`admin`") && e.0.contains("token"), "{e}");
        let e =
            parse("id = 1\nlisten = \"10.0.0.1:1\"\nsecret_file = \"s\"\n[[peer]]\nid = 2\naddress = \"10.0.0.2:1\"\n");
        assert!(e.is_err(), "a missing secret file or plain links off loopback are refused");
        let e = parse("id = 1\nlisten = \"127.0.0.1:1\"\n[limits]\nconnections_max = 0\n").unwrap_err();
        assert!(e.0.contains("`limits.connections_max`"), "{e}");
    }

    #[test]
    fn a_partial_spec_is_checked_and_bounded() {
        let base = "id = 1\nlisten = \"127.0.0.1:7101\"\n";
        let c = parse(&format!(
            "{base}user_replica = true\npartial = {{ mailboxes = [\"INBOX\", \"Work/%\"], since_s = 1700000000, body_bytes_max = 100000 }}\n"
        ))
        .unwrap();
        let p = c.core.partial.expect("the spec is taken");
        assert_eq!(
            (p.mailboxes.len(), p.since_s, p.body_bytes_max, p.keep_fetched),
            (2, 1_700_000_000, Some(100_000), true)
        );
        let server = parse(&format!("{base}partial = {{ body_bytes_max = 1000 }}\n")).unwrap();
        assert_eq!(server.core.partial.and_then(|p| p.body_bytes_max), Some(1000), "a partial cluster server");
        let e = parse(&format!("{base}partial = {{ mailboxes = [\"INBOX\"] }}\n")).unwrap_err();
        assert!(e.0.contains("`partial`") && e.0.contains("user/mailbox"), "{e}");
        let server =
            parse(&format!("{base}partial = {{ mailboxes = [\"%/INBOX\"], since_s = 1700000000 }}\n")).unwrap();
        let p = server.core.partial.expect("a server holding some folders' and dates' bodies");
        assert_eq!((p.mailboxes, p.since_s, p.body_bytes_max), (vec!["%/INBOX".to_string()], 1_700_000_000, None));
        let e = parse(&format!("{base}user_replica = true\npartial = {{ mailboxes = [\"\"] }}\n")).unwrap_err();
        assert!(e.0.contains("`partial`"), "{e}");
        let typo = parse(&format!("{base}user_replica = true\npartial = {{ since = 5 }}\n"));
        assert!(typo.is_err(), "an unknown key is refused, not ignored");
    }

    #[test]
    fn a_world_readable_secret_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text =
            "id = 1\nlisten = \"127.0.0.1:1\"\nsecret_file = \"secret\"\n[[peer]]\nid = 2\naddress = \"127.0.0.1:2\"\n";
        let e = NodeConfig::parse(text, dir.path()).unwrap_err();
        assert!(e.0.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(NodeConfig::parse(text, dir.path()).is_ok());
    }

    #[test]
    fn special_use_names_are_checked() {
        let base = "id = 1\nlisten = \"127.0.0.1:7101\"\n";
        let config = |extra: &str| parse(&format!("{base}{extra}"));
        match config("") {
            Ok(c) => assert_eq!(c.special_use.get("Sent"), Some(&"\\Sent")),
            Err(e) => panic!("{e:?}"),
        }
        match config("special_use = { \"Sent Items\" = \"\\\\sent\" }\n") {
            Ok(c) => {
                assert_eq!(c.special_use.get("Sent Items"), Some(&"\\Sent"));
                assert!(!c.special_use.contains_key("Sent"), "a table of one's own replaces the defaults");
            }
            Err(e) => panic!("{e:?}"),
        }
        assert!(config("special_use = { Spam = \"\\\\Spam\" }\n").is_err_and(|e| e.0.contains("special_use")));
        assert!(config("special_use = { \"a*\" = \"\\\\Junk\" }\n").is_err());
    }

    #[test]
    fn fresh_read_ms_is_bounded() {
        let base = "id = 1\nlisten = \"127.0.0.1:7101\"\n";
        match parse(&format!("{base}fresh_read_ms = 2500\n")) {
            Ok(c) => assert_eq!(c.core.fresh_read_us, 2_500_000),
            Err(e) => panic!("{e:?}"),
        }
        assert!(parse(&format!("{base}fresh_read_ms = 1\n")).is_err_and(|e| e.0.contains("fresh_read_ms")));
        assert!(parse(&format!("{base}fresh_read_ms = 600000\n")).is_err());
    }

    #[test]
    fn retry_window_s_is_bounded_and_zero_turns_it_off() {
        let base = "id = 1\nlisten = \"127.0.0.1:7101\"\n";
        match parse(base) {
            Ok(c) => assert_eq!(c.core.retry_window_s, 86_400),
            Err(e) => panic!("{e:?}"),
        }
        match parse(&format!("{base}retry_window_s = 0\n")) {
            Ok(c) => assert_eq!(c.core.retry_window_s, 0),
            Err(e) => panic!("{e:?}"),
        }
        assert!(parse(&format!("{base}retry_window_s = 9999999\n")).is_err_and(|e| e.0.contains("retry_window_s")));
    }
}
