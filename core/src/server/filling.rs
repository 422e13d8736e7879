//! A store made after its cluster had run (a new server, or one started on an empty disk
//! after losing its own) is filled by its peers mailbox by mailbox, through anti-entropy
//! and SYNC, while it already serves. A copy filled part of the way is a state its
//! mailbox never had: fewer messages under the cluster's UIDVALIDITY (the name's, see
//! `MailboxKey::initial_uidvalidity`) and a lower UIDNEXT, which a client with cached mail
//! takes for expunges. So such a store (a newcomer, `DiskImage::newcomer`) answers a read
//! that cannot reach its master's position only from a copy a master has confirmed
//! (`DiskImage::confirmed`), and refuses it otherwise (a temporary failure: the client
//! tries again, or another server). A store that is not filled yet, while no other
//! server is in reach, opens no root term, gives out no mastership as a root from before
//! and finishes no catch-up of a mastership: alone, it would master mailboxes from its
//! empty or partly filled disk and give out UIDs the cluster had given already.
//!
//! A store put back from a backup is one too (`DiskImage::backup_copy`): its copies
//! were a state each mailbox had, but maybe days ago.
//!
//! A store learns it is a newcomer from the first epoch a peer tells it in an incarnation
//! (a link state, a term): it was never in a root term (epoch 0) and the cluster had been
//! (a link state's origin may be this server before it lost its disk: a peer relays that
//! back first). The
//! servers of a new cluster hear each other before any of them opens the first term (the
//! start-up hold waits for every configured server), so they are not newcomers; one
//! started after the others had opened it is, rightly: it may have missed mail.

use super::Server;
use crate::marks::Mark;
use crate::store::StoreWrite;
use crate::types::{MailboxKey, MasterKey, Sid};

impl Server {
    /// An epoch a peer's message carries (a link state's, with the highest epoch its
    /// origin knew, or a term's): the first one heard in this incarnation tells a store
    /// that was never in a term whether its cluster had run (a link state's origin may
    /// be this server before it lost its disk).
    pub(crate) fn heard_peer_epoch(&mut self, from: Sid, peer_epoch: u64) {
        if self.peer_heard || from == self.cfg.sid {
            return;
        }
        self.peer_heard = true;
        let disk = self.image.disk();
        if disk.epoch == 0 && peer_epoch > 0 && !disk.newcomer {
            debug_assert!(disk.confirmed.is_empty(), "only a newcomer's copies are confirmed");
            self.commit(StoreWrite::Newcomer);
            self.marks.hit(Mark::NewcomerStore);
            self.note(|| format!("a newcomer: a peer had been in root term {peer_epoch}, this store never"));
            debug_assert!(self.image.disk().newcomer, "the store says it is a newcomer");
        }
    }

    /// A store that was in a root term, has no identity and is a newcomer is a copy put
    /// back in place (`DiskImage::backup_copy`, what `tandem backup` writes): its copies
    /// are a state each mailbox had, but maybe long ago, and cut off alone it would
    /// master mailboxes from them and answer reads with mail expunged since, where the
    /// rest of the cluster retired those UIDs (the late-restore focus, seed 3345). As a
    /// newcomer it refuses reads no master's position can check and opens no root term
    /// alone until every copy it holds is confirmed, as a store filled from empty does.
    /// Marked at its first start (a store of a release before store identities has none
    /// either, but is no newcomer, and stays as it was).
    pub(super) fn note_restored_store(&mut self) {
        let disk = self.image.disk();
        if disk.store_id != 0 || disk.epoch == 0 || !disk.newcomer {
            return;
        }
        self.marks.hit(Mark::RestoredStoreRefills);
        let unconfirmed = disk.mailboxes.len().saturating_sub(disk.confirmed.len());
        self.note(|| format!("a store put back from a backup: a newcomer, {unconfirmed} copies to confirm"));
    }

    /// Whether a read that could not reach its master's position may be answered from
    /// this server's copy of `mailbox`: not while the store was never in a term (nothing
    /// it holds was ever checked against a master), nor from a newcomer's copy no master
    /// has confirmed. A server alone in its cluster is every mailbox's master.
    pub(crate) fn copy_trusted(&self, mailbox: &MailboxKey) -> bool {
        if self.member_servers.len() <= 1 || self.has_bug(crate::Bug::TrustsUnfilledStore) {
            return true;
        }
        let disk = self.image.disk();
        disk.epoch > 0 && (!disk.newcomer || disk.confirmed.contains(mailbox))
    }

    /// This server's copy of `mailbox` is the same as its master's (the master's check
    /// found it so, a fresh read caught up with another server's position, or a catch-up
    /// here heard every peer): a newcomer trusts it from now on, across restarts.
    /// Only a copy held here counts: a fresh read of a name nobody has catches up too, and
    /// a client could fill the set with names otherwise.
    pub(crate) fn copy_confirmed(&mut self, mailbox: &MailboxKey) {
        let disk = self.image.disk();
        if !disk.newcomer || disk.confirmed.contains(mailbox) || !disk.mailboxes.contains_key(mailbox) {
            return;
        }
        self.commit(StoreWrite::Confirmed { mailbox: mailbox.clone() });
        self.marks.hit(Mark::NewcomerCopyConfirmed);
        let disk = self.image.disk();
        debug_assert!(disk.confirmed.len() <= disk.mailboxes.len(), "confirmed copies are copies held here");
        debug_assert!(self.copy_trusted(mailbox) || disk.epoch == 0, "a confirmed copy is trusted");
    }

