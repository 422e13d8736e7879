//! Focused generators: small scenarios drawn around one window the general generator
//! (`explore::generate`) reaches too rarely to sweep, each a few events on three
//! servers, so that thousands run in seconds (`tandem-sim explore --focus NAME`).
//!
//! - `move-back`: a message expunged, its tombstone collected on one side of a partition
//!   while the other side holds it, the side's servers restarted (forgetting when the
//!   collection was, so that a COPY back takes the message's own GUID), and the message
//!   copied or moved back into the mailbox, then the sides
//!   rearranged or healed. Found the loss fixed by `MergeRules::from_log` (44 of its first
//!   4,000 seeds fail under the broken variant `expunge-wins-over-log-copy`).
//! - `laptop`: a laptop of one user beside three servers; saves, copies, moves and
//!   expunges on both, its agent's syncs, RENAMEs, master moves, crashes (the laptop's
//!   too, in the middle of a sync round), lost disks and partitions in any order. Found
//!   explore seed 1159717's second order of adopts, a false alarm of the oracle after
//!   lost async disks, and (with the laptop's crashes) seed 188146.
//! - `partial`: a partial cluster server (bodies of some mailboxes, dates or sizes only)
//!   beside three whole ones, with saves of small and large messages, copies and moves,
//!   expunges, RENAMEs across its patterns, clients reading bodies through it, master
//!   moves to and from it, crashes, lost disks, damaged bodies and partitions.
//! - `leave`: a server leaves the cluster (`tandem member remove`) while mail goes on,
//!   sometimes with a spare joining, the leaving server crashing or cut off during its
//!   handover, and a laptop whose home it was syncing before and after (through another
//!   server once its home is gone).
//! - `rename`: RENAMEs of one user's mailboxes back and forth among a few names, on both
//!   sides of a partition (the same mailbox renamed to two names at once, two mailboxes to
//!   one name), DELETEs and CREATEs of those names, saves, copies, moves, expunges and
//!   flag changes into them, master moves, crashes and heals.
//! - `conflict`: a split brain on one mailbox, what dsync gets wrong without saved state:
//!   each side saves new mail (the same UIDs taken on both), clients read those UIDs on
//!   both, flags are added on one side and removed on the other (some STOREs conditional,
//!   UNCHANGEDSINCE), messages flagged on one side expunged or moved on the other; small
//!   logs that overflow into a full SYNC, a second split before the first healed,
//!   crashes and lost disks on the way, then the heal and more reads and flag changes.
//! - `import`: a migration (`tandem import`) into a mailbox that is RENAMEd, DELETEd and
//!   CREATEd again while the import runs, some messages sent twice (a resumed import),
//!   through servers cut off or crashing, beside saves, copies, moves and expunges of
//!   the imported messages.
//! - `slow`: links that turn slow past the request timeout, go silent one way, reset
//!   (what was acknowledged into the void is sent again) or flap, while mail is saved
//!   (an MTA retrying what timed out), copied, moved, expunged and flagged, masters
//!   move in the middle of saves and servers crash: cancels, retries and duplicates.
//! - `edit`: the store edited by hand under the protocol: message files deleted, bodies
//!   damaged on disk (one copy, or every copy of a message held in several mailboxes, so
//!   that a census gives it up), files dropped in, beside copies, moves, expunges, flag
//!   changes, body reads, master moves, crashes, lost disks and partitions: the scrub's
//!   repairs, the census and the masters' merges meeting.
//! - `restore`: a server's store backed up (`tandem backup`) and later put back in place
//!   of its store (sometimes after its disk was lost), while mail went on: saves,
//!   copies, moves, expunges and flag changes after the backup, master moves to and from
//!   it, crashes and partitions; it comes back with a new store identity, as it was at
//!   the backup, within the tombstone grace (README, "Backups").
//! - `replace`: a server lost for good (its disk gone, or the machine) and replaced as
//!   README "Replacing a lost server" says: its id retired as lost and a new server
//!   added under a new id, through any server left, in either order, sometimes cut off
//!   from the rest, while mail goes on (saves, copies, moves, expunges, flag changes,
//!   reads, master moves to the new server, crashes and partitions) and the new server
//!   fills; sometimes the machine given up comes back with its disk.
//! - `late-restore`: as `restore`, but the backup is put back only after the expunges
//!   made since were collected (with `--accept-old-backup` in the node), half the time
//!   after every other server restarted: the servers that saw the collection must
//!   still drop the restored store's copies of the expunged mail, not move them to new
//!   UIDs as mail only it holds.
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
    Partial,
    Leave,
    Rename,
    Conflict,
    Import,
    Slow,
    Minority,
    Incarnation,
    Edit,
    Restore,
    Replace,
    LateRestore,
}

impl Focus {
    pub const ALL: [Focus; 14] = [
        Focus::MoveBack,
        Focus::Laptop,
        Focus::Partial,
        Focus::Leave,
        Focus::Rename,
        Focus::Conflict,
        Focus::Import,
        Focus::Slow,
        Focus::Minority,
        Focus::Incarnation,
        Focus::Edit,
        Focus::Restore,
        Focus::Replace,
        Focus::LateRestore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Focus::MoveBack => "move-back",
            Focus::Laptop => "laptop",
            Focus::Partial => "partial",
            Focus::Leave => "leave",
            Focus::Rename => "rename",
            Focus::Conflict => "conflict",
            Focus::Import => "import",
            Focus::Slow => "slow",
            Focus::Minority => "minority",
            Focus::Incarnation => "incarnation",
            Focus::Edit => "edit",
            Focus::Restore => "restore",
            Focus::Replace => "replace",
            Focus::LateRestore => "late-restore",
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
        Focus::Partial => partial(&mut rng),
        Focus::Leave => leave(&mut rng),
        Focus::Rename => rename(&mut rng),
        Focus::Conflict => conflict(&mut rng),
        Focus::Import => import(&mut rng),
        Focus::Slow => slow(&mut rng),
        Focus::Minority => minority(&mut rng),
        Focus::Incarnation => incarnation(&mut rng),
        Focus::Edit => edit(&mut rng),
        Focus::Restore => restore(&mut rng),
        Focus::Replace => replace(&mut rng),
        Focus::LateRestore => late_restore(&mut rng),
    };
    draft.events.sort_by_key(|e| e.at_ms);
    Scenario {
        name: format!("focus-{}-{seed}", focus.name()),
        path: None,
        seed,
        wire: false,
        cluster: ClusterSpec {
            servers: draft.servers,
            spares: draft.spares,
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
            partial_servers: draft.partial_servers,
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
    servers: Vec<Sid>,
    spares: Vec<Sid>,
    partial_servers: std::collections::BTreeMap<Sid, tandem_core::partial::Partial>,
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
            servers: servers(),
            spares: Vec::new(),
            partial_servers: Default::default(),
        }
    }

    fn at(&mut self, at_ms: u64, action: Action) {
        self.events.push(TimedEvent { at_ms, id: None, action, expect: None, line: 0 });
    }

    /// `server` goes down at `at_ms` by `fault` (a crash or a lost disk) and restarts
    /// 50 to 800 ms later.
    fn down_and_up(&mut self, rng: &mut ChaCha8Rng, at_ms: u64, fault: Action, server: Sid) {
        self.at(at_ms, fault);
        self.at(at_ms + rng.random_range(50..=800u64), Action::Restart { server });
    }

