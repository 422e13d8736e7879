//! Focused generators: small scenarios drawn around one window the general generator
//! (`explore::generate`) reaches too rarely to sweep, each a few events on three
//! servers, so that thousands run in seconds (`tandem-sim explore --focus NAME`).
//!
//! - `move-back`: a message expunged, its tombstone collected on one side of a partition
//!   while the other side holds it, the side's servers restarted (forgetting the
//!   collection), and the message copied or moved back into the mailbox, then the sides
//!   rearranged or healed. Found the loss fixed by `MergeRules::from_log` (44 of its first
//!   4,000 seeds fail under the broken variant `expunge-wins-over-log-copy`).
//! - `laptop`: a laptop of one user beside three servers; saves, copies, moves and
//!   expunges on both, its agent's syncs, RENAMEs, master moves, crashes, lost disks and
//!   partitions in any order. Found explore seed 1159717's second order of adopts and a
//!   false alarm of the oracle after lost async disks.
use crate::scenario::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_core::{Durability, Granularity, MailboxKey, Sid};

/// Mixed into each focus's seed, so that its seed N is not the general generator's.
const FOCUS_SALT: u64 = 0xf0c5_5eed_f0c5_5eed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    MoveBack,
    Laptop,
}

impl Focus {
    pub const ALL: [Focus; 2] = [Focus::MoveBack, Focus::Laptop];

    pub fn name(self) -> &'static str {
        match self {
            Focus::MoveBack => "move-back",
            Focus::Laptop => "laptop",
        }
    }

    pub fn from_name(name: &str) -> Option<Focus> {
        Focus::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// The scenario of `seed` under `focus`.
pub fn generate(focus: Focus, seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ FOCUS_SALT ^ (focus as u64).wrapping_mul(0x9e37_79b9));
    let mut draft = match focus {
        Focus::MoveBack => move_back(&mut rng),
        Focus::Laptop => laptop(&mut rng),
    };
    draft.events.sort_by_key(|e| e.at_ms);
    Scenario {
        name: format!("focus-{}-{seed}", focus.name()),
        path: None,
        seed,
        wire: false,
        cluster: ClusterSpec {
            servers: servers(),
            spares: Vec::new(),
            replicas: 1,
            durability: draft.durability,
            log_capacity: draft.log_capacity,
            granularity: draft.granularity,
            latency_ms: draft.latency_ms,
            links: None,
            disk_latency_us: (200, 1000),
            request_timeout_ms: 5000,
            tombstone_grace_ms: draft.tombstone_grace_ms,
            startup_hold_ms: STARTUP_HOLD_MS_DEFAULT,
            mta_retry_ms: Some(crate::explore::MTA_RETRY_MS),
            laptops: draft.laptops,
            partial_servers: Default::default(),
        },
        events: draft.events,
        expects: vec![Expect::Invariants],
        settle_ms: 30_000,
        heal_at_end: true,
        schedule: Vec::new(),
    }
}

struct Draft {
    events: Vec<TimedEvent>,
    durability: Durability,
    granularity: Granularity,
    log_capacity: usize,
    latency_ms: (u64, u64),
    tombstone_grace_ms: u64,
    laptops: Vec<LaptopSpec>,
}

impl Draft {
    fn new(rng: &mut ChaCha8Rng, log_capacities: &[usize], latencies_ms: &[u64], graces_ms: &[u64]) -> Draft {
        Draft {
            events: Vec::new(),
            durability: if rng.random_bool(0.5) { Durability::Sync } else { Durability::Async },
            granularity: one_of(rng, &[Granularity::Global, Granularity::Mailbox, Granularity::User]),
            log_capacity: one_of(rng, log_capacities),
            latency_ms: (1, one_of(rng, latencies_ms)),
            tombstone_grace_ms: one_of(rng, graces_ms),
            laptops: Vec::new(),
        }
    }

    fn at(&mut self, at_ms: u64, action: Action) {
        self.events.push(TimedEvent { at_ms, id: None, action, expect: None, line: 0 });
    }
}

fn servers() -> Vec<Sid> {
    vec![Sid(1), Sid(2), Sid(3)]
}

fn one_of<T: Clone>(rng: &mut ChaCha8Rng, choices: &[T]) -> T {
    choices[rng.random_range(0..choices.len())].clone()
}

fn save(server: Sid, mailbox: &MailboxKey, label: &str, size: usize) -> Action {
    Action::Save { server, mailbox: mailbox.clone(), label: Some(label.to_string()), flags: Vec::new(), size }
}

fn copy(server: Sid, from: &MailboxKey, label: &str, to: &MailboxKey, as_label: &str, moving: bool) -> Action {
    Action::Copy {
        server,
        from: from.clone(),
        label: label.to_string(),
        to: to.clone(),
        as_label: Some(as_label.to_string()),
        moving,
    }
}

