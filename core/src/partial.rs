//! A partial replica (issue 17): a user replica that holds a subset of its user's mail,
//! chosen by mailbox patterns and a received-date window, with bodies above a size limit
//! left on the cluster until a client of the replica asks for one. A partial cluster
//! server takes the same spec with another reach: it holds every record, and leaves out
//! the bodies above the limit, outside the patterns (over `user/mailbox`) or before the
//! date (`Server::omits_body`), fetching one from a peer when a client asks.
//!
//! The seed thread: "replicate only certain folders over certain date ranges (or only
//! parts of certain messages, eg excluding large attachments)", and Timo's FETCH-SMALL
//! that "somehow remembers" what it dropped "so that they could later be downloaded
//! again". What is not held is never taken for what was lost:
//!
//! - a mailbox outside the patterns is not listed by either side for the agent: it is
//!   neither pulled nor pushed, and nothing of it is compared;
//! - a message outside the window is not sent to the replica, and the summaries both
//!   sides give the agent count only the messages inside it (the window's digest), so
//!   the copies agree without the replica holding the rest. Absence never means expunge
//!   in a merge; only a tombstone does, and the cluster sends none for what it leaves out
//!   (the broken variant `partial-expunges-unheld` does, and the oracle catches the
//!   cluster losing mail for it);
//! - a body above the limit is omitted: the record is held, the bytes are not, and
//!   neither an adopt, the scrub nor a census counts that as a body gone missing. A
//!   client's read of it (`ClientRequest::FetchBody`) queues it; the agent's next round
//!   brings it.
use crate::types::{MailboxKey, MailboxState, MessageRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Mailbox patterns a partial replica may have at most, and their bytes in all: a spec
/// comes from a logged-in user's agent too, and matching costs pattern bytes times name
/// bytes per mailbox listed.
pub const PATTERNS_MAX: usize = 32;
pub const PATTERN_BYTES_MAX: usize = 256;

/// What a partial replica holds. The default holds everything.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partial {
    /// IMAP LIST patterns of the mailbox names held (`*` anything, `%` anything but the
    /// `/` delimiter, case-insensitive); empty: every mailbox.
    #[serde(default)]
    pub mailboxes: Vec<String>,
    /// Only messages received at or after this (seconds since the Unix epoch); 0: every
    /// date. A fixed date, not an age: a window that slid with the clock would make the
    /// two sides' counts of it differ by when each was asked.
    #[serde(default)]
    pub since_s: u64,
    /// Bodies larger than this many bytes stay on the cluster until a client asks for
    /// one; None: every body comes.
    #[serde(default)]
    pub body_bytes_max: Option<u32>,
    /// A body fetched because a client asked is kept (true), or dropped again once that
    /// client was given it (false: a laptop short of disk).
    #[serde(default = "keep_fetched_default")]
    pub keep_fetched: bool,
}

fn keep_fetched_default() -> bool {
    true
}

impl Default for Partial {
    fn default() -> Partial {
        Partial { mailboxes: Vec::new(), since_s: 0, body_bytes_max: None, keep_fetched: true }
    }
}

impl Partial {
    /// Holds everything: no pattern, no window, no size limit.
    pub fn is_whole(&self) -> bool {
        self.mailboxes.is_empty() && self.since_s == 0 && self.body_bytes_max.is_none()
    }

    /// Refuses a spec a config file or a peer could make unbounded.
    pub fn check(&self) -> Result<(), String> {
        if self.mailboxes.len() > PATTERNS_MAX {
            return Err(format!("at most {PATTERNS_MAX} mailbox patterns, not {}", self.mailboxes.len()));
        }
        if self.mailboxes.iter().any(String::is_empty) {
            return Err("an empty mailbox pattern".into());
        }
        let bytes: usize = self.mailboxes.iter().map(String::len).sum();
        if bytes > PATTERN_BYTES_MAX {
            return Err(format!("mailbox patterns have at most {PATTERN_BYTES_MAX} bytes in all, not {bytes}"));
        }
        Ok(())
    }

    /// [`Partial::check`] for a cluster server's spec too: there a pattern names
    /// `user/mailbox` (a server holds every user's mail), so one without `/` would match
    /// no mailbox at all.
    pub fn check_on(&self, user_replica: bool) -> Result<(), String> {
        self.check()?;
        if !user_replica && self.mailboxes.iter().any(|p| !p.contains('/')) {
            return Err("on a cluster server a mailbox pattern names user/mailbox, like \"%/INBOX\" (every \
                        user's INBOX) or \"*@example.org/*\""
                .into());
        }
        Ok(())
    }

