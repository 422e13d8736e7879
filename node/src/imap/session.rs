use super::parsed::Parsed;
use super::wire::{astring, literal, string, text_literal};
use super::{mime, text_parts, thread};
use crate::front::{Front, LoginError, UserSession};
use crate::node::NodeHandle;
use crate::peer::PeerIo;
use imap_codec::decode::Decoder;
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::IntoStatic;
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody, FetchModifier, SelectParameter, StoreModifier};
use imap_codec::imap_types::core::{Charset, LiteralMode};
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::extensions::sort::{SortCriterion, SortKey};
use imap_codec::imap_types::extensions::thread::ThreadingAlgorithm;
use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName, Section};
use imap_codec::imap_types::flag::{Flag as ImapFlag, StoreResponse, StoreType};
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_codec::imap_types::status::StatusDataItemName;
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::io::{ClientReply, ClientRequest, MailboxChanges, MailboxStatus, MailboxView, MessageView};
use tandem_core::msg::{FailKind, WriteResult};
use tandem_core::types::{Body, Flag, Guid, MailboxKey, SpecialUse, Uid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// A failed login is answered after this long at least (the throttle adds more after
/// repeated failures).
const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);
/// An IDLE session's poll when no wake-up came: wake-ups carry every durable change,
/// so this only bounds how long a change the node failed to announce stays unseen.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// The command text around literals in one command may add this much to the message.
const COMMAND_TEXT_SLACK: u32 = 1024 * 1024;
const CAPABILITIES: &str = "IMAP4rev1 SASL-IR IDLE UIDPLUS UNSELECT MOVE ID NAMESPACE LITERAL+ ENABLE CONDSTORE QRESYNC QUOTA QUOTA=RES-STORAGE QUOTA=RES-MESSAGE SORT SORT=DISPLAY THREAD=ORDEREDSUBJECT THREAD=REFERENCES BINARY ESEARCH ESORT CONTEXT=SEARCH MULTIAPPEND LIST-EXTENDED LIST-STATUS NOTIFY SPECIAL-USE CREATE-SPECIAL-USE COMPRESS=DEFLATE CATENATE UTF8=ACCEPT X-REPLICATE";

/// Serves IMAP on `listener`: with `implicit_tls`, TLS from the first byte; otherwise
/// plain, with STARTTLS offered when `tls` is set.
pub async fn serve(
    listener: TcpListener,
    node: NodeHandle,
    front: Front,
    tls: Option<TlsAcceptor>,
    implicit_tls: bool,
) {
    let limits = front.session_limits("* BYE [UNAVAILABLE] too many connections, try again later\r\n");
    crate::node::serve_sessions(listener, limits, move |tcp, addr| {
        let (node, front, tls) = (node.clone(), front.clone(), tls.clone());
        async move {
            let login_deadline = tokio::time::Instant::now() + Duration::from_secs(front.limits.login_timeout_s);
            let _ = set_keepalive(&tcp);
            debug!(%addr, "IMAP session");
            let stream: Box<dyn PeerIo> = match (&tls, implicit_tls) {
                (Some(acceptor), true) => match tokio::time::timeout_at(login_deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        debug!(%addr, error = %e, "IMAPS handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
                _ => Box::new(tcp),
            };
            let starttls = if implicit_tls { None } else { tls };
            let secure = implicit_tls;
            if let Err(e) = run_session(stream, node, front, addr.ip(), login_deadline, starttls, secure, None).await {
                debug!(%addr, error = %e, "IMAP session ended");
            }
        }
    })
    .await
}

/// One IMAP session on any byte stream; `logged_in` starts it as that user (the fuzzer
/// reaches the commands behind LOGIN without paying for argon2).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_session(
    stream: Box<dyn PeerIo>,
    node: NodeHandle,
    front: Front,
    peer_ip: IpAddr,
    login_deadline: tokio::time::Instant,
    starttls: Option<TlsAcceptor>,
    secure: bool,
    logged_in: Option<String>,
) -> Result<()> {
    let mut session = Session {
        stream,
        node,
        front,
        peer_ip,
        login_deadline,
        login: None,
        user: logged_in,
        selected: None,
        out: Vec::new(),
        condstore: false,
        qresync: false,
        starttls,
        secure,
        compressed: false,
        utf8: false,
        returning: None,
        create_use: SpecialUse::NONE,
        notify: None,
    };
    session.run().await
}

struct Selected {
    mailbox: MailboxKey,
    name: String,
    read_only: bool,
    uidvalidity: u32,
    /// Sequence number i + 1 is uids[i].
    uids: Vec<Uid>,
    /// What the client was last told of each message it has a sequence number for.
    view: BTreeMap<Uid, MessageView>,
    /// The messages that are `\Recent` in this session (the rule: `super::recent`).
    recent: BTreeSet<Uid>,
    /// The keywords announced in FLAGS: a message with another keyword is shown only
    /// after a new FLAGS response names it (RFC 3501 7.2.6; clients build their keyword
    /// lists from it).
    keywords: BTreeSet<String>,
    /// The mailbox's HIGHESTMODSEQ as of the last read: changes after it are what the
    /// next refresh asks the node for.
    highest_modseq: u64,
    /// Messages gone from the mailbox that the client still has a sequence number for
    /// (an expunge waits during commands that use sequence numbers).
    gone: BTreeSet<Uid>,
    /// Searches whose result the client is kept told of (CONTEXT=SEARCH's UPDATE).
    updates: Vec<UpdateSearch>,
}

/// A `SEARCH RETURN (UPDATE)` the session keeps answering (RFC 5267 section 4).
struct UpdateSearch {
    tag: String,
    uid: bool,
    criteria: Vec<SearchKey<'static>>,
    /// The result the client was last told of, by UID.
    hits: BTreeSet<Uid>,
}

impl UpdateSearch {
    /// `* ESEARCH (TAG ..) [UID] ADDTO|REMOVEFROM (position set)` for `uids`, numbered
    /// as `sel` numbers them now; `position` is where the first of them is (was) in the
    /// result.
    fn line(&self, sel: &Selected, what: &str, position: usize, uids: &[Uid]) -> String {
        let mut numbers: Vec<u32> = if self.uid {
            uids.to_vec()
        } else {
            uids.iter().filter_map(|u| sel.index_of(u)).map(|i| i as u32 + 1).collect()
        };
        numbers.sort_unstable();
        let uid = if self.uid { " UID" } else { "" };
        format!("* ESEARCH (TAG \"{}\"){uid} {what} ({position} {})", self.tag, uid_set(&numbers))
    }
}

impl Selected {
    fn flags(&self, uid: &Uid) -> &[Flag] {
        self.view.get(uid).map(|m| m.flags.as_slice()).unwrap_or_default()
    }

    /// A message's flags as FETCH shows them: with `\Recent` when it is recent here.
    fn flag_list(&self, uid: &Uid) -> String {
        shown_flags(self.flags(uid), self.recent.contains(uid))
    }

    /// The FLAGS and PERMANENTFLAGS responses for the system flags and the keywords
    /// announced so far.
    fn flags_responses(&self) -> [String; 2] {
        let mut flags = String::from(SYSTEM_FLAGS);
        for k in &self.keywords {
            flags.push(' ');
            flags.push_str(k);
        }
        [format!("* FLAGS ({flags})"), format!("* OK [PERMANENTFLAGS ({flags} \\*)] flags stick")]
    }

    /// The index of `uid` in `uids` (its sequence number less one). `uids` is in UID
    /// order unless a refresh appended a UID below one shown; then it is looked for.
    fn index_of(&self, uid: &Uid) -> Option<usize> {
        self.uids.binary_search(uid).ok().or_else(|| self.uids.iter().position(|u| u == uid))
    }

    /// Drops `gone` from the session and says so: an EXPUNGE per message, highest
    /// sequence number first (so each number is still right when sent), or one VANISHED
    /// once QRESYNC is enabled.
    fn report_expunges(&mut self, gone: &BTreeSet<Uid>, qresync: bool, lines: &mut Vec<String>) {
        // An updated search loses its expunged results first, numbered as before.
        let mut removals = Vec::new();
        for u in &self.updates {
            let removed: Vec<Uid> = u.hits.intersection(gone).copied().collect();
            if let Some(first) = removed.first() {
                let position = u.hits.range(..first).count() + 1;
                removals.push(u.line(self, "REMOVEFROM", position, &removed));
            }
        }
        lines.extend(removals);
        for u in &mut self.updates {
            u.hits.retain(|h| !gone.contains(h));
        }
        let mut at: Vec<usize> = gone.iter().filter_map(|u| self.index_of(u)).collect();
        at.sort_unstable_by(|a, b| b.cmp(a));
        let mut vanished = Vec::new();
        for i in at {
            let uid = self.uids.remove(i);
            if !qresync {
                lines.push(format!("* {} EXPUNGE", i + 1));
            }
            self.view.remove(&uid);
            self.recent.remove(&uid);
            vanished.push(uid);
        }
        if qresync && !vanished.is_empty() {
            vanished.sort_unstable();
            lines.push(format!("* VANISHED {}", uid_set(&vanished)));
        }
    }

    /// A message's flags as an untagged FETCH, with MODSEQ once CONDSTORE is in use.
    fn flags_line(&self, seq: usize, uid: &Uid, condstore: bool) -> String {
        let modseq = match (condstore, self.view.get(uid)) {
            (true, Some(m)) => format!(" MODSEQ ({})", m.modseq),
            _ => String::new(),
        };
        format!("* {seq} FETCH (UID {uid} FLAGS ({}){modseq})", self.flag_list(uid))
    }

    /// New messages (already in `uids`): those recent in this session, then EXISTS and
    /// RECENT. A read-only session shows the recent ones without taking them.
    fn announce_new(
        &mut self,
        marks: &super::recent::RecentMarks,
        added: impl ExactSizeIterator<Item = (Uid, tandem_core::types::Guid)>,
        lines: &mut Vec<String>,
    ) {
        if added.len() == 0 {
            return;
        }
        let recent = if self.read_only {
            marks.shown(&self.mailbox, self.uidvalidity, added)
        } else {
            marks.take(&self.mailbox, self.uidvalidity, added)
        };
        self.recent.extend(recent);
        lines.push(format!("* {} EXISTS", self.uids.len()));
        lines.push(format!("* {} RECENT", self.recent.len()));
    }

    /// Adds the keywords of `messages` not announced yet; true when there were any.
    fn learn_keywords<'a>(&mut self, messages: impl IntoIterator<Item = &'a MessageView>) -> bool {
        let mut learned = false;
        for m in messages {
            for f in m.flags.iter().filter(|f| !f.as_str().starts_with('\\')) {
                if !self.keywords.contains(f.as_str()) {
                    self.keywords.insert(f.as_str().to_string());
                    learned = true;
                }
            }
        }
        learned
    }
}

/// SEARCH, SORT and THREAD read message bodies in batches of at most this many bytes
/// (one message at least).
const BODY_BATCH_BYTES: u64 = 64 * 1024 * 1024;

/// FETCH reads bodies, and writes their responses to the client, in batches of at most
/// this many bytes of message (one message at least).
const FETCH_BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Absent bodies one FETCH asks the core for at most (the rest with the next FETCH).
const FETCH_BODIES_ASKED_MAX: usize = 64;

/// The flags every mailbox has.
const SYSTEM_FLAGS: &str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft";

struct Session {
    stream: Box<dyn PeerIo>,
    node: NodeHandle,
    front: Front,
    peer_ip: IpAddr,
    /// Before login, every read must finish by then.
    login_deadline: tokio::time::Instant,
    /// Holds the session's place in the user's session count.
    login: Option<UserSession>,
    user: Option<String>,
    selected: Option<Selected>,
    out: Vec<u8>,
    /// RFC 7162: MODSEQ goes with every FLAGS once CONDSTORE is in use, and expunges
    /// are reported as VANISHED once QRESYNC is enabled.
    condstore: bool,
    qresync: bool,
    /// Offered while the session is still plain.
    starttls: Option<TlsAcceptor>,
    secure: bool,
    /// COMPRESS=DEFLATE (RFC 4978) is on: both directions pass through raw DEFLATE.
    compressed: bool,
    /// UTF8=ACCEPT (RFC 6855) is enabled: mailbox names are UTF-8 both ways here (kept
    /// in modified UTF-7, as clients without it write them; see `super::utf7`).
    utf8: bool,
    /// The RETURN options of the SEARCH or SORT being run (ESEARCH, ESORT); None for
    /// every other command and for a plain SEARCH or SORT.
    returning: Option<super::esearch::ReturnOptions>,
    /// The special use the CREATE being run asked for (CREATE-SPECIAL-USE).
    create_use: SpecialUse,
    /// What NOTIFY (RFC 5465) asked to be told, and what the session told last.
    notify: Option<NotifyState>,
}

struct NotifyState {
    set: super::notify::NotifySet,
    told: super::notify::Snapshot,
    /// Wakes the session for any durable change to the user's mailboxes; None once the
    /// node stopped sending wake-ups.
    wake: Option<tokio::sync::watch::Receiver<u64>>,
}

type Result<T> = std::result::Result<T, String>;

enum Flow {
    Continue,
    Logout,
}

