//! Writes a [`Scenario`] back as a scenario file that `scenario::parse` reads to the same
//! value: how a shrunk failure becomes an ordinary regression test. The file is the
//! parser's own `scenario_file::FileToml` filled in and written by toml's serializer,
//! which does the quoting and escaping.

use crate::scenario::*;
use crate::scenario_file::*;
use tandem_core::{Flag, MailboxKey, Sid};
use toml::Spanned;

/// The scenario as TOML, with `comment` (one line per `\n`) at the top.
pub fn to_toml(s: &Scenario, comment: &str) -> String {
    let mut out: String = comment.lines().map(|line| format!("# {line}\n")).collect();
    match toml::to_string(&file_of(s)) {
        Ok(text) => out.push_str(&text),
        // Only a number above TOML's largest integer (i64::MAX) gets here, such as a seed
        // given on the command line: the file says so rather than hold another number.
        Err(e) => out.push_str(&format!("# cannot be written as TOML: {e}\n")),
    }
    out
}

fn file_of(s: &Scenario) -> FileToml {
    let c = &s.cluster;
    let link = |l: &LinkSpec| {
        let latency_ms = l.latency_ms.map(range);
        Spanned::new(0..0, LinkToml { a: l.a.to_string(), b: l.b.to_string(), latency_ms })
    };
    let cluster = ClusterToml {
        servers: Some(ServersToml::Names(c.servers.iter().map(Sid::to_string).collect())),
        replicas: Some(c.replicas),
        mode: name_in(MODES, c.durability),
        log_capacity: Some(c.log_capacity as u64),
        granularity: name_in(GRANULARITIES, c.granularity),
        latency_ms: Some(range(c.latency_ms)),
        disk_latency_us: Some(range(c.disk_latency_us)),
        request_timeout_ms: Some(c.request_timeout_ms),
        tombstone_grace_ms: Some(c.tombstone_grace_ms),
        startup_hold_ms: Some(c.startup_hold_ms),
        mta_retry_ms: c.mta_retry_ms,
        spares: (!c.spares.is_empty()).then(|| c.spares.iter().map(Sid::to_string).collect()),
        links: c.links.as_ref().map(|links| links.iter().map(link).collect()),
        partial_servers: (!c.partial_servers.is_empty()).then(|| {
            c.partial_servers
                .iter()
                .map(|(sid, p)| PartialServerToml {
                    server: sid.to_string(),
                    body_bytes_max: p.body_bytes_max,
                    mailboxes: (!p.mailboxes.is_empty()).then(|| p.mailboxes.clone()),
                    since_ms: (p.since_s > 0).then(|| p.since_s.saturating_sub(SIM_EPOCH_S) * 1000),
                    keep_fetched: (!p.keep_fetched).then_some(false),
                })
                .collect()
        }),
        laptops: (!c.laptops.is_empty()).then(|| {
            c.laptops
                .iter()
                .map(|l| {
                    Spanned::new(
                        0..0,
                        LaptopToml {
                            server: l.sid.to_string(),
                            user: l.user.clone(),
                            home: l.home.to_string(),
                            latency_ms: Some(range(l.latency_ms)),
                            partial: l.partial.as_ref().map(|p| PartialToml {
                                mailboxes: (!p.mailboxes.is_empty()).then(|| p.mailboxes.clone()),
                                since_ms: (p.since_s > 0).then(|| p.since_s.saturating_sub(SIM_EPOCH_S) * 1000),
                                body_bytes_max: p.body_bytes_max,
                                keep_fetched: (!p.keep_fetched).then_some(false),
                            }),
                        },
                    )
                })
                .collect()
        }),
    };
    FileToml {
        name: Some(s.name.clone()),
        seed: Some(s.seed),
        wire: Some(s.wire),
        settle_ms: Some(s.settle_ms),
        heal_at_end: Some(s.heal_at_end),
        schedule: s.schedule.clone(),
        cluster: Some(cluster),
        event: s.events.iter().map(event_of).collect(),
        expect: s.expects.iter().map(expect_of).collect(),
    }
}

fn name_in<T: PartialEq>(choices: &[(&str, T)], value: T) -> Option<String> {
    choices.iter().find(|(_, v)| *v == value).map(|(name, _)| name.to_string())
}

