//! What the mail front ends (IMAP, LMTP) share on one node: the users, the limits, the
//! password checks (off the async workers, a few at a time, slowed down after failures)
//! and the count of sessions per user.

use crate::config::{Limits, NodeConfig};
use crate::node::{NodeHandle, SessionLimits};
use crate::users::Users;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Password hashes computed at once; argon2 takes tens of milliseconds of a core each,
/// and the async workers must stay free for everyone else.
const PASSWORD_CHECKS_MAX: usize = 2;
/// Addresses and users remembered by the throttle; the oldest are forgotten first.
const THROTTLE_ENTRIES_MAX: usize = 100_000;
/// Failures are forgotten after this long without another.
const THROTTLE_MEMORY: Duration = Duration::from_secs(15 * 60);
const PENALTY_BASE: Duration = Duration::from_millis(250);
/// The longest wait one IP address is made to accept before each attempt.
const IP_PENALTY_MAX: Duration = Duration::from_secs(15);
/// The longest wait for a user's name from an address never seen to log in as them; short
/// so that an attacker guessing one user's password cannot lock the user out.
const USER_PENALTY_MAX: Duration = Duration::from_secs(4);
/// Failures for one user (from anywhere) before attempts at that user are spaced out.
const USER_FAILURES_FREE: u32 = 3;
/// Addresses a user logged in from lately that skip the per-user spacing.
const TRUSTED_PER_USER_MAX: usize = 16;

#[derive(Clone)]
pub struct Front {
    /// Replaced whole when the users file is read again (SIGHUP): a check in progress
    /// keeps the set it started with.
    users: Arc<RwLock<Arc<Users>>>,
    pub limits: Limits,
    pub allow_plaintext_auth: bool,
    pub plaintext_auth_on_loopback: bool,
    checks: Arc<Semaphore>,
    throttle: Arc<Mutex<Throttle>>,
    sessions: Arc<Mutex<BTreeMap<String, usize>>>,
    /// IMAP's `\Recent`: which messages a session on this node has already been shown as
    /// recent (per server, as RFC 3501 allows).
    pub(crate) recent: Arc<crate::imap::recent::RecentMarks>,
    /// ENVELOPE, BODY and BODYSTRUCTURE per GUID, parsed once for every session.
    pub(crate) parsed: Arc<crate::imap::parsed::ParsedCache>,
    /// Mailbox name -> SPECIAL-USE attribute (see `NodeConfig::special_use`).
    pub special_use: Arc<BTreeMap<String, &'static str>>,
}