impl Session {
    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await.map_err(|e| e.to_string())?;
            // TLS sends its records, DEFLATE ends its block (a sync flush): the client
            // must get every response now, not when a buffer fills.
            self.stream.flush().await.map_err(|e| e.to_string())?;
            self.out.clear();
        }
        Ok(())
    }

    /// A CONDSTORE enabling command (RFC 7162 section 3.1): from now on FLAGS go with
    /// MODSEQ, and the first such command on a selected mailbox reports HIGHESTMODSEQ.
    fn enable_condstore(&mut self) {
        if self.condstore {
            return;
        }
        self.condstore = true;
        if let Some(highest) = self.selected.as_ref().map(|s| s.highest_modseq) {
            self.line(&format!("* OK [HIGHESTMODSEQ {highest}] CONDSTORE enabled"));
        }
    }

    fn line(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Before login the login deadline applies; after it, the autologout time per read.
    fn read_deadline(&self) -> tokio::time::Instant {
        if self.user.is_none() {
            self.login_deadline
        } else {
            tokio::time::Instant::now() + Duration::from_secs(self.front.limits.autologout_s)
        }
    }

    async fn read_more(&mut self, fragmentizer: &mut Fragmentizer) -> Result<()> {
        let mut buf = [0u8; 16 * 1024];
        let deadline = self.read_deadline();
        // Between commands a NOTIFY session is told of changes as they happen.
        let between_commands = fragmentizer.message_bytes().is_empty();
        let read = loop {
            let wake = if between_commands { self.notify.as_mut().and_then(|n| n.wake.as_mut()) } else { None };
            tokio::select! {
                read = tokio::time::timeout_at(deadline, self.stream.read(&mut buf)) => break read,
                woken = changed_ref(wake) => {
                    if !woken && let Some(n) = self.notify.as_mut() {
                        n.wake = None;
                    }
                    self.notify_round(true).await;
                    self.flush().await?;
                }
            }
        };
        let n = match read {
            Ok(n) => n.map_err(|e| e.to_string())?,
            Err(_) => {
                let why = if self.user.is_none() { "no login in time" } else { "autologout: idle too long" };
                self.line(&format!("* BYE {why}"));
                let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
                return Err(why.into());
            }
        };
        if n == 0 {
            return Err("client closed the connection".into());
        }
        fragmentizer.enqueue_bytes(&buf[..n]);
        Ok(())
    }

    fn capabilities(&self) -> String {
        let mut caps = String::from(CAPABILITIES);
        if self.starttls.is_some() && !self.secure {
            caps.push_str(" STARTTLS");
        }
        if self.user.is_none() {
            caps.push_str(if self.plaintext_refused() { " LOGINDISABLED" } else { " AUTH=PLAIN" });
        }
        caps
    }

    /// Passwords are not taken in the clear where TLS is on offer (RFC 3501's
    /// LOGINDISABLED; Dovecot's disable_plaintext_auth), except from loopback, which
    /// never crosses a network, or where the operator allows it.
    fn plaintext_refused(&self) -> bool {
        let trusted_loopback = self.peer_ip.is_loopback() && self.front.plaintext_auth_on_loopback;
        self.starttls.is_some() && !self.secure && !trusted_loopback && !self.front.allow_plaintext_auth
    }

    /// The largest literal accepted now: a message after login, a few KiB before.
    fn literal_len_max(&self) -> u32 {
        let limits = &self.front.limits;
        let max = if self.user.is_none() { limits.imap_prelogin_len_max } else { limits.message_size_max };
        u32::try_from(max).unwrap_or(u32::MAX)
    }

    /// The longest command text between literals accepted now.
    fn line_len_max(&self) -> usize {
        let limits = &self.front.limits;
        if self.user.is_none() { limits.imap_prelogin_len_max } else { limits.imap_line_len_max }
    }

    async fn run(&mut self) -> Result<()> {
        self.line(&format!("* OK [CAPABILITY {}] tandem IMAP ready", self.capabilities()));
        self.flush().await?;
        let mut fragmentizer = Fragmentizer::new(self.message_len_max());
        // Where the current line of the current command began, and whether a literal's
        // bytes are arriving (those count against the literal limit instead).
        let mut line_start = 0usize;
        let mut in_literal = false;
        loop {
            let Some(info) = fragmentizer.progress() else {
                if !in_literal && fragmentizer.message_bytes().len().saturating_sub(line_start) > self.line_len_max() {
                    // A line without end: answered and closed, as nothing after it can
                    // be told apart from it.
                    self.line("* BYE [LIMIT] command line too long");
                    self.flush().await?;
                    return Err("command line too long".into());
                }
                self.read_more(&mut fragmentizer).await?;
                continue;
            };
            match info {
                FragmentInfo::Line { end, announcement, .. } => {
                    line_start = end;
                    in_literal = announcement.is_some();
                }
                FragmentInfo::Literal { end, .. } => {
                    line_start = end;
                    in_literal = false;
                }
            }
            if let FragmentInfo::Line { announcement: Some(LiteralAnnouncement { mode, length }), .. } = info {
                if length > self.literal_len_max() {
                    // Refused before a byte of it is read.
                    let tag = fragmentizer.decode_tag().map(|t| t.as_ref().to_string());
                    let limit = self.literal_len_max();
                    let why = if self.user.is_none() { "before login" } else { "for this server" };
                    match tag {
                        Some(tag) => self.line(&format!(
                            "{tag} BAD [TOOBIG] a literal of {length} bytes is too large {why} (limit {limit})"
                        )),
                        None => self.line("* BAD [LIMIT] literal too large"),
                    }
                    self.flush().await?;
                    if mode == LiteralMode::NonSync {
                        self.line("* BYE [LIMIT] an oversize non-synchronizing literal cannot be skipped");
                        self.flush().await?;
                        return Err("oversize non-synchronizing literal".into());
                    }
                    fragmentizer.skip_message();
                    line_start = 0;
                    in_literal = false;
                    continue;
                }
                if mode == LiteralMode::Sync {
                    self.line("+ go ahead");
                    self.flush().await?;
                }
                continue;
            }
            if !fragmentizer.is_message_complete() {
                continue;
            }
            line_start = 0;
            in_literal = false;
            // An extended LIST (RFC 5258), which the codec does not parse.
            if let Some(list) = super::listext::parse(fragmentizer.message_bytes()) {
                let tag = fragmentizer.decode_tag().map(|t| t.as_ref().to_string()).unwrap_or("*".into());
                let answer = match list {
                    Err(why) => format!("{tag} BAD {why}"),
                    Ok(_) if self.user.is_none() => format!("{tag} BAD log in first"),
                    Ok(list) => {
                        let text = self.list_extended(&list).await;
                        format!("{tag} OK {text}")
                    }
                };
                self.line(&answer);
                self.flush().await?;
                continue;
            }
            // NOTIFY (RFC 5465), which the codec does not parse.
            if let Some((tag, parsed)) = super::notify::parse(fragmentizer.message_bytes()) {
                let answer = match parsed {
                    _ if self.user.is_none() => "BAD log in first".to_string(),
                    Err(refused) => refused.answer(),
                    Ok(command) => self.notify_command(command).await,
                };
                self.line(&format!("{tag} {answer}"));
                self.flush().await?;
                continue;
            }
            // A user replica's agent (`tandem replicate`): the rest of the connection is
            // the replica link, gated to this user's mailboxes.
            if let Some(ReplicateCommand { tag, version, deflate }) = replicate_command(fragmentizer.message_bytes()) {
                let Some(user) = self.user.clone() else {
                    self.line(&format!("{tag} NO log in first"));
                    self.flush().await?;
                    continue;
                };
                if version != Some(crate::replica_link::VERSION) {
                    let theirs = version.map_or("1 (unnamed)".to_string(), |v| v.to_string());
                    warn!(user, ip = %self.peer_ip, theirs, "a user replica's agent of another link version refused");
                    self.line(&format!(
                        "{tag} NO [X-VERSION] this server speaks replica link version {} and the agent {theirs}: use the same tandem release on both sides",
                        crate::replica_link::VERSION
                    ));
                    self.flush().await?;
                    continue;
                }
                info!(user, ip = %self.peer_ip, deflate, "a user replica's sync begins");
                self.line(&format!("{tag} OK the replica link begins"));
                self.flush().await?;
                // The agent waits for this answer before its first frame, so nothing of
                // the link is in the fragmentizer.
                let mut stream = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
                if deflate && !self.compressed {
                    stream = crate::peer::deflated(stream);
                }
                let gate = crate::replica_link::Gate::User(user.as_str().into());
                return crate::replica_link::serve(stream, gate, self.node.clone()).await;
            }
            // A SEARCH or SORT with RETURN: the codec parses the command without it.
            let mut returning = None;
            // A CREATE with a special use: the codec parses it without its parameters.
            let mut create_use = SpecialUse::NONE;
            let cut = match super::esearch::cut_return(fragmentizer.message_bytes()) {
                Some(Ok((rest, options))) => {
                    returning = Some(options);
                    Some(Ok(rest))
                }
                Some(Err(why)) => Some(Err(format!("BAD {why}"))),
                None => super::special_use::cut_create_use(fragmentizer.message_bytes()).map(|cut| match cut {
                    Ok((rest, uses)) => {
                        create_use = uses;
                        Ok(rest)
                    }
                    Err(super::special_use::Refused::Bad(why)) => Err(format!("BAD {why}")),
                    Err(super::special_use::Refused::UseAttribute(why)) => Err(format!("NO [USEATTR] {why}")),
                }),
            };
            let parsed = match cut {
                None => fragmentizer.decode_message(&CommandCodec::default()).map(|c| c.into_static()).map_err(|_| ()),
                Some(Ok(rest)) => CommandCodec::default().decode(&rest).map(|(_, c)| c.into_static()).map_err(|_| ()),
                Some(Err(answer)) => {
                    let tag = fragmentizer.decode_tag().map(|t| t.as_ref().to_string());
                    self.line(&format!("{} {answer}", tag.as_deref().unwrap_or("*")));
                    self.flush().await?;
                    continue;
                }
            };
            match parsed {
                Ok(command) => {
                    self.returning = returning;
                    self.create_use = create_use;
                    let flow = self.command(command, &mut fragmentizer).await;
                    self.returning = None;
                    self.create_use = SpecialUse::NONE;
                    let flow = flow?;
                    self.flush().await?;
                    if let Flow::Logout = flow {
                        return Ok(());
                    }
                }
                Err(_) => {
                    if let Some(cancel) = super::esearch::cancel_update(fragmentizer.message_bytes()) {
                        let tag = fragmentizer.decode_tag().map(|t| t.as_ref().to_string()).unwrap_or("*".into());
                        let answer = match cancel.and_then(|tags| self.cancel_updates(&tags)) {
                            Ok(text) => format!("{tag} OK {text}"),
                            Err(text) if text.starts_with("BAD") => format!("{tag} {text}"),
                            Err(text) => format!("{tag} BAD {text}"),
                        };
                        self.line(&answer);
                        self.flush().await?;
                        continue;
                    }
                    // An APPEND made of parts (CATENATE), with MULTIAPPEND or not.
                    if let Some(parsed) = super::catenate::parse(fragmentizer.message_bytes()) {
                        let tag = fragmentizer.decode_tag().map(|t| t.as_ref().to_string()).unwrap_or("*".into());
                        let answer = match parsed {
                            Err(why) => format!("{tag} BAD {why}"),
                            Ok(catenate) => match self.catenate(catenate).await {
                                Ok(text) => format!("{tag} OK {text}"),
                                Err(text) if text.starts_with("BAD") || text.starts_with("NO") => {
                                    format!("{tag} {text}")
                                }
                                Err(text) => format!("{tag} NO {text}"),
                            },
                        };
                        self.line(&answer);
                        self.flush().await?;
                        continue;
                    }
                    // An APPEND of several messages (MULTIAPPEND), one APPEND each.
                    let appends: Option<Vec<Command<'static>>> =
                        super::multiappend::split(fragmentizer.message_bytes()).and_then(|commands| {
                            commands
                                .iter()
                                .map(|c| CommandCodec::default().decode(c).ok().map(|(_, c)| c.into_static()))
                                .collect()
                        });
                    if let Some(appends) = appends {
                        let tag = appends.first().map(|c| c.tag.as_ref().to_string()).unwrap_or_default();
                        let answer = match self.multi_append(appends).await {
                            Ok(text) => format!("{tag} OK {text}"),
                            Err(text) if text.starts_with("BAD") || text.starts_with("NO") => format!("{tag} {text}"),
                            Err(text) => format!("{tag} NO {text}"),
                        };
                        self.line(&answer);
                        self.flush().await?;
                        continue;
                    }
                    let tag = fragmentizer.decode_tag().map(|t| t.as_ref().to_string());
                    // The one rule for NUL: a plain literal may not hold it (RFC 3501),
                    // a literal8 may (BINARY, RFC 3516); FETCH shows a stored NUL as 0x80
                    // outside BINARY, as Dovecot does.
                    let why = if memchr::memchr(0, fragmentizer.message_bytes()).is_some() {
                        "a literal may not contain NUL (APPEND binary content with a literal8, ~{n})"
                    } else {
                        "could not parse the command"
                    };
                    match tag {
                        Some(tag) => self.line(&format!("{tag} BAD {why}")),
                        None => self.line(&format!("* BAD {why}")),
                    }
                    self.flush().await?;
                }
            }
        }
    }

    async fn command(&mut self, command: Command<'static>, fragmentizer: &mut Fragmentizer) -> Result<Flow> {
        let tag = command.tag.as_ref().to_string();
        let name = command.body.name().to_string();
        let authenticated = self.user.is_some();
        // Changes since the last command first; expunges wait during sequence-number
        // commands (RFC 3501 7.4.1).
        let seq_command = matches!(
            &command.body,
            CommandBody::Fetch { uid: false, .. }
                | CommandBody::Store { uid: false, .. }
                | CommandBody::Search { uid: false, .. }
                | CommandBody::Sort { uid: false, .. }
                | CommandBody::Thread { uid: false, .. }
                | CommandBody::Copy { uid: false, .. }
        );
        if self.selected.is_some() && !matches!(command.body, CommandBody::Select { .. } | CommandBody::Examine { .. })
        {
            self.refresh(!seq_command).await;
        }
        let result = match command.body {
            CommandBody::Capability => {
                self.line(&format!("* CAPABILITY {}", self.capabilities()));
                Ok("CAPABILITY done".to_string())
            }
            CommandBody::StartTLS => {
                let Some(acceptor) = self.starttls.take().filter(|_| !self.secure) else {
                    self.line(&format!("{tag} BAD STARTTLS is not available here"));
                    return Ok(Flow::Continue);
                };
                self.line(&format!("{tag} OK begin TLS now"));
                self.flush().await?;
                // Nothing the client sent before the handshake may count after it.
                *fragmentizer = Fragmentizer::new(self.message_len_max());
                let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
                let tls = acceptor.accept(plain).await.map_err(|e| format!("STARTTLS handshake: {e}"))?;
                self.stream = Box::new(tls);
                self.secure = true;
                return Ok(Flow::Continue);
            }
            CommandBody::Compress { algorithm: _ } => {
                // DEFLATE is the only algorithm the codec parses.
                if self.compressed {
                    Err("NO [COMPRESSIONACTIVE] DEFLATE is on already".to_string())
                } else if self.user.is_none() {
                    Err("BAD log in first".to_string())
                } else {
                    self.line(&format!("{tag} OK DEFLATE active"));
                    self.flush().await?;
                    // The client waits for the OK before compressing: anything it sent
                    // after the command was sent before it knew, and is dropped.
                    *fragmentizer = Fragmentizer::new(self.message_len_max());
                    let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::duplex(1).0));
                    self.stream = crate::peer::deflated(plain);
                    self.compressed = true;
                    return Ok(Flow::Continue);
                }
            }
            CommandBody::Noop | CommandBody::Check => Ok(format!("{name} done")),
            CommandBody::Logout => {
                self.line("* BYE tandem says goodbye");
                self.line(&format!("{tag} OK LOGOUT done"));
                return Ok(Flow::Logout);
            }
            CommandBody::Id { .. } => {
                self.line("* ID (\"name\" \"tandem\")");
                Ok("ID done".into())
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. } if authenticated => {
                Err("BAD already logged in".into())
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. } if self.plaintext_refused() => {
                Err("NO [PRIVACYREQUIRED] use STARTTLS before sending a password".into())
            }
            CommandBody::Login { username, password } => {
                let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                self.login(&user, password.declassify().as_ref()).await
            }
            CommandBody::Authenticate { mechanism: AuthMechanism::Plain, initial_response } => {
                let data = match initial_response {
                    Some(r) => r.declassify().to_vec(),
                    None => {
                        self.line("+ ");
                        self.flush().await?;
                        match self.authenticate_data(fragmentizer).await? {
                            Some(d) => d,
                            None => {
                                self.line(&format!("{tag} BAD AUTHENTICATE cancelled"));
                                return Ok(Flow::Continue);
                            }
                        }
                    }
                };
                // authzid \0 authcid \0 password; acting as another user (an authzid
                // other than the authcid) is not something anyone may do here.
                let fields: Vec<&[u8]> = data.split(|b| *b == 0).collect();
                match fields.as_slice() {
                    [authz, user, _] if !authz.is_empty() && authz != user => {
                        Err("NO [AUTHORIZATIONFAILED] logging in as another user is not allowed".into())
                    }
                    [_, user, password] => {
                        let user = String::from_utf8_lossy(user).into_owned();
                        self.login(&user, password).await
                    }
                    _ => Err("BAD malformed PLAIN credentials".into()),
                }
            }
            CommandBody::Authenticate { .. } => Err("NO only AUTHENTICATE PLAIN is supported".into()),
            _ if !authenticated => Err("NO log in first".into()),
            CommandBody::Namespace => {
                self.line("* NAMESPACE ((\"\" \"/\")) NIL NIL");
                Ok("NAMESPACE done".into())
            }
            CommandBody::Enable { capabilities } => {
                let mut enabled = Vec::new();
                for c in capabilities.as_ref() {
                    let name = c.to_string().to_ascii_uppercase();
                    if name == "CONDSTORE" || name == "QRESYNC" {
                        self.condstore = true;
                        self.qresync |= name == "QRESYNC";
                        enabled.push(name);
                    } else if name == "UTF8=ACCEPT" {
                        self.utf8 = true;
                        enabled.push(name);
                    }
                }
                self.line(&format!("* ENABLED{}{}", if enabled.is_empty() { "" } else { " " }, enabled.join(" ")));
                Ok("ENABLE done".into())
            }
            CommandBody::List { reference, mailbox_wildcard } | CommandBody::Lsub { reference, mailbox_wildcard } => {
                let reference = self.name(&reference);
                let pattern = match mailbox_wildcard {
                    ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()).into_owned(),
                    ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()).into_owned(),
                };
                let pattern = self.stored_name(pattern);
                self.list(&name, &reference, &pattern).await
            }
            CommandBody::Select { mailbox, parameters } => self.select(&self.name(&mailbox), false, &parameters).await,
            CommandBody::Examine { mailbox, parameters } => self.select(&self.name(&mailbox), true, &parameters).await,
            CommandBody::Status { mailbox, item_names } => self.status(&self.name(&mailbox), &item_names).await,
            CommandBody::Append { mailbox, flags, date, message } => {
                let bytes = append_bytes(message);
                let received = date.map(|d| d.as_ref().timestamp().max(0) as u64);
                self.append(&self.name(&mailbox), &flags, received, bytes).await
            }
            CommandBody::Subscribe { mailbox } | CommandBody::Unsubscribe { mailbox } => {
                let subscribe = name == "SUBSCRIBE";
                let target = self.name(&mailbox).trim_end_matches('/').to_string();
                self.lifecycle(ClientRequest::Subscription { mailbox: self.key(&target), subscribe })
                    .await
                    .map(|_| format!("{name} done"))
            }
            CommandBody::Create { mailbox } => {
                let name = self.name(&mailbox);
                let name = name.trim_end_matches('/').to_string();
                if let Err(e) = self.check_new_name(&name) {
                    Err(e)
                } else if let Err(e) = self.check_mailbox_count().await {
                    Err(e)
                } else if self.mailbox_exists(&name).await {
                    Err("NO [ALREADYEXISTS] that mailbox exists".into())
                } else {
                    let special_use = self.create_use;
                    self.lifecycle(ClientRequest::CreateMailbox { mailbox: self.key(&name), special_use })
                        .await
                        .map(|_| "CREATE done".into())
                }
            }
            CommandBody::Delete { mailbox } => {
                let name = self.name(&mailbox);
                if name.eq_ignore_ascii_case("INBOX") {
                    Err("NO [CANNOT] INBOX cannot be deleted".into())
                } else if !self.mailbox_exists(&name).await {
                    Err("NO [NONEXISTENT] no such mailbox".into())
                } else {
                    if self.selected.as_ref().is_some_and(|s| s.mailbox == self.key(&name)) {
                        self.selected = None;
                    }
                    self.lifecycle(ClientRequest::DeleteMailbox { mailbox: self.key(&name) })
                        .await
                        .map(|_| "DELETE done".into())
                }
            }
            CommandBody::Rename { from, to } => self.rename(&self.name(&from), &self.name(&to)).await,
            CommandBody::GetQuotaRoot { mailbox } => {
                let user = self.user.clone().unwrap_or_default();
                // The name echoed as the client sent it, byte for byte.
                self.out.extend_from_slice(b"* QUOTAROOT ");
                match &mailbox {
                    Mailbox::Inbox => self.out.extend_from_slice(b"INBOX"),
                    Mailbox::Other(other) => string(&mut self.out, other.as_ref()),
                }
                self.line(" \"\"");
                let quota = self.front.quota_response(&self.node, &user).await;
                self.line(&quota);
                Ok("GETQUOTAROOT done".into())
            }
            CommandBody::GetQuota { root } => {
                if !root.as_ref().is_empty() {
                    Err("NO [NONEXISTENT] the only quota root is \"\"".into())
                } else {
                    let user = self.user.clone().unwrap_or_default();
                    let quota = self.front.quota_response(&self.node, &user).await;
                    self.line(&quota);
                    Ok("GETQUOTA done".into())
                }
            }
            CommandBody::SetQuota { .. } => Err("NO [NOPERM] quotas are set in the server's configuration".into()),
            _ if self.selected.is_none() => Err("NO select a mailbox first".into()),
            CommandBody::Fetch { sequence_set, macro_or_item_names, uid, modifiers } => {
                self.fetch(&sequence_set, macro_or_item_names, uid, &modifiers).await
            }
            CommandBody::Store { sequence_set, kind, response, flags, uid, modifiers } => {
                let since = modifiers.iter().map(|StoreModifier::UnchangedSince(m)| *m).next();
                self.store(&sequence_set, kind, response, &flags, uid, since).await
            }
            CommandBody::Copy { sequence_set, mailbox, uid } => {
                self.copy(&sequence_set, &self.name(&mailbox), uid, false).await
            }
            CommandBody::Move { sequence_set, mailbox, uid } => {
                self.copy(&sequence_set, &self.name(&mailbox), uid, true).await
            }
            CommandBody::Search { criteria, uid, .. } => self.search(&tag, criteria.as_ref(), uid).await,
            CommandBody::Sort { sort_criteria, charset, search_criteria, uid } => {
                self.sort(&tag, sort_criteria.as_ref(), &charset, search_criteria.as_ref(), uid).await
            }
            CommandBody::Thread { algorithm, charset, search_criteria, uid } => {
                self.thread(&algorithm, &charset, search_criteria.as_ref(), uid).await
            }
            CommandBody::Expunge => self.expunge(None).await,
            CommandBody::ExpungeUid { sequence_set } => self.expunge(Some(&sequence_set)).await,
            CommandBody::Close => {
                if self.selected.as_ref().is_some_and(|s| !s.read_only) {
                    let _ = self.expunge_deleted(None, false).await;
                }
                self.selected = None;
                Ok("CLOSE done".into())
            }
            CommandBody::Unselect => {
                self.selected = None;
                Ok("UNSELECT done".into())
            }
            CommandBody::Idle => {
                self.idle(fragmentizer).await?;
                Ok("IDLE terminated".into())
            }
            _ => Err(format!("BAD {name} is not supported")),
        };
        match result {
            Ok(text) => self.line(&format!("{tag} OK {text}")),
            Err(text) if text.starts_with("BAD ") || text.starts_with("NO ") => self.line(&format!("{tag} {text}")),
            Err(text) => self.line(&format!("{tag} NO {text}")),
        }
        Ok(Flow::Continue)
    }

    async fn authenticate_data(&mut self, fragmentizer: &mut Fragmentizer) -> Result<Option<Vec<u8>>> {
        loop {
            let Some(_) = fragmentizer.progress() else {
                self.read_more(fragmentizer).await?;
                continue;
            };
            if !fragmentizer.is_message_complete() {
                continue;
            }
            return match fragmentizer.decode_message(&AuthenticateDataCodec::default()) {
                Ok(AuthenticateData::Continue(d)) => Ok(Some(d.declassify().to_vec())),
                _ => Ok(None),
            };
        }
    }

    async fn login(&mut self, user: &str, password: &[u8]) -> Result<String> {
        let started = tokio::time::Instant::now();
        match self.front.login(self.peer_ip, user, password).await {
            Ok(session) => {
                info!(user, ip = %self.peer_ip, "IMAP login");
                self.user = Some(user.to_string());
                self.login = Some(session);
                Ok(format!("[CAPABILITY {}] logged in", self.capabilities()))
            }
            Err(LoginError::Refused) => {
                warn!(user, ip = %self.peer_ip, "IMAP login refused");
                tokio::time::sleep_until(started + AUTH_FAILURE_DELAY).await;
                Err("NO [AUTHENTICATIONFAILED] wrong user name or password".into())
            }
            Err(LoginError::TooManySessions) => {
                warn!(user, ip = %self.peer_ip, "IMAP login over the user's session limit");
                Err("NO [LIMIT] too many sessions for this user".into())
            }
            Err(LoginError::Unavailable) => Err("NO [UNAVAILABLE] the server is stopping".into()),
        }
    }

    /// The largest command the fragmentizer keeps: a message and its command text.
    fn message_len_max(&self) -> u32 {
        u32::try_from(self.front.limits.message_size_max).unwrap_or(u32::MAX).saturating_add(COMMAND_TEXT_SLACK)
    }

    /// A mailbox name a client may create: bounded in length and depth, and no empty
    /// level (the core keys mailboxes by name; the peers' limits must never be met).
    fn check_new_name(&self, name: &str) -> Result<()> {
        let limits = &self.front.limits;
        if name.len() > limits.mailbox_name_len_max {
            return Err(format!("NO [LIMIT] mailbox names are at most {} bytes", limits.mailbox_name_len_max));
        }
        if name.split('/').count() > limits.mailbox_depth_max {
            return Err(format!("NO [LIMIT] mailboxes nest at most {} levels", limits.mailbox_depth_max));
        }
        if name.is_empty() || name.split('/').any(str::is_empty) || name.chars().any(char::is_control) {
            return Err("NO [CANNOT] not a valid mailbox name".into());
        }
        Ok(())
    }

    async fn check_mailbox_count(&self) -> Result<()> {
        let user = self.user.clone().unwrap_or_default();
        let count = self.node.mailboxes(&user).await.len();
        if count >= self.front.limits.mailboxes_per_user_max {
            return Err(format!("NO [LIMIT] at most {} mailboxes per user", self.front.limits.mailboxes_per_user_max));
        }
        Ok(())
    }

    fn key(&self, name: &str) -> MailboxKey {
        let name = if name.eq_ignore_ascii_case("INBOX") { "INBOX" } else { name };
        MailboxKey::new(self.user.as_deref().unwrap_or_default(), name)
    }

    /// The stored form of a mailbox name the client sent (modified UTF-7 for a client
    /// with UTF8=ACCEPT, as clients without it write names themselves).
    fn name(&self, m: &Mailbox<'_>) -> String {
        self.stored_name(mailbox_name(m))
    }

    fn stored_name(&self, name: String) -> String {
        if self.utf8 { super::utf7::encode(&name) } else { name }
    }

    /// A stored mailbox name as this client is shown it: UTF-8 with UTF8=ACCEPT (a name
    /// that is not well-formed modified UTF-7 as it is).
    fn shown(&self, name: &str) -> String {
        if self.utf8 { super::utf7::decode(name).unwrap_or_else(|| name.to_string()) } else { name.to_string() }
    }

    /// `shown`, written as an astring (quoted UTF-8 with UTF8=ACCEPT).
    fn shown_astring(&self, name: &str) -> String {
        if self.utf8 { super::wire::astring_utf8(&self.shown(name)) } else { astring(name) }
    }

    /// Whether the mailbox exists: here, or (asked of its master when this node has not
    /// heard of it) made through another node a moment ago.
    async fn mailbox_exists(&self, name: &str) -> bool {
        let key = self.key(name);
        &*key.name == "INBOX"
            || self.node.mailboxes(&key.user).await.iter().any(|s| s.mailbox == key)
            || self.read_fresh(name).await.is_ok()
    }

    /// The mailbox as this node has it; INBOX exists (empty) before its first message.
    /// For what the session already shows (its refreshes, COPY's sources).
    async fn read(&self, name: &str) -> Result<MailboxView> {
        self.read_as(name, false).await
    }

    /// The mailbox with every change its master had ordered when asked, so that what a
    /// client did through another node and was told OK is here (read-your-writes); from
    /// what this node has if the master cannot be reached within a second. For SELECT,
    /// EXAMINE and STATUS, which start from the mailbox as it is.
    async fn read_fresh(&self, name: &str) -> Result<MailboxView> {
        self.read_as(name, true).await
    }

    async fn read_as(&self, name: &str, fresh: bool) -> Result<MailboxView> {
        let key = self.key(name);
        let request = if fresh {
            ClientRequest::FreshRead { mailbox: key.clone() }
        } else {
            ClientRequest::Read { mailbox: key.clone() }
        };
        match self.node.request(request).await {
            ClientReply::Read(view) | ClientReply::FreshRead { view, .. } => Ok(view),
            ClientReply::Failed { reason, .. } if reason.starts_with("no mailbox") => {
                inbox_before_its_first_message(&key)?;
                Ok(MailboxView {
                    uidvalidity: key.initial_uidvalidity(),
                    mailbox: key,
                    uidnext: 1,
                    highest_modseq: 0,
                    messages: Vec::new(),
                })
            }
            other => Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
        }
    }

    async fn lifecycle(&self, request: ClientRequest) -> Result<()> {
        match self.node.request(request).await {
            ClientReply::Write(WriteResult::MailboxDone { .. }) => Ok(()),
            ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, reason }) => {
                Err(format!("NO {reason}"))
            }
            other => Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
        }
    }

    /// RENAME: one request to the core, ordered by the master of the old name: the new
    /// name gets every message (with the old UIDVALIDITY and UIDs when the name is new),
    /// the old one is deleted (INBOX is emptied instead), in one step.
    async fn rename(&mut self, from: &str, to: &str) -> Result<String> {
        self.check_new_name(to)?;
        if !self.mailbox_exists(from).await {
            return Err("NO [NONEXISTENT] no such mailbox".into());
        }
        if self.mailbox_exists(to).await {
            return Err("NO [ALREADYEXISTS] the target exists".into());
        }
        let (src, dst) = (self.key(from), self.key(to));
        let renamed = match self.node.request(ClientRequest::RenameMailbox { from: src.clone(), to: dst }).await {
            ClientReply::Write(WriteResult::MailboxDone { .. }) => Ok("RENAME done".to_string()),
            ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, reason })
                if reason.starts_with("no mailbox") && &*src.name == "INBOX" =>
            {
                // An INBOX that never held a message: the core has no copy of it yet, so
                // the new name starts empty.
                let special_use = SpecialUse::NONE;
                self.lifecycle(ClientRequest::CreateMailbox { mailbox: self.key(to), special_use }).await?;
                Ok("RENAME done".to_string())
            }
            ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, reason }) => {
                Err(format!("NO {reason}"))
            }
            other => Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
        };
        if renamed.is_ok() && &*src.name != "INBOX" && self.selected.as_ref().is_some_and(|s| s.mailbox == src) {
            self.selected = None;
        }
        renamed
    }

    async fn list(&mut self, command: &str, reference: &str, pattern: &str) -> Result<String> {
        let user = self.user.clone().unwrap_or_default();
        if pattern.is_empty() {
            self.line(&format!("* {command} (\\Noselect) \"/\" \"\""));
            return Ok(format!("{command} done"));
        }
        if command == "LSUB" {
            return self.lsub(&user, reference, pattern).await;
        }
        let mut names: BTreeSet<String> =
            self.node.mailboxes(&user).await.into_iter().map(|s| s.mailbox.name.to_string()).collect();
        names.insert("INBOX".into());
        let full = format!("{reference}{pattern}");
        if full.len() > 2 * self.front.limits.mailbox_name_len_max {
            return Err("BAD [LIMIT] pattern too long".into());
        }
        let special_uses = self.special_uses(&user).await;
        for n in names.iter().filter(|n| wildcard_match(&full, n)) {
            let children = names.iter().any(|c| c.starts_with(&format!("{n}/")));
            let attr = if children { "\\HasChildren" } else { "\\HasNoChildren" };
            let special: String = special_uses(n).iter().map(|u| format!("{u} ")).collect();
            self.line(&format!("* {command} ({special}{attr}) \"/\" {}", self.shown_astring(n)));
        }
        Ok(format!("{command} done"))
    }

    /// The special-use attributes of each of the user's mailboxes: the uses a client gave
    /// it (CREATE-SPECIAL-USE, replicated) or else the node's table by name.
    async fn special_uses(&self, user: &str) -> impl Fn(&str) -> Vec<&'static str> + use<> {
        let given = self.node.special_uses(user).await;
        let by_name = self.front.special_use.clone();
        move |name: &str| match given.get(name) {
            Some(uses) => uses.names().collect(),
            None => by_name.get(name).copied().into_iter().collect(),
        }
    }

    /// NOTIFY NONE or SET: the answer after the tag. A SET with STATUS tells every
    /// covered mailbox's STATUS first.
    async fn notify_command(&mut self, command: super::notify::Command) -> String {
        let mut set = match command {
            super::notify::Command::None => {
                self.notify = None;
                return "OK NOTIFY done".into();
            }
            super::notify::Command::Set(set) => set,
        };
        for name in set.names_mut() {
            let stored = self.stored_name(std::mem::take(name));
            *name = stored.trim_end_matches('/').to_string();
        }
        let user = self.user.clone().unwrap_or_default();
        let now = self.notify_snapshot().await;
        if set.status {
            let selected = self.selected.as_ref().map(|s| s.mailbox.name.to_string());
            for notice in super::notify::initial_status(&set, &now, selected.as_deref()) {
                self.tell(notice);
            }
        }
        let wake = self.node.watch_user(&user).await;
        self.notify = Some(NotifyState { set, told: now, wake });
        "OK NOTIFY done".into()
    }

    /// The user's mailboxes as NOTIFY compares them: INBOX is there before its first
    /// message, as LIST shows it.
    async fn notify_snapshot(&self) -> super::notify::Snapshot {
        let user = self.user.clone().unwrap_or_default();
        let mut mailboxes: BTreeMap<String, super::notify::Counts> = self
            .node
            .mailboxes(&user)
            .await
            .into_iter()
            .map(|s| {
                let counts = super::notify::Counts {
                    uidvalidity: s.uidvalidity,
                    uidnext: s.uidnext,
                    messages: s.count,
                    highest_modseq: s.highest_modseq,
                };
                (s.mailbox.name.to_string(), counts)
            })
            .collect();
        mailboxes.entry("INBOX".into()).or_insert_with(|| super::notify::Counts {
            uidvalidity: self.key("INBOX").initial_uidvalidity(),
            uidnext: 1,
            messages: 0,
            highest_modseq: 0,
        });
        let subscribed = self.node.subscriptions(&user).await.into_iter().collect();
        super::notify::Snapshot { mailboxes, subscribed }
    }

    /// Tells what changed since the last round that NOTIFY asked for: between commands
    /// (`between_commands`) the selected mailbox's own reports too, if its events were
    /// asked for.
    async fn notify_round(&mut self, between_commands: bool) {
        let Some((selected_events, delayed)) = self.notify.as_ref().map(|n| (n.set.selected, n.set.selected_delayed))
        else {
            return;
        };
        if between_commands && selected_events.about_messages() {
            // RFC 3501 sends no EXPUNGE outside a command; NOTIFY's `selected` lifts that.
            self.refresh(!delayed).await;
        }
        let now = self.notify_snapshot().await;
        let selected = self.selected.as_ref().map(|s| s.mailbox.name.to_string());
        let user = self.user.clone().unwrap_or_default();
        let Some(state) = self.notify.as_mut() else { return };
        let notices = super::notify::notices(&state.set, &user, &state.told, &now, selected.as_deref());
        state.told = now;
        for notice in notices {
            self.tell(notice);
        }
    }

    fn tell(&mut self, notice: super::notify::Notice) {
        let line = match notice {
            super::notify::Notice::Status { name, items, counts } => {
                format!("* STATUS {} ({})", self.shown_astring(&name), items.text(&counts))
            }
            super::notify::Notice::List { name, attributes, old_name } => {
                let old =
                    old_name.map(|old| format!(" (\"OLDNAME\" ({}))", self.shown_astring(&old))).unwrap_or_default();
                format!("* LIST ({}) \"/\" {}{old}", attributes.join(" "), self.shown_astring(&name))
            }
        };
        self.line(&line);
    }

    /// An extended LIST: see `super::listext`.
    async fn list_extended(&mut self, list: &super::listext::ListExtended) -> String {
        let mut list = list.clone();
        list.reference = self.stored_name(std::mem::take(&mut list.reference));
        list.patterns = std::mem::take(&mut list.patterns).into_iter().map(|p| self.stored_name(p)).collect();
        let list = &list;
        let user = self.user.clone().unwrap_or_default();
        let mut existing: BTreeSet<String> =
            self.node.mailboxes(&user).await.into_iter().map(|s| s.mailbox.name.to_string()).collect();
        existing.insert("INBOX".into());
        let subscribed: BTreeSet<String> = self.node.subscriptions(&user).await.into_iter().collect();
        let limit = 2 * self.front.limits.mailbox_name_len_max;
        let special_uses = self.special_uses(&user).await;
        let listed = super::listext::answer(
            list,
            &existing,
            &subscribed,
            |pattern, name| pattern.len() <= limit && wildcard_match(pattern, name),
            special_uses,
        );
        for l in listed {
            let childinfo = if l.childinfo_subscribed { " (\"CHILDINFO\" (\"SUBSCRIBED\"))" } else { "" };
            let shown = self.shown_astring(&l.name);
            self.line(&format!("* LIST ({}) \"/\" {shown}{childinfo}", l.attributes.join(" ")));
            // LIST-STATUS: each selectable mailbox's STATUS right after its LIST line; one
            // that vanished meanwhile is left out (RFC 5819 section 2).
            if let Some(items) = &list.return_status
                && existing.contains(&l.name)
            {
                let items: Vec<StatusDataItemName> = items.iter().filter_map(|i| status_item(i)).collect();
                let _ = self.status(&l.name, &items).await;
            }
        }
        "LIST done".into()
    }

    /// LSUB: the subscribed names the pattern matches (a subscription may outlive its
    /// mailbox), and, for a pattern ending in `%`, each parent it matches that is not
    /// subscribed itself but has a subscribed child, as `\Noselect` (RFC 3501 6.3.9).
    async fn lsub(&mut self, user: &str, reference: &str, pattern: &str) -> Result<String> {
        let full = format!("{reference}{pattern}");
        if full.len() > 2 * self.front.limits.mailbox_name_len_max {
            return Err("BAD [LIMIT] pattern too long".into());
        }
        let subscribed: BTreeSet<String> = self.node.subscriptions(user).await.into_iter().collect();
        // Name -> shown only as the parent of a subscribed mailbox.
        let mut shown: BTreeMap<String, bool> = BTreeMap::new();
        for name in &subscribed {
            if wildcard_match(&full, name) {
                shown.insert(name.clone(), false);
            } else if full.ends_with('%') {
                let mut parent = name.as_str();
                while let Some(cut) = parent.rfind('/') {
                    parent = &parent[..cut];
                    if !subscribed.contains(parent) && wildcard_match(&full, parent) {
                        shown.entry(parent.to_string()).or_insert(true);
                    }
                }
            }
        }
        for (name, parent_only) in shown {
            let attr = if parent_only { "\\Noselect" } else { "" };
            self.line(&format!("* LSUB ({attr}) \"/\" {}", self.shown_astring(&name)));
        }
        Ok("LSUB done".into())
    }

    async fn select(&mut self, name: &str, read_only: bool, parameters: &[SelectParameter]) -> Result<String> {
        self.selected = None;
        let mut resync = None;
        for p in parameters {
            match p {
                SelectParameter::CondStore => self.condstore = true,
                SelectParameter::QResync { .. } if !self.qresync => {
                    return Err("BAD ENABLE QRESYNC first".into());
                }
                SelectParameter::QResync { uid_validity, mod_sequence_value, known_uids, .. } => {
                    resync = Some((uid_validity.get(), mod_sequence_value.get(), known_uids.clone()));
                }
            }
        }
        let view = self.read_fresh(name).await?;
        let uids: Vec<Uid> = view.messages.iter().map(|m| m.uid).collect();
        // SELECT takes the recent messages for this session; EXAMINE only shows them.
        let messages = view.messages.iter().map(|m| (m.uid, m.guid));
        let recent: BTreeSet<Uid> = if read_only {
            self.front.recent.shown(&view.mailbox, view.uidvalidity, messages).into_iter().collect()
        } else {
            self.front.recent.take(&view.mailbox, view.uidvalidity, messages).into_iter().collect()
        };
        let mut selected = Selected {
            mailbox: view.mailbox.clone(),
            name: name.to_string(),
            read_only,
            uidvalidity: view.uidvalidity,
            uids,
            view: BTreeMap::new(),
            recent,
            keywords: BTreeSet::new(),
            highest_modseq: view.highest_modseq,
            gone: BTreeSet::new(),
            updates: Vec::new(),
        };
        selected.learn_keywords(&view.messages);
        for l in selected.flags_responses() {
            self.line(&l);
        }
        self.line(&format!("* {} EXISTS", view.messages.len()));
        self.line(&format!("* {} RECENT", selected.recent.len()));
        if let Some(first_unseen) = view.messages.iter().position(|m| !has(&m.flags, "\\Seen")) {
            self.line(&format!("* OK [UNSEEN {}] first unseen", first_unseen + 1));
        }
        self.line(&format!("* OK [UIDVALIDITY {}] UIDs valid", view.uidvalidity));
        self.line(&format!("* OK [UIDNEXT {}] next UID", view.uidnext));
        self.line(&format!("* OK [HIGHESTMODSEQ {}] modseq", view.highest_modseq));
        if let Some((_, since, known)) = resync.filter(|r| r.0 == view.uidvalidity) {
            // What the client's cache lost: UIDs it may know that are gone, then every
            // message changed since its modseq.
            let present: Vec<Uid> = view.messages.iter().map(|m| m.uid).collect();
            let largest = view.uidnext.saturating_sub(1);
            let known = known.as_ref().map(|k| Intervals::new(k, largest)).unwrap_or_else(|| Intervals::all(largest));
            let gone = known.absent(&present, largest);
            if !gone.is_empty() {
                self.line(&format!("* VANISHED (EARLIER) {}", range_set(&gone)));
            }
            for (i, m) in view.messages.iter().enumerate() {
                if m.modseq > since {
                    self.line(&format!(
                        "* {} FETCH (UID {} FLAGS ({}) MODSEQ ({}))",
                        i + 1,
                        m.uid,
                        shown_flags(&m.flags, selected.recent.contains(&m.uid)),
                        m.modseq
                    ));
                }
            }
        }
        selected.view = view.messages.into_iter().map(|m| (m.uid, m)).collect();
        self.selected = Some(selected);
        Ok(if read_only { "[READ-ONLY] EXAMINE done".into() } else { "[READ-WRITE] SELECT done".into() })
    }

    /// Tells the client what changed in the selected mailbox since it last looked.
    async fn refresh(&mut self, expunges_allowed: bool) {
        self.refresh_except(expunges_allowed, &BTreeSet::new()).await;
    }

    /// `refresh`, leaving out flag changes of `quiet`: the current command reports them.
    async fn refresh_except(&mut self, expunges_allowed: bool, quiet: &BTreeSet<Uid>) {
        let Some((mailbox, uidvalidity, since)) =
            self.selected.as_ref().map(|s| (s.mailbox.clone(), s.uidvalidity, s.highest_modseq))
        else {
            return;
        };
        // What changed since the session last looked: a lookup when nothing did.
        if let Some(changes) = self.node.changes(mailbox, uidvalidity, since).await
            && self.apply_changes(changes, expunges_allowed, quiet)
        {
            self.refresh_updates(since).await;
            return;
        }
        self.refresh_whole(expunges_allowed, quiet).await;
        self.refresh_updates(since).await;
    }

    /// Tells the client how each updated search's result changed, when the mailbox
    /// changed after `since` (its HIGHESTMODSEQ before this refresh): what left it, then
    /// what joined it.
    async fn refresh_updates(&mut self, since: u64) {
        let Some(sel) = self.selected.as_ref() else { return };
        if sel.updates.is_empty() || sel.highest_modseq == since {
            return;
        }
        for i in 0..sel.updates.len() {
            let Some(criteria) = self.selected.as_ref().and_then(|s| s.updates.get(i)).map(|u| u.criteria.clone())
            else {
                return;
            };
            let Ok(hits) = self.matching(&criteria, false, |_, _| ()).await else { return };
            let now: BTreeSet<Uid> = hits.iter().map(|h| h.1).collect();
            let Some(sel) = self.selected.as_mut() else { return };
            let Some(update) = sel.updates.get(i) else { return };
            let removed: Vec<Uid> = update.hits.difference(&now).copied().collect();
            let added: Vec<Uid> = now.difference(&update.hits).copied().collect();
            let mut lines = Vec::new();
            if let Some(first) = removed.first() {
                let position = update.hits.range(..first).count() + 1;
                lines.push(update.line(sel, "REMOVEFROM", position, &removed));
            }
            if let Some(first) = added.first() {
                let position = now.range(..first).count() + 1;
                lines.push(update.line(sel, "ADDTO", position, &added));
            }
            if let Some(update) = sel.updates.get_mut(i) {
                update.hits = now;
            }
            for l in lines {
                self.line(&l);
            }
        }
    }

    /// Reports `changes` to the client; false, having reported nothing, when they do not
    /// add up to the node's message count (a tombstone collected, a new message below
    /// one shown): the caller then reads the mailbox whole.
    fn apply_changes(&mut self, changes: MailboxChanges, expunges_allowed: bool, quiet: &BTreeSet<Uid>) -> bool {
        let (condstore, qresync) = (self.condstore, self.qresync);
        let Some(sel) = self.selected.as_mut() else { return false };
        let gone: Vec<Uid> =
            changes.gone.iter().copied().filter(|u| sel.view.contains_key(u) && !sel.gone.contains(u)).collect();
        let added: Vec<&MessageView> = changes.changed.iter().filter(|m| !sel.view.contains_key(&m.uid)).collect();
        let last_shown = sel.uids.last().copied().unwrap_or(0);
        let still_shown = sel.uids.len().checked_sub(sel.gone.len() + gone.len());
        if still_shown.map(|s| s + added.len()) != Some(changes.count) || added.iter().any(|m| m.uid <= last_shown) {
            return false;
        }
        let mut lines = Vec::new();
        sel.gone.extend(gone);
        if expunges_allowed {
            let gone = std::mem::take(&mut sel.gone);
            sel.report_expunges(&gone, qresync, &mut lines);
        }
        for m in &added {
            sel.uids.push(m.uid);
        }
        sel.announce_new(&self.front.recent, added.iter().map(|m| (m.uid, m.guid)), &mut lines);
        // Keywords new to this session are announced before any message shows them.
        if sel.learn_keywords(&changes.changed) {
            lines.extend(sel.flags_responses());
        }
        for m in changes.changed {
            if sel.gone.contains(&m.uid) {
                continue;
            }
            let known = sel.view.contains_key(&m.uid);
            let changed = known && sel.flags(&m.uid) != m.flags.as_slice();
            let uid = m.uid;
            sel.view.insert(uid, m);
            if changed
                && !quiet.contains(&uid)
                && let Some(i) = sel.index_of(&uid)
            {
                lines.push(sel.flags_line(i + 1, &uid, condstore));
            }
        }
        sel.highest_modseq = changes.highest_modseq;
        for l in lines {
            self.line(&l);
        }
        true
    }

    /// `refresh_except` by reading the whole mailbox.
    async fn refresh_whole(&mut self, expunges_allowed: bool, quiet: &BTreeSet<Uid>) {
        let Some(name) = self.selected.as_ref().map(|s| s.name.clone()) else { return };
        let Ok(view) = self.read(&name).await else { return };
        let Some(sel) = self.selected.as_mut() else { return };
        sel.highest_modseq = view.highest_modseq;
        let mut lines = Vec::new();
        if view.uidvalidity != sel.uidvalidity {
            lines.push(format!("* OK [UIDVALIDITY {}] UIDVALIDITY changed", view.uidvalidity));
            sel.uidvalidity = view.uidvalidity;
        }
        let now: BTreeMap<Uid, &MessageView> = view.messages.iter().map(|m| (m.uid, m)).collect();
        sel.gone = sel.uids.iter().copied().filter(|u| !now.contains_key(u)).collect();
        if expunges_allowed {
            let gone = std::mem::take(&mut sel.gone);
            sel.report_expunges(&gone, self.qresync, &mut lines);
        }
        let known: BTreeSet<Uid> = sel.uids.iter().copied().collect();
        let added: Vec<&MessageView> = view.messages.iter().filter(|m| !known.contains(&m.uid)).collect();
        // A renumbered message's new UID is above every UID shown, so appending keeps
        // the sequence in UID order.
        for m in &added {
            sel.uids.push(m.uid);
            sel.view.insert(m.uid, (*m).clone());
        }
        sel.announce_new(&self.front.recent, added.iter().map(|m| (m.uid, m.guid)), &mut lines);
        // Keywords new to this session are announced before any message shows them.
        let shown: Vec<&MessageView> = sel.uids.iter().filter_map(|u| now.get(u).copied()).collect();
        if sel.learn_keywords(shown) {
            lines.extend(sel.flags_responses());
        }
        for (i, uid) in sel.uids.iter().enumerate() {
            let Some(m) = now.get(uid) else { continue };
            let changed = sel.flags(uid) != m.flags.as_slice();
            sel.view.insert(*uid, (*m).clone());
            if changed && !quiet.contains(uid) {
                lines.push(sel.flags_line(i + 1, uid, self.condstore));
            }
        }
        for l in lines {
            self.line(&l);
        }
    }

    async fn status(&mut self, name: &str, items: &[StatusDataItemName]) -> Result<String> {
        // RECENT is per session and message, so only it needs the messages; every other
        // item is a count the core keeps, answered without a pass over the mailbox.
        let recent = if items.contains(&StatusDataItemName::Recent) {
            let view = self.read_fresh(name).await?;
            let messages = view.messages.iter().map(|m| (m.uid, m.guid));
            Some(self.front.recent.shown(&view.mailbox, view.uidvalidity, messages).len())
        } else {
            None
        };
        let status = self.status_fresh(name).await?;
        let mut parts = Vec::new();
        for item in items {
            match item {
                StatusDataItemName::Messages => parts.push(format!("MESSAGES {}", status.messages)),
                StatusDataItemName::Recent => parts.push(format!("RECENT {}", recent.unwrap_or(0))),
                StatusDataItemName::UidNext => parts.push(format!("UIDNEXT {}", status.uidnext)),
                StatusDataItemName::UidValidity => parts.push(format!("UIDVALIDITY {}", status.uidvalidity)),
                StatusDataItemName::Unseen => {
                    parts.push(format!("UNSEEN {}", status.messages.saturating_sub(status.seen)))
                }
                StatusDataItemName::Deleted => parts.push(format!("DELETED {}", status.deleted)),
                StatusDataItemName::HighestModSeq => parts.push(format!("HIGHESTMODSEQ {}", status.highest_modseq)),
                _ => {}
            }
        }
        self.line(&format!("* STATUS {} ({})", self.shown_astring(name), parts.join(" ")));
        Ok("STATUS done".into())
    }

    /// The mailbox's STATUS counts, fresh as `read_fresh` is.
    async fn status_fresh(&self, name: &str) -> Result<MailboxStatus> {
        let key = self.key(name);
        match self.node.request(ClientRequest::FreshStatus { mailbox: key.clone() }).await {
            ClientReply::FreshStatus { status, .. } => Ok(status),
            ClientReply::Failed { reason, .. } if reason.starts_with("no mailbox") => {
                inbox_before_its_first_message(&key)?;
                let uidvalidity = key.initial_uidvalidity();
                let (messages, seen, deleted) = (0, 0, 0);
                Ok(MailboxStatus { mailbox: key, uidvalidity, uidnext: 1, highest_modseq: 0, messages, seen, deleted })
            }
            other => Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
        }
    }

    async fn append(
        &mut self,
        name: &str,
        flags: &[ImapFlag<'_>],
        received: Option<u64>,
        body: Vec<u8>,
    ) -> Result<String> {
        let flags = core_flags(flags)?;
        if body.len() > self.front.limits.message_size_max {
            return Err(format!("NO [TOOBIG] messages are at most {} bytes", self.front.limits.message_size_max));
        }
        if !self.mailbox_exists(name).await {
            return Err("NO [TRYCREATE] no such mailbox".into());
        }
        let user = self.user.clone().unwrap_or_default();
        if let Err(why) = self.front.within_quota(&self.node, &user, body.len() as u64, 1).await {
            return Err(format!("NO [OVERQUOTA] {why}"));
        }
        let received = received.unwrap_or_else(now_secs);
        let request =
            ClientRequest::Save { mailbox: self.key(name), received, flags, body: body.into(), delivery: false };
        match self.node.request(request).await {
            ClientReply::Write(WriteResult::Saved { uidvalidity, uid, .. }) => {
                if self.selected.as_ref().is_some_and(|s| s.mailbox == self.key(name)) {
                    self.refresh(true).await;
                }
                Ok(format!("[APPENDUID {uidvalidity} {uid}] APPEND done"))
            }
            other => Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
        }
    }

    /// MULTIAPPEND (RFC 3502): every message or none. The checks come first (size, the
    /// mailbox, the quota for all of them); the messages are then saved in order, and
    /// if one cannot be, those saved before it are expunged again and the answer is NO.
    /// CATENATE: each message's parts joined (URLs resolved to the bytes they name),
    /// then appended as MULTIAPPEND appends them. A missing mailbox is TRYCREATE before
    /// any URL is looked at; a URL that names nothing here is BADURL and nothing is
    /// appended.
    async fn catenate(&mut self, catenate: super::catenate::Catenate) -> Result<String> {
        use super::catenate::Part;
        if self.user.is_none() {
            return Err("BAD log in first".into());
        }
        // The target's name as the codec reads a mailbox (quoted, literal, INBOX).
        let probe = [catenate.tag.as_slice(), b" APPEND ", &catenate.mailbox, b" {1+}\r\nx\r\n"].concat();
        let name = match CommandCodec::default().decode(&probe) {
            Ok((_, Command { body: CommandBody::Append { mailbox, .. }, .. })) => self.name(&mailbox),
            _ => return Err("BAD a malformed mailbox name".into()),
        };
        if !self.mailbox_exists(&name).await {
            return Err("NO [TRYCREATE] no such mailbox".into());
        }
        let size_max = self.front.limits.message_size_max;
        // URLs multiply a short command into much more: all messages together may hold
        // no more than the longest command the session takes.
        let total_max = usize::try_from(self.message_len_max()).unwrap_or(usize::MAX);
        let mut total = 0usize;
        let mut appends = Vec::with_capacity(catenate.messages.len());
        for message in &catenate.messages {
            let mut body = Vec::new();
            for part in &message.parts {
                match part {
                    Part::Text(text) => body.extend_from_slice(text),
                    Part::Url(url) => {
                        let bytes = self.url_bytes(url).await.map_err(|why| {
                            let shown: String =
                                url.chars().filter(|c| *c != ']' && !c.is_control()).take(200).collect();
                            format!("NO [BADURL {shown}] {why}")
                        })?;
                        body.extend_from_slice(&bytes);
                    }
                }
                if body.len() > size_max {
                    return Err(format!("NO [TOOBIG] messages are at most {size_max} bytes"));
                }
                if total.saturating_add(body.len()) > total_max {
                    return Err(format!("NO [TOOBIG] one APPEND takes at most {total_max} bytes in all"));
                }
            }
            total = total.saturating_add(body.len());
            // NUL only in a literal8 (BINARY is offered); the codec reads it as any APPEND.
            let literal = if memchr::memchr(0, &body).is_some() {
                format!("~{{{}+}}\r\n", body.len())
            } else {
                format!("{{{}+}}\r\n", body.len())
            };
            let command = [
                catenate.tag.as_slice(),
                b" APPEND ",
                &catenate.mailbox,
                b" ",
                &message.options,
                literal.as_bytes(),
                &body,
                b"\r\n",
            ]
            .concat();
            match CommandCodec::default().decode(&command) {
                Ok((_, command)) => appends.push(command.into_static()),
                Err(_) => return Err("BAD a malformed APPEND (flags or date)".into()),
            }
        }
        self.multi_append(appends).await
    }

    /// The bytes a CATENATE URL names: a message of this user's (or a section or a
    /// range of it), read as FETCH BODY.PEEK would.
    async fn url_bytes(&self, url: &str) -> std::result::Result<Vec<u8>, String> {
        let url = super::catenate::parse_url(url)?;
        // A URL's mailbox is UTF-8 (RFC 5092); names are kept in modified UTF-7.
        let mailbox = super::utf7::encode(&url.mailbox);
        let view = self.read_fresh(&mailbox).await.map_err(|_| "no such mailbox".to_string())?;
        if url.uidvalidity.is_some_and(|v| v != view.uidvalidity) {
            return Err("the mailbox has another UIDVALIDITY".into());
        }
        let message = view.messages.iter().find(|m| m.uid == url.uid).ok_or("no such message")?;
        let bodies = self.node.bodies(vec![message.guid]).await;
        let msg = bodies.get(&message.guid).ok_or("the message's body cannot be read now")?;
        let bytes = url_section(msg, &url.section)?;
        Ok(match url.partial {
            None => bytes,
            Some((offset, length)) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
                let end = length
                    .map(|l| start.saturating_add(usize::try_from(l).unwrap_or(usize::MAX)))
                    .unwrap_or(bytes.len())
                    .min(bytes.len());
                bytes[start..end].to_vec()
            }
        })
    }

    async fn multi_append(&mut self, appends: Vec<Command<'static>>) -> Result<String> {
        if self.user.is_none() {
            return Err("NO log in first".into());
        }
        if self.selected.is_some() {
            self.refresh(false).await;
        }
        let mut name = None;
        let mut messages = Vec::new();
        for command in appends {
            let CommandBody::Append { mailbox, flags, date, message } = command.body else {
                return Err("BAD not an APPEND".into());
            };
            let this = self.name(&mailbox);
            if name.get_or_insert_with(|| this.clone()) != &this {
                return Err("BAD one mailbox per APPEND".into());
            }
            let bytes = append_bytes(message);
            if bytes.len() > self.front.limits.message_size_max {
                return Err(format!("NO [TOOBIG] messages are at most {} bytes", self.front.limits.message_size_max));
            }
            let received = date.map(|d| d.as_ref().timestamp().max(0) as u64).unwrap_or_else(now_secs);
            messages.push((core_flags(&flags)?, received, bytes));
        }
        let name = name.unwrap_or_default();
        if !self.mailbox_exists(&name).await {
            return Err("NO [TRYCREATE] no such mailbox".into());
        }
        let user = self.user.clone().unwrap_or_default();
        let total: u64 = messages.iter().map(|m| m.2.len() as u64).sum();
        if let Err(why) = self.front.within_quota(&self.node, &user, total, messages.len() as u64).await {
            return Err(format!("NO [OVERQUOTA] {why}"));
        }
        let key = self.key(&name);
        let mut saved = Vec::new();
        let mut validity = 0;
        for (flags, received, body) in messages {
            let request =
                ClientRequest::Save { mailbox: key.clone(), received, flags, body: body.into(), delivery: false };
            match self.node.request(request).await {
                ClientReply::Write(WriteResult::Saved { uidvalidity, uid, .. }) => {
                    validity = uidvalidity;
                    saved.push(uid);
                }
                other => {
                    if !saved.is_empty() {
                        let undo = ClientRequest::Expunge { mailbox: key.clone(), uids: saved.clone() };
                        let _ = self.node.request(undo).await;
                    }
                    return Err(format!("NO [UNAVAILABLE] none of the messages was kept: {}", describe(&other)));
                }
            }
        }
        if self.selected.as_ref().is_some_and(|s| s.mailbox == key) {
            self.refresh(true).await;
        }
        Ok(format!("[APPENDUID {validity} {}] APPEND done", uid_set(&saved)))
    }

    /// (sequence number, UID) of the messages a set names.
    fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<(usize, Uid)> {
        let Some(sel) = self.selected.as_ref() else { return Vec::new() };
        let largest = if uid { sel.uids.last().copied().unwrap_or(0) } else { sel.uids.len() as u32 };
        let set = Intervals::new(set, largest);
        let mut out = Vec::new();
        for (i, u) in sel.uids.iter().enumerate() {
            let n = if uid { *u } else { i as u32 + 1 };
            if set.contains(n) {
                out.push((i + 1, *u));
            }
        }
        out
    }

    async fn fetch(
        &mut self,
        set: &SequenceSet,
        items: MacroOrMessageDataItemNames<'_>,
        uid: bool,
        modifiers: &[FetchModifier],
    ) -> Result<String> {
        let mut items: Vec<MessageDataItemName<'_>> = match items {
            MacroOrMessageDataItemNames::Macro(m) => m.expand().into_iter().map(|i| i.into_static()).collect(),
            MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
        };
        if uid && !items.contains(&MessageDataItemName::Uid) {
            items.insert(0, MessageDataItemName::Uid);
        }
        let mut changed_since = None;
        for m in modifiers {
            match m {
                FetchModifier::ChangedSince(since) => {
                    self.enable_condstore();
                    changed_since = Some(since.get());
                }
                FetchModifier::Vanished if !(uid && self.qresync) => {
                    return Err("BAD VANISHED needs UID FETCH and QRESYNC".into());
                }
                FetchModifier::Vanished => {}
            }
        }
        if items.contains(&MessageDataItemName::ModSeq) {
            self.enable_condstore();
        }
        let vanished = modifiers.contains(&FetchModifier::Vanished);
        if self.condstore
            && (items.contains(&MessageDataItemName::Flags) || changed_since.is_some())
            && !items.contains(&MessageDataItemName::ModSeq)
        {
            items.push(MessageDataItemName::ModSeq);
        }
        if vanished
            && changed_since.is_some()
            && let Some(sel) = self.selected.as_ref()
        {
            let largest = sel.uids.last().copied().unwrap_or(0);
            let gone = Intervals::new(set, largest).absent(&sel.uids, largest);
            if !gone.is_empty() {
                self.line(&format!("* VANISHED (EARLIER) {}", range_set(&gone)));
            }
        }
        let mut targets = self.resolve(set, uid);
        if let (Some(since), Some(sel)) = (changed_since, self.selected.as_ref()) {
            targets.retain(|(_, u)| sel.view.get(u).is_some_and(|m| m.modseq > since));
        }
        let needs_body = items.iter().any(|i| {
            !matches!(
                i,
                MessageDataItemName::Uid
                    | MessageDataItemName::Flags
                    | MessageDataItemName::InternalDate
                    | MessageDataItemName::Rfc822Size
                    | MessageDataItemName::ModSeq
            )
        });
        let sets_seen = items.iter().any(|i| {
            matches!(
                i,
                MessageDataItemName::BodyExt { peek: false, .. }
                    | MessageDataItemName::Binary { peek: false, .. }
                    | MessageDataItemName::Rfc822
                    | MessageDataItemName::Rfc822Text
            )
        });
        let Some(sel) = self.selected.as_ref() else { return Err("NO select a mailbox first".into()) };
        if sets_seen && !sel.read_only {
            let unseen: Vec<Uid> = targets.iter().map(|t| t.1).filter(|u| !has(sel.flags(u), "\\Seen")).collect();
            if !unseen.is_empty() {
                let mailbox = sel.mailbox.clone();
                let seen = Flag::new("\\Seen").map_err(|e| format!("{e:?}"))?;
                let request = ClientRequest::Store {
                    mailbox,
                    uids: unseen,
                    add: vec![seen],
                    remove: vec![],
                    unchanged_since: None,
                };
                let _ = self.node.request(request).await;
                // The new flags go out in this FETCH's own responses, not as separate ones.
                if !items.contains(&MessageDataItemName::Flags) {
                    items.push(MessageDataItemName::Flags);
                }
                let reported_here: BTreeSet<Uid> = targets.iter().map(|t| t.1).collect();
                self.refresh_except(false, &reported_here).await;
            }
        }
        // Copied out of the session: the batches below await reads and writes.
        let rows: Vec<(usize, Uid, MessageView, bool)> = {
            let Some(sel) = self.selected.as_ref() else { return Err("NO select a mailbox first".into()) };
            targets
                .iter()
                .filter_map(|(seq, u)| sel.view.get(u).map(|m| (*seq, *u, m.clone(), sel.recent.contains(u))))
                .collect()
        };
        // Bodies are read and answered in batches of at most FETCH_BATCH_BYTES, each
        // batch written to the client before the next is read: a FETCH of a whole
        // mailbox holds one batch of bodies and responses in memory, not the mailbox.
        // ENVELOPE, BODY and BODYSTRUCTURE come from the node's cache when it has them:
        // such a FETCH reads only the bodies parsed for the first time.
        let parsed_only = needs_body
            && items.iter().all(|i| {
                !matches!(
                    i,
                    MessageDataItemName::BodyExt { .. }
                        | MessageDataItemName::Binary { .. }
                        | MessageDataItemName::BinarySize { .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Header
                        | MessageDataItemName::Rfc822Text
                )
            });
        let batches =
            if needs_body { batches(rows.iter().map(|r| r.2.size), FETCH_BATCH_BYTES) } else { vec![(0, rows.len())] };
        // The next batch's bodies are read while this one is formatted and written: the
        // store and the socket work at once, and at most two batches are in memory.
        let read_batch = |this: &Self, (start, end): (usize, usize)| {
            let wanted: Vec<_> = rows[start..end]
                .iter()
                .map(|r| r.2.guid)
                .filter(|g| !parsed_only || this.front.parsed.get(*g).is_none())
                .collect();
            let node = this.node.clone();
            tokio::spawn(async move { if wanted.is_empty() { BTreeMap::new() } else { node.bodies(wanted).await } })
        };
        let mut next = (needs_body && !batches.is_empty()).then(|| read_batch(self, batches[0]));
        // Messages whose bodies are not here: being repaired from a peer, or (on a partial
        // replica) left on the cluster until a client asks, as this one does now.
        let mut absent: Vec<usize> = Vec::new();
        for (i, &(start, end)) in batches.iter().enumerate() {
            let bodies = match next.take() {
                Some(read) => read.await.unwrap_or_default(),
                None => BTreeMap::new(),
            };
            if needs_body && let Some(&following) = batches.get(i + 1) {
                next = Some(read_batch(self, following));
            }
            let mut out = Vec::new();
            for (row, (seq, _, m, recent)) in rows[start..end].iter().enumerate() {
                let parsed = parsed_only.then(|| self.front.parsed.get(m.guid)).flatten();
                let body = bodies.get(&m.guid).map(|b| b.as_ref());
                if needs_body && body.is_none() && parsed.is_none() {
                    // Not here yet: say nothing rather than lie.
                    absent.push(start + row);
                    continue;
                }
                let message = Message::new(body.unwrap_or_default(), parsed);
                if let Err(why) = fetch_row(&mut out, *seq, &items, m, *recent, &message) {
                    // What was answered for earlier messages stands.
                    self.out.extend_from_slice(&out);
                    return Err(format!("NO [UNKNOWN-CTE] message {seq}: {why}"));
                }
                // A body read whole anyway is parsed while it is here (as Dovecot caches
                // what it learns on a FETCH): the client's next ENVELOPE or
                // BODYSTRUCTURE of it reads nothing.
                if body.is_some() && (parsed_only || self.front.parsed.get(m.guid).is_none()) {
                    self.front.parsed.put(m.guid, message.parsed());
                }
            }
            drop(bodies);
            self.out.extend_from_slice(&out);
            if end < rows.len() {
                self.flush().await?;
            }
        }
        if !absent.is_empty() {
            // A partial replica answers what it can from the text parts it holds of a
            // large message (its text, its structure); the rest is asked for below.
            let answered = self.fetch_from_text_parts(&items, &rows, &absent).await?;
            absent.retain(|i| !answered.contains(i));
        }
        let absent: Vec<Uid> = absent.iter().filter_map(|i| rows.get(*i)).map(|r| r.1).collect();
        if !absent.is_empty()
            && let Some(mailbox) = self.selected.as_ref().map(|s| s.mailbox.clone())
        {
            // The core queues each (a partial replica's agent brings it at its next sync;
            // a cluster server repairs it from a peer); the client asks again later.
            for uid in absent.iter().take(FETCH_BODIES_ASKED_MAX) {
                let _ = self.node.request(ClientRequest::FetchBody { mailbox: mailbox.clone(), uid: *uid }).await;
            }
            return Err(format!(
                "NO [UNAVAILABLE] {} message bodies are not here yet (UID {}): try again after the next sync",
                absent.len(),
                uid_set(&absent)
            ));
        }
        Ok(format!("{}FETCH done", if uid { "UID " } else { "" }))
    }

    /// FETCH responses from text parts (see [`text_parts`]) for the rows whose bodies are
    /// not here, where every item can be answered from them. The rows answered.
    async fn fetch_from_text_parts(
        &mut self,
        items: &[MessageDataItemName<'_>],
        rows: &[(usize, Uid, MessageView, bool)],
        absent: &[usize],
    ) -> Result<BTreeSet<usize>> {
        let guids: Vec<Guid> = absent.iter().filter_map(|i| rows.get(*i)).map(|r| r.2.guid).collect();
        let held: BTreeMap<Guid, Body> = match self.node.request(ClientRequest::ReadTextParts { guids }).await {
            ClientReply::TextParts { parts } => parts.into_iter().collect(),
            _ => return Ok(BTreeSet::new()),
        };
        let mut answered = BTreeSet::new();
        let mut out = Vec::new();
        for &i in absent {
            let Some((seq, _, m, recent)) = rows.get(i) else { continue };
            let Some(parts) = held.get(&m.guid).and_then(|b| text_parts::TextParts::decode(b)) else { continue };
            if !parts.answer(items) {
                continue;
            }
            let message = Message::new(&parts.abridged, Some(Arc::new(parts.whole)));
            // An item that fails is left for the whole body (which repeats the error if
            // it is the body's).
            if fetch_row(&mut out, *seq, items, m, *recent, &message).is_ok() {
                answered.insert(i);
            }
        }
        self.out.extend_from_slice(&out);
        Ok(answered)
    }

    async fn store(
        &mut self,
        set: &SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: &[ImapFlag<'_>],
        uid: bool,
        unchanged_since: Option<u64>,
    ) -> Result<String> {
        if unchanged_since.is_some() {
            self.enable_condstore();
        }
        let Some(sel) = self.selected.as_ref() else { return Err("NO select a mailbox first".into()) };
        if sel.read_only {
            return Err("NO the mailbox is read-only".into());
        }
        let wanted = core_flags(flags)?;
        let targets = self.resolve(set, uid);
        let mailbox = sel.mailbox.clone();
        // One request per distinct change: for FLAGS (replace), what to add and remove
        // differs per message.
        let mut groups: BTreeMap<(Vec<Flag>, Vec<Flag>), Vec<Uid>> = BTreeMap::new();
        for (_, u) in &targets {
            let current = sel.flags(u).to_vec();
            let (add, remove) = match kind {
                StoreType::Add => (wanted.clone(), vec![]),
                StoreType::Remove => (vec![], wanted.clone()),
                StoreType::Replace => (
                    wanted.iter().filter(|f| !current.contains(f)).cloned().collect(),
                    current.iter().filter(|f| !wanted.contains(f)).cloned().collect(),
                ),
            };
            // With UNCHANGEDSINCE even a no-op STORE must be checked against the modseq.
            if !add.is_empty() || !remove.is_empty() || unchanged_since.is_some() {
                groups.entry((add, remove)).or_default().push(*u);
            }
        }
        let mut modified: Vec<Uid> = Vec::new();
        for ((add, remove), uids) in groups {
            if add.is_empty() && remove.is_empty() {
                // Nothing to change: only the UNCHANGEDSINCE test, against our view.
                let sel = self.selected.as_ref();
                let since = unchanged_since.unwrap_or(u64::MAX);
                modified
                    .extend(uids.iter().filter(|u| sel.and_then(|s| s.view.get(u)).is_some_and(|m| m.modseq > since)));
                continue;
            }
            let request = ClientRequest::Store { mailbox: mailbox.clone(), uids, add, remove, unchanged_since };
            match self.node.request(request).await {
                ClientReply::Write(WriteResult::Stored { rejected, .. }) => modified.extend(rejected),
                other => return Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
            }
        }
        // The new flags reach the client through the refresh; with .SILENT they still
        // do (RFC 3501 allows it) but only as changes.
        let before: BTreeMap<Uid, Vec<Flag>> = self
            .selected
            .as_ref()
            .map(|s| targets.iter().map(|(_, u)| (*u, s.flags(u).to_vec())).collect())
            .unwrap_or_default();
        self.refresh(false).await;
        if response == StoreResponse::Answer {
            let Some(sel) = self.selected.as_ref() else { return Err("NO select a mailbox first".into()) };
            let mut lines = Vec::new();
            for (seq, u) in &targets {
                let flags = sel.flags(u).to_vec();
                if before.get(u) == Some(&flags) && !modified.contains(u) {
                    lines.push(sel.flags_line(*seq, u, self.condstore));
                }
            }
            for l in lines {
                self.line(&l);
            }
        }
        let verb = if uid { "UID STORE" } else { "STORE" };
        if !modified.is_empty() {
            modified.sort();
            // MODIFIED names what the client named: UIDs for UID STORE, else numbers.
            let names: Vec<u32> = if uid {
                modified
            } else {
                targets.iter().filter(|(_, u)| modified.contains(u)).map(|(s, _)| *s as u32).collect()
            };
            return Ok(format!("[MODIFIED {}] {verb} partly done", uid_set(&names)));
        }
        Ok(format!("{verb} done"))
    }

    /// COPY and MOVE. Into another mailbox each message is a core COPY (the body is not
    /// sent again); into the selected mailbox itself (which the core refuses: one GUID
    /// would have two UIDs there) each is saved anew, with its flags and internal date,
    /// as Dovecot does. MOVE is the copy, then `* OK [COPYUID ...]`, then the expunge of
    /// the originals and their EXPUNGE responses (RFC 6851). A message expunged meanwhile
    /// (by another session, unseen here yet) stops the command before anything is copied:
    /// `NO [EXPUNGEISSUED]`.
    async fn copy(&mut self, set: &SequenceSet, to: &str, uid: bool, moving: bool) -> Result<String> {
        let targets = self.resolve(set, uid);
        let Some(sel) = self.selected.as_ref() else { return Err("NO select a mailbox first".into()) };
        if moving && sel.read_only {
            return Err("NO the mailbox is read-only".into());
        }
        let (src, src_name) = (sel.mailbox.clone(), sel.name.clone());
        let dst = self.key(to);
        if !self.mailbox_exists(to).await {
            return Err("NO [TRYCREATE] no such mailbox".into());
        }
        let verb = if moving { "MOVE" } else { "COPY" };
        if targets.is_empty() {
            return Ok(format!("{verb} done"));
        }
        let now = self.read(&src_name).await?;
        let present: BTreeMap<Uid, &MessageView> = now.messages.iter().map(|m| (m.uid, m)).collect();
        let Some(messages) = targets.iter().map(|(_, u)| present.get(u).copied().cloned()).collect::<Option<Vec<_>>>()
        else {
            return Err("NO [EXPUNGEISSUED] some of the messages no longer exist".into());
        };
        if !moving || dst == src {
            let bytes: u64 = messages.iter().map(|m| u64::from(m.size)).sum();
            let user = self.user.clone().unwrap_or_default();
            if let Err(why) = self.front.within_quota(&self.node, &user, bytes, messages.len() as u64).await {
                return Err(format!("NO [OVERQUOTA] {why}"));
            }
        }
        let mut pairs = Vec::new();
        let mut uidvalidity = 0;
        if dst == src {
            let bodies = self.node.bodies(messages.iter().map(|m| m.guid).collect()).await;
            for m in &messages {
                let Some(body) = bodies.get(&m.guid) else {
                    return Err("NO [UNAVAILABLE] a message's body is not on this server yet; try again".into());
                };
                let request = ClientRequest::Save {
                    mailbox: dst.clone(),
                    received: m.received,
                    flags: m.flags.clone(),
                    body: body.clone(),
                    delivery: false,
                };
                match self.node.request(request).await {
                    ClientReply::Write(WriteResult::Saved { uidvalidity: v, uid: new, .. }) => {
                        uidvalidity = v;
                        pairs.push((m.uid, new));
                    }
                    other => return Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
                }
            }
        } else {
            for m in &messages {
                let request = ClientRequest::Copy { src: src.clone(), src_uid: m.uid, dst: dst.clone() };
                match self.node.request(request).await {
                    ClientReply::Write(WriteResult::Copied { uidvalidity: v, uid: new, .. }) => {
                        uidvalidity = v;
                        pairs.push((m.uid, new));
                    }
                    // Expunged between our read and the master's copy.
                    ClientReply::Write(WriteResult::Failed { kind: FailKind::Permanent, reason })
                        if reason.starts_with("no message") =>
                    {
                        return Err("NO [EXPUNGEISSUED] some of the messages no longer exist".into());
                    }
                    other => return Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
                }
            }
        }
        let from: Vec<u32> = pairs.iter().map(|p| p.0).collect();
        let new: Vec<u32> = pairs.iter().map(|p| p.1).collect();
        // UIDPLUS sets name the messages in the order copied, pairwise: no ranges merged
        // across both lists, so each source UID stays beside its new UID.
        let copyuid = format!("COPYUID {uidvalidity} {} {}", comma_list(&from), comma_list(&new));
        if !moving {
            return Ok(format!("[{copyuid}] COPY done"));
        }
        self.line(&format!("* OK [{copyuid}] moved"));
        let uids = messages.iter().map(|m| m.uid).collect();
        match self.node.request(ClientRequest::Expunge { mailbox: src, uids }).await {
            ClientReply::Write(WriteResult::Expunged { .. }) => {}
            other => return Err(format!("NO [UNAVAILABLE] copied, but the originals stay: {}", describe(&other))),
        }
        self.refresh(true).await;
        Ok("MOVE done".into())
    }

    async fn expunge(&mut self, set: Option<&SequenceSet>) -> Result<String> {
        if self.selected.as_ref().is_some_and(|s| s.read_only) {
            return Err("NO the mailbox is read-only".into());
        }
        self.expunge_deleted(set, true).await?;
        Ok("EXPUNGE done".into())
    }

    async fn expunge_deleted(&mut self, set: Option<&SequenceSet>, report: bool) -> Result<()> {
        let Some(sel) = self.selected.as_ref() else { return Ok(()) };
        let candidates: Vec<Uid> = match set {
            Some(s) => self.resolve(s, true).into_iter().map(|t| t.1).collect(),
            None => sel.uids.clone(),
        };
        let doomed: Vec<Uid> = candidates.into_iter().filter(|u| has(sel.flags(u), "\\Deleted")).collect();
        if !doomed.is_empty() {
            let request = ClientRequest::Expunge { mailbox: sel.mailbox.clone(), uids: doomed };
            match self.node.request(request).await {
                ClientReply::Write(WriteResult::Expunged { .. }) => {}
                other => return Err(format!("NO [UNAVAILABLE] {}", describe(&other))),
            }
        }
        if report {
            self.refresh(true).await;
        }
        Ok(())
    }

    async fn search(&mut self, tag: &str, criteria: &[SearchKey<'static>], uid: bool) -> Result<String> {
        // RFC 7162 section 3.1.5: a search that names MODSEQ says the highest modseq of
        // what it returns.
        let with_modseq = criteria.iter().any(names_modseq);
        if with_modseq {
            self.enable_condstore();
        }
        let hits = self.matching(criteria, false, |m, _| m.modseq).await?;
        let numbers: Vec<(u32, u64)> = hits
            .iter()
            .map(|(seq, u, modseq)| (if uid { *u } else { *seq }, if with_modseq { *modseq } else { 0 }))
            .collect();
        let mut code = String::new();
        if self.returning.is_some_and(|o| o.update)
            && let Some(sel) = self.selected.as_mut()
        {
            if sel.updates.len() < super::esearch::UPDATES_MAX && !sel.updates.iter().any(|u| u.tag == tag) {
                let hits = hits.iter().map(|h| h.1).collect();
                sel.updates.push(UpdateSearch { tag: tag.to_string(), uid, criteria: criteria.to_vec(), hits });
            } else {
                code = format!("[NOUPDATE \"{tag}\"] ");
            }
        }
        match self.returning {
            Some(options) => self.line(&super::esearch::response(tag, uid, options, &numbers, false)),
            None => {
                let mut text = String::from("* SEARCH");
                for (n, _) in &numbers {
                    text.push_str(&format!(" {n}"));
                }
                if let Some(highest) = numbers.iter().map(|n| n.1).max().filter(|m| *m > 0) {
                    text.push_str(&format!(" (MODSEQ {highest})"));
                }
                self.line(&text);
            }
        }
        Ok(format!("{code}{}SEARCH done", if uid { "UID " } else { "" }))
    }

    /// CANCELUPDATE: the searches named stop being updated.
    fn cancel_updates(&mut self, tags: &[String]) -> Result<String> {
        let Some(sel) = self.selected.as_mut() else { return Err("BAD no mailbox is selected".into()) };
        if let Some(unknown) = tags.iter().find(|t| !sel.updates.iter().any(|u| &u.tag == *t)) {
            return Err(format!("BAD no search {unknown:?} is being updated"));
        }
        sel.updates.retain(|u| !tags.contains(&u.tag));
        Ok("CANCELUPDATE done".into())
    }

    /// The selected messages that match every key, in order: (sequence number, UID, what
    /// `extract` takes from the message and its bytes). The bytes are read when the keys
    /// or `with_bodies` need them (else `extract` gets none), in batches of at most
    /// [`BODY_BATCH_BYTES`], so a command holds one batch in memory, not the mailbox.
    async fn matching<T>(
        &self,
        criteria: &[SearchKey<'_>],
        with_bodies: bool,
        mut extract: impl FnMut(&MessageView, &[u8]) -> T,
    ) -> Result<Vec<(u32, Uid, T)>> {
        let Some(sel) = self.selected.as_ref() else { return Err("NO select a mailbox first".into()) };
        let needs_body = with_bodies || criteria.iter().any(key_needs_body);
        let largest_uid = sel.uids.last().copied().unwrap_or(0);
        let count = sel.uids.len() as u32;
        // Copied out of the session: reading the batches awaits.
        let rows: Vec<(u32, Uid, MessageView, bool)> = sel
            .uids
            .iter()
            .enumerate()
            .filter_map(|(i, u)| sel.view.get(u).map(|m| (i as u32 + 1, *u, m.clone(), sel.recent.contains(u))))
            .collect();
        let sets = SetCache::default();
        let mut hits = Vec::new();
        let batches =
            if needs_body { batches(rows.iter().map(|r| r.2.size), BODY_BATCH_BYTES) } else { vec![(0, rows.len())] };
        for (start, end) in batches {
            let mut bodies = BTreeMap::new();
            if needs_body {
                bodies = self.node.bodies(rows[start..end].iter().map(|r| r.2.guid).collect()).await;
            }
            for (seq, uid, m, recent) in &rows[start..end] {
                let body = bodies.get(&m.guid).map(|b| b.as_ref()).unwrap_or_default();
                let cx = Candidate { seq: *seq, uid: *uid, m, recent: *recent, body, largest_uid, count, sets: &sets };
                if criteria.iter().all(|k| matches(k, &cx)) {
                    hits.push((*seq, *uid, extract(m, body)));
                }
            }
        }
        Ok(hits)
    }

    /// SORT (RFC 5256) and SORT=DISPLAY (RFC 5957): the matching messages ordered by each
    /// criterion in turn (REVERSE turns one criterion around), ties by sequence number.
    async fn sort(
        &mut self,
        tag: &str,
        criteria: &[SortCriterion],
        charset: &Charset<'_>,
        search: &[SearchKey<'_>],
        uid: bool,
    ) -> Result<String> {
        check_charset(charset)?;
        if self.returning.is_some_and(|o| o.update) {
            // CONTEXT=SORT is not advertised: a sorted result is not kept up to date.
            return Err("BAD RETURN (UPDATE) is for SEARCH only".into());
        }
        let header_keys = criteria.iter().any(|c| !matches!(c.key, SortKey::Arrival | SortKey::Size));
        let mut rows = self
            .matching(search, header_keys, |m, body| {
                let fields = header_keys.then(|| mime::SortFields::of(&body[..mime::header_end(body)]));
                (m.clone(), fields)
            })
            .await?;
        rows.sort_by(|a, b| {
            for c in criteria {
                let order = sort_compare(&c.key, (&a.2.0, &a.2.1), (&b.2.0, &b.2.1));
                let order = if c.reverse { order.reverse() } else { order };
                if order != std::cmp::Ordering::Equal {
                    return order;
                }
            }
            a.0.cmp(&b.0)
        });
        if let Some(options) = self.returning {
            let with_modseq = search.iter().any(names_modseq);
            let numbers: Vec<(u32, u64)> = rows
                .iter()
                .map(|r| (if uid { r.1 } else { r.0 }, if with_modseq { r.2.0.modseq } else { 0 }))
                .collect();
            self.line(&super::esearch::response(tag, uid, options, &numbers, true));
            return Ok(format!("{}SORT done", if uid { "UID " } else { "" }));
        }
        let list: Vec<String> = rows.iter().map(|r| if uid { r.1 } else { r.0 }.to_string()).collect();
        self.line(&format!("* SORT{}{}", if list.is_empty() { "" } else { " " }, list.join(" ")));
        Ok(format!("{}SORT done", if uid { "UID " } else { "" }))
    }

    /// THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256) over the matching messages.
    async fn thread(
        &mut self,
        algorithm: &ThreadingAlgorithm<'_>,
        charset: &Charset<'_>,
        search: &[SearchKey<'_>],
        uid: bool,
    ) -> Result<String> {
        check_charset(charset)?;
        if let ThreadingAlgorithm::Other(other) = algorithm {
            return Err(format!("BAD THREAD={} is not supported", other.as_ref()));
        }
        let messages = self
            .matching(search, true, |m, body| {
                let fields = mime::ThreadFields::of(&body[..mime::header_end(body)]);
                (fields, i64::try_from(m.received).unwrap_or(i64::MAX))
            })
            .await?;
        let messages: Vec<thread::ThreadMessage> = messages
            .into_iter()
            .map(|(seq, u, (f, received))| thread::ThreadMessage {
                number: if uid { u } else { seq },
                order: (f.date.unwrap_or(received), seq),
                message_id: f.message_id,
                references: f.references,
                // Subjects group as i;ascii-casemap compares them.
                subject: f.subject.to_ascii_uppercase(),
                reply: f.reply,
            })
            .collect();
        let threads = match algorithm {
            ThreadingAlgorithm::OrderedSubject => thread::ordered_subject(&messages),
            _ => thread::references(&messages),
        };
        self.line(&format!("* THREAD{}{threads}", if threads.is_empty() { "" } else { " " }));
        Ok(format!("{}THREAD done", if uid { "UID " } else { "" }))
    }

    /// Waits for DONE, telling the client each change to the selected mailbox as the
    /// node makes it durable: the node wakes the session (`NodeHandle::watch`), and a
    /// slow poll covers a node that stopped waking it.
    async fn idle(&mut self, fragmentizer: &mut Fragmentizer) -> Result<()> {
        let mut wake = match self.selected.as_ref().map(|s| s.mailbox.clone()) {
            Some(mailbox) => self.node.watch(mailbox).await,
            None => None,
        };
        self.line("+ idling");
        // What changed between the command's own refresh and the watch's start.
        self.refresh(true).await;
        self.flush().await?;
        let mut line = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = self.stream.read(&mut buf) => {
                    let n = n.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("client closed the connection".into());
                    }
                    line.extend_from_slice(&buf[..n]);
                    if let Some(end) = line.iter().position(|b| *b == b'\n') {
                        let rest = line.split_off(end + 1);
                        // Whatever came after DONE is the next command.
                        fragmentizer.enqueue_bytes(&rest);
                        let text = String::from_utf8_lossy(&line).trim().to_string();
                        if text.eq_ignore_ascii_case("DONE") {
                            return Ok(());
                        }
                        return Err(format!("expected DONE, got {text:?}"));
                    }
                    if line.len() > 1024 {
                        return Err("expected DONE".into());
                    }
                }
                woken = changed(&mut wake) => {
                    if !woken {
                        wake = None;
                    }
                    self.refresh(true).await;
                    self.notify_round(false).await;
                    self.flush().await?;
                }
                woken = changed_ref(self.notify.as_mut().and_then(|n| n.wake.as_mut())) => {
                    if !woken && let Some(n) = self.notify.as_mut() {
                        n.wake = None;
                    }
                    self.refresh(true).await;
                    self.notify_round(false).await;
                    self.flush().await?;
                }
                _ = tokio::time::sleep(IDLE_POLL) => {
                    self.refresh(true).await;
                    self.notify_round(false).await;
                    self.flush().await?;
                }
            }
        }
    }
}

/// A URL's section of a message: empty for all of it, else part numbers (`1.2`) and
/// at most one of HEADER, TEXT and MIME after them.
fn url_section(msg: &[u8], section: &str) -> std::result::Result<Vec<u8>, String> {
    if section.is_empty() {
        return Ok(msg.to_vec());
    }
    let mut path = Vec::new();
    let mut text = mime::SectionText::All;
    let mut pieces = section.split('.').peekable();
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        match piece {
            "HEADER" if last => text = mime::SectionText::Header,
            "TEXT" if last => text = mime::SectionText::Text,
            "MIME" if last && !path.is_empty() => text = mime::SectionText::Mime,
            number => match number.parse::<u32>() {
                Ok(n) if n > 0 && path.len() < 32 => path.push(n),
                _ => return Err(format!("no section {}", section.chars().take(40).collect::<String>())),
            },
        }
    }
    let structure = mime::Structure::of(msg);
    mime::section(msg, &structure, &path, text).ok_or_else(|| "no such section".to_string())
}

/// A LIST-STATUS item (one of `listext::STATUS_ITEMS`) as the codec names it.
fn status_item(name: &str) -> Option<StatusDataItemName> {
    Some(match name {
        "MESSAGES" => StatusDataItemName::Messages,
        "RECENT" => StatusDataItemName::Recent,
        "UIDNEXT" => StatusDataItemName::UidNext,
        "UIDVALIDITY" => StatusDataItemName::UidValidity,
        "UNSEEN" => StatusDataItemName::Unseen,
        "DELETED" => StatusDataItemName::Deleted,
        "HIGHESTMODSEQ" => StatusDataItemName::HighestModSeq,
        _ => return None,
    })
}

/// True when the watched mailbox changed; false when the node stopped sending wake-ups;
/// never resolves without a watch.
async fn changed(wake: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match wake {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// `changed`, for a watch borrowed out of a longer-lived state.
async fn changed_ref(wake: Option<&mut tokio::sync::watch::Receiver<u64>>) -> bool {
    match wake {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// SEARCH and SORT take US-ASCII and UTF-8 (their strings are compared as bytes).
fn check_charset(charset: &Charset<'_>) -> Result<()> {
    let name = match charset {
        Charset::Atom(a) => a.as_ref().to_string(),
        Charset::Quoted(q) => q.as_ref().to_string(),
    };
    if name.eq_ignore_ascii_case("US-ASCII") || name.eq_ignore_ascii_case("UTF-8") {
        Ok(())
    } else {
        Err("NO [BADCHARSET (US-ASCII UTF-8)] only US-ASCII and UTF-8 are known".into())
    }
}

/// One SORT criterion between two messages. Text keys compare as i;ascii-casemap
/// (ASCII letters folded to upper case, then bytes); DATE is the Date: header's instant,
/// or INTERNALDATE without one (RFC 5256).
fn sort_compare(
    key: &SortKey,
    (a, fa): (&MessageView, &Option<mime::SortFields>),
    (b, fb): (&MessageView, &Option<mime::SortFields>),
) -> std::cmp::Ordering {
    let text = |f: &Option<mime::SortFields>, pick: fn(&mime::SortFields) -> &str| {
        f.as_ref().map(|f| pick(f).to_ascii_uppercase()).unwrap_or_default()
    };
    let date = |m: &MessageView, f: &Option<mime::SortFields>| {
        f.as_ref().and_then(|f| f.date).unwrap_or_else(|| i64::try_from(m.received).unwrap_or(i64::MAX))
    };
    match key {
        SortKey::Arrival => a.received.cmp(&b.received),
        SortKey::Size => a.size.cmp(&b.size),
        SortKey::Date => date(a, fa).cmp(&date(b, fb)),
        SortKey::Subject => text(fa, |f| &f.subject).cmp(&text(fb, |f| &f.subject)),
        SortKey::From => text(fa, |f| &f.from).cmp(&text(fb, |f| &f.from)),
        SortKey::To => text(fa, |f| &f.to).cmp(&text(fb, |f| &f.to)),
        SortKey::Cc => text(fa, |f| &f.cc).cmp(&text(fb, |f| &f.cc)),
        SortKey::DisplayFrom => text(fa, |f| &f.display_from).cmp(&text(fb, |f| &f.display_from)),
        SortKey::DisplayTo => text(fa, |f| &f.display_to).cmp(&text(fb, |f| &f.display_to)),
    }
}

struct Candidate<'a> {
    seq: u32,
    uid: Uid,
    m: &'a MessageView,
    /// `\Recent` in this session.
    recent: bool,
    body: &'a [u8],
    largest_uid: Uid,
    count: u32,
    sets: &'a SetCache,
}

/// The sequence sets of one SEARCH as [`Intervals`], built once per set and command, not
/// once per message. Keyed by the set's address in the parsed command, which lives for
/// the whole search.
#[derive(Default)]
struct SetCache(std::cell::RefCell<BTreeMap<usize, Intervals>>);

impl SetCache {
    fn contains(&self, set: &SequenceSet, largest: u32, n: u32) -> bool {
        let key = set as *const SequenceSet as usize;
        let mut cache = self.0.borrow_mut();
        cache.entry(key).or_insert_with(|| Intervals::new(set, largest)).contains(n)
    }
}

fn key_needs_body(k: &SearchKey<'_>) -> bool {
    match k {
        SearchKey::And(keys) => keys.as_ref().iter().any(key_needs_body),
        SearchKey::Not(k) => key_needs_body(k),
        SearchKey::Or(a, b) => key_needs_body(a) || key_needs_body(b),
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(..)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_) => true,
        _ => false,
    }
}

/// An APPEND's message as stored: binary content (RFC 3516) is kept as base64, so
/// BODY[] stays text.
fn append_bytes(message: LiteralOrLiteral8<'_>) -> Vec<u8> {
    match message {
        LiteralOrLiteral8::Literal(l) => l.data().to_vec(),
        LiteralOrLiteral8::Literal8(l) => mime::encode_binary_parts(&l.data).unwrap_or_else(|| l.data.to_vec()),
    }
}

/// Whether a search names MODSEQ anywhere (its nesting is bounded by the codec, as for
/// [`key_needs_body`]).
fn names_modseq(k: &SearchKey<'_>) -> bool {
    match k {
        SearchKey::And(keys) => keys.as_ref().iter().any(names_modseq),
        SearchKey::Not(k) => names_modseq(k),
        SearchKey::Or(a, b) => names_modseq(a) || names_modseq(b),
        SearchKey::ModSequence { .. } => true,
        _ => false,
    }
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    // Two-way search: linear in the haystack, whatever the needle (a sliding window
    // compare costs their product).
    let hay = hay.to_ascii_lowercase();
    let needle = needle.to_ascii_lowercase();
    memchr::memmem::find(&hay, &needle).is_some()
}

fn header_value(body: &[u8], name: &str) -> Vec<u8> {
    let header = &body[..mime::header_end(body)];
    let fields = mime::header_fields(header, &[name.to_string()], false);
    fields.splitn(2, |b| *b == b':').nth(1).map(<[u8]>::to_vec).unwrap_or_default()
}

/// SEARCH FROM/TO/CC/BCC: the string in the addresses as "Name <mailbox@host>" (groups
/// by name), or in the raw header when it holds no address mail-parser can read.
fn address_matches(body: &[u8], name: &str, needle: &[u8]) -> bool {
    match mime::address_search_text(&body[..mime::header_end(body)], name) {
        Some(text) => contains_ci(text.as_bytes(), needle),
        None => contains_ci(&header_value(body, name), needle),
    }
}

/// The day of the Date: header as written (time and zone disregarded, RFC 3501), or of
/// the internal date when there is none or it cannot be read (as Dovecot does).
fn sent_date(c: &Candidate<'_>) -> Option<chrono::NaiveDate> {
    mime::sent_date(&c.body[..mime::header_end(c.body)]).or_else(|| day_of(c.m.received))
}

fn day_of(secs: u64) -> Option<chrono::NaiveDate> {
    chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0).map(|d| d.date_naive())
}

fn matches(k: &SearchKey<'_>, c: &Candidate<'_>) -> bool {
    let flag = |name: &str| has(&c.m.flags, name);
    let date = day_of(c.m.received);
    match k {
        SearchKey::And(keys) => keys.as_ref().iter().all(|k| matches(k, c)),
        SearchKey::Not(k) => !matches(k, c),
        SearchKey::Or(a, b) => matches(a, c) || matches(b, c),
        SearchKey::All => true,
        SearchKey::SequenceSet(set) => c.sets.contains(set, c.count, c.seq),
        SearchKey::Uid(set) => c.sets.contains(set, c.largest_uid, c.uid),
        SearchKey::Answered => flag("\\Answered"),
        SearchKey::Unanswered => !flag("\\Answered"),
        SearchKey::Deleted => flag("\\Deleted"),
        SearchKey::Undeleted => !flag("\\Deleted"),
        SearchKey::Draft => flag("\\Draft"),
        SearchKey::Undraft => !flag("\\Draft"),
        SearchKey::Flagged => flag("\\Flagged"),
        SearchKey::Unflagged => !flag("\\Flagged"),
        SearchKey::Seen => flag("\\Seen"),
        SearchKey::Unseen => !flag("\\Seen"),
        SearchKey::New => c.recent && !flag("\\Seen"),
        SearchKey::Old => !c.recent,
        SearchKey::Recent => c.recent,
        SearchKey::Keyword(a) => flag(a.as_ref()),
        SearchKey::Unkeyword(a) => !flag(a.as_ref()),
        SearchKey::Larger(n) => c.m.size > *n,
        SearchKey::Smaller(n) => c.m.size < *n,
        SearchKey::Before(d) => date.is_some_and(|x| x < *d.as_ref()),
        SearchKey::On(d) => date.is_some_and(|x| x == *d.as_ref()),
        SearchKey::Since(d) => date.is_some_and(|x| x >= *d.as_ref()),
        SearchKey::Body(s) => contains_ci(&c.body[mime::header_end(c.body)..], s.as_ref()),
        SearchKey::Text(s) => contains_ci(c.body, s.as_ref()),
        SearchKey::Subject(s) => contains_ci(&header_value(c.body, "Subject"), s.as_ref()),
        SearchKey::From(s) => address_matches(c.body, "From", s.as_ref()),
        SearchKey::To(s) => address_matches(c.body, "To", s.as_ref()),
        SearchKey::Cc(s) => address_matches(c.body, "Cc", s.as_ref()),
        SearchKey::Bcc(s) => address_matches(c.body, "Bcc", s.as_ref()),
        SearchKey::Header(name, s) => {
            let name = String::from_utf8_lossy(name.as_ref()).into_owned();
            let header = &c.body[..mime::header_end(c.body)];
            let present = mime::header_fields(header, std::slice::from_ref(&name), false).len() > 2;
            present && contains_ci(&header_value(c.body, &name), s.as_ref())
        }
        SearchKey::SentBefore(d) => sent_date(c).is_some_and(|x| x < *d.as_ref()),
        SearchKey::SentOn(d) => sent_date(c).is_some_and(|x| x == *d.as_ref()),
        SearchKey::SentSince(d) => sent_date(c).is_some_and(|x| x >= *d.as_ref()),
        SearchKey::ModSequence { modseq, .. } => c.m.modseq >= *modseq,
    }
}

/// A sequence set as sorted, disjoint, inclusive ranges: membership costs a binary
/// search, however many elements the client wrote (a set of 200,000 ranges against
/// every message of a mailbox would otherwise cost their product).
struct Intervals(Vec<(u32, u32)>);

impl Intervals {
    /// `*` stands for `largest` (or 1 in an empty mailbox).
    fn new(set: &SequenceSet, largest: u32) -> Intervals {
        let value = |s: &SeqOrUid| match s {
            SeqOrUid::Value(v) => v.get(),
            SeqOrUid::Asterisk => largest.max(1),
        };
        let mut ranges: Vec<(u32, u32)> = set
            .0
            .as_ref()
            .iter()
            .map(|seq| match seq {
                Sequence::Single(s) => (value(s), value(s)),
                Sequence::Range(a, b) => (value(a).min(value(b)), value(a).max(value(b))),
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Intervals(merged)
    }

    fn all(largest: u32) -> Intervals {
        Intervals(if largest == 0 { Vec::new() } else { vec![(1, largest)] })
    }

    fn contains(&self, n: u32) -> bool {
        let i = self.0.partition_point(|r| r.1 < n);
        self.0.get(i).is_some_and(|r| r.0 <= n)
    }

    /// The numbers in these ranges, up to `largest`, that are not in `present` (sorted),
    /// as ranges: linear in ranges plus present, not in the numbers covered.
    fn absent(&self, present: &[u32], largest: u32) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.0 {
            let hi = hi.min(largest);
            if lo > hi {
                continue;
            }
            // u64: the number after u32::MAX must not wrap to it.
            let mut next = u64::from(lo);
            let start = present.partition_point(|u| *u < lo);
            for &u in present[start..].iter().take_while(|u| **u <= hi) {
                if u64::from(u) > next {
                    out.push((next as u32, u - 1));
                }
                next = u64::from(u) + 1;
            }
            if next <= u64::from(hi) {
                out.push((next as u32, hi));
            }
        }
        out
    }
}

/// Where a batch of messages that starts at `start` ends: at least one message, and no
/// more than `bytes_max` bytes of them.
/// Consecutive index ranges of at most `bytes_max` bytes each (a message larger than
/// that is a batch of its own), covering every size in order.
fn batches(sizes: impl Iterator<Item = u32>, bytes_max: u64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    let mut count = 0usize;
    for (i, size) in sizes.enumerate() {
        if i > start && bytes + u64::from(size) > bytes_max {
            out.push((start, i));
            (start, bytes) = (i, 0);
        }
        bytes += u64::from(size);
        count = i + 1;
    }
    if count > start {
        out.push((start, count));
    }
    out
}

/// Ranges as an IMAP set: 1:3,7,9:10.
fn range_set(ranges: &[(u32, u32)]) -> String {
    let parts: Vec<String> =
        ranges.iter().map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}:{hi}") }).collect();
    parts.join(",")
}

/// One message's bytes, with its MIME tree found at most once for all its FETCH items,
/// and its parsed items, from the node's cache or worked out once.
struct Message<'a> {
    bytes: &'a [u8],
    structure: std::cell::OnceCell<mime::Structure>,
    parsed: std::cell::OnceCell<Arc<Parsed>>,
}

impl<'a> Message<'a> {
    fn new(bytes: &'a [u8], parsed: Option<Arc<Parsed>>) -> Message<'a> {
        let cell = std::cell::OnceCell::new();
        if let Some(p) = parsed {
            let _ = cell.set(p);
        }
        Message { bytes, structure: std::cell::OnceCell::new(), parsed: cell }
    }

    fn structure(&self) -> &mime::Structure {
        self.structure.get_or_init(|| mime::Structure::of(self.bytes))
    }

    /// ENVELOPE, BODY and BODYSTRUCTURE (parsed from the bytes unless the cache had them).
    fn parsed(&self) -> Arc<Parsed> {
        self.parsed.get_or_init(|| Arc::new(Parsed::of(self.bytes, self.structure()))).clone()
    }
}

/// One FETCH item of one message; `Err` when a BINARY section's encoding cannot be undone.
/// One message's FETCH response (`* seq FETCH (...)`) appended to `out`; on an item's
/// error nothing of it is left in `out`.
fn fetch_row(
    out: &mut Vec<u8>,
    seq: usize,
    items: &[MessageDataItemName<'_>],
    m: &MessageView,
    recent: bool,
    message: &Message<'_>,
) -> std::result::Result<(), String> {
    let start = out.len();
    out.extend_from_slice(format!("* {seq} FETCH (").as_bytes());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        if let Err(why) = fetch_item(out, item, m, recent, message) {
            out.truncate(start);
            return Err(why);
        }
    }
    out.extend_from_slice(b")\r\n");
    Ok(())
}

fn fetch_item(
    out: &mut Vec<u8>,
    item: &MessageDataItemName<'_>,
    m: &MessageView,
    recent: bool,
    msg: &Message<'_>,
) -> std::result::Result<(), String> {
    let body = msg.bytes;
    let header_end = mime::header_end(body);
    match item {
        MessageDataItemName::Uid => out.extend_from_slice(format!("UID {}", m.uid).as_bytes()),
        MessageDataItemName::Flags => {
            out.extend_from_slice(format!("FLAGS ({})", shown_flags(&m.flags, recent)).as_bytes())
        }
        MessageDataItemName::InternalDate => {
            out.extend_from_slice(format!("INTERNALDATE \"{}\"", internal_date(m.received)).as_bytes())
        }
        MessageDataItemName::Rfc822Size => out.extend_from_slice(format!("RFC822.SIZE {}", m.size).as_bytes()),
        MessageDataItemName::ModSeq => out.extend_from_slice(format!("MODSEQ ({})", m.modseq).as_bytes()),
        MessageDataItemName::Envelope => {
            out.extend_from_slice(b"ENVELOPE ");
            out.extend_from_slice(&msg.parsed().envelope);
        }
        MessageDataItemName::Body => {
            out.extend_from_slice(b"BODY ");
            out.extend_from_slice(&msg.parsed().body);
        }
        MessageDataItemName::BodyStructure => {
            out.extend_from_slice(b"BODYSTRUCTURE ");
            out.extend_from_slice(&msg.parsed().bodystructure);
        }
        MessageDataItemName::Rfc822 => {
            out.extend_from_slice(b"RFC822 ");
            text_literal(out, body);
        }
        MessageDataItemName::Rfc822Header => {
            out.extend_from_slice(b"RFC822.HEADER ");
            text_literal(out, &body[..header_end]);
        }
        MessageDataItemName::Rfc822Text => {
            out.extend_from_slice(b"RFC822.TEXT ");
            text_literal(out, &body[header_end..]);
        }
        MessageDataItemName::BodyExt { section, partial, .. } => {
            let numbers = |part: &Option<&imap_codec::imap_types::fetch::Part>| -> Vec<u32> {
                part.map(|p| p.0.as_ref().iter().map(|n| n.get()).collect()).unwrap_or_default()
            };
            let names_of = |names: &[imap_codec::imap_types::core::AString<'_>]| -> Vec<String> {
                names.iter().map(|n| String::from_utf8_lossy(n.as_ref()).into_owned()).collect()
            };
            let header_names;
            let (path, label, text): (_, Vec<u8>, _) = match section {
                None => (Vec::new(), Vec::new(), mime::SectionText::All),
                Some(Section::Part(p)) => (numbers(&Some(p)), Vec::new(), mime::SectionText::All),
                Some(Section::Header(p)) => (numbers(&p.as_ref()), b"HEADER".to_vec(), mime::SectionText::Header),
                Some(Section::Text(p)) => (numbers(&p.as_ref()), b"TEXT".to_vec(), mime::SectionText::Text),
                Some(Section::Mime(p)) => (numbers(&Some(p)), b"MIME".to_vec(), mime::SectionText::Mime),
                Some(Section::HeaderFields(p, names)) | Some(Section::HeaderFieldsNot(p, names)) => {
                    let not = matches!(section, Some(Section::HeaderFieldsNot(..)));
                    header_names = names_of(names.as_ref());
                    // The names are echoed as the client sent them, byte for byte.
                    let mut label = format!("HEADER.FIELDS{} (", if not { ".NOT" } else { "" }).into_bytes();
                    for (n, name) in names.as_ref().iter().enumerate() {
                        if n > 0 {
                            label.push(b' ');
                        }
                        string(&mut label, name.as_ref());
                    }
                    label.push(b')');
                    (numbers(&p.as_ref()), label, mime::SectionText::HeaderFields { names: &header_names, not })
                }
            };
            let bytes = match (path.is_empty(), &text) {
                // The whole message and its own header and text need no MIME tree.
                (true, mime::SectionText::All) => body.to_vec(),
                (true, mime::SectionText::Header) => body[..header_end].to_vec(),
                (true, mime::SectionText::Text) => body[header_end..].to_vec(),
                _ => mime::section(body, msg.structure(), &path, text).unwrap_or_default(),
            };
            let mut name = path.iter().map(u32::to_string).collect::<Vec<_>>().join(".").into_bytes();
            if !name.is_empty() && !label.is_empty() {
                name.push(b'.');
            }
            name.extend_from_slice(&label);
            let (origin, bytes) = match partial {
                Some((start, len)) => {
                    let start = (*start as usize).min(bytes.len());
                    let end = start.saturating_add(len.get() as usize).min(bytes.len());
                    (format!("<{start}>"), bytes[start..end].to_vec())
                }
                None => (String::new(), bytes),
            };
            out.extend_from_slice(b"BODY[");
            out.extend_from_slice(&name);
            out.extend_from_slice(format!("]{origin} ").as_bytes());
            text_literal(out, &bytes);
        }
        MessageDataItemName::Binary { section, partial, .. } => {
            let path: Vec<u32> = section.iter().map(|n| n.get()).collect();
            let bytes = mime::binary_section(body, msg.structure(), &path)?.unwrap_or_default();
            let (origin, bytes) = match partial {
                Some((start, len)) => {
                    let start = (*start as usize).min(bytes.len());
                    let end = start.saturating_add(len.get() as usize).min(bytes.len());
                    (format!("<{start}>"), &bytes[start..end])
                }
                None => (String::new(), bytes.as_slice()),
            };
            let name = path.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
            out.extend_from_slice(format!("BINARY[{name}]{origin} ").as_bytes());
            // NUL cannot be in a plain literal (RFC 3516's literal8 carries it).
            if bytes.contains(&0) {
                out.push(b'~');
            }
            literal(out, bytes);
        }
        MessageDataItemName::BinarySize { section } => {
            let path: Vec<u32> = section.iter().map(|n| n.get()).collect();
            let size = mime::binary_section(body, msg.structure(), &path)?.map(|b| b.len()).unwrap_or(0);
            let name = path.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
            out.extend_from_slice(format!("BINARY.SIZE[{name}] {size}").as_bytes());
        }
    }
    Ok(())
}

/// A mailbox the core does not have: INBOX, which exists (empty) before its first
/// message, or else NONEXISTENT.
fn inbox_before_its_first_message(key: &MailboxKey) -> Result<()> {
    if &*key.name == "INBOX" { Ok(()) } else { Err("NO [NONEXISTENT] no such mailbox".into()) }
}

/// A mailbox name as the client wrote it (see `Session::name` for what is looked up).
fn mailbox_name(m: &Mailbox<'_>) -> String {
    match m {
        Mailbox::Inbox => "INBOX".into(),
        Mailbox::Other(o) => String::from_utf8_lossy(o.as_ref()).into_owned(),
    }
}

use tandem_core::partial::wildcard_match;

/// Numbers in the order given, as an IMAP set without ranges: 4,2,9.
fn comma_list(numbers: &[u32]) -> String {
    numbers.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Numbers as an IMAP set in the order given: runs of consecutive ascending numbers
/// become ranges (1:3,7,9:10); sorted UIDs give the shortest set.
pub(super) fn uid_set(uids: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &u in uids {
        match runs.last_mut() {
            Some(run) if run.1.checked_add(1) == Some(u) => run.1 = u,
            _ => runs.push((u, u)),
        }
    }
    range_set(&runs)
}

fn has(flags: &[Flag], name: &str) -> bool {
    flags.iter().any(|f| f.as_str().eq_ignore_ascii_case(name))
}

/// Flags as a FETCH shows them; `\Recent` is the session's, never stored.
fn shown_flags(flags: &[Flag], recent: bool) -> String {
    let recent = recent.then_some("\\Recent");
    recent.into_iter().chain(flags.iter().map(|f| f.as_str())).collect::<Vec<_>>().join(" ")
}

/// The flags a client asks to store; `\Recent` is the server's to set, so it is left out.
fn core_flags(flags: &[ImapFlag<'_>]) -> Result<Vec<Flag>> {
    flags
        .iter()
        .map(|f| f.to_string())
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
        .map(|f| Flag::new(&f).map_err(|e| format!("BAD bad flag {f}: {e:?}")))
        .collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn internal_date(secs: u64) -> String {
    let d = chrono::DateTime::from_timestamp(i64::try_from(secs).unwrap_or(0), 0).unwrap_or_default();
    d.format("%d-%b-%Y %H:%M:%S +0000").to_string()
}

fn describe(reply: &ClientReply) -> String {
    match reply {
        ClientReply::Failed { reason, .. } | ClientReply::Write(WriteResult::Failed { reason, .. }) => reason.clone(),
        other => format!("unexpected answer {other:?}"),
    }
}

/// TCP keepalive: a client that vanished without a FIN (IDLE waits without a timeout)
/// is noticed within minutes, not hours.
fn set_keepalive(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(120)).with_interval(Duration::from_secs(30));
    socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

/// An `X-REPLICATE` command (`tag X-REPLICATE <version>`, with ` DEFLATE` after it for a
/// link compressed from the answer on; an agent from before versions sends no version).
#[derive(Debug, PartialEq, Eq)]
struct ReplicateCommand {
    tag: String,
    /// The replica link version the agent speaks; None for an agent before versions.
    version: Option<u32>,
    deflate: bool,
}

fn replicate_command(message: &[u8]) -> Option<ReplicateCommand> {
    let line = message.strip_suffix(b"\r\n").or_else(|| message.strip_suffix(b"\n"))?;
    let text = std::str::from_utf8(line).ok()?;
    let (tag, command) = text.split_once(' ')?;
    let tag_ok = !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b));
    if !tag_ok {
        return None;
    }
    let mut words = command.split(' ');
    if !words.next()?.eq_ignore_ascii_case("X-REPLICATE") {
        return None;
    }
    let (mut version, mut deflate) = (None, false);
    let mut rest = words.peekable();
    if let Some(word) = rest.peek()
        && !word.is_empty()
        && word.len() <= 9
        && word.bytes().all(|b| b.is_ascii_digit())
    {
        version = word.parse().ok();
        rest.next();
    }
    if let Some(word) = rest.next() {
        if !word.eq_ignore_ascii_case("DEFLATE") {
            return None;
        }
        deflate = true;
    }
    if rest.next().is_some() {
        return None;
    }
    Some(ReplicateCommand { tag: tag.to_string(), version, deflate })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_replicate_is_recognised_only_alone_and_tagged() {
        let command = |tag: &str, version, deflate| Some(ReplicateCommand { tag: tag.into(), version, deflate });
        assert_eq!(replicate_command(b"r X-REPLICATE 2\r\n"), command("r", Some(2), false));
        assert_eq!(replicate_command(b"a1 x-replicate 2 deflate\r\n"), command("a1", Some(2), true));
        assert_eq!(replicate_command(b"r X-REPLICATE\r\n"), command("r", None, false), "an agent before versions");
        assert_eq!(replicate_command(b"a1 x-replicate deflate\r\n"), command("a1", None, true));
        assert_eq!(replicate_command(b"a1 X-REPLICATE now\r\n"), None);
        assert_eq!(replicate_command(b"a1 X-REPLICATE 2 DEFLATE more\r\n"), None);
        assert_eq!(replicate_command(b"a1 X-REPLICATE 99999999999 DEFLATE\r\n"), None);
        assert_eq!(replicate_command(b"* X-REPLICATE\r\n"), None);
        assert_eq!(replicate_command(b"a1 NOOP\r\n"), None);
    }

    #[test]
    fn a_batch_holds_one_message_at_least_and_bytes_max_at_most() {
        let sizes = [5u32, 5, 20, 1, 1];
        assert_eq!(
            batches(sizes.into_iter(), 10),
            [(0, 2), (2, 3), (3, 5)],
            "one message larger than the limit goes alone"
        );
        assert_eq!(batches([10u32, 10].into_iter(), 10), [(0, 1), (1, 2)]);
        assert_eq!(batches([].into_iter(), 10), []);
        assert_eq!(batches([0u32, 0, 0].into_iter(), 0), [(0, 3)], "empty messages cost nothing");
    }

    #[test]
    fn sets_with_asterisk() {
        let set: SequenceSet = "2:*".parse().unwrap();
        let i = Intervals::new(&set, 5);
        assert!(i.contains(5) && i.contains(2) && !i.contains(1) && !i.contains(6));
        let set: SequenceSet = "*".parse().unwrap();
        let i = Intervals::new(&set, 7);
        assert!(i.contains(7) && !i.contains(6));
        let set: SequenceSet = "9,1:3,2:5,20:*".parse().unwrap();
        let i = Intervals::new(&set, 4_000_000_000);
        assert_eq!(i.0, vec![(1, 5), (9, 9), (20, 4_000_000_000)]);
        assert_eq!(
            i.absent(&[2, 3, 9, 25, 4_000_000_000], 4_000_000_000),
            vec![(1, 1), (4, 5), (20, 24), (26, 3_999_999_999)]
        );
        assert_eq!(range_set(&i.absent(&[], 3)), "1:3");
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        let set: SequenceSet = "1:*".parse().unwrap();
        assert_eq!(Intervals::new(&set, u32::MAX).absent(&[u32::MAX], u32::MAX), vec![(1, u32::MAX - 1)]);
    }
}