    /// Whether a server with this spec leaves any body out by design: a user replica only
    /// above its size limit, a cluster server by any of its rules.
    pub fn leaves_out_some(&self, user_replica: bool) -> bool {
        if user_replica { self.body_bytes_max.is_some() } else { !self.is_whole() }
    }

    /// Whether a server with this spec holds `r` of `mailbox` without its body: above the
    /// size limit; on a cluster server also outside the patterns (matched against
    /// `user/mailbox`) or received before the date. A user replica's patterns and date
    /// choose what is listed and sent to it at all, so they leave no record without its
    /// body.
    pub fn leaves_out_body(&self, user_replica: bool, mailbox: &MailboxKey, r: &MessageRecord) -> bool {
        self.omits_body(r.size) || (!user_replica && (!self.in_window(r) || !self.holds_mailbox(&mailbox.to_string())))
    }

    pub fn holds_mailbox(&self, name: &str) -> bool {
        self.mailboxes.is_empty() || self.mailboxes.iter().any(|p| wildcard_match(p, name))
    }

    /// Whether the message is inside the date window.
    pub fn in_window(&self, r: &MessageRecord) -> bool {
        r.received >= self.since_s
    }

    /// Whether a message of this size comes without its body.
    pub fn omits_body(&self, size: u32) -> bool {
        self.body_bytes_max.is_some_and(|max| size > max)
    }

    /// The cluster's state as the replica is to have it: the messages outside the window
    /// left out, except one whose GUID a tombstone of the state names (a binding the
    /// cluster retired moved it: the replica may hold it at the old UID, and must see
    /// where it went rather than keep a binding the cluster gave up). Tombstones,
    /// retirements and the rest stay: they are how expunges reach the replica.
    pub fn window_state(&self, state: &mut MailboxState) {
        if self.since_s == 0 {
            return;
        }
        let moved: BTreeSet<_> = state.tombstones.iter().map(|t| t.guid).collect();
        state.messages.retain(|r| self.in_window(r) || moved.contains(&r.guid));
    }

    /// The broken variant `partial-expunges-unheld`: what is left out of the window is
    /// sent as expunged ("the replica drops what left its window"), and the replica's
    /// next push takes those expunges back to the cluster.
    pub fn window_state_broken(&self, state: &mut MailboxState) {
        if self.since_s == 0 {
            return;
        }
        let gone: Vec<crate::types::Tombstone> = state
            .messages
            .iter()
            .filter(|r| !self.in_window(r))
            .map(|r| crate::types::Tombstone::expunge(r.uid, r.guid, r.modseq))
            .collect();
        state.messages.retain(|r| self.in_window(r));
        state.tombstones.extend(gone);
    }
}

