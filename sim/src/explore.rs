//! Seed exploration ("swarm" testing): every seed draws its own cluster, workload and
//! fault mix as an ordinary scenario of explicit events, runs it (safety with faults,
//! then heal and convergence), and reports the invariant it broke. Seeds run on every
//! core in parallel; each seed stays deterministic.

use crate::focus::Focus;
use crate::scenario::*;
use crate::world::{RunOptions, RunReport, run};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};
use tandem_core::{Bug, Durability, Flag, Granularity, MailboxKey, Mark, Sid, SpecialUse};

/// Explored clients retry failed deliveries as an MTA does, after this long.
pub(crate) const MTA_RETRY_MS: u64 = 4000;

/// Keeps the generator's stream apart from the run's own RNG stream of the same seed.
const GENERATOR_SALT: u64 = 0x5eed_0f5e_ed0f_5eed;

fn pick<T: Copy>(rng: &mut ChaCha8Rng, weighted: &[(u32, T)]) -> T {
    let total: u32 = weighted.iter().map(|w| w.0).sum();
    let mut roll = rng.random_range(0..total);
    for (w, v) in weighted {
        if roll < *w {
            return *v;
        }
        roll -= w;
    }
    weighted[weighted.len() - 1].1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultMix {
    None,
    Partitions,
    Crashes,
    Links,
    /// Servers lost for good (within the mode's budget) and crashes.
    Losses,
    /// Everything but losses; the only mix with hand edits and corrupted bodies, which
    /// destroy copies too.
    Everything,
}

/// The scenario of one seed: cluster, workload and faults all drawn from it.
pub fn generate(seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ GENERATOR_SALT);
    let n: u32 = match pick(&mut rng, &[(60, 0u8), (30, 1), (10, 2)]) {
        0 => rng.random_range(3..=5),
        1 => rng.random_range(6..=10),
        _ => rng.random_range(11..=30),
    };
    let servers: Vec<Sid> = (1..=n).map(Sid).collect();
    let durability = pick(&mut rng, &[(70, Durability::Sync), (30, Durability::Async)]);
    let replicas = rng.random_range(0..=2u8.min((n - 1) as u8));
    let log_capacity = pick(&mut rng, &[(15, 3usize), (15, 8), (20, 40), (20, 300), (30, 10_000)]);
    let granularity = pick(
        &mut rng,
        &[(70, Granularity::Mailbox), (15, Granularity::User), (5, Granularity::Domain), (10, Granularity::Global)],
    );
    let latency_ms = pick(&mut rng, &[(70, (1, 5)), (20, (1, 30)), (10, (5, 100))]);
    let links = match pick(&mut rng, &[(70, 0u8), (20, 1), (10, 2)]) {
        0 => None,
        1 => Some(random_connected(&mut rng, &servers)),
        _ => Some(data_centres(&servers)),
    };
    let duration_ms = rng.random_range(3_000..=8_000u64);
    let ops_per_s = rng.random_range(10..=60u64);
    let users = rng.random_range(1..=3u32);
    let boxes = rng.random_range(1..=3u32);
    let mix = pick(
        &mut rng,
        &[
            (20, FaultMix::None),
            (20, FaultMix::Partitions),
            (20, FaultMix::Crashes),
            (15, FaultMix::Links),
            (10, FaultMix::Losses),
            (20, FaultMix::Everything),
        ],
    );
    let mut events = Vec::new();
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    let gap = 1000 / ops_per_s.max(1);
    let mut next_label = 0;
    let flag_names = ["\\Seen", "\\Flagged", "\\Answered", "$Work"];
    while t < duration_ms {
        t += rng.random_range(gap / 2..=gap * 3 / 2).max(1);
        let server = servers[rng.random_range(0..servers.len())];
        let user = format!("u{}@d{}", rng.random_range(1..=users), rng.random_range(1..=2u32));
        let name = match rng.random_range(0..boxes) {
            0 => "INBOX".to_string(),
            k => format!("Box{k}"),
        };
        let mailbox = MailboxKey::new(&user, &name);
        let flag = |rng: &mut ChaCha8Rng| {
            Flag::new(flag_names[rng.random_range(0..flag_names.len())]).ok().into_iter().collect()
        };
        let known: Vec<&(MailboxKey, String)> = labels.iter().filter(|(m, _)| *m == mailbox).collect();
        let some_label =
            |rng: &mut ChaCha8Rng| known.get(rng.random_range(0..known.len().max(1))).map(|(_, l)| l.clone());
        let roll = rng.random_range(0..100u32);
        let action = match roll {
            0..40 => {
                next_label += 1;
                let label = format!("m{next_label}");
                labels.push((mailbox.clone(), label.clone()));
                let flags = if rng.random_bool(0.3) { flag(&mut rng) } else { Vec::new() };
                Action::Save { server, mailbox, label: Some(label), flags, size: rng.random_range(100..2000) }
            }
            // A quarter of the fresh reads (by the clock, leaving the generator's
            // sequence as it was) ask for STATUS counts instead.
            40..60 => match rng.random_bool(0.5) {
                true if t % 4 == 0 => Action::Status { server, mailbox },
                fresh => Action::Read { server, mailbox, fresh },
            },
            60..76 => {
                let Some(label) = some_label(&mut rng) else { continue };
                let (add, remove) =
                    if rng.random_bool(0.5) { (flag(&mut rng), Vec::new()) } else { (Vec::new(), flag(&mut rng)) };
                let unchanged_since = rng.random_bool(0.2).then_some(UnchangedSince::Current);
                Action::Store { server, mailbox, labels: vec![label], add, remove, unchanged_since }
            }
            76..82 => {
                let Some(label) = some_label(&mut rng) else { continue };
                Action::Expunge { server, mailbox, labels: vec![label] }
            }
            82..88 => {
                let Some(label) = some_label(&mut rng) else { continue };
                let to = MailboxKey::new(&mailbox.user, if &*mailbox.name == "INBOX" { "Box9" } else { "INBOX" });
                next_label += 1;
                let as_label = format!("m{next_label}");
                labels.push((to.clone(), as_label.clone()));
                // Every other copy is a MOVE (by the label count, not the generator, so
                // that the rest of the scenario is drawn as before moves were made).
                let moving = next_label % 2 == 0;
                Action::Copy { server, from: mailbox, label, to, as_label: Some(as_label), moving }
            }
            88..94 => Action::MasterMove { server, mailbox },
            // Deleting or corrupting a file destroys a copy: only where the mode keeps a
            // second durable one can the protocol repair it.
            _ if mix == FaultMix::Everything && durability == Durability::Sync && replicas > 0 => {
                match rng.random_range(0..3u32) {
                    0 => {
                        next_label += 1;
                        let label = format!("m{next_label}");
                        labels.push((mailbox.clone(), label.clone()));
                        Action::HandAdd { server, mailbox, label: Some(label) }
                    }
                    1 => {
                        let Some(label) = some_label(&mut rng) else { continue };
                        Action::HandDelete { server, mailbox, label }
                    }
                    _ => {
                        let Some(label) = some_label(&mut rng) else { continue };
                        Action::Corrupt { server, label }
                    }
                }
            }
            // Mailbox lifecycle now and then: RENAME (its labels follow it), CREATE,
            // DELETE (of INBOX: refused).
            94..97 => match rng.random_range(0..3u32) {
                0 => {
                    let to = MailboxKey::new(&mailbox.user, &format!("Ren{}", rng.random_range(1..=3u32)));
                    for entry in labels.iter_mut().filter(|(m, _)| *m == mailbox) {
                        entry.0 = to.clone();
                    }
                    Action::RenameMailbox { server, from: mailbox, to }
                }
                // Every other CREATE gives a special use, taken from the time rather
                // than the generator so the rest of the seed's workload is unchanged.
                1 => {
                    let special_use = if t % 2 == 0 { SpecialUse(1 << (t / 2 % 7)) } else { SpecialUse::NONE };
                    Action::CreateMailbox { server, mailbox, special_use }
                }
                _ => Action::DeleteMailbox { server, mailbox },
            },
            _ => Action::Read { server, mailbox, fresh: false },
        };
        events.push(TimedEvent { at_ms: t, id: None, action, expect: None, line: 0 });
    }
    let faults = match mix {
        FaultMix::None => 0,
        _ => rng.random_range(1..=6u32),
    };
    let lose_budget = match durability {
        Durability::Sync => usize::from(replicas),
        Durability::Async => 0,
    };
    let mut lost = 0;
    // Saves at the server that first saved into their mailbox: most likely its master.
    let mut first_saver: BTreeMap<MailboxKey, Sid> = BTreeMap::new();
    let saves: Vec<(u64, Sid)> = events
        .iter()
        .filter_map(|e| match &e.action {
            Action::Save { server, mailbox, .. } => {
                let first = *first_saver.entry(mailbox.clone()).or_insert(*server);
                (first == *server).then_some((e.at_ms, *server))
            }
            _ => None,
        })
        .collect();
    for _ in 0..faults {
        let mut at = rng.random_range(200..duration_ms);
        let mut target = None;
        if mix == FaultMix::Losses && !saves.is_empty() && rng.random_bool(0.7) {
            // Right after a SAVE, at the server that took it: the moment a copy is most
            // likely to exist only there.
            let (t, s) = saves[rng.random_range(0..saves.len())];
            at = t + rng.random_range(1..=4);
            target = Some(s);
        }
        let heal_at = at + rng.random_range(300..4_000u64);
        let a = target.unwrap_or_else(|| servers[rng.random_range(0..servers.len())]);
        let b = servers[rng.random_range(0..servers.len())];
        let kinds: &[u8] = match mix {
            FaultMix::Partitions => &[0, 1],
            FaultMix::Crashes => &[2],
            // Slow links, one-way silences and resets noticed at one end first too: what
            // TCP does besides breaking.
            FaultMix::Links => &[3, 4, 6, 7, 8],
            FaultMix::Losses => &[2, 5],
            _ => &[0, 1, 2, 3, 4],
        };
        let (fault, heal) = match kinds[rng.random_range(0..kinds.len())] {
            0 => {
                let (mut left, mut right) = (Vec::new(), Vec::new());
                for &s in &servers {
                    if rng.random_bool(0.5) { left.push(s) } else { right.push(s) }
                }
                left.retain(|s| !right.contains(s));
                let groups: Vec<Vec<Sid>> = [left, right].into_iter().filter(|g| !g.is_empty()).collect();
                (Action::Partition { groups }, Some(Action::Heal))
            }
            1 => (Action::Isolate { server: a }, Some(Action::Heal)),
            2 => (Action::Crash { server: a }, Some(Action::Restart { server: a })),
            3 if a != b => (Action::Cut { a, b }, Some(Action::Restore { a, b })),
            4 if a != b => (Action::Flap { a, b, down_ms: rng.random_range(10..1_000) }, None),
            6 if a != b => {
                let (delay_ms, for_ms) = (rng.random_range(500..4_000), rng.random_range(1_000..10_000));
                (Action::Slow { a, b, delay_ms, for_ms }, None)
            }
            7 if a != b => (Action::Silence { from: a, to: b, for_ms: rng.random_range(500..8_000) }, None),
            8 if a != b => (Action::Reset { a, b, down_ms: rng.random_range(10..1_000) }, None),
            5 if lost < lose_budget => {
                lost += 1;
                (Action::Lose { server: a }, Some(Action::Replace { server: a }))
            }
            _ => continue,
        };
        events.push(TimedEvent { at_ms: at, id: None, action: fault, expect: None, line: 0 });
        if let Some(heal) = heal {
            events.push(TimedEvent { at_ms: heal_at, id: None, action: heal, expect: None, line: 0 });
        }
    }
    events.sort_by_key(|e| e.at_ms);
    // Drawn last, so the rest of a seed's scenario is what it was before tombstones were
    // collected. The shortest grace is just above the longest a message can travel here
    // (32 hops at the slowest latency); the longest never collects within the run.
    let tombstone_grace_ms = pick(
        &mut rng,
        &[
            (40, u64::from(tandem_core::HOPS_MAX) * latency_ms.1 + 500),
            (40, crate::scenario::TOMBSTONE_GRACE_MS_DEFAULT),
            (20, 600_000),
        ],
    );
    // Membership changes and writes right after a start, drawn after everything else so
    // the rest of a seed's scenario is what it was before they existed.
    let mut links = links;
    let spares = membership_changes(&mut rng, &mut events, &servers, &mut links, durability, replicas, duration_ms);
    writes_after_starts(&mut rng, &mut events, &labels);
    imports(&mut rng, &mut events, &servers, users, duration_ms);
    let laptops = laptop(&mut rng, &mut events, &servers, &labels, (users, boxes), duration_ms);
    // A server that leaves takes its copies with it: in sync mode the servers left
    // holding every body must still be enough for the copies promised (explore seed
    // 448759 had one full server left beside a partial one, as an operator must not).
    let leaves = events.iter().any(|e| matches!(e.action, Action::MemberRemove { lost: false, .. }));
    let whole_servers_min = usize::from(replicas) + 1 + usize::from(leaves && durability == Durability::Sync);
    let partial_servers = partial_server(&mut rng, &mut events, &servers, &labels, whole_servers_min, duration_ms);
    events.sort_by_key(|e| e.at_ms);
    Scenario {
        name: format!("explore-seed-{seed}"),
        path: None,
        seed,
        wire: false,
        cluster: ClusterSpec {
            servers,
            spares,
            replicas,
            durability,
            log_capacity,
            granularity,
            latency_ms,
            links,
            disk_latency_us: (200, 1000),
            request_timeout_ms: 5000,
            tombstone_grace_ms,
            startup_hold_ms: crate::scenario::STARTUP_HOLD_MS_DEFAULT,
            mta_retry_ms: Some(MTA_RETRY_MS),
            laptops,
            partial_servers,
        },
        events,
        expects: vec![Expect::Invariants],
        settle_ms: 30_000,
        heal_at_end: true,
        schedule: Vec::new(),
    }
}

