//! How many times a replicated SAVE copies its body: two cores (the master and one
//! replica, sync mode, replicas=1) joined through the wire codec as the node's peer
//! links are, with a counting allocator. Every allocation (or reallocation) at least as
//! large as the body is one copy of it. The figure is printed (`--nocapture`) and held
//! to a bound, so a change that copies bodies again fails here.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tandem_core::wire::{Decoder, Encoder};
use tandem_core::*;

const BODY_LEN: usize = 1 << 20;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LARGE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= BODY_LEN && COUNTING.load(Ordering::SeqCst) {
            LARGE.fetch_add(1, Ordering::SeqCst);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= BODY_LEN && COUNTING.load(Ordering::SeqCst) {
            LARGE.fetch_add(1, Ordering::SeqCst);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const S1: Sid = Sid(1);
const S2: Sid = Sid(2);

struct Pair {
    servers: BTreeMap<Sid, Server>,
    bodies: BTreeMap<Sid, MemoryBodies>,
    codecs: BTreeMap<(Sid, Sid), (Encoder, Decoder)>,
    replies: BTreeMap<(Sid, RequestId), ClientReply>,
    now: Instant,
}

impl Pair {
    fn new() -> Pair {
        let bodies: BTreeMap<Sid, MemoryBodies> = [S1, S2].into_iter().map(|s| (s, MemoryBodies::default())).collect();
        let servers = [S1, S2]
            .into_iter()
            .map(|sid| {
                let mut cfg = Config::new(sid, vec![S1, S2]);
                cfg.replicas = 1;
                cfg.durability = Durability::Sync;
                (sid, Server::new(cfg, 7, Box::new(bodies[&sid].clone())))
            })
            .collect();
        let codecs = [(S1, S2), (S2, S1)].into_iter().map(|d| (d, (Encoder::new(), Decoder::new()))).collect();
        let mut p = Pair { servers, bodies, codecs, replies: BTreeMap::new(), now: Instant(0) };
        p.pump(vec![(S1, Input::LinkUp { peer: S2 }), (S2, Input::LinkUp { peer: S1 })]);
        for _ in 0..1000 {
            if p.servers[&S1].root_active() && p.servers[&S2].term() == p.servers[&S1].term() {
                return p;
            }
            p.tick();
        }
        panic!("no root");
    }

    fn tick(&mut self) {
        self.now = self.now.plus_us(50_000);
        let inputs = self.servers.keys().map(|sid| (*sid, Input::Timer)).collect();
        self.pump(inputs);
    }

    /// As a node's peer link does: each command encoded into a buffer, sent, decoded.
    fn pump(&mut self, mut queue: Vec<(Sid, Input)>) {
        while !queue.is_empty() {
            for (sid, input) in std::mem::take(&mut queue) {
                if let Some(s) = self.servers.get_mut(&sid) {
                    s.handle(self.now, input);
                }
            }
            for (&sid, server) in &mut self.servers {
                while let Some(out) = server.poll_output() {
                    match out {
                        Output::Write { id, write } => {
                            self.bodies[&sid].apply(&write);
                            queue.push((sid, Input::Durable { upto: id }));
                        }
                        Output::Reply { id, reply } => {
                            self.replies.insert((sid, id), reply);
                        }
                        Output::Send { to, envelope } => {
                            let (enc, dec) = self.codecs.get_mut(&(sid, to)).expect("a link");
                            let mut bytes = Vec::new();
                            enc.try_encode(&envelope, &mut bytes).expect("encodes");
                            let (decoded, _) = dec.decode(&bytes).expect("decodes").expect("whole");
                            queue.push((to, Input::Peer { from: sid, envelope: decoded }));
                        }
                    }
                }
            }
        }
    }

    fn save(&mut self, at: Sid, id: RequestId, body: Body) -> ClientReply {
        let request = ClientRequest::Save {
            mailbox: MailboxKey::new("u", "INBOX"),
            received: 1,
            flags: vec![],
            body,
            delivery: false,
        };
        self.pump(vec![(at, Input::Client { id, request })]);
        for _ in 0..1000 {
            if let Some(r) = self.replies.remove(&(at, id)) {
                return r;
            }
            self.tick();
        }
        panic!("no reply");
    }
}

#[test]
fn a_replicated_save_copies_its_body_a_bounded_number_of_times() {
    let mut pair = Pair::new();
    // The first SAVE makes a master; the counted one runs on a settled pair.
    let warm = pair.save(S1, 1, Body::from(vec![b'w'; 100]));
    assert!(matches!(warm, ClientReply::Write(WriteResult::Saved { .. })), "{warm:?}");
    let mut bytes = b"Subject: big\r\n\r\n".to_vec();
    bytes.resize(BODY_LEN, b'x');
    let body = Body::from(bytes);
    LARGE.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let reply = pair.save(S1, 2, body);
    COUNTING.store(false, Ordering::SeqCst);
    assert!(matches!(reply, ClientReply::Write(WriteResult::Saved { .. })), "{reply:?}");
    let copies = LARGE.load(Ordering::SeqCst);
    println!("body copies for one SAVE replicated to one peer through the wire codec: {copies}");
    // The encoder's line buffer grows to the body's size (a reallocation or two) and
    // the replica's decoder copies the literal out once; nothing in the core copies.
    assert!(copies <= 4, "{copies} copies of a 1 MiB body");
    assert!(pair.servers[&S2].stored_body(pair.servers[&S2].image().bodies.keys().copied().last().unwrap()).is_some());
}
