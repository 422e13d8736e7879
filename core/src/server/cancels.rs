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
//! "Nobody was told" is decided by the master that ordered the save, from what it
//! remembers ([`OrderedSaves`], in memory, bounded): a save it ordered is cancellable
//! until a retry is answered with it (the retry's client was told OK: then it is kept).
//! A master that did not order it (mastership moved meanwhile), or forgot it (older than
//! the horizon, or beyond the bound), keeps it: a cancel never removes a message someone
//! may have been told is stored.

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

/// Saves this server ordered as master, for deciding cancels.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct OrderedSaves {
    saves: BTreeMap<Guid, OrderedSave>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct OrderedSave {
    at: Instant,
    /// A retry was answered with this message: its client was told it is stored.
    claimed: bool,
}

impl OrderedSaves {
    /// A save ordered here (a resent one keeps what is known of it).
    pub(crate) fn ordered(&mut self, guid: Guid, now: Instant) {
        if self.saves.len() < ORDERED_SAVES_MAX {
            self.saves.entry(guid).or_insert(OrderedSave { at: now, claimed: false });
        }
    }
    /// A retry was answered with this message.
    pub(crate) fn claimed(&mut self, guid: Guid) {
        if let Some(s) = self.saves.get_mut(&guid) {
            s.claimed = true;
        }
    }
    /// Whether the save may be cancelled now; it is forgotten either way.
    pub(crate) fn take_cancellable(&mut self, guid: Guid) -> bool {
        self.saves.remove(&guid).is_some_and(|s| !s.claimed)
    }
    fn forget_before(&mut self, cutoff: Instant) {
        self.saves.retain(|_, s| s.at >= cutoff);
    }
}

impl Server {
    /// A client's SAVE timed out here: the master is asked to cancel it.
    pub(crate) fn cancel_save(&mut self, request: &WriteRequest) {
        if let WriteRequest::Save { mailbox, guid, .. } = request {
            self.marks.hit(Mark::SaveCancelSent);
            let cancel = WriteRequest::Cancel { mailbox: mailbox.clone(), guid: *guid };
            let within_us = self.cfg.request_timeout_us.saturating_mul(CANCEL_TRIES_TIMEOUTS);
            self.submit_write_within(super::Origin::Internal, cancel, within_us);
        }
    }

    /// Saves older than the horizon are no longer cancellable (maintenance).
    pub(crate) fn forget_old_saves(&mut self) {
        let horizon = self.cfg.request_timeout_us.saturating_mul(CANCEL_HORIZON_TIMEOUTS);
        let cutoff = Instant(self.now.0.saturating_sub(horizon));
        self.ordered_saves.forget_before(cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_or_forgotten_save_is_not_cancellable() {
        let mut s = OrderedSaves::default();
        s.ordered(Guid(1), Instant(10));
        s.ordered(Guid(2), Instant(10));
        s.ordered(Guid(3), Instant(100));
        s.claimed(Guid(2));
        s.ordered(Guid(2), Instant(20));
        s.forget_before(Instant(50));
        assert!(!s.take_cancellable(Guid(1)), "forgotten");
        assert!(!s.take_cancellable(Guid(2)), "claimed by a retry");
        assert!(s.take_cancellable(Guid(3)));
        assert!(!s.take_cancellable(Guid(3)), "cancelled once");
    }
}