/// A server joins (a spare, started when it is added), one leaves, or both (a server
/// replaced under a new id); returns the spares. A leave keeps more servers than sync
/// mode's copies need.
fn membership_changes(
    rng: &mut ChaCha8Rng,
    events: &mut Vec<TimedEvent>,
    servers: &[Sid],
    links: &mut Option<Vec<LinkSpec>>,
    durability: Durability,
    replicas: u8,
    duration_ms: u64,
) -> Vec<Sid> {
    let (join, leave) = match pick(rng, &[(70, 0u8), (12, 1), (12, 2), (6, 3)]) {
        0 => (false, false),
        1 => (true, false),
        2 => (false, true),
        _ => (true, true),
    };
    let mut spares = Vec::new();
    let event = |at_ms, action| TimedEvent { at_ms, id: None, action, expect: None, line: 0 };
    // Drawn first, so that a server joining is not linked to the one leaving alone.
    let leaving = servers[rng.random_range(0..servers.len())];
    if join {
        let spare = Sid(servers.iter().map(|s| s.0).max().unwrap_or(0) + 1);
        spares.push(spare);
        if let Some(list) = links.as_mut() {
            // Joined to one or two servers of the drawn topology.
            let stay: Vec<Sid> = servers.iter().copied().filter(|s| !leave || *s != leaving).collect();
            for _ in 0..rng.random_range(1..=2u32) {
                let Some(&a) = stay.get(rng.random_range(0..stay.len().max(1))) else { break };
                if !list.iter().any(|l| l.a == a && l.b == spare) {
                    list.push(LinkSpec { a, b: spare, latency_ms: None });
                }
            }
        }
        let at = rng.random_range(200..duration_ms.max(201));
        let server = servers[rng.random_range(0..servers.len())];
        events.push(event(at, Action::MemberAdd { server, member: spare }));
    }
    let remaining = servers.len() + spares.len() - 1;
    let enough = match durability {
        Durability::Sync => remaining > usize::from(replicas),
        Durability::Async => remaining >= 1,
    };
    if leave && enough && servers.len() >= 2 {
        let member = leaving;
        let server = servers[rng.random_range(0..servers.len())];
        let at = rng.random_range(200..duration_ms.max(201));
        events.push(event(at, Action::MemberRemove { server, member, lost: false }));
    }
    spares
}

