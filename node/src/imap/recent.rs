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

use std::collections::HashMap;
use std::sync::Mutex;
use tandem_core::types::{MailboxKey, Uid};

/// The highest UID handed out as recent in each mailbox, with the UIDVALIDITY it counts in.
#[derive(Default)]
pub struct RecentMarks {
    /// One entry per mailbox any session selected since the node started: bounded by the
    /// mailboxes that exist (users x `mailboxes_per_user_max`).
    marks: Mutex<HashMap<MailboxKey, (u32, Uid)>>,
}

impl RecentMarks {
    /// The UIDs among `uids` that are recent for the calling session, which takes them:
    /// no other session will see them as recent.
    pub fn take(&self, mailbox: &MailboxKey, uidvalidity: u32, uids: impl IntoIterator<Item = Uid>) -> Vec<Uid> {
        let Ok(mut marks) = self.marks.lock() else { return Vec::new() };
        let mark = marks.entry(mailbox.clone()).or_insert((uidvalidity, 0));
        if mark.0 != uidvalidity {
            *mark = (uidvalidity, 0);
        }
        let above = mark.1;
        let taken: Vec<Uid> = uids.into_iter().filter(|u| *u > above).collect();
        if let Some(highest) = taken.iter().max() {
            mark.1 = *highest;
        }
        taken
    }

    /// The highest UID no longer recent for anyone else: every UID above it is recent to
    /// the next session that takes it.
    pub fn mark(&self, mailbox: &MailboxKey, uidvalidity: u32) -> Uid {
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

    #[test]
    fn a_uid_is_recent_in_one_session_only() {
        let marks = RecentMarks::default();
        let inbox = MailboxKey::new("u", "INBOX");
        assert_eq!(marks.mark(&inbox, 7), 0);
        assert_eq!(marks.take(&inbox, 7, [1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(marks.take(&inbox, 7, [1, 2, 3]), Vec::<Uid>::new());
        assert_eq!(marks.take(&inbox, 7, [2, 3, 4]), vec![4]);
        assert_eq!(marks.mark(&inbox, 7), 4);
        // A new UIDVALIDITY starts over.
        assert_eq!(marks.mark(&inbox, 8), 0);
        assert_eq!(marks.take(&inbox, 8, [1]), vec![1]);
    }
}