    /// A partition that cuts `alone` off from the rest of `among`.
    fn isolate(&mut self, at_ms: u64, alone: Sid, among: &[Sid]) {
        let rest: Vec<Sid> = among.iter().copied().filter(|s| *s != alone).collect();
        self.at(at_ms, Action::Partition { groups: vec![vec![alone], rest] });
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
                d.down_and_up(rng, t, fault, server);
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
                d.isolate(t, alone, &all);
            }
            80..86 => d.at(t, Action::Heal),
            86..90 => {
                // The laptop crashes in the middle of a sync round: what it remembers
                // only in memory (records its adopts dropped) is gone after.
                d.at(t, Action::Replicate { server: laptop, home: None });
                let at = t + rng.random_range(1..=60u64);
                d.down_and_up(rng, at, Action::Crash { server: laptop }, laptop);
            }
            _ => d.at(t, Action::Replicate { server: laptop, home: None }),
        }
    }
    d
}

fn partial(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let whole = servers();
    let part = Sid(4);
    let mut all = whole.clone();
    all.push(part);
    d.servers = all.clone();
    let user = "u1@d1";
    let mut spec = tandem_core::partial::Partial {
        body_bytes_max: Some(one_of(rng, &[500, 1000])),
        keep_fetched: rng.random_bool(0.5),
        ..Default::default()
    };
    // Patterns on the names RENAMEs move messages between, so that a RENAME may carry
    // them into or out of what the partial server holds.
    match rng.random_range(0..5u32) {
        0 => spec.mailboxes = vec!["%/INBOX".into()],
        1 => spec.mailboxes = vec!["*/Box%".into()],
        2 => spec.mailboxes = vec!["*/Ren%".into(), "%/INBOX".into()],
        3 => spec.since_s = crate::scenario::SIM_EPOCH_S + rng.random_range(0..8u64),
        _ => {}
    }
    if !spec.mailboxes.is_empty() && rng.random_bool(0.5) {
        spec.body_bytes_max = None;
    }
    d.partial_servers.insert(part, spec);
    let mut boxes = vec![MailboxKey::new(user, "INBOX"), MailboxKey::new(user, "Box1")];
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut renames = 0;
    let mut t = 300;
    // Mostly through the partial server: it is the one under test.
    let through = |rng: &mut ChaCha8Rng| if rng.random_bool(0.5) { part } else { one_of(rng, &whole) };
    for _ in 0..rng.random_range(1..=3u32) {
        save_new(&mut d, rng, t, &boxes, &mut labels, through);
        t += rng.random_range(10..=200u64);
    }
    for _ in 0..rng.random_range(8..=18u32) {
        t += rng.random_range(50..=900u64);
        match rng.random_range(0..100u32) {
            0..22 => save_new(&mut d, rng, t, &boxes, &mut labels, through),
            22..32 if !labels.is_empty() => {
                let (from, label) = one_of(rng, &labels);
                let others: Vec<MailboxKey> = boxes.iter().filter(|b| **b != from).cloned().collect();
                let to = one_of(rng, &others);
                let as_label = format!("m{}", labels.len() + 1);
                let server = through(rng);
                d.at(t, copy(server, &from, &label, &to, &as_label, rng.random_bool(0.5)));
                labels.push((to, as_label));
            }
            32..40 if !labels.is_empty() => {
                let (mailbox, label) = one_of(rng, &labels);
                let server = through(rng);
                d.at(t, Action::Expunge { server, mailbox, labels: vec![label] });
            }
            40..52 if !labels.is_empty() => {
                let (mailbox, label) = one_of(rng, &labels);
                d.at(t, Action::FetchBody { server: part, mailbox, label });
            }
            52..55 => {
                let fresh = rng.random_bool(0.5);
                d.at(t, Action::Read { server: part, mailbox: one_of(rng, &boxes), fresh });
            }
            55..60 => {
                let server = if rng.random_bool(0.5) { part } else { one_of(rng, &all) };
                d.at(t, Action::MasterMove { server, mailbox: one_of(rng, &boxes) });
            }
            60..68 => {
                renames += 1;
                let from = one_of(rng, &boxes);
                let name = if rng.random_bool(0.5) { format!("Ren{renames}") } else { format!("Box{}", renames + 1) };
                let to = MailboxKey::new(user, &name);
                let server = through(rng);
                d.at(t, Action::RenameMailbox { server, from: from.clone(), to: to.clone() });
                // A RENAME of INBOX leaves an empty INBOX behind; its messages go along.
                follow_rename(&mut labels, &from, &to);
                boxes.retain(|b| *b != from || &*b.name == "INBOX");
                boxes.push(to);
            }
            68..78 => {
                let server = if rng.random_bool(0.5) { part } else { one_of(rng, &whole) };
                let fault = match rng.random_range(0..4u32) {
                    0 => Action::Lose { server },
                    _ => Action::Crash { server },
                };
                d.down_and_up(rng, t, fault, server);
            }
            78..82 if !labels.is_empty() => {
                let (_, label) = one_of(rng, &labels);
                d.at(t, Action::Corrupt { server: one_of(rng, &all), label });
            }
            82..92 => {
                let alone = if rng.random_bool(0.5) { part } else { one_of(rng, &whole) };
                d.isolate(t, alone, &all);
            }
            _ => d.at(t, Action::Heal),
        }
    }
    d
}

/// The labels of messages in `from` now name them in `to` (a RENAME asked for; the sim
/// follows the messages themselves).
fn follow_rename(labels: &mut [(MailboxKey, String)], from: &MailboxKey, to: &MailboxKey) {
    for (mailbox, _) in labels.iter_mut() {
        if mailbox == from {
            *mailbox = to.clone();
        }
    }
}

/// A save of a new message, small or large, into one of `boxes` through the server
/// `through` draws (after the mailbox and the size; `|_| server` draws none), labelled
/// after those before.
fn save_new(
    d: &mut Draft,
    rng: &mut ChaCha8Rng,
    t: u64,
    boxes: &[MailboxKey],
    labels: &mut Vec<(MailboxKey, String)>,
    through: impl Fn(&mut ChaCha8Rng) -> Sid,
) {
    let label = format!("m{}", labels.len() + 1);
    let mailbox = one_of(rng, boxes);
    let size = one_of(rng, &[100, 1500]);
    let server = through(rng);
    d.at(t, save(server, &mailbox, &label, size));
    labels.push((mailbox, label));
}

/// A COPY or MOVE through `server` of a labelled message into the other of two `boxes`.
fn copy_to_the_other(
    d: &mut Draft,
    rng: &mut ChaCha8Rng,
    t: u64,
    server: Sid,
    boxes: &[MailboxKey],
    labels: &mut Vec<(MailboxKey, String)>,
) {
    let (from, label) = one_of(rng, labels);
    let to = boxes.iter().find(|b| **b != from).cloned().unwrap_or_else(|| from.clone());
    let as_label = format!("m{}", labels.len() + 1);
    d.at(t, copy(server, &from, &label, &to, &as_label, rng.random_bool(0.5)));
    labels.push((to, as_label));
}

