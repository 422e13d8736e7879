//! NOTIFY (RFC 5465): which changes to which mailboxes a session is told of without
//! asking. imap-codec 2.0.0-alpha.10 does not parse NOTIFY, so it is read here, and what
//! to tell is worked out by [`notices`], a pure function of two snapshots of the user's
//! mailboxes (their counts, names and subscriptions) taken by the session.
//!
//! The selected mailbox keeps its usual reports (EXISTS, EXPUNGE, FETCH FLAGS, at each
//! command and during IDLE); NOTIFY adds STATUS for the other mailboxes the filters
//! cover (MessageNew, MessageExpunge, FlagChange) and LIST for names that appear or go
//! (MailboxName: a RENAME shows as the old name gone and the new one there) and for
//! subscriptions (SubscriptionChange). Events tandem has no data for (annotations,
//! metadata) are refused with BADEVENT, as RFC 5465 asks.
//!
//! Bounded: at most [`NAMES_MAX`] mailbox names and [`GROUPS_MAX`] event groups, a
//! nesting of at most four lists, read in one pass without recursion.

use std::collections::{BTreeMap, BTreeSet};
use tandem_core::types::MailboxKey;

/// Mailbox names a NOTIFY may name (Dovecot's limit too); more is NOTIFICATIONOVERFLOW.
pub const NAMES_MAX: usize = 100;
/// Event groups in one NOTIFY SET.
pub const GROUPS_MAX: usize = 16;
/// Items in any one list (events, fetch attributes, names).
const ITEMS_MAX: usize = NAMES_MAX;
/// Lists inside lists: the group, its events, MessageNew's fetch attributes and a
/// list inside one of those (HEADER.FIELDS (...)).
const DEPTH_MAX: usize = 4;

/// A set of NOTIFY events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events(u8);

impl Events {
    pub const MESSAGE_NEW: Events = Events(1);
    pub const MESSAGE_EXPUNGE: Events = Events(2);
    pub const FLAG_CHANGE: Events = Events(4);
    pub const MAILBOX_NAME: Events = Events(8);
    pub const SUBSCRIPTION_CHANGE: Events = Events(16);

    pub fn has(self, e: Events) -> bool {
        self.0 & e.0 != 0
    }
    fn add(&mut self, e: Events) {
        self.0 |= e.0;
    }
    /// Any of the events about messages, which STATUS reports for other mailboxes.
    pub fn about_messages(self) -> bool {
        self.has(Events(Self::MESSAGE_NEW.0 | Self::MESSAGE_EXPUNGE.0 | Self::FLAG_CHANGE.0))
    }
}

/// RFC 5465's events tandem cannot report (it keeps no annotations or metadata).
const UNSUPPORTED_EVENTS: [&str; 3] = ["AnnotationChange", "MailboxMetadataChange", "ServerMetadataChange"];

/// Which mailboxes an event group covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// The mailboxes mail is delivered to: INBOX here (LMTP delivers to INBOX).
    Inboxes,
    /// Every mailbox of the user.
    Personal,
    /// The names subscribed, as they are when a change happens.
    Subscribed,
    /// These mailboxes and every mailbox below them.
    Subtree(Vec<String>),
    /// Exactly these mailboxes.
    Mailboxes(Vec<String>),
}

impl Filter {
    pub fn covers(&self, name: &str, subscribed: impl Fn(&str) -> bool) -> bool {
        let same = |a: &str, b: &str| a == b || (a.eq_ignore_ascii_case("INBOX") && b.eq_ignore_ascii_case("INBOX"));
        match self {
            Filter::Inboxes => name.eq_ignore_ascii_case("INBOX"),
            Filter::Personal => true,
            Filter::Subscribed => subscribed(name),
            Filter::Mailboxes(names) => names.iter().any(|n| same(n, name)),
            Filter::Subtree(roots) => roots.iter().any(|root| {
                same(root, name) || name.strip_prefix(root.as_str()).is_some_and(|rest| rest.starts_with('/'))
            }),
        }
    }

    fn names_mut(&mut self) -> Option<&mut Vec<String>> {
        match self {
            Filter::Subtree(names) | Filter::Mailboxes(names) => Some(names),
            _ => None,
        }
    }
}