fn range((lo, hi): (u64, u64)) -> RangeToml {
    RangeToml::Span(lo, hi)
}

fn server(s: &Sid) -> Option<String> {
    Some(s.to_string())
}

fn mailbox(m: &MailboxKey) -> Option<String> {
    Some(format!("{}/{}", m.user, m.name))
}

/// Positions are only read from files; written entries have none.
fn unplaced(s: String) -> Spanned<String> {
    Spanned::new(0..0, s)
}

fn flags(flags: &[Flag]) -> Option<Vec<Spanned<String>>> {
    Some(flags.iter().map(|f| unplaced(f.as_str().to_string())).collect())
}

fn servers(list: &[Sid]) -> Vec<Spanned<String>> {
    list.iter().map(|s| unplaced(s.to_string())).collect()
}

fn event_of(e: &TimedEvent) -> EventToml {
    let mut table = EventToml { at_ms: Some(e.at_ms), id: e.id.clone(), expect: e.expect, ..Default::default() };
    let op = match &e.action {
        Action::Save { server: s, mailbox: m, label, flags: f, size } => {
            (table.server, table.mailbox, table.label, table.flags) = (server(s), mailbox(m), label.clone(), flags(f));
            table.size = Some(*size as u64);
            "save"
        }
        Action::Import { server: s, mailbox: m, label, uidvalidity, uid, flags: f, size } => {
            (table.server, table.mailbox, table.label, table.flags) =
                (server(s), mailbox(m), Some(label.clone()), flags(f));
            (table.uidvalidity, table.uid, table.size) =
                (Some(u64::from(*uidvalidity)), Some(u64::from(*uid)), Some(*size as u64));
            "import"
        }
        Action::Copy { server: s, from, label, to, as_label, moving } => {
            (table.server, table.from, table.label) = (server(s), mailbox(from), Some(label.clone()));
            (table.to, table.as_label) = (mailbox(to), as_label.clone());
            if *moving { "move" } else { "copy" }
        }
        Action::Replicate { server: s, home } => {
            table.server = server(s);
            table.home = home.as_ref().map(Sid::to_string);
            "replicate"
        }
        Action::RenameMailbox { server: s, from, to } => {
            (table.server, table.from, table.to) = (server(s), mailbox(from), mailbox(to));
            "rename_mailbox"
        }
        Action::Expunge { server: s, mailbox: m, labels } => {
            (table.server, table.mailbox, table.labels) = (server(s), mailbox(m), Some(labels.clone()));
            "expunge"
        }
        Action::Store { server: s, mailbox: m, labels, add, remove, unchanged_since } => {
            (table.server, table.mailbox, table.labels) = (server(s), mailbox(m), Some(labels.clone()));
            // Both lists, even empty: a STORE needs at least one of them.
            (table.add, table.remove) = (flags(add), flags(remove));
            table.unchanged_since = unchanged_since.as_ref().map(|u| match u {
                UnchangedSince::Current => ModseqToml::Word("current".to_string()),
                UnchangedSince::Value(modseq) => ModseqToml::Value(*modseq),
            });
            "store"
        }
        Action::FetchBody { server: s, mailbox: m, label } => {
            (table.server, table.mailbox, table.label) = (server(s), mailbox(m), Some(label.clone()));
            "fetch_body"
        }
        Action::Read { server: s, mailbox: m, fresh } => {
            (table.server, table.mailbox) = (server(s), mailbox(m));
            table.fresh = fresh.then_some(true);
            "read"
        }
        Action::CreateMailbox { server: s, mailbox: m, special_use } => {
            (table.server, table.mailbox) = (server(s), mailbox(m));
            if !special_use.is_empty() {
                table.special_use = Some(special_use.names().map(str::to_string).collect());
            }
            "create_mailbox"
        }
        Action::MasterMove { server: s, mailbox: m }
        | Action::DeleteMailbox { server: s, mailbox: m }
        | Action::Status { server: s, mailbox: m } => {
            (table.server, table.mailbox) = (server(s), mailbox(m));
            match e.action {
                Action::MasterMove { .. } => "master_move",
                Action::Status { .. } => "status",
                _ => "delete_mailbox",
            }
        }
        Action::Cut { a, b } | Action::Restore { a, b } => {
            (table.a, table.b) = (server(a), server(b));
            if matches!(e.action, Action::Cut { .. }) { "cut" } else { "restore" }
        }
        Action::Flap { a, b, down_ms } => {
            (table.a, table.b, table.down_ms) = (server(a), server(b), Some(*down_ms));
            "flap"
        }
        Action::Reset { a, b, down_ms } => {
            (table.a, table.b, table.down_ms) = (server(a), server(b), Some(*down_ms));
            "reset"
        }
        Action::Slow { a, b, delay_ms, for_ms } => {
            (table.a, table.b, table.delay_ms, table.for_ms) = (server(a), server(b), Some(*delay_ms), Some(*for_ms));
            "slow"
        }
        Action::Silence { from, to, for_ms } => {
            (table.a, table.b, table.for_ms) = (server(from), server(to), Some(*for_ms));
            "silence"
        }
        Action::Partition { groups } => {
            table.groups = Some(groups.iter().map(|g| servers(g)).collect());
            "partition"
        }
        Action::Heal => "heal",
        Action::Isolate { server: s }
        | Action::Crash { server: s }
        | Action::Restart { server: s }
        | Action::Lose { server: s }
        | Action::Replace { server: s }
        | Action::Backup { server: s }
        | Action::RestoreBackup { server: s } => {
            table.server = server(s);
            match e.action {
                Action::Isolate { .. } => "isolate",
                Action::Crash { .. } => "crash",
                Action::Restart { .. } => "restart",
                Action::Lose { .. } => "lose",
                Action::Backup { .. } => "backup",
                Action::RestoreBackup { .. } => "restore_backup",
                _ => "replace",
            }
        }
        Action::MemberAdd { server: s, member } => {
            (table.server, table.member) = (server(s), server(member));
            "member_add"
        }
        Action::MemberRemove { server: s, member, lost } => {
            (table.server, table.member, table.lost) = (server(s), server(member), lost.then_some(true));
            "member_remove"
        }
        Action::HandAdd { server: s, mailbox: m, label } => {
            (table.server, table.mailbox, table.label) = (server(s), mailbox(m), label.clone());
            "hand_add"
        }
        Action::HandDelete { server: s, mailbox: m, label } => {
            (table.server, table.mailbox, table.label) = (server(s), mailbox(m), Some(label.clone()));
            "hand_delete"
        }
        Action::Corrupt { server: s, label } => {
            (table.server, table.label) = (server(s), Some(label.clone()));
            "corrupt"
        }
        Action::RandomWorkload { until_ms, ops_per_s, users, mailboxes, servers: list } => {
            (table.until_ms, table.ops_per_s) = (Some(*until_ms), Some(*ops_per_s));
            (table.users, table.mailboxes) = (Some(u64::from(*users)), Some(u64::from(*mailboxes)));
            table.servers = list.as_deref().map(servers);
            "random_workload"
        }
        Action::RandomFaults { until_ms, count, kinds } => {
            (table.until_ms, table.count, table.kinds) =
                (Some(*until_ms), Some(u64::from(*count)), Some(kinds.clone()));
            "random_faults"
        }
    };
    table.op = Some(op.to_string());
    table
}