/// A COPY or MOVE (drawn) through `server` of `label` in `from` into `to`, labelled after
/// those before; nothing when `to` is `from`.
fn copy_labelled(
    d: &mut Draft,
    rng: &mut ChaCha8Rng,
    t: u64,
    server: Sid,
    (from, label): (MailboxKey, String),
    to: MailboxKey,
    labels: &mut Vec<(MailboxKey, String)>,
) {
    if to == from {
        return;
    }
    let as_label = format!("m{}", labels.len() + 1);
    d.at(t, copy(server, &from, &label, &to, &as_label, rng.random_bool(0.5)));
    labels.push((to, as_label));
}

fn leave(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all = servers();
    let spare = Sid(4);
    let leaving = one_of(rng, &all);
    let joins = rng.random_bool(0.5);
    let mut present = all.clone();
    if joins {
        d.spares.push(spare);
    }
    let user = "u1@d1";
    let boxes = [MailboxKey::new(user, "INBOX"), MailboxKey::new(user, "Box1")];
    let laptop = Sid(13);
    let with_laptop = rng.random_bool(0.5);
    if with_laptop {
        // Its home is the server that leaves, mostly.
        let home = if rng.random_bool(0.7) { leaving } else { one_of(rng, &all) };
        d.laptops.push(LaptopSpec { sid: laptop, user: user.to_string(), home, latency_ms: (1, 10), partial: None });
    }
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    let leave_at = rng.random_range(1500..=6000u64);
    let join_at = rng.random_range(500..=8000u64);
    let mut left = false;
    let mut joined = false;
    for _ in 0..rng.random_range(10..=20u32) {
        t += rng.random_range(50..=700u64);
        if !left && t >= leave_at {
            left = true;
            d.at(t, Action::MemberRemove { server: one_of(rng, &present), member: leaving, lost: false });
            present.retain(|s| *s != leaving);
            // The leaving server crashes or is cut off in the middle of its handover.
            match rng.random_range(0..4u32) {
                0 => {
                    let at = t + rng.random_range(1..=300u64);
                    d.down_and_up(rng, at, Action::Crash { server: leaving }, leaving);
                }
                1 => {
                    let at = t + rng.random_range(1..=300u64);
                    d.isolate(at, leaving, &all);
                }
                _ => {}
            }
            continue;
        }
        if joins && !joined && t >= join_at {
            joined = true;
            d.at(t, Action::MemberAdd { server: one_of(rng, &present), member: spare });
            present.push(spare);
            continue;
        }
        let server = if with_laptop && rng.random_bool(0.25) { laptop } else { one_of(rng, &present) };
        match rng.random_range(0..100u32) {
            0..30 => save_new(&mut d, rng, t, &boxes, &mut labels, |_| server),
            30..40 if !labels.is_empty() => copy_to_the_other(&mut d, rng, t, server, &boxes, &mut labels),
            40..48 if !labels.is_empty() => {
                let (mailbox, label) = one_of(rng, &labels);
                d.at(t, Action::Expunge { server, mailbox, labels: vec![label] });
            }
            48..58 if with_laptop => {
                // Once its home has left, the user points it at another server.
                let home = left.then(|| one_of(rng, &present));
                d.at(t, Action::Replicate { server: laptop, home });
            }
            58..68 => d.at(t, Action::MasterMove { server: one_of(rng, &present), mailbox: one_of(rng, &boxes) }),
            68..76 => {
                let server = one_of(rng, &present);
                d.down_and_up(rng, t, Action::Crash { server }, server);
            }
            76..86 => {
                let alone = one_of(rng, &present);
                d.isolate(t, alone, &present);
            }
            _ => d.at(t, Action::Heal),
        }
    }
    if left {
        // Long enough after for the leaving server to have handed everything over and
        // retired (a run otherwise ends once the servers agree): then more mail, the
        // retired server restarting, the laptop syncing through a server that stays.
        t += rng.random_range(50..=500u64);
        d.at(t, Action::Heal);
        t += rng.random_range(15_000..=40_000u64);
        if rng.random_bool(0.3) {
            d.at(t + 1, Action::Crash { server: leaving });
            d.at(t + rng.random_range(50..=800u64), Action::Restart { server: leaving });
        }
        for _ in 0..rng.random_range(1..=4u32) {
            t += rng.random_range(50..=700u64);
            let server = one_of(rng, &present);
            match rng.random_range(0..4u32) {
                0 if !labels.is_empty() => {
                    let (mailbox, label) = one_of(rng, &labels);
                    d.at(t, Action::Expunge { server, mailbox, labels: vec![label] });
                }
                1 if with_laptop => d.at(t, Action::Replicate { server: laptop, home: Some(server) }),
                _ => {
                    let label = format!("m{}", labels.len() + 1);
                    let mailbox = one_of(rng, &boxes);
                    d.at(t, save(server, &mailbox, &label, 100));
                    labels.push((mailbox, label));
                }
            }
        }
    }
    d
}

fn rename(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all = servers();
    let user = "u1@d1";
    let names = ["INBOX", "Box1", "Box2", "Box3"];
    let mailbox = |name: &str| MailboxKey::new(user, name);
    let flag: Vec<tandem_core::Flag> = tandem_core::Flag::new("\\Seen").ok().into_iter().collect();
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    for _ in 0..rng.random_range(1..=3u32) {
        let label = format!("m{}", labels.len() + 1);
        let to = mailbox(one_of(rng, &names));
        d.at(t, save(one_of(rng, &all), &to, &label, 100));
        labels.push((to, label));
        t += rng.random_range(10..=200u64);
    }
    for _ in 0..rng.random_range(8..=18u32) {
        t += rng.random_range(20..=700u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..100u32) {
            0..16 => {
                let label = format!("m{}", labels.len() + 1);
                let to = mailbox(one_of(rng, &names));
                d.at(t, save(server, &to, &label, 100));
                labels.push((to, label));
            }
            16..40 => {
                // Where labels go is the sim's business (it follows the messages); the
                // names are drawn afresh, so a RENAME may find its source gone or its
                // target taken, as two clients racing would.
                let from = mailbox(one_of(rng, &names));
                let to = mailbox(one_of(rng, &names));
                if from != to {
                    d.at(t, Action::RenameMailbox { server, from: from.clone(), to: to.clone() });
                    follow_rename(&mut labels, &from, &to);
                }
            }
            40..46 => d.at(t, Action::DeleteMailbox { server, mailbox: mailbox(one_of(rng, &names[1..])) }),
            46..50 => d.at(
                t,
                Action::CreateMailbox {
                    server,
                    mailbox: mailbox(one_of(rng, &names[1..])),
                    special_use: Default::default(),
                },
            ),
            50..58 if !labels.is_empty() => {
                let (from, label) = one_of(rng, &labels);
                let to = mailbox(one_of(rng, &names));
                let as_label = format!("m{}", labels.len() + 1);
                d.at(t, copy(server, &from, &label, &to, &as_label, rng.random_bool(0.5)));
                labels.push((to, as_label));
            }
            58..64 if !labels.is_empty() => {
                let (m, label) = one_of(rng, &labels);
                d.at(t, Action::Expunge { server, mailbox: m, labels: vec![label] });
            }
            64..70 if !labels.is_empty() => {
                let (m, label) = one_of(rng, &labels);
                let (add, remove) =
                    if rng.random_bool(0.6) { (flag.clone(), Vec::new()) } else { (Vec::new(), flag.clone()) };
                d.at(t, Action::Store { server, mailbox: m, labels: vec![label], add, remove, unchanged_since: None });
            }
            70..78 => d.at(t, Action::MasterMove { server, mailbox: mailbox(one_of(rng, &names)) }),
            78..84 => d.down_and_up(rng, t, Action::Crash { server }, server),
            84..94 => d.isolate(t, server, &all),
            _ => d.at(t, Action::Heal),
        }
    }
    d
}