/// A logged-in session's place in the per-user count, given back when dropped.
pub struct UserSession {
    user: String,
    sessions: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Drop for UserSession {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sessions.lock() {
            match s.get_mut(&self.user) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    s.remove(&self.user);
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoginError {
    /// Wrong name or password (after the failure delay).
    Refused,
    /// The user has as many sessions as allowed.
    TooManySessions,
    /// The node could not check (shutting down).
    Unavailable,
}

impl Front {
    pub fn new(cfg: &NodeConfig) -> Front {
        Front {
            allow_plaintext_auth: cfg.allow_plaintext_auth,
            plaintext_auth_on_loopback: cfg.plaintext_auth_on_loopback,
            recent: Arc::new(crate::imap::recent::RecentMarks::for_cluster(
                cfg.core.sid.0,
                cfg.peers.iter().map(|p| p.id),
            )),
            special_use: Arc::new(cfg.special_use.clone()),
            ..Front::with(cfg.users.clone(), cfg.limits.clone())
        }
    }

    /// The users as now configured.
    pub fn users(&self) -> Arc<Users> {
        match self.users.read() {
            Ok(users) => users.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Takes a new set of users (the users file was read again); sessions already
    /// logged in go on.
    pub fn replace_users(&self, users: Users) {
        match self.users.write() {
            Ok(mut slot) => *slot = Arc::new(users),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(users),
        }
    }

    /// Users and limits, plaintext passwords refused where TLS is offered.
    pub fn with(users: Arc<Users>, limits: Limits) -> Front {
        Front {
            users: Arc::new(RwLock::new(users)),
            limits,
            allow_plaintext_auth: false,
            plaintext_auth_on_loopback: true,
            checks: Arc::new(Semaphore::new(PASSWORD_CHECKS_MAX)),
            throttle: Arc::default(),
            sessions: Arc::default(),
            recent: Arc::default(),
            parsed: Arc::default(),
            special_use: Arc::new(crate::config::special_use_default()),
        }
    }

    /// A listener's connection limits, and the line a connection over them gets.
    pub(crate) fn session_limits(&self, refuse: &'static str) -> SessionLimits {
        SessionLimits {
            connections_max: self.limits.connections_max,
            per_ip_max: self.limits.connections_per_ip_max,
            refuse,
        }
    }

    /// Checks a password for `user` from `ip`: waits out the throttle's delay first, runs
    /// argon2 on the blocking pool, then counts the session against the user's limit.
    pub async fn login(&self, ip: IpAddr, user: &str, password: &[u8]) -> Result<UserSession, LoginError> {
        let wait = self.throttle.lock().map(|mut t| t.reserve(ip, user, Instant::now())).unwrap_or_default();
        // Counted until the check is done or the client leaves, whichever comes first.
        let _in_flight = InFlight { throttle: self.throttle.clone(), ip };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let permit = self.checks.clone().acquire_owned().await.map_err(|_| LoginError::Unavailable)?;
        let (users, name, password) = (self.users(), user.to_string(), password.to_vec());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            users.verify(&name, &password)
        })
        .await
        .map_err(|_| LoginError::Unavailable)?;
        if let Ok(mut t) = self.throttle.lock() {
            if ok {
                t.succeeded(ip, user);
            } else {
                t.failed(ip, user, Instant::now());
            }
        }
        if !ok {
            return Err(LoginError::Refused);
        }
        let mut sessions = self.sessions.lock().map_err(|_| LoginError::Unavailable)?;
        let n = sessions.entry(user.to_string()).or_insert(0);
        if *n >= self.limits.connections_per_user_max {
            return Err(LoginError::TooManySessions);
        }
        *n += 1;
        Ok(UserSession { user: user.to_string(), sessions: self.sessions.clone() })
    }
}

impl Front {
    /// Whether `user` may store `bytes` more in `messages` more messages under the
    /// quota; the reason when not. Measured against this node's copy of the user's mail:
    /// two deliveries racing on two nodes may both fit, so the quota is a bound the
    /// user can exceed by one message per node at most.
    pub async fn within_quota(&self, node: &NodeHandle, user: &str, bytes: u64, messages: u64) -> Result<(), String> {
        let (bytes_max, messages_max) = (self.limits.quota_bytes, self.limits.quota_messages);
        if bytes_max == 0 && messages_max == 0 {
            return Ok(());
        }
        let used = node.usage(user).await;
        if bytes_max > 0 && used.bytes.saturating_add(bytes) > bytes_max {
            return Err(format!("over the storage quota: {} of {bytes_max} bytes used", used.bytes));
        }
        if messages_max > 0 && used.messages.saturating_add(messages) > messages_max {
            return Err(format!("over the message quota: {} of {messages_max} messages", used.messages));
        }
        Ok(())
    }

    /// RFC 9208's QUOTA response for the user's one quota root (""), with the usage.
    pub async fn quota_response(&self, node: &NodeHandle, user: &str) -> String {
        let used = node.usage(user).await;
        let mut resources = Vec::new();
        if self.limits.quota_bytes > 0 {
            // STORAGE counts units of 1024 octets.
            resources.push(format!("STORAGE {} {}", used.bytes.div_ceil(1024), self.limits.quota_bytes / 1024));
        }
        if self.limits.quota_messages > 0 {
            resources.push(format!("MESSAGE {} {}", used.messages, self.limits.quota_messages));
        }
        format!("* QUOTA \"\" ({})", resources.join(" "))
    }
}

/// One login check under way from an address; the count goes down when it is dropped.
struct InFlight {
    throttle: Arc<Mutex<Throttle>>,
    ip: IpAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut t) = self.throttle.lock() {
            match t.in_flight.get_mut(&self.ip) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    t.in_flight.remove(&self.ip);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Penalty {
    failures: u32,
    last_failure: Instant,
    /// The earliest moment the next attempt may be checked.
    next_slot: Instant,
}

/// Failure delays per client address and per user. Attempts are spaced out (each one
/// reserves the next slot), so many parallel connections guess no faster than one.
#[derive(Default)]
struct Throttle {
    ips: BTreeMap<IpAddr, Penalty>,
    users: BTreeMap<String, Penalty>,
    /// (user, address) pairs that logged in lately: the per-user spacing spares them.
    trusted: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Checks under way per address: parallel attempts from one address are spaced out
    /// before any of them has failed (a burst of connections gets no free wave).
    in_flight: BTreeMap<IpAddr, u32>,
}

fn penalty_of(failures: u32, free: u32, max: Duration) -> Duration {
    if failures <= free {
        return Duration::ZERO;
    }
    let doublings = (failures - free - 1).min(16);
    (PENALTY_BASE * 2u32.pow(doublings)).min(max)
}

fn reserve_slot(entry: Option<&mut Penalty>, now: Instant, free: u32, max: Duration) -> Duration {
    let Some(p) = entry else { return Duration::ZERO };
    let step = penalty_of(p.failures, free, max);
    if step.is_zero() {
        return Duration::ZERO;
    }
    let slot = p.next_slot.max(now);
    // Bounded: a slot is never reserved further ahead than one maximal penalty past the
    // last one, so a flood does not push honest attempts out without end.
    p.next_slot = (slot + step).min(now + max * 2);
    slot - now
}

impl Throttle {
    fn reserve(&mut self, ip: IpAddr, user: &str, now: Instant) -> Duration {
        self.forget_old(now);
        let by_ip = reserve_slot(self.ips.get_mut(&ip), now, 0, IP_PENALTY_MAX);
        // The per-user spacing slows addresses that have failed before and never logged in
        // as this user: a client from a clean address is never held up by an attack on
        // its user, and each attacking address gets one free guess at most.
        let suspect = self.ips.contains_key(&ip) && !self.trusted.get(user).is_some_and(|s| s.contains(&ip));
        let by_user = if suspect {
            reserve_slot(self.users.get_mut(user), now, USER_FAILURES_FREE, USER_PENALTY_MAX)
        } else {
            Duration::ZERO
        };
        let trusted = self.trusted.get(user).is_some_and(|s| s.contains(&ip));
        let parallel = self.in_flight.entry(ip).or_insert(0);
        let by_burst = if trusted { Duration::ZERO } else { (PENALTY_BASE * (*parallel).min(60)).min(IP_PENALTY_MAX) };
        *parallel = parallel.saturating_add(1);
        by_ip.max(by_user).max(by_burst)
    }

    fn failed(&mut self, ip: IpAddr, user: &str, now: Instant) {
        let bump = |p: &mut Penalty| {
            p.failures = p.failures.saturating_add(1);
            p.last_failure = now;
        };
        let fresh = Penalty { failures: 0, last_failure: now, next_slot: now };
        bump(self.ips.entry(ip).or_insert(fresh));
        if crate::users::valid_name(user) {
            bump(self.users.entry(user.to_string()).or_insert(fresh));
        }
        self.bound();
    }

    fn succeeded(&mut self, ip: IpAddr, user: &str) {
        self.ips.remove(&ip);
        let trusted = self.trusted.entry(user.to_string()).or_default();
        if trusted.len() >= TRUSTED_PER_USER_MAX {
            trusted.pop_first();
        }
        trusted.insert(ip);
        self.bound();
    }

    fn forget_old(&mut self, now: Instant) {
        let fresh = |p: &Penalty| now.saturating_duration_since(p.last_failure) < THROTTLE_MEMORY;
        self.ips.retain(|_, p| fresh(p));
        self.users.retain(|_, p| fresh(p));
    }

    /// Keeps the maps within THROTTLE_ENTRIES_MAX, dropping the stalest entries.
    fn bound(&mut self) {
        fn shrink<K: Ord + Clone>(map: &mut BTreeMap<K, Penalty>) {
            if map.len() <= THROTTLE_ENTRIES_MAX {
                return;
            }
            let mut ages: Vec<(Instant, K)> = map.iter().map(|(k, p)| (p.last_failure, k.clone())).collect();
            ages.sort_by_key(|(t, _)| *t);
            for (_, k) in ages.into_iter().take(map.len() - THROTTLE_ENTRIES_MAX / 2) {
                map.remove(&k);
            }
        }
        shrink(&mut self.ips);
        shrink(&mut self.users);
        if self.trusted.len() > THROTTLE_ENTRIES_MAX {
            let excess = self.trusted.len() - THROTTLE_ENTRIES_MAX / 2;
            let drop: Vec<String> = self.trusted.keys().take(excess).cloned().collect();
            for k in drop {
                self.trusted.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_space_out_attempts_from_one_address_and_at_one_user() {
        let mut t = Throttle::default();
        let now = Instant::now();
        let attacker: IpAddr = [10, 0, 0, 1].into();
        let honest: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(t.reserve(attacker, "alice", now), Duration::ZERO);
        for _ in 0..6 {
            t.failed(attacker, "alice", now);
        }
        // Ten parallel attempts from the attacker wait for successive slots.
        let waits: Vec<Duration> = (0..10).map(|_| t.reserve(attacker, "alice", now)).collect();
        t.in_flight.clear();
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert!(waits[9] >= Duration::from_secs(15), "{waits:?}");
        assert!(waits[9] <= IP_PENALTY_MAX * 2, "{waits:?}");
        // A clean address is not held up by the attack on its user.
        assert_eq!(t.reserve(honest, "alice", now), Duration::ZERO);
        t.in_flight.clear();
        // An address that failed once waits for the user's spacing too.
        t.failed(honest, "alice", now);
        assert!(t.reserve(honest, "alice", now) > Duration::ZERO);
        t.in_flight.clear();
        t.succeeded(honest, "alice");
        assert_eq!(t.reserve(honest, "alice", now), Duration::ZERO);
        t.in_flight.clear();
        // And another user is not slowed down from a fresh address.
        assert_eq!(t.reserve(honest, "bob", now), Duration::ZERO);
        t.in_flight.clear();
        // A burst from a fresh address is spaced before any attempt has failed.
        let burst: IpAddr = [10, 0, 0, 9].into();
        let waits: Vec<Duration> = (0..4).map(|_| t.reserve(burst, "carol", now)).collect();
        assert_eq!(waits, vec![Duration::ZERO, PENALTY_BASE, PENALTY_BASE * 2, PENALTY_BASE * 3]);
        // Everything is forgotten in time.
        let later = now + THROTTLE_MEMORY + Duration::from_secs(1);
        assert_eq!(t.reserve(attacker, "alice", later), Duration::ZERO);
    }
}
