//! An exhaustive checker for small clusters: from one start, every order in which the
//! next event of each stream may run (a message overtaking one on another link, a
//! timer firing before a message arrives, a client or a fault acting early; within a
//! stream the order stays), breadth first, each state reached twice explored once.
//! Only timers move the clock: a message, a client's request or a fault happens the
//! moment it is chosen, and a timer fires when it is the earliest event queued (so a
//! message is delayed past a timeout only by a fault that cuts its link). The oracle checks every step; a state where nothing but timers is left, or at the
//! depth bound, is run on to the end in time order (heal, settle) and checked for
//! convergence and the end-of-run invariants. The first violation found is the one with
//! the fewest steps, written out as a scenario file with its schedule.
//!
//! States are told apart by `World::timeless_key`: the servers' protocol states, what is
//! queued, the links and the oracle's knowledge, with every instant relative to now, so
//! two states that differ only in when they happen are one. A path is kept per state,
//! not the state: a state is rebuilt by replaying its path from the start (memory stays
//! small; the replays are cheap next to the checks).

use crate::RunOptions;
use crate::scenario::{self, Scenario};
use crate::world::World;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant as WallInstant;
use tandem_core::Bug;

/// What `check` explores.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub servers: usize,
    /// Client operations, taken in order from [`OPS`].
    pub ops: usize,
    /// Faults, taken in order from [`FAULTS`] (each a fault and its repair).
    pub faults: usize,
    /// Steps explored from the start at most (deeper states are run on in time order).
    pub depth_max: usize,
    /// States explored at most; the report says whether the space was exhausted.
    pub states_max: u64,
    pub bug: Option<Bug>,
    /// Explore the events of this scenario instead of the menus' (`servers`, `ops` and
    /// `faults` are then ignored): its client operations form one stream and its faults
    /// another, each kept in its order; the run before its first event is in time order.
    pub scenario: Option<Scenario>,
    /// Explore only the orders that depart from time order at most this many times
    /// (delay bounding): each step takes the event due first unless a departure is
    /// left. Few departures reach deep into a run (retries, timeouts, a second fault)
    /// where every order reaches only a few steps. None: every order.
    pub deviations_max: Option<usize>,
}

/// What a check found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// Distinct states reached.
    pub states: u64,
    /// States run on to the end and checked there.
    pub ends_checked: u64,
    pub depth_reached: usize,
    pub elapsed_s: f64,
    /// Every state within the depth bound was explored (not stopped by `states_max`).
    pub exhausted: bool,
    /// The first violation, with the shortest schedule that reaches it.
    pub violation: Option<(String, Scenario)>,
}

/// The client operations of a check, in the order `--ops` takes them: saves from two
/// servers into one mailbox, flag changes and an expunge of the same messages (UID
/// conflicts, flag merges and expunges meeting across a fault).
pub const OPS: &[&str] = &[
    "op = \"save\"\nserver = \"s1\"\nmailbox = \"u1@d1/INBOX\"\nlabel = \"m1\"",
    "op = \"save\"\nserver = \"s2\"\nmailbox = \"u1@d1/INBOX\"\nlabel = \"m2\"",
    "op = \"store\"\nserver = \"s2\"\nmailbox = \"u1@d1/INBOX\"\nlabels = [\"m1\"]\nadd = ['\\Seen']",
    "op = \"store\"\nserver = \"s1\"\nmailbox = \"u1@d1/INBOX\"\nlabels = [\"m1\"]\nremove = ['\\Seen']\nadd = ['\\Answered']",
    "op = \"expunge\"\nserver = \"s1\"\nmailbox = \"u1@d1/INBOX\"\nlabels = [\"m2\"]",
    "op = \"save\"\nserver = \"s1\"\nmailbox = \"u1@d1/INBOX\"\nlabel = \"m3\"",
];

/// The faults of a check, in the order `--faults` takes them, each as the fault and its
/// repair.
pub const FAULTS: &[(&str, &str)] = &[
    ("op = \"isolate\"\nserver = \"s1\"", "op = \"heal\""),
    ("op = \"crash\"\nserver = \"s2\"", "op = \"restart\"\nserver = \"s2\""),
    ("op = \"isolate\"\nserver = \"s2\"", "op = \"heal\""),
];

/// When the explored part starts: the servers have started, found each other and
/// agreed on a root (run in time order, as it is not what the check is about).
const EXPLORE_FROM_MS: u64 = 2_900;