/// A NOTIFY SET: what the session is to be told from now on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotifySet {
    /// STATUS: a STATUS of every covered mailbox before the command's OK.
    pub status: bool,
    /// Events for the selected mailbox (`selected` or `selected-delayed`).
    pub selected: Events,
    /// `selected-delayed`: expunges in the selected mailbox wait for a command that may
    /// report them (RFC 5465 section 6); `selected` tells them at once.
    pub selected_delayed: bool,
    pub groups: Vec<(Filter, Events)>,
}

impl NotifySet {
    /// The events the groups give `name` (the selected mailbox's own come from `selected`).
    pub fn events_for(&self, name: &str, subscribed: impl Fn(&str) -> bool + Copy) -> Events {
        let mut events = Events::default();
        for (filter, e) in &self.groups {
            if filter.covers(name, subscribed) {
                events.add(*e);
            }
        }
        events
    }

    /// Mailbox names the filters name (for the session to turn into stored names).
    pub fn names_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.groups.iter_mut().filter_map(|(f, _)| f.names_mut()).flatten()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    None,
    Set(NotifySet),
}

/// Why a NOTIFY is refused: the text after the tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    Bad(String),
    /// Events tandem does not report (NO [BADEVENT (...)]).
    BadEvent(Vec<&'static str>),
    /// More names than [`NAMES_MAX`] (NO [NOTIFICATIONOVERFLOW]).
    Overflow,
}

impl Refused {
    pub fn answer(&self) -> String {
        match self {
            Refused::Bad(why) => format!("BAD {why}"),
            Refused::BadEvent(events) => {
                let supported = "MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange";
                format!("NO [BADEVENT ({supported})] unsupported NOTIFY events: {}", events.join(" "))
            }
            Refused::Overflow => format!("NO [NOTIFICATIONOVERFLOW] at most {NAMES_MAX} mailbox names"),
        }
    }
}

/// One token of the arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    Text(String),
}

/// The NOTIFY command in `message` (its tag and what it asks); None when it is not one.
pub fn parse(message: &[u8]) -> Option<(String, Result<Command, Refused>)> {
    let mut rest = message;
    let tag = word(&mut rest)?;
    if !word(&mut rest)?.eq_ignore_ascii_case(b"NOTIFY") {
        return None;
    }
    let tag = String::from_utf8_lossy(tag).into_owned();
    let tokens = match tokens(rest) {
        Ok(tokens) => tokens,
        Err(why) => return Some((tag, Err(Refused::Bad(why)))),
    };
    Some((tag, command(&tokens)))
}

/// A space-delimited word at the start of `rest`.
fn word<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let start = rest.iter().position(|b| *b != b' ')?;
    let text = &rest[start..];
    let end = text.iter().position(|b| matches!(b, b' ' | b'\r' | b'\n')).unwrap_or(text.len());
    *rest = &text[end..];
    (end > 0).then_some(&text[..end])
}

/// The arguments as tokens: parentheses, atoms, quoted strings and literals. The
/// message ends with CRLF; a literal's bytes follow its `{n}` and CRLF.
fn tokens(mut rest: &[u8]) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    while let Some(&first) = rest.first() {
        match first {
            b' ' => rest = &rest[1..],
            b'\r' | b'\n' => {
                let crlf = rest.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
                rest = &rest[crlf..];
                if !rest.is_empty() {
                    return Err("text after the command's end".into());
                }
            }
            b'(' => {
                depth += 1;
                if depth > DEPTH_MAX {
                    return Err("lists nested too deep".into());
                }
                out.push(Token::Open);
                rest = &rest[1..];
            }
            b')' => {
                depth = depth.checked_sub(1).ok_or("an unopened list")?;
                out.push(Token::Close);
                rest = &rest[1..];
            }
            b'"' => out.push(Token::Text(quoted(&mut rest)?)),
            b'{' | b'~' => out.push(Token::Text(literal(&mut rest)?)),
            _ => {
                let end =
                    rest.iter().position(|b| matches!(b, b' ' | b'(' | b')' | b'\r' | b'\n')).unwrap_or(rest.len());
                let atom = std::str::from_utf8(&rest[..end]).map_err(|_| "an atom that is not UTF-8")?;
                if atom.contains(['"', '{', '}']) {
                    return Err("a malformed argument".into());
                }
                out.push(Token::Text(atom.to_string()));
                rest = &rest[end..];
            }
        }
        if out.len() > GROUPS_MAX * (ITEMS_MAX + 8) {
            return Err("too many arguments".into());
        }
    }
    if depth != 0 {
        return Err("an unclosed list".into());
    }
    Ok(out)
}

