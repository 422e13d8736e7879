//! Reads that must show every change the mailbox's master had ordered when they were
//! asked (read-your-writes across servers; `ClientRequest::FreshRead`). The server asks
//! the master for its position (a `BARRIER` request, routed like a write: the master
//! answers with the mailbox's HIGHESTMODSEQ as it stands, after every change it ordered
//! before), then waits here until its own durable copy of the mailbox has reached that
//! position, and answers from it. A read that cannot get there in time (no master
//! reachable, a copy that does not catch up) is answered from what the server has: a
//! read is not refused for want of a master, it may only be stale then; unless what the
//! server has is a copy still being filled, a state the mailbox never had (see
//! `filling`).

use crate::io::{RequestId, WriteId};
use crate::types::{Instant, MailboxKey, ModSeq};
use serde::{Deserialize, Serialize};

/// What a fresh read is answered with: the mailbox's messages, or only its counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wanted {
    View,
    Status,
}

/// Where the master stood on a mailbox: its HIGHESTMODSEQ and digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Position {
    pub(crate) highest_modseq: ModSeq,
    pub(crate) digest: u64,
}

/// A read waiting for this server's durable copy to reach its master's position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Waiting {
    id: RequestId,
    mailbox: MailboxKey,
    wanted: Wanted,
    position: Position,
    deadline: Instant,
    /// Once this server's copy (durable or not) equals the master's at the position:
    /// the last write issued then. The read is answered when it is durable, so that the
    /// durable copy holds every write of that point, not a prefix of them.
    upto: Option<WriteId>,
    /// Our summary went to the master once (a copy that differs at the same modseq).
    compared: bool,
}

/// What the server tells [`FreshReads::steps`] about its copies.
pub(crate) struct Copies<'a> {
    /// The HIGHESTMODSEQ and digest of this server's copy of a mailbox, durable or not
    /// ((0, 0) for none).
    pub(crate) summary: &'a dyn Fn(&MailboxKey) -> Position,
    pub(crate) last_write: WriteId,
    pub(crate) is_durable: &'a dyn Fn(WriteId) -> bool,
}

/// What the server does next for a waiting read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Answer from the durable copy: `caught_up` when it holds the master's position.
    Answer { id: RequestId, mailbox: MailboxKey, wanted: Wanted, caught_up: bool },
    /// Our copy went past the position (later changes, or changes of its own), so it
    /// cannot be compared with it: ask the master again, within the same time.
    AskAgain { id: RequestId, mailbox: MailboxKey, wanted: Wanted, deadline: Instant },
    /// Our copy has the master's HIGHESTMODSEQ but not its digest (a change it missed,
    /// say a log that overflowed): send the master our summary, which starts a SYNC.
    Compare { mailbox: MailboxKey },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct FreshReads {
    /// In arrival order; at most one per client request in progress, so bounded by the
    /// driver's requests (and `Config::pending_max` through the jobs that led here).
    waiting: Vec<Waiting>,
}

impl FreshReads {
    pub(crate) fn wait(
        &mut self,
        id: RequestId,
        mailbox: MailboxKey,
        wanted: Wanted,
        position: Position,
        deadline: Instant,
    ) {
        debug_assert!(self.waiting.iter().all(|w| w.id != id), "one wait per request");
        self.waiting.push(Waiting { id, mailbox, wanted, position, deadline, upto: None, compared: false });
    }

    /// The mailboxes reads wait on (their copies' summaries are what `steps` needs).
    pub(crate) fn mailboxes(&self) -> impl Iterator<Item = &MailboxKey> {
        self.waiting.iter().map(|w| &w.mailbox)
    }

    /// What to do now for each waiting read; answered and re-asked reads are removed.
    pub(crate) fn steps(&mut self, now: Instant, copies: &Copies<'_>) -> Vec<Step> {
        let mut steps = Vec::new();
        self.waiting.retain_mut(|w| {
            if w.upto.is_none() {
                let ours = (copies.summary)(&w.mailbox);
                if ours == w.position {
                    w.upto = Some(copies.last_write);
                } else if ours.highest_modseq > w.position.highest_modseq && w.deadline > now {
                    let (mailbox, wanted) = (w.mailbox.clone(), w.wanted);
                    steps.push(Step::AskAgain { id: w.id, mailbox, wanted, deadline: w.deadline });
                    return false;
                } else if ours.highest_modseq == w.position.highest_modseq && !w.compared {
                    w.compared = true;
                    steps.push(Step::Compare { mailbox: w.mailbox.clone() });
                }
            }
            let caught_up = w.upto.is_some_and(|upto| (copies.is_durable)(upto));
            if caught_up || w.deadline <= now {
                steps.push(Step::Answer { id: w.id, mailbox: w.mailbox.clone(), wanted: w.wanted, caught_up });
                return false;
            }
            true
        });
        steps
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.deadline).min()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(highest_modseq: ModSeq, digest: u64) -> Position {
        Position { highest_modseq, digest }
    }

    fn steps(reads: &mut FreshReads, now: u64, ours: Position, last_write: WriteId, durable: WriteId) -> Vec<Step> {
        let summary = move |_: &MailboxKey| ours;
        let is_durable = move |w: WriteId| w <= durable;
        reads.steps(Instant(now), &Copies { summary: &summary, last_write, is_durable: &is_durable })
    }

    #[test]
    fn a_read_is_answered_once_its_copy_equals_the_position_durably() {
        let inbox = MailboxKey::new("u", "INBOX");
        let mut reads = FreshReads::default();
        reads.wait(1, inbox.clone(), Wanted::View, at(7, 70), Instant(100));
        assert!(steps(&mut reads, 10, at(6, 60), 10, 10).is_empty(), "changes still on their way");
        // Equal with write 12, which is not durable yet; then durable.
        assert!(steps(&mut reads, 10, at(7, 70), 12, 11).is_empty());
        let answered = steps(&mut reads, 10, at(8, 80), 13, 12);
        assert_eq!(answered, vec![Step::Answer { id: 1, mailbox: inbox, wanted: Wanted::View, caught_up: true }]);
        assert!(reads.is_empty() && reads.next_deadline().is_none());
    }

    #[test]
    fn a_copy_that_differs_is_compared_once_or_asked_again_and_the_deadline_answers() {
        let inbox = MailboxKey::new("u", "INBOX");
        let mut reads = FreshReads::default();
        reads.wait(1, inbox.clone(), Wanted::View, at(7, 70), Instant(100));
        reads.wait(2, inbox.clone(), Wanted::Status, at(5, 50), Instant(100));
        // Same modseq, another digest: compared (once); the other read's copy is past it.
        let first = steps(&mut reads, 10, at(7, 71), 10, 10);
        assert_eq!(
            first,
            vec![
                Step::Compare { mailbox: inbox.clone() },
                Step::AskAgain { id: 2, mailbox: inbox.clone(), wanted: Wanted::Status, deadline: Instant(100) }
            ]
        );
        assert!(steps(&mut reads, 20, at(7, 71), 10, 10).is_empty());
        assert_eq!(reads.next_deadline(), Some(Instant(100)));
        let late = steps(&mut reads, 100, at(7, 71), 10, 10);
        assert_eq!(late, vec![Step::Answer { id: 1, mailbox: inbox, wanted: Wanted::View, caught_up: false }]);
    }
}