/// IMAP LIST wildcards: `*` matches anything, `%` anything but the `/` delimiter; ASCII
/// letters match either case. One pass per pattern byte over the set of name positions
/// reachable so far: O(pattern x name), never the exponential backtracking a recursive
/// matcher does on `*a*a*a*...b`.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let name = name.as_bytes();
    // reachable[i]: the pattern so far can match name[..i].
    let mut reachable = vec![false; name.len() + 1];
    reachable[0] = true;
    let mut next = vec![false; name.len() + 1];
    for &p in pattern.as_bytes() {
        next.iter_mut().for_each(|x| *x = false);
        match p {
            b'*' | b'%' => {
                let mut open = false;
                for i in 0..=name.len() {
                    open |= reachable[i];
                    next[i] = open;
                    // `%` cannot run across a hierarchy delimiter.
                    if p == b'%' && name.get(i) == Some(&b'/') {
                        open = false;
                    }
                }
            }
            c => {
                for i in 0..name.len() {
                    next[i + 1] = reachable[i] && name[i].eq_ignore_ascii_case(&c);
                }
            }
        }
        std::mem::swap(&mut reachable, &mut next);
        if !reachable.iter().any(|x| *x) {
            return false;
        }
    }
    reachable[name.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Guid, MailboxKey, Tombstone};

    fn rec(uid: u32, received: u64) -> MessageRecord {
        MessageRecord {
            uid,
            guid: Guid(uid as u128),
            received,
            size: 10,
            checksum: 0,
            modseq: uid as u64,
            flags: Default::default(),
            claimed: false,
            pushed: false,
        }
    }

    #[test]
    fn patterns_match_as_imap_list_does() {
        assert!(wildcard_match("*", "INBOX"));
        assert!(wildcard_match("%", "Sent"));
        assert!(!wildcard_match("%", "Archive/2024"));
        assert!(wildcard_match("Archive/%", "Archive/2024"));
        assert!(wildcard_match("inbox", "INBOX"));
        assert!(!wildcard_match("Work*", "Notes"));
        assert!(!wildcard_match("Sent", "Sent Items"));
        assert!(wildcard_match("A%/%", "a/b") && !wildcard_match("%", "a/") && wildcard_match("%/", "a/"));
        assert!(wildcard_match("*b", "a/b") && wildcard_match("a*b*", "ab") && !wildcard_match("a*c", "ab"));
        // No backtracking blow-up on a hostile pattern.
        let name = "a".repeat(1000);
        assert!(!wildcard_match(&format!("{}b", "*a".repeat(100)), &name));
    }

    #[test]
    fn the_default_holds_everything() {
        let p = Partial::default();
        assert!(p.holds_mailbox("Anything/at/all"));
        assert!(p.in_window(&rec(1, 0)));
        assert!(!p.omits_body(u32::MAX));
        assert!(p.mailboxes.is_empty() && p.is_whole());
    }

    #[test]
    fn the_window_leaves_out_old_mail_but_never_sends_an_expunge_for_it() {
        let p = Partial { since_s: 100, ..Partial::default() };
        let mut state = MailboxState::empty(MailboxKey::new("u", "INBOX"), 1);
        state.messages = vec![rec(1, 50), rec(2, 150), rec(3, 20)];
        // UID 3 moved here from a retired UID 9: it stays, so the replica learns where.
        state.tombstones = vec![Tombstone::retirement(9, Guid(3), 4)];
        let before = state.tombstones.clone();
        p.window_state(&mut state);
        assert_eq!(state.messages.iter().map(|r| r.uid).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(state.tombstones, before, "no tombstone is made for what is left out");
        let mut broken = MailboxState::empty(MailboxKey::new("u", "INBOX"), 1);
        broken.messages = vec![rec(1, 50), rec(2, 150)];
        p.window_state_broken(&mut broken);
        assert!(broken.tombstones.iter().any(|t| t.guid == Guid(1) && t.expunged));
    }

    #[test]
    fn a_cluster_server_leaves_out_bodies_by_its_patterns_and_date_and_a_user_replica_by_size_only() {
        let p = Partial { mailboxes: vec!["%/INBOX".into()], since_s: 100, ..Partial::default() };
        let (inbox, archive) = (MailboxKey::new("a@x", "INBOX"), MailboxKey::new("a@x", "Archive"));
        assert!(!p.leaves_out_body(false, &inbox, &rec(1, 150)));
        assert!(p.leaves_out_body(false, &archive, &rec(1, 150)), "outside the patterns");
        assert!(p.leaves_out_body(false, &inbox, &rec(1, 50)), "before the date");
        assert!(!p.leaves_out_body(true, &archive, &rec(1, 50)), "a user replica's patterns and date list, not omit");
        assert!(p.leaves_out_some(false) && !p.leaves_out_some(true));
        assert!(p.check_on(false).is_ok());
        let bare = Partial { mailboxes: vec!["INBOX".into()], ..Partial::default() };
        assert!(bare.check_on(true).is_ok());
        assert!(bare.check_on(false).is_err_and(|e| e.contains("user/mailbox")), "a server's pattern names the user");
    }

    #[test]
    fn a_body_above_the_limit_is_omitted() {
        let p = Partial { body_bytes_max: Some(1000), ..Partial::default() };
        assert!(!p.omits_body(1000));
        assert!(p.omits_body(1001));
        assert!(!p.is_whole());
    }

    #[test]
    fn an_unbounded_spec_is_refused() {
        let many = Partial { mailboxes: vec!["x".into(); PATTERNS_MAX + 1], ..Partial::default() };
        assert!(many.check().is_err());
        let long = Partial { mailboxes: vec!["x".repeat(PATTERN_BYTES_MAX / 2 + 1); 2], ..Partial::default() };
        assert!(long.check().is_err());
        let empty = Partial { mailboxes: vec![String::new()], ..Partial::default() };
        assert!(empty.check().is_err());
        assert!(Partial { mailboxes: vec!["INBOX".into()], ..Partial::default() }.check().is_ok());
    }
}