fn quoted(rest: &mut &[u8]) -> Result<String, String> {
    let mut value = Vec::new();
    let mut i = 1;
    while let Some(&b) = rest.get(i) {
        match b {
            b'"' => {
                *rest = &rest[i + 1..];
                return String::from_utf8(value).map_err(|_| "a quoted string that is not UTF-8".into());
            }
            b'\\' => match rest.get(i + 1) {
                Some(&e @ (b'"' | b'\\')) => {
                    value.push(e);
                    i += 2;
                    continue;
                }
                _ => return Err("a bad escape in a quoted string".into()),
            },
            b'\r' | b'\n' => break,
            b => value.push(b),
        }
        i += 1;
    }
    Err("an unclosed quoted string".into())
}

/// `{n}` or `{n+}` (`~{n}` refused: a mailbox name is text), CRLF, then n bytes.
fn literal(rest: &mut &[u8]) -> Result<String, String> {
    if rest.first() == Some(&b'~') {
        return Err("a binary literal where a mailbox name goes".into());
    }
    let close = rest.iter().position(|b| *b == b'}').ok_or("a malformed literal")?;
    let digits = std::str::from_utf8(&rest[1..close]).map_err(|_| "a malformed literal")?;
    let len: usize = digits.trim_end_matches('+').parse().map_err(|_| "a malformed literal")?;
    let after = rest[close + 1..].strip_prefix(b"\r\n").ok_or("a literal without CRLF")?;
    if after.len() < len {
        return Err("a literal shorter than announced".into());
    }
    let text = std::str::from_utf8(&after[..len]).map_err(|_| "a literal that is not UTF-8")?.to_string();
    *rest = &after[len..];
    Ok(text)
}

/// A cursor over the tokens.
struct Reader<'a> {
    tokens: &'a [Token],
    at: usize,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Option<&'a Token> {
        let t = self.tokens.get(self.at);
        self.at += 1;
        t
    }
    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.at)
    }
    fn text(&mut self, what: &str) -> Result<&'a str, Refused> {
        match self.next() {
            Some(Token::Text(t)) => Ok(t),
            _ => Err(Refused::Bad(format!("NOTIFY wants {what}"))),
        }
    }
    fn open(&mut self, what: &str) -> Result<(), Refused> {
        match self.next() {
            Some(Token::Open) => Ok(()),
            _ => Err(Refused::Bad(format!("NOTIFY wants a list of {what}"))),
        }
    }
}

fn command(tokens: &[Token]) -> Result<Command, Refused> {
    let mut r = Reader { tokens, at: 0 };
    let verb = r.text("NONE or SET")?;
    if verb.eq_ignore_ascii_case("NONE") {
        return match r.peek() {
            None => Ok(Command::None),
            Some(_) => Err(Refused::Bad("nothing follows NOTIFY NONE".into())),
        };
    }
    if !verb.eq_ignore_ascii_case("SET") {
        return Err(Refused::Bad("NOTIFY takes NONE or SET".into()));
    }
    let mut set = NotifySet::default();
    if matches!(r.peek(), Some(Token::Text(t)) if t.eq_ignore_ascii_case("STATUS")) {
        set.status = true;
        r.next();
    }
    let mut unsupported: BTreeSet<&'static str> = BTreeSet::new();
    let mut selected_seen = false;
    let mut names = 0usize;
    if r.peek().is_none() {
        return Err(Refused::Bad("NOTIFY SET wants at least one event group".into()));
    }
    while r.peek().is_some() {
        if set.groups.len() >= GROUPS_MAX {
            return Err(Refused::Bad(format!("at most {GROUPS_MAX} event groups")));
        }
        r.open("a filter and its events")?;
        let filter_name = r.text("a filter")?.to_ascii_lowercase();
        let filter = match filter_name.as_str() {
            "selected" | "selected-delayed" => None,
            "inboxes" => Some(Filter::Inboxes),
            "personal" => Some(Filter::Personal),
            "subscribed" => Some(Filter::Subscribed),
            "subtree" | "mailboxes" => {
                let list = mailbox_names(&mut r)?;
                names += list.len();
                if names > NAMES_MAX {
                    return Err(Refused::Overflow);
                }
                Some(if filter_name == "subtree" { Filter::Subtree(list) } else { Filter::Mailboxes(list) })
            }
            other => return Err(Refused::Bad(format!("unknown NOTIFY filter {}", clip(other)))),
        };
        let events = events(&mut r, filter.is_none(), &mut unsupported)?;
        match r.next() {
            Some(Token::Close) => {}
            _ => return Err(Refused::Bad("an event group ends after its events".into())),
        }
        match filter {
            None if selected_seen => return Err(Refused::Bad("the selected mailbox named twice".into())),
            None => {
                selected_seen = true;
                set.selected = events;
                set.selected_delayed = filter_name == "selected-delayed";
            }
            // Other mailboxes may ask for MessageNew or MessageExpunge alone: their
            // STATUS says the count either way (Dovecot takes it too).
            Some(filter) => {
                if events != Events::default() {
                    set.groups.push((filter, events));
                }
            }
        }
    }
    if !unsupported.is_empty() {
        return Err(Refused::BadEvent(unsupported.into_iter().collect()));
    }
    Ok(Command::Set(set))
}

