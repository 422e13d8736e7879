//! What a replica's acknowledgement of a replicated change means: the change is durable
//! here, so its master may count us as a copy. A change we could not apply in full is
//! acknowledged as refused, so that the master waits for another copy instead.

use tandem_core::*;

const MASTER: Sid = Sid(1);
const REPLICA: Sid = Sid(2);

/// A replica alone with its master, driven by hand: every write is made durable at once
/// and the messages it sends are kept.
struct Replica {
    server: Server,
    now: Instant,
    sent: Vec<(Sid, Msg)>,
}

impl Replica {
    fn new() -> Replica {
        let mut cfg = Config::new(REPLICA, vec![MASTER, REPLICA]);
        cfg.replicas = 1;
        let mut r = Replica {
            server: Server::new(cfg, 7, Box::new(MemoryBodies::default())),
            now: Instant(0),
            sent: Vec::new(),
        };
        r.input(Input::LinkUp { peer: MASTER });
        // The master's side of the link: without it the master is out of reach.
        let msg = Msg::LinkState { origin: MASTER, seq: 1, epoch: 0, store: 1, neighbors: vec![REPLICA] };
        r.input(Input::Peer { from: MASTER, envelope: Envelope { src: MASTER, dst: REPLICA, hops: 0, msg } });
        r
    }

    fn input(&mut self, input: Input) {
        self.now = self.now.plus_us(1_000);
        self.server.handle(self.now, input);
        let mut upto = None;
        while let Some(out) = self.server.poll_output() {
            match out {
                Output::Write { id, .. } => upto = upto.max(Some(id)),
                Output::Send { to, envelope } => self.sent.push((to, envelope.msg)),
                Output::Reply { .. } => {}
            }
        }
        if let Some(upto) = upto {
            self.input(Input::Durable { upto });
        }
    }

    fn change(&mut self, seq: u64, change: Change) {
        let envelope = Envelope { src: MASTER, dst: REPLICA, hops: 0, msg: Msg::Change { seq, change } };
        self.input(Input::Peer { from: MASTER, envelope });
    }

    /// Every acknowledgement sent so far, as (taken, refused).
    fn acks(&self) -> (Vec<u64>, Vec<u64>) {
        let mut all = (Vec::new(), Vec::new());
        for (to, msg) in &self.sent {
            if let (&MASTER, Msg::Ack { seqs, refused, .. }) = (to, msg) {
                all.0.extend(seqs);
                all.1.extend(refused);
            }
        }
        all
    }
}

fn record(uid: Uid, guid: Guid, body: &Body) -> MessageRecord {
    MessageRecord {
        uid,
        guid,
        received: 1_000,
        size: body.len() as u32,
        checksum: body.checksum(),
        modseq: 2,
        flags: Flags::default(),
        claimed: false,
        pushed: false,
    }
}

fn seen(mailbox: &MailboxKey, uid: Uid, guid: Guid) -> Change {
    Change::Store {
        mailbox: mailbox.clone(),
        uidvalidity: 77,
        stamp: Stamp { modseq: 3, sid: MASTER },
        messages: vec![(uid, guid)],
        add: vec![Flag::new("\\Seen").unwrap()],
        remove: Vec::new(),
    }
}

#[test]
fn a_flag_change_for_a_message_the_replica_lacks_counts_for_no_copy() {
    let inbox = MailboxKey::new("u", "INBOX");
    let body = Body::from_static(b"Subject: one\r\n\r\nhello\r\n");
    let (held, lacked) = (Guid(0x1_0001), Guid(0x2_0001));
    let mut replica = Replica::new();
    replica.change(
        1,
        Change::Save { mailbox: inbox.clone(), uidvalidity: 77, record: record(1, held, &body), body: body.clone() },
    );
    replica.change(2, seen(&inbox, 1, held));
    // UID 2 was saved while the replica was away: it never came here.
    replica.change(3, seen(&inbox, 2, lacked));
    assert_eq!(replica.acks(), (vec![1, 2], vec![3]));
    assert_eq!(replica.server.marks().count(Mark::UnheldChangeRefused), 1);
}