/// Now and then a save right after a server (re)starts, at that server: within the
/// start-up hold, before it has heard its peers.
fn writes_after_starts(rng: &mut ChaCha8Rng, events: &mut Vec<TimedEvent>, labels: &[(MailboxKey, String)]) {
    let starts: Vec<(u64, Sid)> = events
        .iter()
        .filter_map(|e| match e.action {
            Action::Restart { server } | Action::Replace { server } => Some((e.at_ms, server)),
            Action::MemberAdd { member, .. } => Some((e.at_ms, member)),
            _ => None,
        })
        .collect();
    for (i, (at, server)) in starts.into_iter().enumerate() {
        if !rng.random_bool(0.5) {
            continue;
        }
        let mailbox = match labels.get(rng.random_range(0..labels.len().max(1))) {
            Some((m, _)) => m.clone(),
            None => MailboxKey::new("u1@d1", "INBOX"),
        };
        let label = Some(format!("start{i}"));
        let at_ms = at + rng.random_range(0..=10);
        let size = rng.random_range(100..2000);
        let action = Action::Save { server, mailbox, label, flags: Vec::new(), size };
        events.push(TimedEvent { at_ms, id: None, action, expect: None, line: 0 });
    }
}

/// Now and then a user's laptop (a user replica, issue 17): work on it while it is
/// offline (saves, flag changes, expunges, copies, a new folder), between syncs through
/// a cluster server over a LAN or a satellite link, while the cluster goes on with the
/// same user's mail. Drawn after everything else.
fn laptop(
    rng: &mut ChaCha8Rng,
    events: &mut Vec<TimedEvent>,
    servers: &[Sid],
    labels: &[(MailboxKey, String)],
    (users, boxes): (u32, u32),
    duration_ms: u64,
) -> Vec<LaptopSpec> {
    if !rng.random_bool(0.3) {
        return Vec::new();
    }
    // Above any spare's id (a spare is the highest server's plus one).
    let sid = Sid(servers.iter().map(|s| s.0).max().unwrap_or(0) + 10);
    let user = format!("u{}@d{}", rng.random_range(1..=users), rng.random_range(1..=2u32));
    let home = servers[rng.random_range(0..servers.len())];
    let latency_ms = pick(rng, &[(60, (1, 10)), (40, (500, 2_000))]);
    let event = |at_ms, action| TimedEvent { at_ms, id: None, action, expect: None, line: 0 };
    for _ in 0..rng.random_range(1..=4u32) {
        // Now and then through another server (its user took the laptop elsewhere).
        let through = rng.random_bool(0.2).then(|| servers[rng.random_range(0..servers.len())]);
        events
            .push(event(rng.random_range(200..duration_ms.max(201)), Action::Replicate { server: sid, home: through }));
    }
    let mut mine: Vec<(MailboxKey, String)> = labels.iter().filter(|(m, _)| *m.user == *user).cloned().collect();
    let flags = ["\\Seen", "\\Flagged", "\\Draft", "$Work"];
    for n in 0..rng.random_range(3..=20u32) {
        let at = rng.random_range(200..duration_ms.max(201));
        let name = match rng.random_range(0..=boxes) {
            0 => "INBOX".to_string(),
            k if k == boxes => "Notes".to_string(),
            k => format!("Box{k}"),
        };
        let mailbox = MailboxKey::new(&user, &name);
        let flag: Vec<Flag> = Flag::new(flags[rng.random_range(0..flags.len())]).ok().into_iter().collect();
        let known: Vec<String> = mine.iter().filter(|(m, _)| *m == mailbox).map(|(_, l)| l.clone()).collect();
        let label = known.get(rng.random_range(0..known.len().max(1))).cloned();
        let action = match (rng.random_range(0..100u32), label) {
            (0..45, _) | (_, None) => {
                let label = format!("laptop{n}");
                mine.push((mailbox.clone(), label.clone()));
                let flags = if rng.random_bool(0.3) { flag } else { Vec::new() };
                Action::Save { server: sid, mailbox, label: Some(label), flags, size: rng.random_range(100..2000) }
            }
            (45..70, Some(label)) => {
                let (add, remove) = if rng.random_bool(0.6) { (flag, Vec::new()) } else { (Vec::new(), flag) };
                Action::Store { server: sid, mailbox, labels: vec![label], add, remove, unchanged_since: None }
            }
            (70..82, Some(label)) => Action::Expunge { server: sid, mailbox, labels: vec![label] },
            (82..94, Some(label)) => {
                let to = MailboxKey::new(&user, if name == "INBOX" { "Notes" } else { "INBOX" });
                let as_label = format!("laptop{n}-copy");
                mine.push((to.clone(), as_label.clone()));
                Action::Copy { server: sid, from: mailbox, label, to, as_label: Some(as_label), moving: n % 2 == 0 }
            }
            _ => Action::CreateMailbox { server: sid, mailbox, special_use: SpecialUse::NONE },
        };
        events.push(event(at, action));
    }
    // Now and then a partial laptop: some folders, recent mail, small bodies, and a
    // client reading bodies it left on the cluster.
    let partial = rng.random_bool(0.4).then(|| tandem_core::partial::Partial {
        mailboxes: match rng.random_range(0..3u32) {
            0 => Vec::new(),
            1 => vec!["INBOX".to_string(), "Notes".to_string()],
            _ => vec!["Box%".to_string(), "INBOX".to_string()],
        },
        since_s: if rng.random_bool(0.5) {
            crate::scenario::SIM_EPOCH_S + rng.random_range(0..duration_ms / 2000 + 1)
        } else {
            0
        },
        body_bytes_max: rng.random_bool(0.6).then(|| rng.random_range(200..1500u32)),
        keep_fetched: rng.random_bool(0.5),
    });
    if partial.is_some() {
        for _ in 0..rng.random_range(0..=6u32) {
            let Some((mailbox, label)) = mine.get(rng.random_range(0..mine.len().max(1))).cloned() else { break };
            let at = rng.random_range(200..duration_ms.max(201));
            events.push(event(at, Action::FetchBody { server: sid, mailbox, label }));
        }
    }
    vec![LaptopSpec { sid, user, home, latency_ms, partial }]
}

