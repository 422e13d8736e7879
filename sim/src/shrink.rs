//! Shrinking a failing run to a small scenario that fails the same way: drop events
//! (delta debugging), drop servers, simplify values, pull events earlier. The result is
//! an ordinary scenario file that `tandem-sim run` reproduces.

use crate::explore::{category, run_guarded};
use crate::scenario::*;
use crate::world::RunOptions;
use std::time::{Duration, Instant};
use tandem_core::Sid;

pub struct ShrinkBudget {
    pub runs_max: usize,
    pub time_max: Duration,
}

impl Default for ShrinkBudget {
    fn default() -> Self {
        ShrinkBudget { runs_max: 3_000, time_max: Duration::from_secs(300) }
    }
}

struct Shrinker<'a> {
    opts: &'a RunOptions,
    target: String,
    runs: usize,
    budget: &'a ShrinkBudget,
    started: Instant,
}

impl Shrinker<'_> {
    fn spent(&self) -> bool {
        self.runs >= self.budget.runs_max || self.started.elapsed() >= self.budget.time_max
    }

    /// Whether `candidate` still fails the same way.
    fn fails(&mut self, candidate: &Scenario) -> bool {
        if self.spent() {
            return false;
        }
        self.runs += 1;
        category(&run_guarded(candidate, self.opts)).as_deref() == Some(self.target.as_str())
    }
}

/// Returns the shrunk scenario and the failure it keeps, or None if `s` passes.
pub fn shrink(s: &Scenario, opts: &RunOptions, budget: &ShrinkBudget) -> Option<(Scenario, String)> {
    let target = category(&run_guarded(s, opts))?;
    let mut k = Shrinker { opts, target: target.clone(), runs: 1, budget, started: Instant::now() };
    let mut best = s.clone();
    // The seed is part of the failure: keep it fixed in the file.
    best.seed = opts.seed.unwrap_or(s.seed);
    let opts_fixed = RunOptions { seed: None, ..opts.clone() };
    k.opts = &opts_fixed;
    let mut progress = true;
    while progress && !k.spent() {
        progress = false;
        progress |= drop_expectations(&mut k, &mut best);
        progress |= drop_event_chunks(&mut k, &mut best);
        progress |= drop_servers(&mut k, &mut best);
        progress |= simplify(&mut k, &mut best);
        progress |= pull_earlier(&mut k, &mut best);
    }
    Some((best, target))
}

/// Expectations the failure does not need (a scenario made from an incident expects
/// everything the real cluster held): all at once, else one at a time.
fn drop_expectations(k: &mut Shrinker<'_>, best: &mut Scenario) -> bool {
    let droppable = |x: &Expect| !matches!(x, Expect::Invariants);
    if !best.expects.iter().any(droppable) {
        return false;
    }
    let mut candidate = best.clone();
    candidate.expects.retain(|x| !droppable(x));
    if k.fails(&candidate) {
        *best = candidate;
        return true;
    }
    let mut changed = false;
    let mut i = 0;
    while i < best.expects.len() && !k.spent() {
        if droppable(&best.expects[i]) {
            let mut candidate = best.clone();
            candidate.expects.remove(i);
            if k.fails(&candidate) {
                *best = candidate;
                changed = true;
                continue;
            }
        }
        i += 1;
    }
    changed
}

/// Delta debugging over the event list.
fn drop_event_chunks(k: &mut Shrinker<'_>, best: &mut Scenario) -> bool {
    let before = best.events.len();
    let mut n = 2;
    while best.events.len() >= 2 && !k.spent() {
        let len = best.events.len();
        let chunk = len.div_ceil(n);
        let mut removed = false;
        let mut start = 0;
        while start < len {
            let mut candidate = best.clone();
            let end = (start + chunk).min(len);
            candidate.events.drain(start..end);
            if k.fails(&candidate) {
                *best = candidate;
                removed = true;
                break;
            }
            start = end;
        }
        if removed {
            n = (n - 1).max(2);
        } else if n >= len {
            break;
        } else {
            n = (n * 2).min(len);
        }
    }
    if best.events.len() == 1 {
        let mut candidate = best.clone();
        candidate.events.clear();
        if k.fails(&candidate) {
            *best = candidate;
        }
    }
    best.events.len() < before
}