/// RFC 5465 section 5: MessageNew and MessageExpunge go together, and FlagChange needs
/// them (for the selected mailbox, whose reports are sequence numbers).
fn check_pairs(events: Events) -> Result<(), Refused> {
    let new = events.has(Events::MESSAGE_NEW);
    let expunge = events.has(Events::MESSAGE_EXPUNGE);
    if new != expunge {
        return Err(Refused::Bad("MessageNew and MessageExpunge go together".into()));
    }
    if events.has(Events::FLAG_CHANGE) && !expunge {
        return Err(Refused::Bad("FlagChange needs MessageNew and MessageExpunge".into()));
    }
    Ok(())
}

/// One mailbox name or a parenthesised list of at least one.
fn mailbox_names(r: &mut Reader<'_>) -> Result<Vec<String>, Refused> {
    match r.next() {
        Some(Token::Text(name)) => Ok(vec![name.clone()]),
        Some(Token::Open) => {
            let mut names = Vec::new();
            loop {
                match r.next() {
                    Some(Token::Close) if !names.is_empty() => return Ok(names),
                    Some(Token::Text(name)) if names.len() < NAMES_MAX => names.push(name.clone()),
                    Some(Token::Text(_)) => return Err(Refused::Overflow),
                    _ => return Err(Refused::Bad("a malformed list of mailbox names".into())),
                }
            }
        }
        _ => Err(Refused::Bad("NOTIFY wants mailbox names".into())),
    }
}

/// NONE, or a list of events (MessageNew may take a list of fetch attributes, for the
/// selected mailbox only; they are checked as words and the usual reports stand).
fn events(r: &mut Reader<'_>, selected: bool, unsupported: &mut BTreeSet<&'static str>) -> Result<Events, Refused> {
    let mut events = Events::default();
    match r.next() {
        Some(Token::Text(t)) if t.eq_ignore_ascii_case("NONE") => return Ok(events),
        Some(Token::Open) => {}
        _ => return Err(Refused::Bad("NOTIFY wants NONE or a list of events".into())),
    }
    let mut count = 0;
    loop {
        let name = match r.next() {
            Some(Token::Close) if count > 0 => break,
            Some(Token::Text(name)) => name,
            _ => return Err(Refused::Bad("a malformed list of events".into())),
        };
        count += 1;
        if count > ITEMS_MAX {
            return Err(Refused::Bad("too many events".into()));
        }
        let event = match name.to_ascii_lowercase().as_str() {
            "messagenew" => Events::MESSAGE_NEW,
            "messageexpunge" => Events::MESSAGE_EXPUNGE,
            "flagchange" => Events::FLAG_CHANGE,
            "mailboxname" => Events::MAILBOX_NAME,
            "subscriptionchange" => Events::SUBSCRIPTION_CHANGE,
            other => match UNSUPPORTED_EVENTS.iter().find(|u| u.eq_ignore_ascii_case(other)) {
                Some(u) => {
                    unsupported.insert(u);
                    continue;
                }
                None => return Err(Refused::Bad(format!("unknown NOTIFY event {}", clip(name)))),
            },
        };
        events.add(event);
        if event == Events::MESSAGE_NEW && matches!(r.peek(), Some(Token::Open)) {
            if !selected {
                return Err(Refused::Bad("fetch attributes go with the selected mailbox only".into()));
            }
            fetch_attributes(r)?;
        }
    }
    if selected {
        check_pairs(events)?;
    }
    Ok(events)
}