/// Flags the conflict and import focuses change: a system flag, another, a keyword.
fn some_flags() -> Vec<tandem_core::Flag> {
    ["\\Seen", "\\Flagged", "$Work"].iter().filter_map(|f| tandem_core::Flag::new(f).ok()).collect()
}

/// A STORE of one drawn flag on `label`: added or removed, sometimes conditional on the
/// modseq the executing server shows (CONDSTORE's UNCHANGEDSINCE).
fn store_one(rng: &mut ChaCha8Rng, server: Sid, mailbox: &MailboxKey, label: String) -> Action {
    let flag = vec![one_of(rng, &some_flags())];
    let (add, remove) = if rng.random_bool(0.5) { (flag, Vec::new()) } else { (Vec::new(), flag) };
    let unchanged_since = rng.random_bool(0.2).then_some(UnchangedSince::Current);
    Action::Store { server, mailbox: mailbox.clone(), labels: vec![label], add, remove, unchanged_since }
}

/// An EXPUNGE through `server` of one labelled message.
fn expunge_one(d: &mut Draft, rng: &mut ChaCha8Rng, t: u64, server: Sid, labels: &[(MailboxKey, String)]) {
    let (mailbox, label) = one_of(rng, labels);
    d.at(t, Action::Expunge { server, mailbox, labels: vec![label] });
}

/// A STORE through `server` of one drawn flag on one labelled message (see `store_one`).
fn flag_one(d: &mut Draft, rng: &mut ChaCha8Rng, t: u64, server: Sid, labels: &[(MailboxKey, String)]) {
    let (mailbox, label) = one_of(rng, labels);
    let action = store_one(rng, server, &mailbox, label);
    d.at(t, action);
}

fn conflict(rng: &mut ChaCha8Rng) -> Draft {
    // Small logs mostly: an overflow turns the heal into a full SYNC of the mailbox.
    let mut d = Draft::new(rng, &[2, 3, 6, 40], &[2, 10, 40], &[660, 5000]);
    let all = servers();
    let user = "u1@d1";
    let inbox = MailboxKey::new(user, "INBOX");
    let other = MailboxKey::new(user, "Box1");
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    // Mail both sides know, read (its UIDs shown) and flagged before the split.
    for _ in 0..rng.random_range(2..=5u32) {
        let label = format!("m{}", labels.len() + 1);
        let flags = if rng.random_bool(0.3) { vec![one_of(rng, &some_flags())] } else { Vec::new() };
        let server = one_of(rng, &all);
        d.at(t, Action::Save { server, mailbox: inbox.clone(), label: Some(label.clone()), flags, size: 100 });
        labels.push((inbox.clone(), label));
        t += rng.random_range(10..=150u64);
    }
    t += rng.random_range(100..=1500u64);
    d.at(t, Action::Read { server: one_of(rng, &all), mailbox: inbox.clone(), fresh: rng.random_bool(0.5) });
    // The split: one server alone against two, or all three apart.
    t += rng.random_range(10..=800u64);
    let alone = one_of(rng, &all);
    let sides: Vec<Vec<Sid>> = if rng.random_bool(0.7) {
        vec![vec![alone], all.iter().copied().filter(|s| *s != alone).collect()]
    } else {
        all.iter().map(|s| vec![*s]).collect()
    };
    d.at(t, Action::Partition { groups: sides.clone() });
    let before_split = labels.len();
    // Each side works on its own: its own master of the mailbox, its own UIDs.
    for _ in 0..rng.random_range(6..=16u32) {
        t += rng.random_range(20..=400u64);
        let side = one_of(rng, &sides);
        let server = one_of(rng, &side);
        match rng.random_range(0..100u32) {
            0..30 => {
                let label = format!("m{}", labels.len() + 1);
                d.at(t, save(server, &inbox, &label, one_of(rng, &[100, 1500])));
                labels.push((inbox.clone(), label));
            }
            30..40 => d.at(t, Action::Read { server, mailbox: inbox.clone(), fresh: rng.random_bool(0.3) }),
            40..62 if !labels.is_empty() => {
                // Mostly the messages both sides have: the flag conflicts.
                let (mailbox, label) = if rng.random_bool(0.7) && before_split > 0 {
                    labels[rng.random_range(0..before_split)].clone()
                } else {
                    one_of(rng, &labels)
                };
                let action = store_one(rng, server, &mailbox, label);
                d.at(t, action);
            }
            62..72 if !labels.is_empty() => {
                let (mailbox, label) = one_of(rng, &labels);
                d.at(t, Action::Expunge { server, mailbox, labels: vec![label] });
            }
            72..80 if !labels.is_empty() => {
                let (from, label) = one_of(rng, &labels);
                let to = if from == inbox { other.clone() } else { inbox.clone() };
                let as_label = format!("m{}", labels.len() + 1);
                d.at(t, copy(server, &from, &label, &to, &as_label, rng.random_bool(0.5)));
                labels.push((to, as_label));
            }
            80..86 => d.at(t, Action::MasterMove { server, mailbox: inbox.clone() }),
            86..93 => {
                let fault = if rng.random_bool(0.25) { Action::Lose { server } } else { Action::Crash { server } };
                d.down_and_up(rng, t, fault, server);
            }
            _ => {
                // Split again another way before the first healed.
                let alone = one_of(rng, &all);
                d.isolate(t, alone, &all);
            }
        }
    }
    t += rng.random_range(100..=2000u64);
    d.at(t, Action::Heal);
    // Right after the heal, while the sides merge: a crash, reads, more flag changes.
    for _ in 0..rng.random_range(1..=5u32) {
        t += rng.random_range(1..=300u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..10u32) {
            0..2 => d.down_and_up(rng, t, Action::Crash { server }, server),
            2..5 => d.at(t, Action::Read { server, mailbox: inbox.clone(), fresh: rng.random_bool(0.5) }),
            5..8 if !labels.is_empty() => {
                let (mailbox, label) = one_of(rng, &labels);
                let action = store_one(rng, server, &mailbox, label);
                d.at(t, action);
            }
            _ => {
                let label = format!("m{}", labels.len() + 1);
                d.at(t, save(server, &inbox, &label, 100));
                labels.push((inbox.clone(), label));
            }
        }
    }
    d
}

