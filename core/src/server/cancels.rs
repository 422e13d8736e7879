//! A save whose client was told "not stored" is cancelled at its master.
//!
//! A client's SAVE that times out at the server that took it is answered with a
//! temporary failure, and an MTA retries it. Without more, the master may have stored it
//! all the same (its answer, or in sync mode the copies' acknowledgements, came too
//! late), and the retry is a second copy where the retry cannot find the first (during a
//! partition). So the server that gave up sends the master a CANCEL, which travels like
//! any write; the master expunges the message if it ordered it and nobody since was told
//! it is stored.
//!
//! "Nobody was told" is decided at the master from what it remembers ([`OrderedSaves`],
//! in memory, bounded): the saves it ordered and the messages it answered a retry with
//! (a "claim": that retry's client was told OK, so the message is kept). A save this
//! master ordered is cancellable until it is claimed. A save another master ordered
//! (mastership moved meanwhile) is cancellable when the server that sends the cancel
//! ordered it itself and saw no claim of it, and this master saw none either: claims are
//! made only by a mailbox's master, so between them the two saw every claim, unless
//! mastership moved twice within the horizon. Otherwise the message is kept: a cancel
//! never removes a message someone may have been told is stored, and a delivery stored
//! twice is the lesser harm.
//!
//! A master whose memory of claims is incomplete (it started, or dropped a claim for the
//! bound, less than a horizon ago) accepts no cancel on another server's word: every
//! save cancelled after that was claimed, if at all, after the memory was complete.

use super::Server;
use crate::marks::Mark;
use crate::msg::WriteRequest;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Saves remembered at most; beyond it new ones are not cancellable.
const ORDERED_SAVES_MAX: usize = 65_536;
/// How long a save stays cancellable at its master, in request timeouts: its cancel is
/// sent one request timeout after the save at the latest and keeps trying for
/// [`CANCEL_TRIES_TIMEOUTS`] more (a short partition), travelling the same way.
const CANCEL_HORIZON_TIMEOUTS: u64 = 5;
const CANCEL_TRIES_TIMEOUTS: u64 = 3;

/// Saves this server ordered as master and messages it answered a retry with, for
/// deciding cancels.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct OrderedSaves {
    saves: BTreeMap<Guid, OrderedSave>,
    /// Since when every claim made here is remembered (None until the first maintenance
    /// pass after a start; reset when a claim is dropped for the bound).
    claims_complete_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct OrderedSave {
    at: Instant,
    /// Ordered here as master (else only claimed here).
    ordered: bool,
    /// A retry was answered with this message: its client was told it is stored.
    claimed: bool,
}

impl OrderedSaves {
    /// A save ordered here (a resent one keeps what is known of it).
    pub(crate) fn ordered(&mut self, guid: Guid, now: Instant) {
        if let Some(s) = self.saves.get_mut(&guid) {
            s.ordered = true;
        } else if self.saves.len() < ORDERED_SAVES_MAX {
            self.saves.insert(guid, OrderedSave { at: now, ordered: true, claimed: false });
        }
    }
    /// A retry was answered with this message, ordered here or not.
    pub(crate) fn claimed(&mut self, guid: Guid, now: Instant) {
        if let Some(s) = self.saves.get_mut(&guid) {
            s.claimed = true;
            s.at = s.at.max(now);
        } else if self.saves.len() < ORDERED_SAVES_MAX {
            self.saves.insert(guid, OrderedSave { at: now, ordered: false, claimed: true });
        } else {
            self.claims_complete_since = None;
        }
    }
    /// Whether this server ordered the save and answered no retry with it: what a
    /// cancel it sends vouches for.
    pub(crate) fn ordered_unclaimed(&self, guid: Guid) -> bool {
        self.saves.get(&guid).is_some_and(|s| s.ordered && !s.claimed)
    }
    /// Whether the save may be cancelled now, `sender_ordered` being the cancel's sender's
    /// word that it ordered the save and answered no retry with it; it is forgotten
    /// either way.
    pub(crate) fn take_cancellable(&mut self, guid: Guid, sender_ordered: bool, now: Instant, horizon_us: u64) -> bool {
        let complete = self.claims_complete_since.is_some_and(|t| now.0.saturating_sub(t.0) >= horizon_us);
        match self.saves.remove(&guid) {
            Some(s) => !s.claimed && (s.ordered || (sender_ordered && complete)),
            None => sender_ordered && complete,
        }
    }
    fn forget_before(&mut self, cutoff: Instant, now: Instant) {
        self.saves.retain(|_, s| s.at >= cutoff);
        if self.saves.len() < ORDERED_SAVES_MAX {
            self.claims_complete_since.get_or_insert(now);
        }
    }
}

