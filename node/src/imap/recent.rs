//! `\Recent`, per server and per session (RFC 3501 2.3.2): a message is recent in the
//! first session on this server that sees it after it arrived (here: got its UID), and
//! in no other. The node remembers, per mailbox, the highest UID already given to a
//! session as recent; a session that selects the mailbox read-write (or sees new
//! messages while it has it selected) takes every UID above that mark and moves the mark.
//! EXAMINE and STATUS only look: read-only sessions show the same messages as recent
//! without taking them, as Dovecot does.
//!
//! The marks live in memory only (replicating them would make every SELECT a write): after
//! a restart every message is recent once more, in the first session that selects its
//! mailbox. UIDs are never reused, and a renumbered message gets a UID above every UID
//! shown, so it is recent again once: to clients it is a new message.
//!
//! In a cluster a message is recent only on the server that took it in (by APPEND,
//! LMTP or COPY; its GUID names that server): sessions on different servers never both
//! see it as recent (an IMAP client may hold sessions on several servers behind one
//! name), and no server has to ask another. A user on another server than the one that
//! took a message in never sees it as `\Recent`; IMAP4rev2 (RFC 9051) dropped the flag
//! for such reasons.

use std::collections::HashMap;
use std::sync::Mutex;
use tandem_core::types::{Guid, MailboxKey, Uid};

/// The highest UID handed out as recent in each mailbox, with the UIDVALIDITY it counts in.
pub struct RecentMarks {
    /// One entry per mailbox any session selected since the node started: bounded by the
    /// mailboxes that exist (users x `mailboxes_per_user_max`).
    marks: Mutex<HashMap<MailboxKey, (u32, Uid)>>,
    /// The GUID origin of this server's messages; None for a server alone, where every
    /// message may be recent.
    origin: Option<u32>,
}

impl Default for RecentMarks {
    /// A server alone.
    fn default() -> RecentMarks {
        RecentMarks::for_cluster(0, [])
    }
}

impl RecentMarks {
    /// Marks for server `me` of a cluster of `servers` (its own id among them or not).
    pub fn for_cluster(me: u32, servers: impl IntoIterator<Item = u32>) -> RecentMarks {
        let alone = servers.into_iter().all(|s| s == me);
        let origin = (!alone).then(|| Guid(u128::from(me)).origin());
        RecentMarks { marks: Mutex::default(), origin }
    }

    /// Whether a message may be recent on this server at all (see the module's note).
    pub fn ours(&self, guid: Guid) -> bool {
        self.origin.is_none_or(|origin| guid.origin() == origin)
    }

    /// The UIDs among `messages` (UID, GUID) that are recent for the calling session,
    /// which takes them: no other session will see them as recent.
    pub fn take(
        &self,
        mailbox: &MailboxKey,
        uidvalidity: u32,
        messages: impl IntoIterator<Item = (Uid, Guid)>,
    ) -> Vec<Uid> {
        let Ok(mut marks) = self.marks.lock() else { return Vec::new() };
        let mark = marks.entry(mailbox.clone()).or_insert((uidvalidity, 0));
        if mark.0 != uidvalidity {
            *mark = (uidvalidity, 0);
        }
        let above = mark.1;
        let mut taken = Vec::new();
        for (uid, guid) in messages.into_iter().filter(|(u, _)| *u > above) {
            mark.1 = mark.1.max(uid);
            if self.ours(guid) {
                taken.push(uid);
            }
        }
        taken
    }

    /// The UIDs among `messages` that a read-only look (EXAMINE, STATUS) shows as recent,
    /// taking none.
    pub fn shown(
        &self,
        mailbox: &MailboxKey,
        uidvalidity: u32,
        messages: impl IntoIterator<Item = (Uid, Guid)>,
    ) -> Vec<Uid> {
        let mark = self.mark(mailbox, uidvalidity);
        messages.into_iter().filter(|(u, g)| *u > mark && self.ours(*g)).map(|(u, _)| u).collect()
    }

    /// The highest UID no longer recent for anyone else: every UID above it is recent to
    /// the next session that takes it.
    fn mark(&self, mailbox: &MailboxKey, uidvalidity: u32) -> Uid {
        let Ok(marks) = self.marks.lock() else { return Uid::MAX };
        match marks.get(mailbox) {
            Some((validity, mark)) if *validity == uidvalidity => *mark,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_guids(uids: &[Uid]) -> Vec<(Uid, Guid)> {
        uids.iter().map(|u| (*u, Guid(u128::from(*u) * 7))).collect()
    }

    #[test]
    fn a_uid_is_recent_in_one_session_only() {
        let marks = RecentMarks::default();
        let inbox = MailboxKey::new("u", "INBOX");
        assert_eq!(marks.mark(&inbox, 7), 0);
        assert_eq!(marks.shown(&inbox, 7, with_guids(&[1, 2])), vec![1, 2]);
        assert_eq!(marks.take(&inbox, 7, with_guids(&[1, 2, 3])), vec![1, 2, 3]);
        assert_eq!(marks.take(&inbox, 7, with_guids(&[1, 2, 3])), Vec::<Uid>::new());
        assert_eq!(marks.take(&inbox, 7, with_guids(&[2, 3, 4])), vec![4]);
        assert_eq!(marks.mark(&inbox, 7), 4);
        // A new UIDVALIDITY starts over.
        assert_eq!(marks.mark(&inbox, 8), 0);
        assert_eq!(marks.take(&inbox, 8, with_guids(&[1])), vec![1]);
    }

    #[test]
    fn in_a_cluster_each_message_is_recent_on_exactly_one_server() {
        let servers = [3u32, 1, 2];
        let nodes: Vec<RecentMarks> = servers.iter().map(|me| RecentMarks::for_cluster(*me, servers)).collect();
        let inbox = MailboxKey::new("u", "INBOX");
        // Taken in on servers 1, 2 and 3 in turn.
        let messages: Vec<(Uid, Guid)> = (1..=30)
            .map(|u| (u, Guid((0x9e37_79b9_7f4a_7c15 * u128::from(u)) << 16 | u128::from(u % 3 + 1))))
            .collect();
        let mut recent_somewhere = Vec::new();
        for node in &nodes {
            let taken = node.take(&inbox, 1, messages.clone());
            assert!(!taken.is_empty() && taken.len() < messages.len(), "a share of the mail on each server");
            recent_somewhere.extend(taken);
            assert!(node.take(&inbox, 1, messages.clone()).is_empty(), "taken once on a server");
        }
        recent_somewhere.sort_unstable();
        assert_eq!(recent_somewhere, (1..=30).collect::<Vec<Uid>>(), "every message on exactly one server");
        assert!(RecentMarks::for_cluster(5, []).ours(Guid(1)), "a server alone owns everything");
    }
}
