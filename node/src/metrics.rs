//! Counters the event loop keeps, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds of the ack-latency histogram buckets, in milliseconds.
const LATENCY_BUCKETS_MS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 5000.0];

#[derive(Default, Debug)]
pub struct Metrics {
    /// Per bucket (plus +Inf at the end): answered writes.
    ack_latency_buckets: [u64; LATENCY_BUCKETS_MS.len() + 1],
    ack_latency_sum_ms: f64,
    ack_latency_count: u64,
    pub writes_failed: u64,
    pub peer_messages_in: u64,
    pub peer_messages_out: u64,
    pub handshakes_refused: u64,
    pub store_commits: u64,
    pub store_writes: u64,
    pub store_failures: u64,
}

impl Metrics {
    pub fn observe_ack_ms(&mut self, ms: f64) {
        let i = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.ack_latency_buckets[i] += 1;
        self.ack_latency_sum_ms += ms;
        self.ack_latency_count += 1;
    }

    /// The whole exposition: our counters plus what the core reports.
    pub fn render(
        &self,
        sid: u32,
        backlog: &BTreeMap<u32, usize>,
        links: &BTreeMap<u32, bool>,
        marks: &[(&str, u64)],
        unconfirmed: Option<usize>,
    ) -> String {
        let mut out = String::new();
        if let Some(n) = unconfirmed {
            let _ = writeln!(
                out,
                "# HELP tandem_unconfirmed_mailboxes A newcomer store's mailboxes no master has confirmed yet."
            );
            let _ = writeln!(out, "# TYPE tandem_unconfirmed_mailboxes gauge");
            let _ = writeln!(out, "tandem_unconfirmed_mailboxes{{server=\"{sid}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP tandem_replication_backlog Replication log entries a peer has not acknowledged.");
        let _ = writeln!(out, "# TYPE tandem_replication_backlog gauge");
        for (peer, n) in backlog {
            let _ = writeln!(out, "tandem_replication_backlog{{server=\"{sid}\",peer=\"{peer}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP tandem_link_up 1 if the peer link is connected.");
        let _ = writeln!(out, "# TYPE tandem_link_up gauge");
        for (peer, up) in links {
            let _ = writeln!(out, "tandem_link_up{{server=\"{sid}\",peer=\"{peer}\"}} {}", u8::from(*up));
        }
        let _ = writeln!(out, "# HELP tandem_ack_latency_ms Time from a write request to its answer.");
        let _ = writeln!(out, "# TYPE tandem_ack_latency_ms histogram");
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += self.ack_latency_buckets[i];
            let _ = writeln!(out, "tandem_ack_latency_ms_bucket{{server=\"{sid}\",le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.ack_latency_buckets[LATENCY_BUCKETS_MS.len()];
        let _ = writeln!(out, "tandem_ack_latency_ms_bucket{{server=\"{sid}\",le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "tandem_ack_latency_ms_sum{{server=\"{sid}\"}} {}", self.ack_latency_sum_ms);
        let _ = writeln!(out, "tandem_ack_latency_ms_count{{server=\"{sid}\"}} {}", self.ack_latency_count);
        let counters = [
            ("tandem_writes_failed_total", "Writes answered with a failure.", self.writes_failed),
            ("tandem_peer_messages_in_total", "Peer messages received.", self.peer_messages_in),
            ("tandem_peer_messages_out_total", "Peer messages sent.", self.peer_messages_out),
            ("tandem_handshakes_refused_total", "Peer connections refused.", self.handshakes_refused),
            ("tandem_store_commits_total", "Durable store transactions (group commits).", self.store_commits),
            ("tandem_store_writes_total", "Store writes made durable.", self.store_writes),
            ("tandem_store_failures_total", "Store commits that failed and were retried.", self.store_failures),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{server=\"{sid}\"}} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP tandem_protocol_events_total Protocol paths taken (syncs run, conflicts renumbered, ...)."
        );
        let _ = writeln!(out, "# TYPE tandem_protocol_events_total counter");
        for (mark, n) in marks {
            let _ = writeln!(out, "tandem_protocol_events_total{{server=\"{sid}\",event=\"{mark}\"}} {n}");
        }
        out
    }
}