impl Server {
    /// A client's SAVE timed out here: the master is asked to cancel it.
    pub(crate) fn cancel_save(&mut self, request: &WriteRequest) {
        if let WriteRequest::Save { mailbox, guid, .. } = request {
            self.marks.hit(Mark::SaveCancelSent);
            let sender_ordered = self.ordered_saves.ordered_unclaimed(*guid);
            let cancel = WriteRequest::Cancel { mailbox: mailbox.clone(), guid: *guid, sender_ordered };
            let within_us = self.cfg.request_timeout_us.saturating_mul(CANCEL_TRIES_TIMEOUTS);
            self.submit_write_within(super::Origin::Internal, cancel, within_us);
        }
    }

    /// Saves older than the horizon are no longer cancellable (maintenance).
    pub(crate) fn forget_old_saves(&mut self) {
        let cutoff = Instant(self.now.0.saturating_sub(self.cancel_horizon_us()));
        self.ordered_saves.forget_before(cutoff, self.now);
    }

    /// How long a save stays cancellable, and a claim remembered.
    pub(crate) fn cancel_horizon_us(&self) -> u64 {
        self.cfg.request_timeout_us.saturating_mul(CANCEL_HORIZON_TIMEOUTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_or_forgotten_save_is_not_cancellable() {
        let mut s = OrderedSaves::default();
        let (now, horizon) = (Instant(100), 10);
        s.ordered(Guid(1), Instant(10));
        s.ordered(Guid(2), Instant(10));
        s.ordered(Guid(3), Instant(100));
        s.claimed(Guid(2), Instant(10));
        s.ordered(Guid(2), Instant(20));
        s.forget_before(Instant(50), Instant(50));
        assert!(!s.take_cancellable(Guid(1), false, now, horizon), "forgotten");
        assert!(!s.take_cancellable(Guid(2), false, now, horizon), "claimed by a retry");
        assert!(s.take_cancellable(Guid(3), false, now, horizon));
        assert!(!s.take_cancellable(Guid(3), false, now, horizon), "cancelled once");
    }

    #[test]
    fn another_servers_save_is_cancellable_on_its_word_when_no_claim_was_missed() {
        let mut s = OrderedSaves::default();
        let horizon = 10;
        assert!(!s.take_cancellable(Guid(1), true, Instant(5), horizon), "claims not yet remembered");
        s.forget_before(Instant(0), Instant(5));
        assert!(!s.take_cancellable(Guid(1), true, Instant(14), horizon), "claims remembered for less than a horizon");
        assert!(s.take_cancellable(Guid(1), true, Instant(15), horizon), "the sender ordered it, nobody claimed it");
        assert!(!s.take_cancellable(Guid(2), false, Instant(15), horizon), "nobody vouches for it");
        s.claimed(Guid(3), Instant(15));
        assert!(!s.ordered_unclaimed(Guid(3)));
        assert!(!s.take_cancellable(Guid(3), true, Instant(16), horizon), "claimed here");
        s.ordered(Guid(4), Instant(16));
        assert!(s.ordered_unclaimed(Guid(4)));
    }

    #[test]
    fn a_claim_dropped_for_the_bound_makes_the_memory_incomplete() {
        let mut s = OrderedSaves::default();
        s.forget_before(Instant(0), Instant(0));
        for g in 0..ORDERED_SAVES_MAX as u128 {
            s.ordered(Guid(g + 100), Instant(1));
        }
        s.claimed(Guid(1), Instant(2));
        assert!(!s.take_cancellable(Guid(1), true, Instant(1_000), 10), "the claim may have been dropped");
    }
}