fn move_back(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[2, 4, 40], &[2, 5, 20], &[300, 660, 1000]);
    let all = servers();
    let (box1, inbox) = (MailboxKey::new("u2@d2", "Box1"), MailboxKey::new("u2@d2", "INBOX"));
    let cut = one_of(rng, &all);
    let side: Vec<Sid> = all.iter().copied().filter(|s| *s != cut).collect();
    d.at(500, save(one_of(rng, &all), &box1, "m1", 100));
    d.at(900, copy(one_of(rng, &all), &box1, "m1", &inbox, "m2", false));
    d.at(1300, Action::Expunge { server: one_of(rng, &all), mailbox: inbox.clone(), labels: vec!["m2".into()] });
    // Late enough that every server has shown the master the expunge (the collection
    // then goes ahead on the side without `cut`).
    let partition_ms = rng.random_range(2500..=4500u64);
    d.at(partition_ms, Action::Partition { groups: vec![side.clone(), vec![cut]] });
    let mut t = partition_ms + rng.random_range(1500..=3500u64);
    for &s in &side {
        if rng.random_bool(0.8) {
            d.at(t, Action::Crash { server: s });
            d.at(t + rng.random_range(20..=200u64), Action::Restart { server: s });
        }
    }
    t += rng.random_range(300..=3000u64);
    if rng.random_bool(0.7) {
        d.at(t, Action::MasterMove { server: one_of(rng, &side), mailbox: inbox.clone() });
        t += rng.random_range(100..=1500u64);
    }
    if rng.random_bool(0.5) {
        d.at(t, Action::MasterMove { server: cut, mailbox: inbox.clone() });
        t += rng.random_range(10..=300u64);
    }
    let moving = rng.random_bool(1.0 / 3.0);
    d.at(t, copy(one_of(rng, &side), &box1, "m1", &inbox, "m3", moving));
    t += rng.random_range(1..=400u64);
    let roll = rng.random_range(0..10u32);
    if roll < 4 {
        let a = one_of(rng, &side);
        let b = side.iter().copied().find(|s| *s != a).unwrap_or(a);
        d.at(t, Action::Partition { groups: vec![vec![a], vec![b, cut]] });
    } else if roll < 6 {
        d.at(t, Action::Heal);
    }
    t += rng.random_range(1..=300u64);
    if rng.random_bool(0.5) {
        d.at(t, Action::MasterMove { server: one_of(rng, &all), mailbox: inbox.clone() });
    }
    t += rng.random_range(100..=3000u64);
    d.at(t, save(one_of(rng, &all), &box1, "m9", 100));
    d
}

fn laptop(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all = servers();
    let laptop = Sid(13);
    let user = "u1@d1";
    d.laptops.push(LaptopSpec {
        sid: laptop,
        user: user.to_string(),
        home: one_of(rng, &all),
        latency_ms: (1, 10),
        partial: None,
    });
    let mut with_laptop = all.clone();
    with_laptop.push(laptop);
    let mut boxes = vec![MailboxKey::new(user, "INBOX"), MailboxKey::new(user, "Box1")];
    let mut labels: Vec<String> = Vec::new();
    let mut renames = 0;
    let mut t = 300;
    for _ in 0..rng.random_range(8..=16u32) {
        t += rng.random_range(50..=900u64);
        let roll = rng.random_range(0..100u32);
        match roll {
            0..22 => {
                let label = format!("m{}", labels.len() + 1);
                let server = if rng.random_bool(0.4) { laptop } else { one_of(rng, &all) };
                let size = one_of(rng, &[100, 1500]);
                d.at(t, save(server, &one_of(rng, &boxes), &label, size));
                labels.push(label);
            }
            22..32 => d.at(t, Action::Replicate { server: laptop, home: None }),
            32..40 if !labels.is_empty() => {
                let label = labels[rng.random_range(0..labels.len())].clone();
                let from = one_of(rng, &boxes);
                let others: Vec<MailboxKey> = boxes.iter().filter(|b| **b != from).cloned().collect();
                let to = one_of(rng, &others);
                let as_label = format!("m{}", labels.len() + 1);
                d.at(t, copy(one_of(rng, &with_laptop), &from, &label, &to, &as_label, rng.random_bool(0.5)));
                labels.push(as_label);
            }
            40..46 if !labels.is_empty() => {
                let label = labels[rng.random_range(0..labels.len())].clone();
                let mailbox = one_of(rng, &boxes);
                d.at(t, Action::Expunge { server: one_of(rng, &with_laptop), mailbox, labels: vec![label] });
            }
            46..54 => d.at(t, Action::MasterMove { server: one_of(rng, &all), mailbox: one_of(rng, &boxes) }),
            54..62 => {
                let server = one_of(rng, &all);
                let fault = if rng.random_bool(0.5) { Action::Lose { server } } else { Action::Crash { server } };
                d.at(t, fault);
                d.at(t + rng.random_range(50..=800u64), Action::Restart { server });
            }
            62..70 => {
                renames += 1;
                let from = one_of(rng, &boxes);
                let to = MailboxKey::new(user, &format!("Ren{renames}"));
                d.at(
                    t,
                    Action::RenameMailbox { server: one_of(rng, &with_laptop), from: from.clone(), to: to.clone() },
                );
                // A RENAME of INBOX leaves an empty INBOX behind.
                boxes.retain(|b| *b != from || &*b.name == "INBOX");
                boxes.push(to);
            }
            70..80 => {
                let alone = one_of(rng, &all);
                let rest: Vec<Sid> = all.iter().copied().filter(|s| *s != alone).collect();
                d.at(t, Action::Partition { groups: vec![vec![alone], rest] });
            }
            80..86 => d.at(t, Action::Heal),
            _ => d.at(t, Action::Replicate { server: laptop, home: None }),
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario_write::to_toml;

    #[test]
    fn focused_scenarios_survive_a_round_trip_through_a_file() {
        for focus in Focus::ALL {
            for seed in 1..=100 {
                let original = generate(focus, seed);
                let text = to_toml(&original, "focused");
                let mut back = parse(&text, None).unwrap_or_else(|e| panic!("{} {seed}: {e}\n{text}", focus.name()));
                back.name = original.name.clone();
                for e in &mut back.events {
                    e.line = 0;
                }
                assert_eq!(original, back, "{} seed {seed}", focus.name());
            }
        }
    }
}
