//! Wire codec speed per message kind: encode and decode rates (criterion), for the
//! commands that dominate replication traffic. Run: `cargo bench -p tandem-core --bench codec`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tandem_core::msg::{Change, Envelope, Msg, WriteRequest};
use tandem_core::types::*;
use tandem_core::wire::{Decoder, Encoder};

fn record(uid: Uid) -> MessageRecord {
    let stamp = Stamp { modseq: u64::from(uid), sid: Sid(1) };
    let flags: Flags = ["\\Seen", "\\Flagged", "$Work"]
        .iter()
        .filter_map(|f| Flag::new(f).ok())
        .map(|f| (f, FlagState { present: true, stamp }))
        .collect();
    MessageRecord {
        uid,
        guid: Guid(0x1234_5678_9abc_def0_u128 << 64 | u128::from(uid)),
        received: 1_700_000_000,
        size: 4096,
        checksum: 0xfeed_beef,
        modseq: u64::from(uid),
        flags,
        claimed: false,
        pushed: false,
    }
}

fn kinds() -> Vec<(&'static str, Envelope)> {
    let inbox = MailboxKey::new("alice@example.org", "INBOX");
    let body: tandem_core::types::Body =
        (0..4096u32).map(|i| b"abcdefghij\r\n"[(i % 12) as usize]).collect::<Vec<u8>>().into();
    let env = |msg| Envelope { src: Sid(1), dst: Sid(2), hops: 0, msg };
    let state = MailboxState {
        mailbox: inbox.clone(),
        uidvalidity: 7,
        uidnext: 101,
        highest_modseq: 100,
        messages: (1..=100).map(record).collect(),
        tombstones: Vec::new(),
        lifecycle: Lifecycle::default(),
        retired: Default::default(),
    };
    vec![
        (
            "SAVE 4 KB",
            env(Msg::Request {
                tag: 1,
                request: WriteRequest::Save {
                    mailbox: inbox.clone(),
                    guid: Guid(9),
                    received: 1,
                    flags: vec![],
                    body: body.clone(),
                    delivery: true,
                },
            }),
        ),
        (
            "R-SAVE 4 KB",
            env(Msg::Change {
                seq: 5,
                change: Change::Save { mailbox: inbox.clone(), uidvalidity: 7, record: record(5), body },
            }),
        ),
        (
            "R-STORE",
            env(Msg::Change {
                seq: 6,
                change: Change::Store {
                    mailbox: inbox.clone(),
                    uidvalidity: 7,
                    stamp: Stamp { modseq: 9, sid: Sid(1) },
                    messages: vec![(5, record(5).guid)],
                    add: vec![Flag::new("\\Seen").unwrap_or_else(|_| unreachable!())],
                    remove: vec![],
                },
            }),
        ),
        ("ACK", env(Msg::Ack { seqs: (1..=16).collect(), refused: vec![], store: 0x5eed_5eed_5eed_5eed })),
        (
            "MBOX",
            env(Msg::Mbox {
                tag: 0,
                summary: Summary {
                    mailbox: inbox.clone(),
                    uidvalidity: 7,
                    uidnext: 101,
                    count: 100,
                    highest_modseq: 100,
                    digest: 42,
                },
            }),
        ),
        ("SYNC 100 messages", env(Msg::Sync { reply: true, state })),
    ]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    for (name, envelope) in kinds() {
        let mut bytes = Vec::new();
        Encoder::new().encode(&envelope, &mut bytes);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", name), &envelope, |b, e| {
            let mut encoder = Encoder::new();
            let mut out = Vec::with_capacity(bytes.len());
            b.iter(|| {
                out.clear();
                encoder.encode(e, &mut out);
                out.len()
            });
        });
        group.bench_with_input(BenchmarkId::new("decode", name), &bytes, |b, input| {
            b.iter(|| match Decoder::new().decode(input) {
                Ok(Some((env, used))) => (env.hops, used),
                other => panic!("{name}: {other:?}"),
            });
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
