//! Writes a [`Scenario`] back as a scenario file that `scenario::parse` reads to the same
//! value: how a shrunk failure becomes an ordinary regression test.

use crate::scenario::*;
use std::fmt::Write;
use tandem_core::{Durability, Flag, Granularity, MailboxKey, Sid};

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn sid(s: Sid) -> String {
    quote(&s.to_string())
}

fn mailbox(m: &MailboxKey) -> String {
    quote(&format!("{}/{}", m.user, m.name))
}

fn flags(f: &[Flag]) -> String {
    format!("[{}]", f.iter().map(|f| quote(f.as_str())).collect::<Vec<_>>().join(", "))
}

fn strings(list: &[String]) -> String {
    format!("[{}]", list.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))
}

fn range(r: (u64, u64)) -> String {
    format!("[{}, {}]", r.0, r.1)
}

/// The scenario as TOML, with `comment` (one line per `\n`) at the top.
pub fn to_toml(s: &Scenario, comment: &str) -> String {
    let mut out = String::new();
    for line in comment.lines() {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(out, "name = {}", quote(&s.name));
    let _ = writeln!(out, "seed = {}", s.seed);
    let _ = writeln!(out, "wire = {}", s.wire);
    let _ = writeln!(out, "settle_ms = {}", s.settle_ms);
    let _ = writeln!(out, "heal_at_end = {}", s.heal_at_end);
    let c = &s.cluster;
    let _ = writeln!(out, "\n[cluster]");
    let servers: Vec<String> = c.servers.iter().map(|s| sid(*s)).collect();
    let _ = writeln!(out, "servers = [{}]", servers.join(", "));
    let _ = writeln!(out, "replicas = {}", c.replicas);
    let mode = match c.durability {
        Durability::Sync => "sync",
        Durability::Async => "async",
    };
    let _ = writeln!(out, "mode = {}", quote(mode));
    let _ = writeln!(out, "log_capacity = {}", c.log_capacity);
    let granularity = match c.granularity {
        Granularity::Mailbox => "mailbox",
        Granularity::User => "user",
        Granularity::Domain => "domain",
        Granularity::Global => "global",
    };
    let _ = writeln!(out, "granularity = {}", quote(granularity));
    let _ = writeln!(out, "latency_ms = {}", range(c.latency_ms));
    let _ = writeln!(out, "disk_latency_us = {}", range(c.disk_latency_us));
    let _ = writeln!(out, "request_timeout_ms = {}", c.request_timeout_ms);
    if let Some(links) = &c.links {
        let items: Vec<String> = links
            .iter()
            .map(|l| match l.latency_ms {
                Some(r) => format!("{{ a = {}, b = {}, latency_ms = {} }}", sid(l.a), sid(l.b), range(r)),
                None => format!("{{ a = {}, b = {} }}", sid(l.a), sid(l.b)),
            })
            .collect();
        if items.is_empty() {
            let _ = writeln!(out, "links = []");
        } else {
            let _ = writeln!(out, "links = [\n  {},\n]", items.join(",\n  "));
        }
    }
    for e in &s.events {
        let _ = writeln!(out, "\n[[event]]");
        let _ = writeln!(out, "at_ms = {}", e.at_ms);
        write_action(&mut out, &e.action);
        if let Some(id) = &e.id {
            let _ = writeln!(out, "id = {}", quote(id));
        }
        if let Some(x) = e.expect {
            let x = match x {
                ReplyExpect::Ok => "ok",
                ReplyExpect::Temporary => "temporary",
                ReplyExpect::Permanent => "permanent",
                ReplyExpect::Rejected => "rejected",
            };
            let _ = writeln!(out, "expect = {}", quote(x));
        }
    }
    for x in &s.expects {
        let _ = writeln!(out, "\n[[expect]]");
        write_expect(&mut out, x);
    }
    out
}

fn write_action(out: &mut String, a: &Action) {
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "{k} = {v}");
    };
    match a {
        Action::Save { server, mailbox: m, label, flags: f, size } => {
            kv("op", quote("save"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
            if let Some(l) = label {
                kv("label", quote(l));
            }
            if !f.is_empty() {
                kv("flags", flags(f));
            }
            kv("size", size.to_string());
        }
        Action::Copy { server, from, label, to, as_label } => {
            kv("op", quote("copy"));
            kv("server", sid(*server));
            kv("from", mailbox(from));
            kv("label", quote(label));
            kv("to", mailbox(to));
            if let Some(l) = as_label {
                kv("as_label", quote(l));
            }
        }
        Action::Expunge { server, mailbox: m, labels } => {
            kv("op", quote("expunge"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
            kv("labels", strings(labels));
        }
        Action::Store { server, mailbox: m, labels, add, remove, unchanged_since } => {
            kv("op", quote("store"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
            kv("labels", strings(labels));
            if !add.is_empty() {
                kv("add", flags(add));
            }
            if !remove.is_empty() {
                kv("remove", flags(remove));
            }
            match unchanged_since {
                Some(UnchangedSince::Current) => kv("unchanged_since", quote("current")),
                Some(UnchangedSince::Value(v)) => kv("unchanged_since", v.to_string()),
                None => {}
            }
        }
        Action::Read { server, mailbox: m } => {
            kv("op", quote("read"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
        }
        Action::MasterMove { server, mailbox: m } => {
            kv("op", quote("master_move"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
        }
        Action::CreateMailbox { server, mailbox: m } | Action::DeleteMailbox { server, mailbox: m } => {
            let op = if matches!(a, Action::CreateMailbox { .. }) { "create_mailbox" } else { "delete_mailbox" };
            kv("op", quote(op));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
        }
        Action::Cut { a, b } => {
            kv("op", quote("cut"));
            kv("a", sid(*a));
            kv("b", sid(*b));
        }
        Action::Restore { a, b } => {
            kv("op", quote("restore"));
            kv("a", sid(*a));
            kv("b", sid(*b));
        }
        Action::Isolate { server } => {
            kv("op", quote("isolate"));
            kv("server", sid(*server));
        }
        Action::Partition { groups } => {
            kv("op", quote("partition"));
            let groups: Vec<String> = groups
                .iter()
                .map(|g| format!("[{}]", g.iter().map(|s| sid(*s)).collect::<Vec<_>>().join(", ")))
                .collect();
            kv("groups", format!("[{}]", groups.join(", ")));
        }
        Action::Heal => kv("op", quote("heal")),
        Action::Flap { a, b, down_ms } => {
            kv("op", quote("flap"));
            kv("a", sid(*a));
            kv("b", sid(*b));
            kv("down_ms", down_ms.to_string());
        }
        Action::Crash { server }
        | Action::Restart { server }
        | Action::Lose { server }
        | Action::Replace { server } => {
            let op = match a {
                Action::Crash { .. } => "crash",
                Action::Restart { .. } => "restart",
                Action::Lose { .. } => "lose",
                _ => "replace",
            };
            kv("op", quote(op));
            kv("server", sid(*server));
        }
        Action::HandAdd { server, mailbox: m, label } => {
            kv("op", quote("hand_add"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
            if let Some(l) = label {
                kv("label", quote(l));
            }
        }
        Action::HandDelete { server, mailbox: m, label } => {
            kv("op", quote("hand_delete"));
            kv("server", sid(*server));
            kv("mailbox", mailbox(m));
            kv("label", quote(label));
        }
        Action::Corrupt { server, label } => {
            kv("op", quote("corrupt"));
            kv("server", sid(*server));
            kv("label", quote(label));
        }
        Action::RandomWorkload { until_ms, ops_per_s, users, mailboxes, servers } => {
            kv("op", quote("random_workload"));
            kv("until_ms", until_ms.to_string());
            kv("ops_per_s", ops_per_s.to_string());
            kv("users", users.to_string());
            kv("mailboxes", mailboxes.to_string());
            if let Some(list) = servers {
                kv("servers", format!("[{}]", list.iter().map(|s| sid(*s)).collect::<Vec<_>>().join(", ")));
            }
        }
        Action::RandomFaults { until_ms, count, kinds } => {
            kv("op", quote("random_faults"));
            kv("until_ms", until_ms.to_string());
            kv("count", count.to_string());
            let kinds: Vec<String> = kinds
                .iter()
                .map(|k| {
                    quote(match k {
                        FaultKind::Partition => "partition",
                        FaultKind::Cut => "cut",
                        FaultKind::Crash => "crash",
                        FaultKind::Flap => "flap",
                        FaultKind::HandEdit => "hand_edit",
                        FaultKind::Corrupt => "corrupt",
                        FaultKind::Lose => "lose",
                    })
                })
                .collect();
            kv("kinds", format!("[{}]", kinds.join(", ")));
        }
    }
}

fn write_expect(out: &mut String, x: &Expect) {
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "{k} = {v}");
    };
    match x {
        Expect::Invariants => kv("check", quote("invariants")),
        Expect::Invariant(name) => {
            kv("check", quote("invariant"));
            kv("name", quote(name));
        }
        Expect::Root { server } => {
            kv("check", quote("root"));
            kv("server", sid(*server));
        }
        Expect::NotUid { label, uid } | Expect::Uid { label, uid } => {
            kv("check", quote(if matches!(x, Expect::Uid { .. }) { "uid" } else { "not_uid" }));
            kv("label", quote(label));
            kv("uid", uid.to_string());
        }
        Expect::Flags { label, flags: f } => {
            kv("check", quote("flags"));
            kv("label", quote(label));
            kv("flags", flags(f));
        }
        Expect::Present { label } | Expect::Absent { label } => {
            kv("check", quote(if matches!(x, Expect::Present { .. }) { "present" } else { "absent" }));
            kv("label", quote(label));
        }
        Expect::Mark { name, min } => {
            kv("check", quote("mark"));
            kv("name", quote(name));
            kv("min", min.to_string());
        }
        Expect::ExactlyOneOk { events } => {
            kv("check", quote("exactly_one_ok"));
            kv("events", strings(events));
        }
        Expect::Count { mailbox: m, count } => {
            kv("check", quote("count"));
            kv("mailbox", mailbox(m));
            kv("count", count.to_string());
        }
        Expect::Visible { mailbox: m, visible } => {
            kv("check", quote("visible"));
            kv("mailbox", mailbox(m));
            kv("visible", visible.to_string());
        }
        Expect::Renumbered { labels } => {
            kv("check", quote("renumbered"));
            kv("labels", strings(labels));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn every_scenario_file_survives_a_round_trip() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let files = files_in(&dir).unwrap();
        for f in files {
            let mut original = load(&f).unwrap();
            let text = to_toml(&original, "round trip\nof a scenario");
            let mut back = parse(&text, None).unwrap_or_else(|e| panic!("{}: {e}\n{text}", f.display()));
            original.path = None;
            back.path = None;
            for e in original.events.iter_mut().chain(back.events.iter_mut()) {
                e.line = 0;
            }
            assert_eq!(original, back, "{}", f.display());
        }
    }
}