/// Now and then a partial cluster server (issue 17): one server that keeps bodies above a
/// size only while it masters their save or once a client asks, with clients reading
/// bodies through it. Only where the other servers can hold every save's copies, also
/// once a server has left (`whole_servers_min` of them); drawn after everything else.
fn partial_server(
    rng: &mut ChaCha8Rng,
    events: &mut Vec<TimedEvent>,
    servers: &[Sid],
    labels: &[(MailboxKey, String)],
    whole_servers_min: usize,
    duration_ms: u64,
) -> BTreeMap<Sid, tandem_core::partial::Partial> {
    if servers.len() < whole_servers_min + 1 || !rng.random_bool(0.15) {
        return BTreeMap::new();
    }
    let sid = servers[rng.random_range(0..servers.len())];
    let mut spec = tandem_core::partial::Partial {
        body_bytes_max: Some(rng.random_range(200..1500u32)),
        keep_fetched: rng.random_bool(0.5),
        ..Default::default()
    };
    // Some hold the bodies of some mailboxes or dates only (and maybe no size limit).
    match rng.random_range(0..4u32) {
        0 => spec.mailboxes = vec!["%/INBOX".into()],
        1 => spec.mailboxes = vec!["u1@*/*".into(), "*/Box%".into()],
        2 => spec.since_s = crate::scenario::SIM_EPOCH_S + rng.random_range(0..duration_ms / 2000 + 1),
        _ => {}
    }
    if !spec.mailboxes.is_empty() && rng.random_bool(0.5) {
        spec.body_bytes_max = None;
    }
    for _ in 0..rng.random_range(0..=8u32) {
        let Some((mailbox, label)) = labels.get(rng.random_range(0..labels.len().max(1))).cloned() else { break };
        let at_ms = rng.random_range(200..duration_ms.max(201));
        let action = Action::FetchBody { server: sid, mailbox, label };
        events.push(TimedEvent { at_ms, id: None, action, expect: None, line: 0 });
    }
    BTreeMap::from([(sid, spec)])
}