fn mentions(action: &Action, sid: Sid) -> bool {
    match action {
        Action::Save { server, .. }
        | Action::Import { server, .. }
        | Action::Copy { server, .. }
        | Action::Expunge { server, .. }
        | Action::Store { server, .. }
        | Action::Read { server, .. }
        | Action::FetchBody { server, .. }
        | Action::Status { server, .. }
        | Action::MasterMove { server, .. }
        | Action::CreateMailbox { server, .. }
        | Action::DeleteMailbox { server, .. }
        | Action::RenameMailbox { server, .. }
        | Action::Isolate { server }
        | Action::Crash { server }
        | Action::Restart { server }
        | Action::Lose { server }
        | Action::Replace { server }
        | Action::Backup { server }
        | Action::RestoreBackup { server }
        | Action::HandAdd { server, .. }
        | Action::HandDelete { server, .. }
        | Action::Corrupt { server, .. } => *server == sid,
        Action::Replicate { server, home } => *server == sid || *home == Some(sid),
        Action::Cut { a, b }
        | Action::Restore { a, b }
        | Action::Flap { a, b, .. }
        | Action::Reset { a, b, .. }
        | Action::Slow { a, b, .. }
        | Action::Silence { from: a, to: b, .. }
        | Action::MemberAdd { server: a, member: b }
        | Action::MemberRemove { server: a, member: b, .. } => *a == sid || *b == sid,
        Action::Partition { .. } | Action::Heal | Action::RandomWorkload { .. } | Action::RandomFaults { .. } => false,
    }
}

/// Remove servers no event needs (highest first), and the links they had.
fn drop_servers(k: &mut Shrinker<'_>, best: &mut Scenario) -> bool {
    let mut changed = false;
    let servers = best.cluster.servers.clone();
    for sid in servers.into_iter().rev() {
        if best.cluster.servers.len() <= 2 || k.spent() {
            break;
        }
        // A laptop's home server stays: the scenario file must name it (explore seed 15950
        // shrank to a file that did not parse).
        if best.events.iter().any(|e| mentions(&e.action, sid)) || best.cluster.laptops.iter().any(|l| l.home == sid) {
            continue;
        }
        let mut candidate = best.clone();
        candidate.cluster.servers.retain(|s| *s != sid);
        if let Some(links) = &mut candidate.cluster.links {
            links.retain(|l| l.a != sid && l.b != sid);
        }
        for e in &mut candidate.events {
            if let Action::Partition { groups } = &mut e.action {
                for g in groups.iter_mut() {
                    g.retain(|s| *s != sid);
                }
                groups.retain(|g| !g.is_empty());
            }
        }
        if !connected(&candidate.cluster) {
            // A cluster split for good never converges: that is not the failure we keep.
            continue;
        }
        let n = candidate.cluster.servers.len() as u8;
        candidate.cluster.replicas = candidate.cluster.replicas.min(n.saturating_sub(1));
        if k.fails(&candidate) {
            *best = candidate;
            changed = true;
        }
    }
    changed
}

/// Whether every server can reach every other over the cluster's links.
fn connected(c: &ClusterSpec) -> bool {
    let Some(links) = &c.links else { return true };
    let Some(&first) = c.servers.first() else { return true };
    let mut seen = vec![first];
    let mut i = 0;
    while i < seen.len() {
        let at = seen[i];
        for l in links {
            let other = if l.a == at {
                l.b
            } else if l.b == at {
                l.a
            } else {
                continue;
            };
            if !seen.contains(&other) {
                seen.push(other);
            }
        }
        i += 1;
    }
    c.servers.iter().all(|s| seen.contains(s))
}

/// Smaller bodies, no flags on SAVE, plain STOREs.
fn simplify(k: &mut Shrinker<'_>, best: &mut Scenario) -> bool {
    let mut changed = false;
    for i in 0..best.events.len() {
        if k.spent() {
            break;
        }
        let mut candidate = best.clone();
        let simpler = match &mut candidate.events[i].action {
            Action::Save { size, flags, .. } if *size > 100 || !flags.is_empty() => {
                *size = 100;
                flags.clear();
                true
            }
            Action::Store { unchanged_since, .. } if unchanged_since.is_some() => {
                *unchanged_since = None;
                true
            }
            _ => false,
        };
        if simpler && k.fails(&candidate) {
            *best = candidate;
            changed = true;
        }
    }
    changed
}

/// Move every event earlier (halving its time), while it still fails.
fn pull_earlier(k: &mut Shrinker<'_>, best: &mut Scenario) -> bool {
    let mut candidate = best.clone();
    for e in &mut candidate.events {
        e.at_ms = 300 + e.at_ms.saturating_sub(300) / 2;
    }
    if candidate.events.iter().zip(&best.events).all(|(a, b)| a.at_ms == b.at_ms) {
        return false;
    }
    if k.fails(&candidate) {
        *best = candidate;
        return true;
    }
    false
}
