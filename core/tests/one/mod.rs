//! One server alone, driven by hand: inputs in, outputs collected, writes made durable
//! when a test says so. Shared by the core's single-server tests.

#![allow(dead_code)]

use tandem_core::*;

pub const S1: Sid = Sid(1);

pub struct One {
    pub server: Server,
    now: Instant,
    /// Writes issued and not yet reported durable.
    pub held: Vec<WriteId>,
    /// The bodies the server wrote, shared with it as the driver's body store is.
    bodies: MemoryBodies,
    replies: Vec<(RequestId, ClientReply)>,
}

impl One {
    pub fn new() -> One {
        let mut cfg = Config::new(S1, vec![S1]);
        cfg.replicas = 0;
        One::with(cfg)
    }

    pub fn with(cfg: Config) -> One {
        let bodies = MemoryBodies::default();
        One {
            server: Server::new(cfg, 3, Box::new(bodies.clone())),
            bodies,
            now: Instant(0),
            held: Vec::new(),
            replies: Vec::new(),
        }
    }

    pub fn input(&mut self, input: Input) {
        self.server.handle(self.now, input);
        while let Some(out) = self.server.poll_output() {
            match out {
                Output::Write { id, write } => {
                    self.bodies.apply(&write);
                    self.held.push(id);
                }
                Output::Reply { id, reply } => self.replies.push((id, reply)),
                Output::Send { to, .. } => panic!("a lone server sent to {to}"),
            }
        }
    }

    /// Everything held so far becomes durable.
    pub fn durable(&mut self) {
        if let Some(upto) = self.held.drain(..).max() {
            self.input(Input::Durable { upto });
        }
    }

    pub fn tick(&mut self, durable: bool) {
        self.now = self.now.plus_us(self.server.config().tick_us);
        self.input(Input::Timer);
        if durable {
            self.durable();
        }
    }

    pub fn reply(&mut self, id: RequestId) -> Option<ClientReply> {
        let at = self.replies.iter().position(|(i, _)| *i == id)?;
        Some(self.replies.remove(at).1)
    }
}