/// Now and then a migration (`tandem import`) into a user's mailbox while everything
/// else goes on: messages at UIDs of their own (gaps between them) under a UIDVALIDITY
/// of their own, through any server, some sent twice (a resumed import); mostly into a
/// new mailbox, sometimes into INBOX, which may have history (then the UIDs are refused
/// and kept nowhere). Drawn after everything else.
fn imports(rng: &mut ChaCha8Rng, events: &mut Vec<TimedEvent>, servers: &[Sid], users: u32, duration_ms: u64) {
    if !rng.random_bool(0.25) {
        return;
    }
    let user = format!("u{}@d{}", rng.random_range(1..=users), rng.random_range(1..=2u32));
    let name = if rng.random_bool(0.8) { format!("Imported{}", rng.random_range(1..=2u32)) } else { "INBOX".into() };
    let mailbox = MailboxKey::new(&user, &name);
    let uidvalidity = rng.random_range(1..=1_000_000_000u32);
    let mut uid = rng.random_range(1..=50u32);
    let mut at_ms = rng.random_range(300..=duration_ms);
    let mut sent: Vec<(String, u32)> = Vec::new();
    for i in 0..rng.random_range(3..=15u32) {
        let server = servers[rng.random_range(0..servers.len())];
        let (label, this_uid) = match sent.get(rng.random_range(0..sent.len().max(1))) {
            Some((label, u)) if rng.random_bool(0.2) => (label.clone(), *u),
            _ => {
                uid += rng.random_range(1..=5u32);
                let label = format!("imp{i}");
                sent.push((label.clone(), uid));
                (label, uid)
            }
        };
        let size = 100 + (this_uid as usize * 37) % 1900;
        let action = Action::Import {
            server,
            mailbox: mailbox.clone(),
            label,
            uidvalidity,
            uid: this_uid,
            flags: Vec::new(),
            size,
        };
        events.push(TimedEvent { at_ms, id: None, action, expect: None, line: 0 });
        at_ms += rng.random_range(5..=200);
    }
}