/// MessageNew's fetch attributes: words, and one level of lists inside (BODY.PEEK[...]
/// is one word here as long as it holds no space).
fn fetch_attributes(r: &mut Reader<'_>) -> Result<(), Refused> {
    r.open("fetch attributes")?;
    let (mut count, mut depth) = (0usize, 0usize);
    loop {
        match r.next() {
            Some(Token::Close) if depth == 0 && count > 0 => return Ok(()),
            Some(Token::Close) if depth > 0 => depth -= 1,
            Some(Token::Open) if depth == 0 => depth += 1,
            Some(Token::Text(_)) if count < ITEMS_MAX => count += 1,
            _ => return Err(Refused::Bad("a malformed list of fetch attributes".into())),
        }
    }
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One mailbox's counts as a snapshot keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: u32,
    pub highest_modseq: u64,
}

/// The user's mailboxes as a session last told them: names (stored form) with counts,
/// and the subscribed names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub mailboxes: BTreeMap<String, Counts>,
    pub subscribed: BTreeSet<String>,
}

/// The STATUS items a notice carries, in the order STATUS answers them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusItems {
    pub messages: bool,
    pub uidnext: bool,
    pub uidvalidity: bool,
    pub highest_modseq: bool,
}

impl StatusItems {
    /// What RFC 5465 section 5 has STATUS say for these events: MESSAGES (and UIDNEXT,
    /// UIDVALIDITY for new mail), UIDVALIDITY and HIGHESTMODSEQ for flag changes.
    pub fn for_events(events: Events) -> StatusItems {
        let new = events.has(Events::MESSAGE_NEW);
        let flags = events.has(Events::FLAG_CHANGE);
        StatusItems {
            messages: new || events.has(Events::MESSAGE_EXPUNGE),
            uidnext: new,
            uidvalidity: new || flags,
            highest_modseq: flags,
        }
    }

    pub fn text(self, c: &Counts) -> String {
        let mut parts = Vec::new();
        if self.messages {
            parts.push(format!("MESSAGES {}", c.messages));
        }
        if self.uidnext {
            parts.push(format!("UIDNEXT {}", c.uidnext));
        }
        if self.uidvalidity {
            parts.push(format!("UIDVALIDITY {}", c.uidvalidity));
        }
        if self.highest_modseq {
            parts.push(format!("HIGHESTMODSEQ {}", c.highest_modseq));
        }
        parts.join(" ")
    }
}

/// Something to tell the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// `* STATUS name (items)` with the mailbox's counts now.
    Status { name: String, items: StatusItems, counts: Counts },
    /// `* LIST (attributes) "/" name`, with `("OLDNAME" (old))` for a rename.
    List { name: String, attributes: Vec<&'static str>, old_name: Option<String> },
}

/// The STATUS of every covered mailbox but the selected one (NOTIFY SET STATUS).
pub fn initial_status(set: &NotifySet, now: &Snapshot, selected: Option<&str>) -> Vec<Notice> {
    let subscribed = |n: &str| now.subscribed.contains(n);
    now.mailboxes
        .iter()
        .filter(|(name, _)| Some(name.as_str()) != selected)
        .filter_map(|(name, counts)| {
            let events = set.events_for(name, subscribed);
            events.about_messages().then(|| Notice::Status {
                name: name.clone(),
                items: StatusItems::for_events(events),
                counts: *counts,
            })
        })
        .collect()
}

/// Names gone times names come in one round past which no rename is looked for: each
/// pair costs a hash of both names.
const RENAME_PAIRS_MAX: usize = 4096;

