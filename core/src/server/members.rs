//! Membership changes on a running cluster (see `crate::membership` for the lattice).
//!
//! An operator's change is made at any server and floods hop by hop, like link state:
//! each server joins what it hears, stores it, and passes it on only if it learned
//! something, so the flood ends. What each state means here:
//!
//! - A member **added** is routed to as soon as a link to it is up; the root sees the
//!   component grow and opens a term, and the new server's copies are filled by
//!   anti-entropy and SYNC like those of a server back from an outage.
//! - A member **leaving** is no longer made root or master. A root that hears of it
//!   opens a new term, so every mastership is dropped and given again to active servers
//!   (whose catch-ups include the leaving server's copies). Every master checks its
//!   copies with it at once. It retires itself once it masters nothing, its logs are
//!   empty, each mailbox it holds (also one that came after it began to leave) has been
//!   shown equal by an active server since it began to leave, and no peer has fetched a body from it for a while with every member in
//!   reach.
//! - A member **retired** is dropped: its logs, its link, every wait for it. A retired
//!   server refuses writes and never opens a term.

use super::Server;
use crate::io::*;
use crate::marks::Mark;
use crate::membership::{MemberChange, MemberState, Membership};
use crate::msg::*;
use crate::store::StoreWrite;
use crate::types::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A leaving server's progress towards retiring itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Leaving {
    /// Mailboxes an active server has shown equal to ours since leaving began. Every
    /// mailbox held must be among them to retire, also one that came after leaving began
    /// (explore seed 581473: a save through us while leaving, whose master then lost its
    /// disk, made a mailbox nobody had confirmed).
    confirmed: BTreeSet<MailboxKey>,
    /// The last time a peer fetched a body from us, or some member was out of reach: a
    /// master that merged our copy, or that was cut off from us, may still need bodies
    /// only we hold (explore seed 448759: a master whose copy was damaged while it was
    /// cut off asked for it just after the heal, and we had retired).
    quiet_since: Instant,
}

/// How long a leaving server must serve no body before it retires: a few maintenance
/// passes, in which any master that still wants a body of ours asks for it.
const LEAVING_QUIET_PASSES: u64 = 3;

impl Leaving {
    pub(crate) fn new(now: Instant) -> Leaving {
        Leaving { confirmed: BTreeSet::new(), quiet_since: now }
    }
}

impl Server {
    /// The membership as this server knows it.
    pub fn members(&self) -> &Membership {
        &self.members
    }

    /// Active and leaving servers other than us.
    pub(crate) fn peers(&self) -> Vec<Sid> {
        self.member_servers.iter().copied().filter(|s| *s != self.cfg.sid).collect()
    }

    /// Whether `sid` is routed to and replicated with.
    pub(crate) fn is_member(&self, sid: Sid) -> bool {
        self.members.is_member(sid)
    }

    pub(crate) fn retired(&self) -> bool {
        self.members.state(self.cfg.sid) == Some(MemberState::Retired)
    }