fn import(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all = servers();
    let user = "u1@d1";
    let inbox = MailboxKey::new(user, "INBOX");
    let names = ["Imported", "Archive"];
    let mut target = if rng.random_bool(0.8) { MailboxKey::new(user, names[0]) } else { inbox.clone() };
    let uidvalidity = rng.random_range(1..=1_000_000_000u32);
    let mut uid = rng.random_range(1..=50u32);
    let mut sent: Vec<(String, u32)> = Vec::new();
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    if rng.random_bool(0.5) {
        let label = format!("m{}", labels.len() + 1);
        d.at(t, save(one_of(rng, &all), &inbox, &label, 100));
        labels.push((inbox.clone(), label));
    }
    for i in 0..rng.random_range(8..=20u32) {
        t += rng.random_range(10..=400u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..100u32) {
            0..40 => {
                // The next message of the import, or one sent before again (resumed).
                let (label, this_uid) = match sent.get(rng.random_range(0..sent.len().max(1))) {
                    Some((label, u)) if rng.random_bool(0.25) => (label.clone(), *u),
                    _ => {
                        uid += rng.random_range(1..=5u32);
                        let label = format!("imp{i}");
                        sent.push((label.clone(), uid));
                        labels.push((target.clone(), label.clone()));
                        (label, uid)
                    }
                };
                let size = 100 + (this_uid as usize * 37) % 1400;
                let mailbox = target.clone();
                d.at(t, Action::Import { server, mailbox, label, uidvalidity, uid: this_uid, flags: Vec::new(), size });
            }
            40..52 => {
                // The import's target renamed away (and the import goes on under its old
                // name, as a running `tandem import` would), or back.
                let from = target.clone();
                let to = if &*from.name == names[0] {
                    MailboxKey::new(user, names[1])
                } else {
                    MailboxKey::new(user, names[0])
                };
                if from != inbox {
                    d.at(t, Action::RenameMailbox { server, from: from.clone(), to: to.clone() });
                    follow_rename(&mut labels, &from, &to);
                    if rng.random_bool(0.5) {
                        target = to;
                    }
                }
            }
            52..56 if target != inbox => d.at(t, Action::DeleteMailbox { server, mailbox: target.clone() }),
            56..59 if target != inbox => {
                d.at(t, Action::CreateMailbox { server, mailbox: target.clone(), special_use: Default::default() })
            }
            59..67 => {
                let label = format!("m{}", labels.len() + 1);
                d.at(t, save(server, &inbox, &label, 100));
                labels.push((inbox.clone(), label));
            }
            67..75 if !labels.is_empty() => {
                let (from, label) = one_of(rng, &labels);
                let to = if from == inbox { target.clone() } else { inbox.clone() };
                copy_labelled(&mut d, rng, t, server, (from, label), to, &mut labels);
            }
            75..81 if !labels.is_empty() => expunge_one(&mut d, rng, t, server, &labels),
            81..85 if !labels.is_empty() => flag_one(&mut d, rng, t, server, &labels),
            85..89 => d.at(t, Action::MasterMove { server, mailbox: target.clone() }),
            89..94 => d.down_and_up(rng, t, Action::Crash { server }, server),
            94..98 => d.isolate(t, server, &all),
            _ => d.at(t, Action::Heal),
        }
    }
    d
}

fn slow(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all = servers();
    let user = "u1@d1";
    let boxes = [MailboxKey::new(user, "INBOX"), MailboxKey::new(user, "Box1")];
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    let pair = |rng: &mut ChaCha8Rng| {
        let a = one_of(rng, &all);
        let others: Vec<Sid> = all.iter().copied().filter(|s| *s != a).collect();
        (a, one_of(rng, &others))
    };
    for _ in 0..rng.random_range(10..=22u32) {
        t += rng.random_range(10..=600u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..100u32) {
            0..26 => save_new(&mut d, rng, t, &boxes, &mut labels, |_| server),
            26..34 if !labels.is_empty() => copy_to_the_other(&mut d, rng, t, server, &boxes, &mut labels),
            34..40 if !labels.is_empty() => expunge_one(&mut d, rng, t, server, &labels),
            40..46 if !labels.is_empty() => flag_one(&mut d, rng, t, server, &labels),
            46..50 => d.at(t, Action::Read { server, mailbox: one_of(rng, &boxes), fresh: rng.random_bool(0.5) }),
            50..64 => {
                // Past the request timeout (5 s) sometimes: the asking server cancels.
                let (a, b) = pair(rng);
                let delay_ms = one_of(rng, &[200, 2000, 6000]);
                d.at(t, Action::Slow { a, b, delay_ms, for_ms: rng.random_range(500..=12_000u64) });
            }
            64..72 => {
                let (from, to) = pair(rng);
                d.at(t, Action::Silence { from, to, for_ms: rng.random_range(100..=8000u64) });
            }
            72..80 => {
                let (a, b) = pair(rng);
                d.at(t, Action::Reset { a, b, down_ms: rng.random_range(1..=500u64) });
            }
            80..85 => {
                let (a, b) = pair(rng);
                d.at(t, Action::Flap { a, b, down_ms: rng.random_range(1..=2000u64) });
            }
            85..92 => d.at(t, Action::MasterMove { server, mailbox: one_of(rng, &boxes) }),
            92..97 => d.down_and_up(rng, t, Action::Crash { server }, server),
            _ => d.at(t, Action::Heal),
        }
    }
    d
}