/// The scenario a check starts from.
pub fn scenario(opts: &CheckOptions) -> Result<Scenario, String> {
    if !(2..=3).contains(&opts.servers) {
        return Err("a check runs 2 or 3 servers".into());
    }
    if opts.ops > OPS.len() || opts.faults > FAULTS.len() {
        return Err(format!("a check takes at most {} ops and {} faults", OPS.len(), FAULTS.len()));
    }
    let servers: Vec<String> = (1..=opts.servers).map(|i| format!("\"s{i}\"")).collect();
    let mut text = format!(
        "name = \"check-{}-servers-{}-ops-{}-faults\"\nsettle_ms = 30000\n[cluster]\nservers = [{}]\n\
         replicas = 1\nmode = \"sync\"\nlatency_ms = [1, 3]\n",
        opts.servers,
        opts.ops,
        opts.faults,
        servers.join(", ")
    );
    // Timed apart so that, in time order, each is done before the next: the check
    // reorders them against everything else.
    let mut at_ms = 3_000;
    for op in &OPS[..opts.ops] {
        text.push_str(&format!("[[event]]\nat_ms = {at_ms}\n{op}\n"));
        at_ms += 400;
    }
    let mut fault_ms = 3_100;
    for (fault, repair) in &FAULTS[..opts.faults] {
        text.push_str(&format!("[[event]]\nat_ms = {fault_ms}\n{fault}\n"));
        text.push_str(&format!("[[event]]\nat_ms = {}\n{repair}\n", fault_ms + 700));
        fault_ms += 1_000;
    }
    text.push_str("[[expect]]\ncheck = \"invariants\"\n");
    scenario::parse(&text, None).map_err(|e| format!("the check's scenario: {e}"))
}

/// The start of a check and when its explored part begins.
fn start(opts: &CheckOptions) -> Result<(Scenario, u64), String> {
    let Some(given) = &opts.scenario else { return Ok((scenario(opts)?, EXPLORE_FROM_MS)) };
    let mut base = given.clone();
    base.schedule.clear();
    let first_ms = base.events.iter().map(|e| e.at_ms).min().ok_or("the scenario has no events to explore")?;
    // Just before the first event, so that it is the first choice the check makes.
    Ok((base, first_ms.saturating_sub(1)))
}

/// The world after `path` from the start.
fn replay(root: &World, path: &[String]) -> World {
    let mut world = root.clone();
    for stream in path {
        world.take(stream);
    }
    world
}

/// Explores as `CheckOptions` say; see the module's comment.
pub fn check(opts: &CheckOptions) -> Result<CheckReport, String> {
    let started = WallInstant::now();
    let (base, explore_from_ms) = start(opts)?;
    let run_opts = RunOptions { bug: opts.bug, ..Default::default() };
    let mut root = World::new(&base, &run_opts);
    let end = root.start().ok_or("the check's scenario does not start")?;
    root.run_until(tandem_core::Instant::from_millis(explore_from_ms));
    let prelude = crate::world::schedule_until(explore_from_ms);
    let mut report =
        CheckReport { states: 1, ends_checked: 0, depth_reached: 0, elapsed_s: 0.0, exhausted: true, violation: None };
    // Each state with the fewest departures from time order it was reached with: one
    // reached again with fewer has more orders left to explore from it.
    let mut seen: BTreeMap<u64, usize> = BTreeMap::from([(root.timeless_key(), 0)]);
    let mut frontier: VecDeque<(Vec<String>, usize)> = VecDeque::from([(Vec::new(), 0)]);
    let departures_max = opts.deviations_max.unwrap_or(usize::MAX);
    let counterexample = |path: &[String], why: String| {
        let mut s = base.clone();
        s.name = format!("{}-counterexample", base.name);
        s.schedule = std::iter::once(prelude.clone()).chain(path.iter().cloned()).collect();
        (why, s)
    };
    while let Some((path, departures)) = frontier.pop_front() {
        let world = replay(&root, &path);
        report.depth_reached = report.depth_reached.max(path.len());
        if let Some(why) = world.broken() {
            report.violation = Some(counterexample(&path, why));
            break;
        }
        let mut choices = world.choices();
        let only_timers = choices.keys().all(|stream| stream.starts_with("timer "));
        // A timer fires when it is due (it is the earliest event of all): the order of
        // everything else is free, and time moves only as far as the event chosen.
        let earliest = choices.iter().min_by_key(|(_, at)| **at).map(|(stream, _)| stream.clone());
        choices.retain(|stream, _| !stream.starts_with("timer ") || Some(stream) == earliest.as_ref());
        if only_timers || path.len() >= opts.depth_max {
            report.ends_checked += 1;
            let mut rest = world.clone();
            rest.run_until(end);
            let ran = rest.settle_and_report();
            if !ran.passed {
                // The servers' state lines of a convergence failure come before what failed.
                let why = ran.failures.iter().find(|f| !f.starts_with(' ')).or(ran.failures.first());
                let why = why.cloned().unwrap_or_default();
                report.violation = Some(counterexample(&path, why));
                break;
            }
            continue;
        }
        for stream in choices.keys() {
            // Time order takes the earliest event (the world's order: due time, then queue order).
            let departures = departures + usize::from(Some(stream) != earliest.as_ref());
            if departures > departures_max {
                continue;
            }
            let mut next = world.clone();
            next.take(stream);
            let key = next.timeless_key();
            if seen.get(&key).is_some_and(|fewest| *fewest <= departures) {
                continue;
            }
            if seen.insert(key, departures).is_none() {
                report.states += 1;
            }
            let mut longer = path.clone();
            longer.push(stream.clone());
            frontier.push_back((longer, departures));
        }
        if report.states >= opts.states_max {
            report.exhausted = false;
            break;
        }
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}