    /// An operator's change, made here and flooded to every server.
    pub(crate) fn on_member_change(&mut self, id: RequestId, change: MemberChange) {
        if self.retired() {
            let reason = "this server is retired from the cluster".to_string();
            self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason });
            return;
        }
        match self.members.changed(&change) {
            Ok(next) => {
                self.note(|| format!("membership change {change:?}"));
                self.learn_members(&next);
                self.out.reply_when_durable(id, ClientReply::Members { members: self.members.clone() });
            }
            Err(e) => {
                self.out.reply(id, ClientReply::Failed { kind: FailKind::Permanent, reason: e.to_string() });
            }
        }
    }

    /// A neighbour's membership.
    /// A neighbour's membership. What it lacks of ours reaches it with the flood of
    /// what we learn (it goes to every link, the sender's too), or at its next link-up.
    pub(crate) fn on_members(&mut self, members: &Membership) {
        self.learn_members(members);
    }

    /// Tells a neighbour (member or not) our membership.
    pub(crate) fn send_members(&mut self, to: Sid) {
        let msg = Msg::Members { members: self.members.clone(), store: self.image.disk().store_id };
        let envelope = Envelope { src: self.cfg.sid, dst: to, hops: 0, msg };
        self.out.send(to, envelope);
    }

    /// Joins `members` into ours; on news, stores it, floods it and acts on it. True when
    /// anything changed.
    pub(crate) fn learn_members(&mut self, members: &Membership) -> bool {
        let before = self.members.clone();
        if !self.members.join(members) {
            return false;
        }
        self.commit(StoreWrite::Members { members: self.members.clone() });
        for peer in self.routing.all_links() {
            self.send_members(peer);
        }
        self.membership_changed(&before);
        true
    }

    fn membership_changed(&mut self, before: &Membership) {
        let me = self.cfg.sid;
        self.member_servers = self.routing_servers();
        let added: Vec<Sid> = self.members.servers().into_iter().filter(|s| !before.is_member(*s)).collect();
        let leaving = self.members.newly(before, MemberState::Leaving);
        let retired = self.members.newly(before, MemberState::Retired);
        for _ in &added {
            self.marks.hit(Mark::MemberAdded);
        }
        for &sid in &leaving {
            self.marks.hit(Mark::MemberLeaving);
            // Every master checks its copies with the leaving server at once.
            self.anti_entropy.recheck_peer(sid);
            self.anti_entropy.kick();
        }
        for &sid in &retired {
            self.marks.hit(Mark::MemberRetired);
            if sid != me {
                let dropped = self.image.drop_log(&mut self.out, sid);
                self.log_progress.dropped(sid, &dropped);
                self.anti_entropy.recheck_peer(sid);
            }
        }
        if leaving.contains(&me) && self.leaving.is_none() {
            self.note(|| "leaves the cluster".to_string());
            self.start_leaving();
        }
        if retired.contains(&me) {
            self.note(|| "is retired from the cluster".to_string());
            self.leaving = None;
            self.drop_masterships();
        }
        let links_changed = self.routing.set_servers(&self.member_servers);
        if links_changed {
            self.schedule_announcement();
        }
        for &sid in &added {
            if self.routing.has_link(sid) {
                // As for a link that just came up: the new member learns the routes.
                self.send_announcements(sid);
                self.log_progress.resend_all(sid);
            }
        }
        self.recompute_routes();
        // A term whose members include a server now leaving is replaced, so that its
        // masterships move to active servers.
        if self.is_root() && leaving.iter().any(|s| *s != me && self.routing.is_reachable(*s)) {
            self.note(|| format!("opens a new term: {leaving:?} leaving"));
            self.open_term();
        }
        self.check_root();
    }

    /// Every mailbox held waits for an active server to show it equal (also after a
    /// restart while leaving: confirmations are not stored).
    pub(crate) fn start_leaving(&mut self) {
        self.leaving = Some(Leaving::new(self.now));
    }

    /// The servers routes may use: members, and ourselves even when retired (a retired
    /// server then reaches no one).
    pub(crate) fn routing_servers(&self) -> Vec<Sid> {
        let me = self.cfg.sid;
        if self.retired() {
            return vec![me];
        }
        let mut servers = self.members.servers();
        if !servers.contains(&me) {
            servers.push(me);
            servers.sort_unstable();
        }
        servers
    }

    /// Whether `sid` may be root or master: active and reachable.
    pub(crate) fn eligible(&self, sid: Sid) -> bool {
        self.members.is_active(sid) && self.routing.is_reachable(sid)
    }

    /// A leaving server saw an active server's copy of `mailbox` equal to its own.
    pub(crate) fn leaving_confirmed(&mut self, from: Sid, mailbox: &MailboxKey) {
        if !self.members.is_active(from) {
            return;
        }
        if let Some(l) = self.leaving.as_mut() {
            l.confirmed.insert(mailbox.clone());
        }
    }

    /// A peer fetched a body from us.
    pub(crate) fn leaving_served_body(&mut self) {
        let now = self.now;
        if let Some(l) = self.leaving.as_mut() {
            l.quiet_since = now;
        }
    }

    /// A leaving server retires itself once nothing of it is needed (see the module
    /// comment). Checked at every maintenance pass.
    pub(crate) fn finish_leaving(&mut self) {
        let all_reachable = self.member_servers.iter().all(|s| self.routing.is_reachable(*s));
        let now = self.now;
        let Some(l) = self.leaving.as_mut() else { return };
        if !all_reachable {
            // The quiet passes count only with every member able to ask us.
            l.quiet_since = now;
            return;
        }
        let quiet = now.0.saturating_sub(l.quiet_since.0) >= self.cfg.anti_entropy_us * LEAVING_QUIET_PASSES;
        let root = self.root_role.root();
        let done = quiet
            && self.image.mailboxes().keys().all(|k| l.confirmed.contains(k))
            && root.is_some_and(|r| r != self.cfg.sid && self.members.is_active(r))
            && self.masters.ready_keys().is_empty()
            && !self.masters.has_catchups()
            && self.image.logs_drained()
            // A leaving server that is the only relay between others (now, or once a
            // partition heals) stays, leaving and a relay only, until their links no
            // longer need it.
            && self.routing.others_connected_without_me();
        if !done {
            return;
        }
        let me = self.cfg.sid;
        let mut next = self.members.clone();
        next.join_member(me, &crate::membership::Member { state: MemberState::Retired, address: String::new() });
        self.note(|| "has handed everything over and retires".to_string());
        self.learn_members(&next);
    }
}