fn minority(rng: &mut ChaCha8Rng) -> Draft {
    // Small logs mostly: the minority's changes overflow its logs to the majority.
    let mut d = Draft::new(rng, &[2, 4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all: Vec<Sid> = (1..=rng.random_range(4..=5u32)).map(Sid).collect();
    d.servers = all.clone();
    let users = ["u1@d1", "u2@d1"];
    let names = ["INBOX", "Box1", "Box2", "Box9"];
    let any_box = |rng: &mut ChaCha8Rng| MailboxKey::new(one_of(rng, &users), one_of(rng, &names));
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    // Mail everyone has before the split.
    for _ in 0..rng.random_range(1..=4u32) {
        let label = format!("m{}", labels.len() + 1);
        let to = MailboxKey::new(one_of(rng, &users), "INBOX");
        d.at(t, save(one_of(rng, &all), &to, &label, one_of(rng, &[100, 1500])));
        labels.push((to, label));
        t += rng.random_range(10..=200u64);
    }
    // The split: one or two servers against the rest.
    t += rng.random_range(100..=1500u64);
    let mut order = all.clone();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let minority_size = rng.random_range(1..=2usize);
    let mut minority: Vec<Sid> = order[..minority_size].to_vec();
    let mut majority: Vec<Sid> = order[minority_size..].to_vec();
    d.at(t, Action::Partition { groups: vec![minority.clone(), majority.clone()] });
    for _ in 0..rng.random_range(8..=22u32) {
        t += rng.random_range(20..=600u64);
        // The minority does most of the work: what it makes is what the majority lacks.
        let side = if rng.random_bool(0.65) { &minority } else { &majority };
        let server = one_of(rng, side);
        match rng.random_range(0..100u32) {
            0..28 => {
                let label = format!("m{}", labels.len() + 1);
                let to = any_box(rng);
                d.at(t, save(server, &to, &label, one_of(rng, &[100, 1500])));
                labels.push((to, label));
            }
            28..34 => d.at(t, Action::CreateMailbox { server, mailbox: any_box(rng), special_use: Default::default() }),
            34..46 if !labels.is_empty() => {
                // Into a name of the same user, often one the other side never saw.
                let (from, label) = one_of(rng, &labels);
                let to = MailboxKey::new(&from.user, one_of(rng, &names));
                copy_labelled(&mut d, rng, t, server, (from, label), to, &mut labels);
            }
            46..52 if !labels.is_empty() => expunge_one(&mut d, rng, t, server, &labels),
            52..57 if !labels.is_empty() => flag_one(&mut d, rng, t, server, &labels),
            57..61 => d.at(t, Action::Read { server, mailbox: any_box(rng), fresh: rng.random_bool(0.5) }),
            61..71 => d.at(t, Action::MasterMove { server, mailbox: any_box(rng) }),
            71..74 => {
                let from = any_box(rng);
                let to = MailboxKey::new(&from.user, one_of(rng, &names));
                if from != to {
                    d.at(t, Action::RenameMailbox { server, from: from.clone(), to: to.clone() });
                    follow_rename(&mut labels, &from, &to);
                }
            }
            74..77 => d.at(t, Action::DeleteMailbox { server, mailbox: MailboxKey::new(one_of(rng, &users), "Box2") }),
            77..84 => {
                let fault = if rng.random_bool(0.25) { Action::Lose { server } } else { Action::Crash { server } };
                d.down_and_up(rng, t, fault, server);
            }
            84..94 => {
                // The split reshaped: a server crosses to the other side (a master taken
                // over now catches up from the side it is on).
                let (from, to) = if rng.random_bool(0.5) && majority.len() > 1 {
                    (&mut majority, &mut minority)
                } else if minority.len() > 1 {
                    (&mut minority, &mut majority)
                } else {
                    (&mut majority, &mut minority)
                };
                let i = rng.random_range(0..from.len());
                let crossing = from.remove(i);
                to.push(crossing);
                d.at(t, Action::Partition { groups: vec![minority.clone(), majority.clone()] });
            }
            _ => d.isolate(t, server, &all),
        }
    }
    t += rng.random_range(100..=3000u64);
    d.at(t, Action::Heal);
    // After the heal, while the sides merge: more mail, reads, a crash.
    for _ in 0..rng.random_range(1..=4u32) {
        t += rng.random_range(1..=400u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..10u32) {
            0..2 => d.down_and_up(rng, t, Action::Crash { server }, server),
            2..5 => d.at(t, Action::Read { server, mailbox: any_box(rng), fresh: rng.random_bool(0.5) }),
            5..7 => d.at(t, Action::MasterMove { server, mailbox: any_box(rng) }),
            _ => {
                let label = format!("m{}", labels.len() + 1);
                let to = any_box(rng);
                d.at(t, save(server, &to, &label, 100));
                labels.push((to, label));
            }
        }
    }
    d
}

fn incarnation(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[2, 4, 8, 40], &[5, 30, 110], &[660, 5000]);
    let all: Vec<Sid> = (1..=rng.random_range(3..=4u32)).map(Sid).collect();
    d.servers = all.clone();
    let user = "u1@d1";
    let names = ["INBOX", "Box1", "Box2", "Box3"];
    let mailbox = |name: &str| MailboxKey::new(user, name);
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    for _ in 0..rng.random_range(1..=3u32) {
        let label = format!("m{}", labels.len() + 1);
        d.at(t, save(one_of(rng, &all), &mailbox("INBOX"), &label, 100));
        labels.push((mailbox("INBOX"), label));
        t += rng.random_range(10..=200u64);
    }
    // The split: one server against the rest, or every server apart.
    let split = |rng: &mut ChaCha8Rng| -> Vec<Vec<Sid>> {
        if rng.random_bool(0.7) {
            let alone = one_of(rng, &all);
            vec![vec![alone], all.iter().copied().filter(|s| *s != alone).collect()]
        } else {
            all.iter().map(|s| vec![*s]).collect()
        }
    };
    t += rng.random_range(100..=1000u64);
    let mut sides = split(rng);
    d.at(t, Action::Partition { groups: sides.clone() });
    for _ in 0..rng.random_range(10..=24u32) {
        t += rng.random_range(20..=500u64);
        let side = one_of(rng, &sides);
        let server = one_of(rng, &side);
        match rng.random_range(0..100u32) {
            0..14 => {
                let label = format!("m{}", labels.len() + 1);
                let to = mailbox(one_of(rng, &names));
                d.at(t, save(server, &to, &label, one_of(rng, &[100, 1500])));
                labels.push((to, label));
            }
            14..20 => {
                let special_use = Default::default();
                d.at(t, Action::CreateMailbox { server, mailbox: mailbox(one_of(rng, &names[1..])), special_use });
            }
            20..38 => {
                let (from, to) = (mailbox(one_of(rng, &names)), mailbox(one_of(rng, &names)));
                if from != to {
                    d.at(t, Action::RenameMailbox { server, from: from.clone(), to: to.clone() });
                    follow_rename(&mut labels, &from, &to);
                }
            }
            38..46 if !labels.is_empty() => {
                let (from, label) = one_of(rng, &labels);
                let to = mailbox(one_of(rng, &names));
                copy_labelled(&mut d, rng, t, server, (from, label), to, &mut labels);
            }
            46..60 if !labels.is_empty() => flag_one(&mut d, rng, t, server, &labels),
            60..68 if !labels.is_empty() => expunge_one(&mut d, rng, t, server, &labels),
            68..71 => {
                d.at(t, Action::Read { server, mailbox: mailbox(one_of(rng, &names)), fresh: rng.random_bool(0.5) })
            }
            71..75 => d.at(t, Action::DeleteMailbox { server, mailbox: mailbox(one_of(rng, &names[1..])) }),
            75..82 => d.at(t, Action::MasterMove { server, mailbox: mailbox(one_of(rng, &names)) }),
            82..87 => {
                let fault = if rng.random_bool(0.2) { Action::Lose { server } } else { Action::Crash { server } };
                d.down_and_up(rng, t, fault, server);
            }
            87..95 => {
                sides = split(rng);
                d.at(t, Action::Partition { groups: sides.clone() });
            }
            _ => {
                // Healed for a while: the incarnations meet, then split again or not.
                d.at(t, Action::Heal);
                sides = vec![all.clone()];
            }
        }
    }
    t += rng.random_range(100..=2000u64);
    d.at(t, Action::Heal);
    // Right after the heal, while the copies settle: flags, expunges, copies, reads.
    for _ in 0..rng.random_range(2..=8u32) {
        t += rng.random_range(1..=300u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..10u32) {
            0..3 if !labels.is_empty() => flag_one(&mut d, rng, t, server, &labels),
            3..5 if !labels.is_empty() => expunge_one(&mut d, rng, t, server, &labels),
            5..6 if !labels.is_empty() => {
                let (from, label) = one_of(rng, &labels);
                let to = mailbox(one_of(rng, &names));
                copy_labelled(&mut d, rng, t, server, (from, label), to, &mut labels);
            }
            6..8 => {
                d.at(t, Action::Read { server, mailbox: mailbox(one_of(rng, &names)), fresh: rng.random_bool(0.5) })
            }
            8 => d.down_and_up(rng, t, Action::Crash { server }, server),
            _ => {
                let label = format!("m{}", labels.len() + 1);
                let to = mailbox(one_of(rng, &names));
                d.at(t, save(server, &to, &label, 100));
                labels.push((to, label));
            }
        }
    }
    d
}

fn edit(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 40], &[2, 5, 20], &[660, 5000]);
    // A damaged or deleted copy is repaired only where the mode keeps another durable
    // one: mostly sync; async runs check the rest (no resurrection, convergence).
    if rng.random_bool(0.75) {
        d.durability = Durability::Sync;
    }
    let all = servers();
    let user = "u1@d1";
    let boxes: Vec<MailboxKey> = ["INBOX", "Box1", "Box2"].iter().map(|n| MailboxKey::new(user, n)).collect();
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let mut t = 300;
    // Mail every server has, some of it copied so that one body is held by several
    // mailboxes (a census decides for all of them at once).
    for _ in 0..rng.random_range(2..=4u32) {
        save_new(&mut d, rng, t, &boxes, &mut labels, |rng| one_of(rng, &all));
        t += rng.random_range(10..=200u64);
    }
    for _ in 0..rng.random_range(0..=3u32) {
        let server = one_of(rng, &all);
        copy_to_the_other(&mut d, rng, t, server, &boxes, &mut labels);
        t += rng.random_range(10..=300u64);
    }
    t += rng.random_range(300..=1500u64);
    for _ in 0..rng.random_range(6..=18u32) {
        t += rng.random_range(1..=700u64);
        let server = one_of(rng, &all);
        match rng.random_range(0..100u32) {
            0..12 => {
                let (mailbox, label) = one_of(rng, &labels);
                d.at(t, Action::HandDelete { server, mailbox, label });
            }
            12..24 => {
                let (_, label) = one_of(rng, &labels);
                d.at(t, Action::Corrupt { server, label });
            }
            24..30 => {
                // Every copy of one message destroyed, one server after another: what
                // no server can repair, given up by a census.
                let (mailbox, label) = one_of(rng, &labels);
                for s in &all {
                    t += rng.random_range(0..=150u64);
                    if rng.random_bool(0.5) {
                        d.at(t, Action::Corrupt { server: *s, label: label.clone() });
                    } else {
                        d.at(t, Action::HandDelete { server: *s, mailbox: mailbox.clone(), label: label.clone() });
                    }
                }
            }
            30..36 => {
                let label = format!("m{}", labels.len() + 1);
                let mailbox = one_of(rng, &boxes);
                d.at(t, Action::HandAdd { server, mailbox: mailbox.clone(), label: Some(label.clone()) });
                labels.push((mailbox, label));
            }
            36..46 => save_new(&mut d, rng, t, &boxes, &mut labels, |_| server),
            46..56 => copy_to_the_other(&mut d, rng, t, server, &boxes, &mut labels),
            56..61 => expunge_one(&mut d, rng, t, server, &labels),
            61..66 => flag_one(&mut d, rng, t, server, &labels),
            66..74 => {
                let (mailbox, label) = one_of(rng, &labels);
                d.at(t, Action::FetchBody { server, mailbox, label });
            }
            74..82 => d.at(t, Action::MasterMove { server, mailbox: one_of(rng, &boxes) }),
            82..89 => {
                let fault = if rng.random_bool(0.2) { Action::Lose { server } } else { Action::Crash { server } };
                d.down_and_up(rng, t, fault, server);
            }
            89..95 => d.isolate(t, server, &all),
            _ => d.at(t, Action::Heal),
        }
    }
    t += rng.random_range(100..=3000u64);
    d.at(t, Action::Heal);
    // After the heal, while repairs and censuses run: reads of bodies, a master move.
    reads_after_heal(&mut d, rng, t, &all, &boxes, &labels, 0.7);
    d
}

