//! Who is in the cluster. Every server ever added is listed with its state and the
//! address the driver reaches it at. The list is a join-semilattice: a server's state
//! only rises (Active, then Leaving, then Retired), an address joins by maximum, and
//! servers are never removed from the list. Copies changed on both sides of a partition
//! (a server added on one side, another retired on the other) therefore merge to one
//! answer on every server, in any order, however often a change is repeated; an id once
//! retired never comes back (a lost server is replaced under a new id).
//!
//! - **Active**: a full member: may be root, may master mailboxes, counts for tombstone
//!   collection and gets every change.
//! - **Leaving**: still routed to and still replicated with, but never made root or
//!   master, so its masterships move to the others at the next term. Once it masters
//!   nothing, its logs are empty and every copy it holds has been confirmed by the
//!   copy's master, it marks itself Retired (see `Server::finish_leaving`).
//! - **Retired**: gone: no link to it is used, its logs are dropped, nothing waits for it.
//!   A server retired while lost (`MemberChange::Lost`) skips Leaving: what only it held
//!   is lost, as with any server lost for good.

use crate::types::Sid;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Servers a membership lists at most (retired ones included): ids are 16 bits in root
/// epochs, and every server keeps state per member.
pub const MEMBERS_MAX: usize = 4096;
/// Longest address (host:port, opaque to the core).
pub const ADDRESS_LEN_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MemberState {
    Active,
    Leaving,
    Retired,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Leaving => "leaving",
            MemberState::Retired => "retired",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub state: MemberState,
    /// Where the driver reaches the server (empty: its own configuration says).
    pub address: String,
}

/// A change an operator asks for (`tandem member add|remove`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// A new server joins at `address`.
    Add { sid: Sid, address: String },
    /// A server leaves: its masterships move to the others and its copies are confirmed
    /// elsewhere before it retires itself.
    Leave { sid: Sid },
    /// A server lost for good is retired at once.
    Lost { sid: Sid },
}

/// Why a [`MemberChange`] is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberError {
    /// Adding an id that is (or was) a member: ids are never reused.
    Known(Sid, MemberState),
    Unknown(Sid),
    /// The change would leave no active member.
    LastActive(Sid),
    TooMany,
    BadAddress(String),
    BadSid(Sid),
}

impl std::fmt::Display for MemberError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemberError::Known(sid, state) => {
                write!(f, "{sid} is already a member ({}); a retired id is never reused", state.name())
            }
            MemberError::Unknown(sid) => write!(f, "{sid} is not a member"),
            MemberError::LastActive(sid) => write!(f, "{sid} is the last active member"),
            MemberError::TooMany => write!(f, "a cluster lists at most {MEMBERS_MAX} servers"),
            MemberError::BadAddress(why) => write!(f, "bad address: {why}"),
            MemberError::BadSid(sid) => write!(f, "{sid} is not a valid server id (1..65535)"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    members: BTreeMap<Sid, Member>,
}

impl Membership {
    /// The configured servers, all active, addresses left to the configuration.
    pub fn seed(servers: &[Sid]) -> Membership {
        let members =
            servers.iter().map(|s| (*s, Member { state: MemberState::Active, address: String::new() })).collect();
        Membership { members }
    }

    pub fn from_entries(entries: impl IntoIterator<Item = (Sid, Member)>) -> Membership {
        let mut m = Membership::default();
        for (sid, member) in entries {
            m.join_member(sid, &member);
        }
        m
    }

