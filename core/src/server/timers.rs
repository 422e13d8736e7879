//! Every deadline the server keeps, by name, in one table (the shape of quinn-proto's
//! `TimerTable`): `Server::poll_timeout` is the earliest of them, and a timer input runs
//! the work of each one that has expired. A timer is armed only while it has work, so
//! an idle server wakes for its maintenance pass and nothing else.

use crate::types::Instant;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Our link-state announcement, held a moment so the many link changes of one
    /// partition or heal go out as one flood.
    Announce,
    /// Polling, every `tick_us`, while work waits on something no input announces:
    /// requests queued for a master, a root term not yet active, catch-ups, bodies
    /// wanted. Also the first timer of a server, which then finds out if it is alone.
    Retry,
    /// The earliest deadline of a job in progress.
    JobDeadline,
    /// The earliest deadline of a fresh read waiting for its copy to catch up.
    FreshReadDeadline,
    /// The earliest log entry sent and not acknowledged within the interval.
    LogResend,
    /// Every `anti_entropy_us`: anti-entropy, mastership reminders, lookups and
    /// handovers resent, dirty copies sent, scrub, body collection.
    Maintenance,
}

impl Timer {
    const ALL: [Timer; 6] = [
        Timer::Announce,
        Timer::Retry,
        Timer::JobDeadline,
        Timer::FreshReadDeadline,
        Timer::LogResend,
        Timer::Maintenance,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer.index()] = Some(at);
    }

    /// Arms `timer` at `at` unless it is already armed earlier.
    pub(crate) fn set_earliest(&mut self, timer: Timer, at: Instant) {
        let slot = &mut self.deadlines[timer.index()];
        *slot = Some(slot.map_or(at, |armed| armed.min(at)));
    }

    pub(crate) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer.index()] = None;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer.index()]
    }

    pub(crate) fn is_armed(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    /// The earliest armed deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// The timers whose deadline has passed, stopped, in the order of [`Timer`].
    pub(crate) fn take_expired(&mut self, now: Instant) -> Vec<Timer> {
        let expired: Vec<Timer> = Timer::ALL.into_iter().filter(|t| self.get(*t).is_some_and(|at| at <= now)).collect();
        for timer in &expired {
            self.stop(*timer);
        }
        debug_assert!(self.deadlines.iter().flatten().all(|at| *at > now));
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_deadline_is_the_earliest_armed() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Maintenance, Instant(1_000));
        t.set(Timer::JobDeadline, Instant(300));
        assert_eq!(t.next(), Some(Instant(300)));
        t.stop(Timer::JobDeadline);
        assert_eq!(t.next(), Some(Instant(1_000)));
    }

    #[test]
    fn set_earliest_never_postpones() {
        let mut t = TimerTable::default();
        t.set_earliest(Timer::LogResend, Instant(500));
        t.set_earliest(Timer::LogResend, Instant(700));
        assert_eq!(t.get(Timer::LogResend), Some(Instant(500)));
        t.set_earliest(Timer::LogResend, Instant(100));
        assert_eq!(t.get(Timer::LogResend), Some(Instant(100)));
    }

    #[test]
    fn expired_timers_are_taken_once_in_order() {
        let mut t = TimerTable::default();
        t.set(Timer::Maintenance, Instant(10));
        t.set(Timer::Announce, Instant(10));
        t.set(Timer::Retry, Instant(20));
        assert_eq!(t.take_expired(Instant(10)), vec![Timer::Announce, Timer::Maintenance]);
        assert!(t.take_expired(Instant(10)).is_empty());
        assert!(!t.is_armed(Timer::Announce));
        assert_eq!(t.next(), Some(Instant(20)));
    }
}