/// What changed from `before` to `now` (`user`'s mailboxes) that `set` asks to be told, in name order:
/// names that appeared or went, subscriptions, then STATUS of other mailboxes whose
/// counts moved in a way the events cover.
pub fn notices(set: &NotifySet, user: &str, before: &Snapshot, now: &Snapshot, selected: Option<&str>) -> Vec<Notice> {
    let mut out = Vec::new();
    // A name covered then or now (a subscription filter follows the subscription).
    let events_of = |name: &str| {
        let mut e = set.events_for(name, |n| now.subscribed.contains(n));
        e.add(set.events_for(name, |n| before.subscribed.contains(n)));
        e
    };
    // A RENAME gives the new name a UIDVALIDITY drawn from its path (the old name's
    // UIDVALIDITY and both names, `MailboxKey::renamed_uidvalidity`): a name gone and one
    // come with that UIDVALIDITY in one round is told as the rename it is (two rounds
    // apart, as the old name gone and the new one there). Bounded: past
    // `RENAME_PAIRS_MAX` pairs in one round, every name is told as gone or come.
    // The names one snapshot holds and the other does not, with their UIDVALIDITY.
    fn only_in<'a>(this: &'a Snapshot, other: &Snapshot) -> Vec<(&'a String, u32)> {
        this.mailboxes
            .iter()
            .filter(|(name, _)| !other.mailboxes.contains_key(*name))
            .map(|(name, counts)| (name, counts.uidvalidity))
            .collect()
    }
    let (gone, come) = (only_in(before, now), only_in(now, before));
    let mut renamed_to: BTreeMap<&String, &String> = BTreeMap::new();
    if gone.len().saturating_mul(come.len()) <= RENAME_PAIRS_MAX {
        for (new, validity) in &come {
            let new_key = MailboxKey::new(user, new);
            let old = gone.iter().find(|(old, old_validity)| {
                !renamed_to.contains_key(old)
                    && new_key.renamed_uidvalidity(&MailboxKey::new(user, old), *old_validity) == *validity
            });
            if let Some((old, _)) = old {
                renamed_to.insert(old, new);
            }
        }
    }
    let renamed_from: BTreeMap<&String, &String> = renamed_to.iter().map(|(old, new)| (*new, *old)).collect();
    let names: BTreeSet<&String> = before
        .mailboxes
        .keys()
        .chain(now.mailboxes.keys())
        .chain(now.subscribed.iter())
        .chain(before.subscribed.iter())
        .collect();
    for name in names {
        let events = events_of(name);
        let (was, is) = (before.mailboxes.get(name), now.mailboxes.get(name));
        let subscribed = now.subscribed.contains(name);
        let old_name = renamed_from.get(name).filter(|old| events_of(old).has(Events::MAILBOX_NAME));
        // The old name of a rename told under the new one is not told again.
        let told_as_rename = renamed_to.get(name).is_some_and(|new| events_of(new).has(Events::MAILBOX_NAME));
        let name_changed = events.has(Events::MAILBOX_NAME) && was.is_some() != is.is_some() && !told_as_rename;
        let subscription_changed =
            events.has(Events::SUBSCRIPTION_CHANGE) && before.subscribed.contains(name) != subscribed;
        if name_changed || subscription_changed {
            let mut attributes = Vec::new();
            if is.is_none() {
                attributes.push("\\NonExistent");
            }
            if subscribed {
                attributes.push("\\Subscribed");
            }
            let old_name = old_name.filter(|_| name_changed).map(|old| old.to_string());
            out.push(Notice::List { name: name.clone(), attributes, old_name });
        }
        let (Some(was), Some(is)) = (was, is) else { continue };
        if Some(name.as_str()) == selected || was == is {
            continue;
        }
        // Only HIGHESTMODSEQ moved: a flag change, told for FlagChange alone.
        let moved = was.uidvalidity != is.uidvalidity || was.uidnext != is.uidnext || was.messages != is.messages;
        if (moved && events.about_messages()) || events.has(Events::FLAG_CHANGE) {
            out.push(Notice::Status { name: name.clone(), items: StatusItems::for_events(events), counts: *is });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(line: &str) -> Result<Command, Refused> {
        let (tag, command) = parse(format!("{line}\r\n").as_bytes()).expect("a NOTIFY");
        assert_eq!(tag, "a");
        command
    }

    fn counts(messages: u32, uidnext: u32, modseq: u64) -> Counts {
        Counts { uidvalidity: 7, uidnext, messages, highest_modseq: modseq }
    }

    #[test]
    fn parses_what_rfc_5465_and_imaptest_send() {
        assert_eq!(parse(b"a LIST \"\" *\r\n"), None);
        assert_eq!(set("a NOTIFY NONE"), Ok(Command::None));
        let Ok(Command::Set(s)) = set("a NOTIFY SET STATUS (mailboxes box2 (MessageExpunge))") else { panic!() };
        assert!(s.status);
        assert_eq!(s.groups, vec![(Filter::Mailboxes(vec!["box2".into()]), Events::MESSAGE_EXPUNGE)]);
        let Ok(Command::Set(s)) = set(
            "a notify set (selected (MessageNew (UID BODY.PEEK[HEADER.FIELDS (From Subject)]) MessageExpunge)) \
             (subtree (\"Lists\" {4}\r\nWork) (MessageNew MessageExpunge FlagChange)) (personal (MailboxName SubscriptionChange))",
        ) else {
            panic!()
        };
        assert!(!s.status && !s.selected_delayed);
        assert!(s.selected.has(Events::MESSAGE_NEW) && s.selected.has(Events::MESSAGE_EXPUNGE));
        assert_eq!(s.groups[0].0, Filter::Subtree(vec!["Lists".into(), "Work".into()]));
        assert!(s.groups[1].1.has(Events::MAILBOX_NAME));
    }

    proptest::proptest! {
        /// Hostile input: any bytes, and lines made of NOTIFY's own words and brackets,
        /// are answered (or passed over) without a panic, within the limits.
        #[test]
        fn any_input_is_answered_without_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            words in proptest::collection::vec(proptest::sample::select(vec![
                "(", ")", "SET", "NONE", "STATUS", "selected", "selected-delayed", "personal", "inboxes",
                "subscribed", "subtree", "mailboxes", "MessageNew", "MessageExpunge", "FlagChange",
                "MailboxName", "SubscriptionChange", "AnnotationChange", "\"a b\"", "{3}\r\nxyz", "{9}\r\n", "x",
            ]), 0..40),
        ) {
            let _ = parse(&bytes);
            let line = format!("a NOTIFY {}\r\n", words.join(" "));
            let (_, answer) = parse(line.as_bytes()).expect("a NOTIFY line is one");
            if let Ok(Command::Set(set)) = answer {
                proptest::prop_assert!(set.groups.len() <= GROUPS_MAX);
                let names: usize = set.groups.iter().map(|(f, _)| match f {
                    Filter::Subtree(n) | Filter::Mailboxes(n) => n.len(),
                    _ => 0,
                }).sum();
                proptest::prop_assert!(names <= NAMES_MAX);
            }
        }
    }

    #[test]
    fn selected_delayed_holds_expunges_back() {
        let Ok(Command::Set(s)) = set("a NOTIFY SET (selected-delayed (MessageExpunge MessageNew))") else { panic!() };
        assert!(s.selected_delayed && s.groups.is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_tell_and_what_is_malformed() {
        assert_eq!(
            set("a NOTIFY SET (personal (MessageNew MessageExpunge AnnotationChange))"),
            Err(Refused::BadEvent(vec!["AnnotationChange"]))
        );
        assert!(matches!(set("a NOTIFY SET (selected (MessageNew))"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET (selected (FlagChange))"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET (selected NONE) (selected-delayed NONE)"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET (nowhere (MessageNew))"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET (((((personal)))))"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET ((personal))"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET (personal (MessageNew)"), Err(Refused::Bad(_))));
        assert!(matches!(set("a NOTIFY SET (mailboxes () (MessageNew MessageExpunge))"), Err(Refused::Bad(_))));
        let many: Vec<String> = (0..=NAMES_MAX).map(|i| format!("m{i}")).collect();
        let line = format!("a NOTIFY SET (mailboxes ({}) (MessageNew MessageExpunge))", many.join(" "));
        assert_eq!(set(&line), Err(Refused::Overflow));
        assert!(matches!(set("a NOTIFY SET (mailboxes {99}\r\nshort (MessageNew))"), Err(Refused::Bad(_))));
    }

    #[test]
    fn initial_status_says_what_the_events_need_and_skips_the_selected_mailbox() {
        let Ok(Command::Set(s)) = set("a NOTIFY SET STATUS (personal (MessageNew MessageExpunge FlagChange))") else {
            panic!()
        };
        let now = Snapshot {
            mailboxes: [("INBOX".to_string(), counts(1, 2, 3)), ("box2".to_string(), counts(4, 5, 6))].into(),
            subscribed: BTreeSet::new(),
        };
        let notices = initial_status(&s, &now, Some("INBOX"));
        assert_eq!(notices.len(), 1);
        let Notice::Status { name, items, counts } = &notices[0] else { panic!() };
        assert_eq!(name, "box2");
        assert_eq!(items.text(counts), "MESSAGES 4 UIDNEXT 5 UIDVALIDITY 7 HIGHESTMODSEQ 6");
        let only_expunge = StatusItems::for_events(Events::MESSAGE_EXPUNGE);
        assert_eq!(only_expunge.text(counts), "MESSAGES 4");
    }

    #[test]
    fn changes_are_told_as_the_filters_ask_and_only_those() {
        let Ok(Command::Set(s)) = set(
            "a NOTIFY SET (mailboxes box2 (MessageNew MessageExpunge)) (subtree Lists (FlagChange MessageNew MessageExpunge)) \
             (personal (MailboxName)) (subscribed (SubscriptionChange))",
        ) else {
            panic!()
        };
        let before = Snapshot {
            mailboxes: [
                ("INBOX".to_string(), counts(1, 2, 3)),
                ("box2".to_string(), counts(1, 2, 3)),
                ("Lists/a".to_string(), counts(1, 2, 3)),
                ("old".to_string(), counts(0, 1, 0)),
                ("quiet".to_string(), counts(0, 1, 0)),
            ]
            .into(),
            subscribed: ["quiet".to_string()].into(),
        };
        let mut now = before.clone();
        now.mailboxes.insert("INBOX".into(), counts(2, 3, 4)); // not covered by a message filter
        now.mailboxes.insert("box2".into(), counts(1, 2, 9)); // flags only: box2 did not ask
        now.mailboxes.insert("Lists/a".into(), counts(1, 2, 9)); // flags: asked
        now.mailboxes.remove("old");
        now.mailboxes.insert("new".into(), Counts { uidvalidity: 8, ..counts(0, 1, 0) }); // not a rename of "old"
        now.subscribed.remove("quiet");
        let told = notices(&s, "u@d", &before, &now, None);
        let lines: Vec<String> = told
            .iter()
            .map(|n| match n {
                Notice::Status { name, items, counts } => format!("STATUS {name} ({})", items.text(counts)),
                Notice::List { name, attributes, old_name: None } => format!("LIST ({}) {name}", attributes.join(" ")),
                Notice::List { name, attributes, old_name: Some(old) } => {
                    format!("LIST ({}) {name} OLDNAME {old}", attributes.join(" "))
                }
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                "STATUS Lists/a (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 7 HIGHESTMODSEQ 9)",
                "LIST () new",
                "LIST (\\NonExistent) old",
                "LIST () quiet",
            ]
        );
        // New mail in box2 is told; the selected mailbox never gets a STATUS.
        let mut later = now.clone();
        later.mailboxes.insert("box2".into(), counts(2, 3, 10));
        later.mailboxes.insert("Lists/a".into(), counts(0, 2, 11));
        let told = notices(&s, "u@d", &now, &later, Some("Lists/a"));
        assert_eq!(told.len(), 1);
        assert!(matches!(&told[0], Notice::Status { name, .. } if name == "box2"));
        assert!(notices(&s, "u@d", &later, &later, None).is_empty());
        // A rename (old name gone, new one there with the UIDVALIDITY of that rename's
        // path): one LIST with OLDNAME.
        let mut renamed = later.clone();
        let counts_of_box2 = renamed.mailboxes.remove("box2").expect("box2");
        let uidvalidity = MailboxKey::new("u@d", "box3").renamed_uidvalidity(&MailboxKey::new("u@d", "box2"), 7);
        renamed.mailboxes.insert("box3".into(), Counts { uidvalidity, ..counts_of_box2 });
        // Another name come with the old one's UIDVALIDITY is no rename of it.
        let mut not_renamed = later.clone();
        not_renamed.mailboxes.remove("box2");
        not_renamed.mailboxes.insert("box4".into(), counts_of_box2);
        let told = notices(&s, "u@d", &later, &not_renamed, None);
        assert!(told.iter().all(|n| !matches!(n, Notice::List { old_name: Some(_), .. })), "{told:?}");
        let told = notices(&s, "u@d", &later, &renamed, None);
        assert_eq!(
            told,
            vec![Notice::List { name: "box3".into(), attributes: vec![], old_name: Some("box2".into()) }],
            "{told:?}"
        );
    }
}