    pub fn entries(&self) -> impl Iterator<Item = (Sid, &Member)> {
        self.members.iter().map(|(s, m)| (*s, m))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn get(&self, sid: Sid) -> Option<&Member> {
        self.members.get(&sid)
    }

    pub fn state(&self, sid: Sid) -> Option<MemberState> {
        self.members.get(&sid).map(|m| m.state)
    }

    /// Active or leaving: routed to and replicated with.
    pub fn is_member(&self, sid: Sid) -> bool {
        self.state(sid).is_some_and(|s| s != MemberState::Retired)
    }

    /// May be root and master.
    pub fn is_active(&self, sid: Sid) -> bool {
        self.state(sid) == Some(MemberState::Active)
    }

    /// Active and leaving servers, in id order.
    pub fn servers(&self) -> Vec<Sid> {
        self.members.iter().filter(|(_, m)| m.state != MemberState::Retired).map(|(s, _)| *s).collect()
    }

    pub fn active(&self) -> Vec<Sid> {
        self.members.iter().filter(|(_, m)| m.state == MemberState::Active).map(|(s, _)| *s).collect()
    }

    /// Servers in `state` here that were not in it in `before`, in id order.
    pub fn newly(&self, before: &Membership, state: MemberState) -> Vec<Sid> {
        self.members
            .iter()
            .filter(|(s, m)| m.state == state && before.state(**s) != Some(state))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Joins one entry; true when anything changed. An entry past `MEMBERS_MAX` is
    /// dropped (a peer cannot make the list grow without bound).
    pub fn join_member(&mut self, sid: Sid, member: &Member) -> bool {
        if member.address.len() > ADDRESS_LEN_MAX {
            return false;
        }
        match self.members.get_mut(&sid) {
            None => {
                if self.members.len() >= MEMBERS_MAX {
                    return false;
                }
                self.members.insert(sid, member.clone());
                true
            }
            Some(have) => {
                let mut changed = false;
                if member.state > have.state {
                    have.state = member.state;
                    changed = true;
                }
                if member.address > have.address {
                    have.address = member.address.clone();
                    changed = true;
                }
                changed
            }
        }
    }

    /// Joins another copy; true when anything changed.
    pub fn join(&mut self, other: &Membership) -> bool {
        let mut changed = false;
        for (sid, member) in &other.members {
            changed |= self.join_member(*sid, member);
        }
        changed
    }

    /// The membership after an operator's change, or why it is refused.
    pub fn changed(&self, change: &MemberChange) -> Result<Membership, MemberError> {
        let mut next = self.clone();
        match change {
            MemberChange::Add { sid, address } => {
                if sid.0 == 0 || sid.0 > u32::from(u16::MAX) {
                    return Err(MemberError::BadSid(*sid));
                }
                if let Some(m) = self.get(*sid) {
                    return Err(MemberError::Known(*sid, m.state));
                }
                if address.is_empty() || address.len() > ADDRESS_LEN_MAX || address.bytes().any(|b| b <= b' ') {
                    return Err(MemberError::BadAddress(format!(
                        "{address:?}: 1 to {ADDRESS_LEN_MAX} printable characters, no spaces"
                    )));
                }
                if self.len() >= MEMBERS_MAX {
                    return Err(MemberError::TooMany);
                }
                next.join_member(*sid, &Member { state: MemberState::Active, address: address.clone() });
            }
            MemberChange::Leave { sid } | MemberChange::Lost { sid } => {
                let Some(m) = self.get(*sid) else { return Err(MemberError::Unknown(*sid)) };
                if m.state == MemberState::Retired {
                    return Err(MemberError::Unknown(*sid));
                }
                if self.active() == vec![*sid] {
                    return Err(MemberError::LastActive(*sid));
                }
                let state = if matches!(change, MemberChange::Lost { .. }) {
                    MemberState::Retired
                } else {
                    MemberState::Leaving
                };
                next.join_member(*sid, &Member { state, address: String::new() });
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(state: MemberState, address: &str) -> Member {
        Member { state, address: address.into() }
    }

    #[test]
    fn states_only_rise_and_ids_are_never_reused() {
        let m = Membership::seed(&[Sid(1), Sid(2), Sid(3)]);
        let m = m.changed(&MemberChange::Add { sid: Sid(4), address: "10.0.0.4:7101".into() }).unwrap();
        assert_eq!(m.servers(), vec![Sid(1), Sid(2), Sid(3), Sid(4)]);
        let m = m.changed(&MemberChange::Leave { sid: Sid(1) }).unwrap();
        assert_eq!(m.active(), vec![Sid(2), Sid(3), Sid(4)]);
        assert!(m.is_member(Sid(1)) && !m.is_active(Sid(1)));
        let m = m.changed(&MemberChange::Lost { sid: Sid(1) }).unwrap();
        assert!(!m.is_member(Sid(1)));
        assert!(matches!(
            m.changed(&MemberChange::Add { sid: Sid(1), address: "x:1".into() }),
            Err(MemberError::Known(_, MemberState::Retired))
        ));
        let seeded = Membership::seed(&[Sid(1), Sid(2), Sid(3)]);
        assert_eq!(m.newly(&seeded, MemberState::Retired), vec![Sid(1)]);
        assert_eq!(m.newly(&m, MemberState::Retired), Vec::<Sid>::new(), "nothing is new against itself");
        let mut older = Membership::seed(&[Sid(1), Sid(2), Sid(3)]);
        assert!(older.join(&m));
        assert_eq!(older, m, "a later state wins a join");
        assert!(!older.join(&Membership::seed(&[Sid(1)])), "an earlier state changes nothing");
    }

    #[test]
    fn the_last_active_member_stays() {
        let m = Membership::seed(&[Sid(1), Sid(2)]);
        let m = m.changed(&MemberChange::Leave { sid: Sid(1) }).unwrap();
        assert_eq!(m.changed(&MemberChange::Leave { sid: Sid(2) }), Err(MemberError::LastActive(Sid(2))));
        assert!(m.changed(&MemberChange::Add { sid: Sid(3), address: "a b".into() }).is_err());
        assert!(m.changed(&MemberChange::Add { sid: Sid(70000), address: "a:1".into() }).is_err());
    }

    proptest! {
        #[test]
        fn join_is_a_semilattice(
            a in proptest::collection::vec((1u32..6, 0u8..3, "[a-c]{0,2}"), 0..8),
            b in proptest::collection::vec((1u32..6, 0u8..3, "[a-c]{0,2}"), 0..8),
            c in proptest::collection::vec((1u32..6, 0u8..3, "[a-c]{0,2}"), 0..8),
        ) {
            let make = |v: &Vec<(u32, u8, String)>| Membership::from_entries(v.iter().map(|(s, st, addr)| {
                let state = [MemberState::Active, MemberState::Leaving, MemberState::Retired][usize::from(*st)];
                (Sid(*s), member(state, addr))
            }));
            let (a, b, c) = (make(&a), make(&b), make(&c));
            let mut ab = a.clone();
            ab.join(&b);
            let mut ba = b.clone();
            ba.join(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone();
            ab_c.join(&c);
            let mut bc = b.clone();
            bc.join(&c);
            let mut a_bc = a.clone();
            a_bc.join(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut aa = a.clone();
            prop_assert!(!aa.join(&a));
        }
    }
}