fn expect_of(x: &Expect) -> ExpectToml {
    let mut table = ExpectToml::default();
    let check = match x {
        Expect::Invariants => "invariants",
        Expect::Invariant(name) => {
            table.name = Some(name.clone());
            "invariant"
        }
        Expect::Root { server: s } => {
            table.server = server(s);
            "root"
        }
        Expect::NotUid { label, uid } | Expect::Uid { label, uid } => {
            (table.label, table.uid) = (Some(label.clone()), Some(u64::from(*uid)));
            if matches!(x, Expect::Uid { .. }) { "uid" } else { "not_uid" }
        }
        Expect::Flags { label, flags: f } => {
            (table.label, table.flags) = (Some(label.clone()), flags(f));
            "flags"
        }
        Expect::Present { label } | Expect::Absent { label } => {
            table.label = Some(label.clone());
            if matches!(x, Expect::Present { .. }) { "present" } else { "absent" }
        }
        Expect::Mark { name, min, max } => {
            (table.name, table.min, table.max) = (Some(name.clone()), Some(*min), *max);
            "mark"
        }
        Expect::ExactlyOneOk { events } => {
            table.events = Some(events.iter().map(|id| unplaced(id.clone())).collect());
            "exactly_one_ok"
        }
        Expect::Count { mailbox: m, count } => {
            (table.mailbox, table.count) = (mailbox(m), Some(*count as u64));
            "count"
        }
        Expect::Validity { mailbox: m, uidvalidity } => {
            (table.mailbox, table.uidvalidity) = (mailbox(m), Some(u64::from(*uidvalidity)));
            "uidvalidity"
        }
        Expect::Tombstones { mailbox: m, count } => {
            (table.mailbox, table.count) = (mailbox(m), Some(*count as u64));
            "tombstones"
        }
        Expect::Visible { mailbox: m, visible } => {
            (table.mailbox, table.visible) = (mailbox(m), Some(*visible));
            "visible"
        }
        Expect::BodyHeld { server, label, held } => {
            (table.server, table.label, table.held) = (Some(server.to_string()), Some(label.clone()), Some(*held));
            "body_held"
        }
        Expect::Renumbered { labels } => {
            table.labels = Some(labels.clone());
            "renumbered"
        }
        Expect::SpecialUse { mailbox: m, special_use } => {
            table.mailbox = mailbox(m);
            table.special_use = Some(special_use.names().map(str::to_string).collect());
            "special_use"
        }
        Expect::Member { server: s, state } => {
            (table.server, table.state) = (server(s), Some(state.name().to_string()));
            "member"
        }
    };
    table.check = Some(check.to_string());
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explore::generate;
    use std::path::PathBuf;

    /// The scenario without what only a file gives it: its path and its events' lines.
    fn placeless(mut s: Scenario) -> Scenario {
        s.path = None;
        for e in &mut s.events {
            e.line = 0;
        }
        s
    }

    fn round_trip(s: &Scenario) -> Scenario {
        let text = to_toml(s, "round trip\nof a scenario");
        placeless(parse(&text, None).unwrap_or_else(|e| panic!("{}: {e}\n{text}", s.name)))
    }

    #[test]
    fn every_scenario_file_survives_a_round_trip() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let files = files_in(&dir).unwrap();
        assert!(!files.is_empty());
        for f in files {
            let original = load(&f).unwrap();
            assert_eq!(round_trip(&original), placeless(original), "{}", f.display());
        }
    }

    #[test]
    fn generated_scenarios_survive_a_round_trip() {
        for seed in [1, 2, 3, 583, 612, 1_000_000, 1_000_001] {
            let original = generate(seed);
            assert_eq!(round_trip(&original), placeless(original), "seed {seed}");
        }
    }

    #[test]
    fn awkward_strings_and_empty_lists_survive_a_round_trip() {
        let mut s = generate(7);
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} del \u{7f} é 'single' \"\"\"";
        s.name = awkward.to_string();
        let m = MailboxKey::new("bob@example.org", "Archive/\"2008\" 'x' \\ é");
        let label = format!("m {awkward}");
        let events = [
            Action::Save { server: Sid(1), mailbox: m.clone(), label: Some(label.clone()), flags: vec![], size: 0 },
            Action::Store {
                server: Sid(1),
                mailbox: m.clone(),
                labels: vec![label.clone()],
                add: vec![],
                remove: vec![],
                unchanged_since: Some(UnchangedSince::Value(0)),
            },
            Action::HandAdd { server: Sid(1), mailbox: m.clone(), label: None },
        ];
        // At time 0 and first, where sorting by time leaves them.
        for (i, action) in events.into_iter().enumerate() {
            let id = Some(format!("{awkward} {i}"));
            s.events.insert(i, TimedEvent { at_ms: 0, id, action, expect: None, line: 0 });
        }
        s.expects.push(Expect::Flags { label: label.clone(), flags: vec![] });
        s.expects.push(Expect::Count { mailbox: m, count: 0 });
        s.cluster.links = Some(vec![]);
        assert_eq!(round_trip(&s), placeless(s));
    }

    #[test]
    fn a_number_beyond_toml_is_refused_in_the_file_not_with_a_panic() {
        let mut s = generate(7);
        s.seed = u64::MAX;
        let text = to_toml(&s, "too big");
        assert!(text.starts_with("# too big\n# cannot be written as TOML"), "{text}");
        assert!(parse(&text, None).is_err());
    }
}