/// A random connected graph: a random spanning tree plus some extra links.
fn random_connected(rng: &mut ChaCha8Rng, servers: &[Sid]) -> Vec<LinkSpec> {
    let mut links = Vec::new();
    for i in 1..servers.len() {
        let j = rng.random_range(0..i);
        links.push(LinkSpec { a: servers[j], b: servers[i], latency_ms: None });
    }
    for _ in 0..servers.len() / 2 {
        let (i, j) = (rng.random_range(0..servers.len()), rng.random_range(0..servers.len()));
        let (a, b) = (servers[i.min(j)], servers[i.max(j)]);
        if a != b && !links.iter().any(|l| l.a == a && l.b == b) {
            links.push(LinkSpec { a, b, latency_ms: None });
        }
    }
    links
}

/// Three data centres: 1-2 ms inside, 100-110 ms across.
fn data_centres(servers: &[Sid]) -> Vec<LinkSpec> {
    let mut links = Vec::new();
    for (i, &a) in servers.iter().enumerate() {
        for (j, &b) in servers.iter().enumerate().skip(i + 1) {
            let same = i % 3 == j % 3;
            links.push(LinkSpec { a, b, latency_ms: Some(if same { (1, 2) } else { (100, 110) }) });
        }
    }
    links
}

/// What one seed did.
#[derive(Clone, Debug)]
pub struct SeedResult {
    pub seed: u64,
    pub passed: bool,
    /// The first invariant broken, `panic`, or the first failure line.
    pub broken: Option<String>,
    pub detail: Option<String>,
    pub marks: Vec<String>,
    pub events: usize,
}