/// After a heal at `t`, while repairs run: one to three reads of a body (each with
/// probability `body_read_p`) or master moves, through `servers`.
fn reads_after_heal(
    d: &mut Draft,
    rng: &mut ChaCha8Rng,
    mut t: u64,
    servers: &[Sid],
    boxes: &[MailboxKey],
    labels: &[(MailboxKey, String)],
    body_read_p: f64,
) {
    for _ in 0..rng.random_range(1..=3u32) {
        t += rng.random_range(1..=1500u64);
        let server = one_of(rng, servers);
        if rng.random_bool(body_read_p) {
            let (mailbox, label) = one_of(rng, labels);
            d.at(t, Action::FetchBody { server, mailbox, label });
        } else {
            d.at(t, Action::MasterMove { server, mailbox: one_of(rng, boxes) });
        }
    }
}

/// One of the mail operations through `server` that `restore` and `replace` draw, by
/// `roll` (below 77): a save, a COPY or MOVE, an expunge, a flag change, a body read or
/// a read of a mailbox.
fn mail_op(
    d: &mut Draft,
    rng: &mut ChaCha8Rng,
    t: u64,
    server: Sid,
    boxes: &[MailboxKey],
    labels: &mut Vec<(MailboxKey, String)>,
    roll: u32,
) {
    match roll {
        0..25 => save_new(d, rng, t, boxes, labels, |_| server),
        25..40 => copy_to_the_other(d, rng, t, server, boxes, labels),
        40..55 => expunge_one(d, rng, t, server, labels),
        55..67 => flag_one(d, rng, t, server, labels),
        67..72 => {
            let (mailbox, label) = one_of(rng, labels);
            d.at(t, Action::FetchBody { server, mailbox, label });
        }
        _ => d.at(t, Action::Read { server, mailbox: one_of(rng, boxes), fresh: rng.random_bool(0.5) }),
    }
}

fn restore(rng: &mut ChaCha8Rng) -> Draft {
    // Graces long enough that the restore falls within one of the backup (README,
    // "Backups").
    restore_at(rng, &[3000, 5000, 10_000], false)
}

fn late_restore(rng: &mut ChaCha8Rng) -> Draft {
    // Graces short enough that the simulated time past them stays short.
    restore_at(rng, &[660, 1000, 3000], true)
}

/// Saves into `inbox` enough messages with enough keywords that its state passes
/// `limits::STATE_PIECE_LEN_MAX` (about 4 KB of command text each, 180 of them), through
/// servers drawn from `all`; returns the time after them.
fn fill_past_one_piece(
    d: &mut Draft,
    rng: &mut ChaCha8Rng,
    mut t: u64,
    inbox: &MailboxKey,
    labels: &mut Vec<(MailboxKey, String)>,
    all: &[Sid],
) -> u64 {
    let keywords: Vec<tandem_core::Flag> =
        (0..40).filter_map(|i| tandem_core::Flag::new(&format!("$a-keyword-long-enough-{i:02}")).ok()).collect();
    for _ in 0..180 {
        let label = format!("m{}", labels.len() + 1);
        let server = one_of(rng, all);
        let action = Action::Save {
            server,
            mailbox: inbox.clone(),
            label: Some(label.clone()),
            flags: keywords.clone(),
            size: 100,
        };
        d.at(t, action);
        labels.push((inbox.clone(), label));
        t += rng.random_range(2..=6u64);
    }
    t
}