    /// A catch-up of `key`'s mastership here heard every peer it asked and merged their
    /// copies: ours of the key's mailboxes are confirmed (as a master, nobody checks them).
    pub(crate) fn copies_caught_up(&mut self, key: &MasterKey) {
        if !self.image.disk().newcomer || self.alone_unfilled() {
            return;
        }
        let granularity = self.cfg.granularity;
        let mailboxes: Vec<MailboxKey> =
            self.image.disk().mailboxes.keys().filter(|m| MasterKey::of(m, granularity) == *key).cloned().collect();
        for mailbox in &mailboxes {
            self.copy_confirmed(mailbox);
        }
    }

    /// Whether this server, with no other server of its cluster in reach, holds a store
    /// not filled yet: it then opens no root term, and as a root from before gives out
    /// no mastership (it would master from its empty or partly filled disk).
    pub(crate) fn alone_unfilled(&self) -> bool {
        self.member_servers.len() > 1 && self.routing.reachable().len() <= 1 && self.store_unfilled()
    }

    /// Whether this store is filled: neither never in a term nor a newcomer with a copy
    /// no master confirmed (see `store_unfilled`). What an operator waits for before
    /// sending clients to a new server.
    pub fn store_filled(&self) -> bool {
        !self.store_unfilled()
    }

    /// Whether this store is not filled yet: never in a term, or a newcomer with no copy
    /// confirmed yet (one that has heard of no mailbox is not filled either) or holding a
    /// copy no master has confirmed (counted, not listed: a mailbox confirmed and then
    /// deleted stays in both).
    fn store_unfilled(&self) -> bool {
        // A server alone in its cluster is every mailbox's master (a backup put back
        // there has nobody to fill it either).
        if self.has_bug(crate::Bug::TrustsUnfilledStore) || self.member_servers.len() <= 1 {
            return false;
        }
        let disk = self.image.disk();
        disk.epoch == 0 || self.unconfirmed_copies().is_some_and(|n| n > 0 || disk.confirmed.is_empty())
    }

    /// A newcomer's copies no master has confirmed yet (None for any other store):
    /// confirmed copies are copies held here, so a count, not a walk.
    pub fn unconfirmed_copies(&self) -> Option<usize> {
        let disk = self.image.disk();
        disk.newcomer.then(|| disk.mailboxes.len().saturating_sub(disk.confirmed.len()))
    }
}

#[cfg(test)]
mod tests {
    use crate::io::Config;
    use crate::marks::Mark;
    use crate::store::{DiskImage, MemoryBodies, StoredMailbox};
    use crate::types::{MailboxKey, Sid};

    /// A store that has been in root term 4, a newcomer once, with its INBOX confirmed.
    fn a_store() -> DiskImage {
        let inbox = MailboxKey::new("u@d", "INBOX");
        let mut disk = DiskImage { epoch: 4, store_id: 9, newcomer: true, ..DiskImage::default() };
        disk.mailboxes.insert(inbox.clone(), StoredMailbox::default());
        disk.confirmed.insert(inbox);
        disk
    }

    fn started(disk: DiskImage, servers: u32) -> super::Server {
        let cfg = Config::new(Sid(1), (1..=servers).map(Sid).collect());
        super::Server::recover(cfg, disk, 1, Box::new(MemoryBodies::default()))
    }

    #[test]
    fn a_store_put_back_from_a_backup_refills_as_a_newcomer() {
        let never_newcomer = DiskImage { newcomer: false, confirmed: Default::default(), ..a_store() };
        for disk in [a_store(), never_newcomer] {
            let restored = started(disk.backup_copy(), 3);
            assert!(restored.image.disk().newcomer && restored.image.disk().confirmed.is_empty());
            assert!(!restored.store_filled());
            assert_eq!(restored.unconfirmed_copies(), Some(1));
            assert!(restored.marks.count(Mark::RestoredStoreRefills) > 0);
            assert_ne!(restored.image.disk().store_id, 0, "it draws a new identity");
            // Alone in its cluster, it has nobody to be filled by.
            assert!(started(disk.backup_copy(), 1).store_filled());
        }
        // A restart keeps what the store had confirmed.
        let restarted = started(a_store(), 3);
        assert_eq!(restarted.image.disk().confirmed.len(), 1);
        assert!(restarted.store_filled());
        assert_eq!(restarted.marks.count(Mark::RestoredStoreRefills), 0);
        // A store of a release before store identities is no backup.
        let old = started(DiskImage { store_id: 0, newcomer: false, ..a_store() }, 3);
        assert!(!old.image.disk().newcomer && old.store_filled());
    }
}