/// The failure category a shrink must keep: the first invariant broken, or "panic".
pub fn category(report: &RunReport) -> Option<String> {
    if report.passed {
        return None;
    }
    Some(report.violations.first().map(|v| v.invariant.to_string()).unwrap_or_else(|| {
        report
            .failures
            .first()
            .map(|f| if f.starts_with("panic") { "panic".to_string() } else { "failure".to_string() })
            .unwrap_or_default()
    }))
}

/// Runs a scenario; a panic in the core or the simulator is a failure like any other.
pub fn run_guarded(s: &Scenario, opts: &RunOptions) -> RunReport {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(s, opts)));
    outcome.unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        RunReport {
            name: s.name.clone(),
            seed: s.seed,
            passed: false,
            failures: vec![format!("panic: {text}")],
            ..Default::default()
        }
    })
}

/// The scenario of `seed`: the general generator's, or a focused one's.
pub fn scenario_of(seed: u64, focus: Option<Focus>) -> Scenario {
    match focus {
        Some(focus) => crate::focus::generate(focus, seed),
        None => generate(seed),
    }
}

pub fn run_seed(seed: u64, bug: Option<Bug>, focus: Option<Focus>) -> SeedResult {
    let scenario = scenario_of(seed, focus);
    let report = run_guarded(&scenario, &RunOptions { bug, ..Default::default() });
    SeedResult {
        seed,
        passed: report.passed,
        broken: category(&report),
        detail: report
            .violations
            .first()
            .map(|v| format!("{} at {:.3} ms", v.detail, v.time_us as f64 / 1000.0))
            .or_else(|| report.failures.first().cloned()),
        marks: report.marks.iter().filter(|(_, c)| **c > 0).map(|(k, _)| k.clone()).collect(),
        events: scenario.events.len(),
    }
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seeds_run: u64,
    pub failures: Vec<SeedResult>,
    /// Seeds that hit each coverage mark.
    pub marks: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

pub struct ExploreOptions {
    pub from: u64,
    pub seeds: u64,
    pub threads: usize,
    pub time_budget: Option<Duration>,
    pub bug: Option<Bug>,
    /// Seeds of a focused generator (`focus`) instead of the general one.
    pub focus: Option<Focus>,
    /// Stop after this many failing seeds (0: never).
    pub stop_after_failures: usize,
    pub progress: bool,
}

/// Runs seeds `from..from+seeds` on `threads` threads.
pub fn explore(opts: &ExploreOptions) -> Summary {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(opts.from));
    let stop = Arc::new(AtomicBool::new(false));
    let end = opts.from.saturating_add(opts.seeds);
    let (tx, rx) = mpsc::channel::<SeedResult>();
    let mut workers = Vec::new();
    for _ in 0..opts.threads.max(1) {
        let (next, stop, tx, bug, focus) = (next.clone(), stop.clone(), tx.clone(), opts.bug, opts.focus);
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    break;
                }
                if tx.send(run_seed(seed, bug, focus)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut summary = Summary::default();
    let mut last_progress = Instant::now();
    for result in rx {
        summary.seeds_run += 1;
        for m in &result.marks {
            *summary.marks.entry(m.clone()).or_default() += 1;
        }
        if !result.passed {
            if opts.progress {
                crate::say!(
                    "seed {} broke {}: {}",
                    result.seed,
                    result.broken.as_deref().unwrap_or("?"),
                    result.detail.as_deref().unwrap_or("")
                );
            }
            summary.failures.push(result);
            if opts.stop_after_failures > 0 && summary.failures.len() >= opts.stop_after_failures {
                stop.store(true, Ordering::Relaxed);
            }
        }
        if opts.time_budget.is_some_and(|b| started.elapsed() >= b) {
            stop.store(true, Ordering::Relaxed);
        }
        if opts.progress && last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let rate = summary.seeds_run as f64 / started.elapsed().as_secs_f64();
            crate::say!(
                "... {}/{} seeds, {} failing, {:.1} seeds/s, {:.0} s",
                summary.seeds_run,
                opts.seeds,
                summary.failures.len(),
                rate,
                started.elapsed().as_secs_f64()
            );
        }
    }
    for w in workers {
        let _ = w.join();
    }
    summary.failures.sort_by_key(|f| f.seed);
    summary.elapsed = started.elapsed();
    summary
}