/// A backup put back in place of a server's store; `late`: only after the expunges made
/// since were collected, sometimes after every other server restarted.
fn restore_at(rng: &mut ChaCha8Rng, graces_ms: &[u64], late: bool) -> Draft {
    let mut d = Draft::new(rng, &[4, 40], &[2, 5, 20], graces_ms);
    if rng.random_bool(0.75) {
        d.durability = Durability::Sync;
    }
    let grace_ms = d.tombstone_grace_ms;
    let all = servers();
    let user = "u1@d1";
    let boxes: Vec<MailboxKey> = ["INBOX", "Box1"].iter().map(|n| MailboxKey::new(user, n)).collect();
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    let restored = one_of(rng, &all);
    let mut t = 300;
    let op = |d: &mut Draft, rng: &mut ChaCha8Rng, t: u64, labels: &mut Vec<(MailboxKey, String)>| {
        let server = one_of(rng, &all);
        match rng.random_range(0..100u32) {
            roll @ 0..77 => mail_op(d, rng, t, server, &boxes, labels, roll),
            77..88 => {
                // Often to the server restored later: it masters what its backup lacks.
                let to = if rng.random_bool(0.5) { restored } else { server };
                d.at(t, Action::MasterMove { server: to, mailbox: one_of(rng, &boxes) });
            }
            88..94 => d.down_and_up(rng, t, Action::Crash { server }, server),
            _ => d.isolate(t, server, &all),
        }
    };
    for _ in 0..rng.random_range(2..=5u32) {
        save_new(&mut d, rng, t, &boxes, &mut labels, |rng| one_of(rng, &all));
        t += rng.random_range(10..=200u64);
    }
    // Late, sometimes an INBOX whose state is too large for one command, so that the
    // names of the bindings collected in it travel in pieces (`limits::state_pieces`).
    let large = late && rng.random_bool(0.1);
    if large {
        t = fill_past_one_piece(&mut d, rng, t, &boxes[0], &mut labels, &all);
    }
    for _ in 0..rng.random_range(0..=4u32) {
        t += rng.random_range(10..=400u64);
        op(&mut d, rng, t, &mut labels);
    }
    t += rng.random_range(200..=1500u64);
    let backup_ms = t;
    d.at(backup_ms, Action::Backup { server: restored });
    // Mail goes on after the backup (what the restored store will lack), for half the
    // grace at most.
    let steps = rng.random_range(2..=10u32);
    let step_ms_max = (grace_ms / 2 / u64::from(steps)).max(20);
    for _ in 0..steps {
        t += rng.random_range(10..=step_ms_max);
        op(&mut d, rng, t, &mut labels);
    }
    if late {
        // At least one expunge the backup lacks, and every server up and joined until
        // its tombstone can be collected.
        for _ in 0..if large { rng.random_range(3..=12u32) } else { 1 } {
            t += rng.random_range(10..=200u64);
            let server = one_of(rng, &all);
            expunge_one(&mut d, rng, t, server, &labels);
        }
        t += rng.random_range(10..=200u64);
        d.at(t, Action::Heal);
        t = t.max(backup_ms + 2 * grace_ms) + rng.random_range(500..=5000u64);
        // Sometimes every server that saw the collection restarts before the store is
        // put back (a rolling upgrade): the memory of the collection is on disk.
        if rng.random_bool(0.5) {
            for server in all.iter().copied().filter(|s| *s != restored) {
                t += rng.random_range(10..=300u64);
                d.at(t, Action::Crash { server });
                t += rng.random_range(50..=800u64);
                d.at(t, Action::Restart { server });
            }
        }
    }
    if rng.random_bool(0.2) {
        t += rng.random_range(10..=100u64);
        d.at(t, Action::Lose { server: restored });
    }
    t += rng.random_range(10..=200u64);
    // Back before the grace since the backup has passed: an expunge made since cannot
    // have been collected while it was away. Late: long after.
    let restart_ms = t + rng.random_range(50..=800u64);
    let restart_ms = if late { restart_ms } else { restart_ms.min(backup_ms + grace_ms - 100) };
    let restore_ms = t.min(restart_ms - 10);
    d.at(restore_ms, Action::RestoreBackup { server: restored });
    d.at(restart_ms, Action::Restart { server: restored });
    t = restart_ms;
    if rng.random_bool(0.3) {
        d.at(t, Action::Heal);
    }
    for _ in 0..rng.random_range(1..=5u32) {
        t += rng.random_range(1..=600u64);
        op(&mut d, rng, t, &mut labels);
    }
    t += rng.random_range(100..=2000u64);
    d.at(t, Action::Heal);
    d
}

fn replace(rng: &mut ChaCha8Rng) -> Draft {
    let mut d = Draft::new(rng, &[4, 8, 40], &[2, 5, 20], &[660, 3000, 10_000]);
    if rng.random_bool(0.75) {
        d.durability = Durability::Sync;
    }
    let all = servers();
    let spare = Sid(4);
    d.spares.push(spare);
    let lost = one_of(rng, &all);
    let user = "u1@d1";
    let boxes: Vec<MailboxKey> = ["INBOX", "Box1"].iter().map(|n| MailboxKey::new(user, n)).collect();
    let mut labels: Vec<(MailboxKey, String)> = Vec::new();
    // Members running: what a client or the operator goes through.
    let mut up = all.clone();
    let mut t = 300;
    let op = |d: &mut Draft, rng: &mut ChaCha8Rng, t: u64, labels: &mut Vec<(MailboxKey, String)>, up: &[Sid]| {
        let server = one_of(rng, up);
        match rng.random_range(0..100u32) {
            roll @ 0..77 => mail_op(d, rng, t, server, &boxes, labels, roll),
            // Often to the new server once it is in: it masters what it is still filling.
            77..88 => {
                let to = if up.contains(&spare) && rng.random_bool(0.5) { spare } else { one_of(rng, up) };
                d.at(t, Action::MasterMove { server: to, mailbox: one_of(rng, &boxes) });
            }
            88..94 => d.down_and_up(rng, t, Action::Crash { server }, server),
            _ => d.isolate(t, server, up),
        }
    };
    for _ in 0..rng.random_range(2..=5u32) {
        save_new(&mut d, rng, t, &boxes, &mut labels, |rng| one_of(rng, &all));
        t += rng.random_range(10..=200u64);
    }
    for _ in 0..rng.random_range(0..=5u32) {
        t += rng.random_range(10..=400u64);
        op(&mut d, rng, t, &mut labels, &up);
    }
    // The loss: its disk dies (it stays down), or the operator gives the machine up while
    // it still runs (the retirement stops it).
    t += rng.random_range(10..=400u64);
    let disk_lost = rng.random_bool(0.7);
    if disk_lost {
        d.at(t, Action::Lose { server: lost });
    }
    up.retain(|s| *s != lost);
    // The operator's two steps, through any server left, in either order, with mail
    // between them.
    let remove_first = rng.random_bool(0.7);
    for step in 0..2 {
        for _ in 0..rng.random_range(0..=3u32) {
            t += rng.random_range(10..=500u64);
            op(&mut d, rng, t, &mut labels, &up);
        }
        t += rng.random_range(10..=300u64);
        let through = one_of(rng, &up);
        if (step == 0) == remove_first {
            d.at(t, Action::MemberRemove { server: through, member: lost, lost: true });
            if !disk_lost && rng.random_bool(0.4) {
                // The machine given up was only cut off: it comes back with its disk, to
                // find itself retired (its mail no longer counts anywhere).
                d.at(t + rng.random_range(10..=3000u64), Action::Restart { server: lost });
            }
        } else {
            d.at(t, Action::MemberAdd { server: through, member: spare });
            up.push(spare);
        }
    }
    // Mail goes on while the new server fills.
    for _ in 0..rng.random_range(2..=8u32) {
        t += rng.random_range(10..=600u64);
        op(&mut d, rng, t, &mut labels, &up);
    }
    t += rng.random_range(100..=2000u64);
    d.at(t, Action::Heal);
    reads_after_heal(&mut d, rng, t, &up, &boxes, &labels, 0.6);
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