/// The coverage table: every mark of the core, with the seeds that hit it.
pub fn mark_table(summary: &Summary) -> String {
    let width = Mark::ALL.iter().map(|m| m.name().len()).max().unwrap_or(0);
    let mut out = format!("{:<width$} {:>6} {:>6}\n", "mark", "seeds", "%");
    for mark in Mark::ALL {
        let hit = summary.marks.get(mark.name()).copied().unwrap_or(0);
        let pct = if summary.seeds_run == 0 { 0.0 } else { 100.0 * hit as f64 / summary.seeds_run as f64 };
        out.push_str(&format!("{:<width$} {:>6} {:>6.1}\n", mark.name(), hit, pct));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario_write::to_toml;

    #[test]
    fn generated_scenarios_survive_a_round_trip_through_a_file() {
        for seed in 1..=300 {
            let original = generate(seed);
            let text = to_toml(&original, "generated");
            let mut back = parse(&text, None).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{text}"));
            back.name = original.name.clone();
            for e in &mut back.events {
                e.line = 0;
            }
            assert_eq!(original, back, "seed {seed}");
        }
    }

    #[test]
    fn a_seed_runs_the_same_with_and_without_a_trace() {
        for seed in [583, 612, 7, 8] {
            let s = generate(seed);
            let quiet = run(&s, &RunOptions::default());
            let traced = run(&s, &RunOptions { tail: true, ..Default::default() });
            assert_eq!(quiet.trace_hash, traced.trace_hash, "seed {seed}");
            assert_eq!(quiet.passed, traced.passed, "seed {seed}");
        }
    }
}
