//! What the server has to say: messages to peers, replies to clients and writes for the
//! store, in the order they were decided, drained by `Server::poll_output`. The outbox
//! also numbers the writes and learns from the shell which are durable, so a reply that
//! must not be seen before its writes are on disk waits here.

use crate::io::{ClientReply, Output, RequestId, WriteId};
use crate::msg::Envelope;
use crate::store::StoreWrite;
use crate::types::Sid;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Outbox {
    outputs: VecDeque<Output>,
    /// The last write issued.
    last_issued: WriteId,
    /// The last write issued that is not lazy (`StoreWrite::is_lazy`): what a reply
    /// or a message waits for, so a lazy write never holds one back.
    last_write: WriteId,
    durable_upto: WriteId,
    /// Replies and messages that may go out once every write up to theirs is durable.
    held: VecDeque<(WriteId, Output)>,
}

impl Outbox {
    /// Every output decided so far was taken (held ones wait for durability, not for
    /// the driver).
    pub(crate) fn drained(&self) -> bool {
        self.outputs.is_empty()
    }

    pub(crate) fn pop(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    pub(crate) fn send(&mut self, to: Sid, envelope: Envelope) {
        self.outputs.push_back(Output::Send { to, envelope });
    }

    pub(crate) fn reply(&mut self, id: RequestId, reply: ClientReply) {
        self.outputs.push_back(Output::Reply { id, reply });
    }

    /// Replies at once if every write issued so far is durable, else when it is: a client
    /// is never shown something a crash could take back.
    pub(crate) fn reply_when_durable(&mut self, id: RequestId, reply: ClientReply) {
        self.when_durable(Output::Reply { id, reply });
    }

    /// Sends at once if every write issued so far is durable, else when it is: a peer is
    /// told only what a crash here cannot take back.
    pub(crate) fn send_when_durable(&mut self, to: Sid, envelope: Envelope) {
        self.when_durable(Output::Send { to, envelope });
    }

    fn when_durable(&mut self, output: Output) {
        let write = self.last_write;
        if self.is_durable(write) {
            self.outputs.push_back(output);
        } else {
            self.held.push_back((write, output));
        }
    }

    /// Numbers a write and queues it. The caller has applied it to the image (see
    /// `Image::commit`, the only caller).
    pub(super) fn write(&mut self, write: StoreWrite) -> WriteId {
        self.last_issued += 1;
        let id = self.last_issued;
        if !write.is_lazy() {
            self.last_write = id;
        }
        self.outputs.push_back(Output::Write { id, write });
        id
    }

    /// The last write issued that is not lazy: once it is durable, so is everything
    /// a reply or a message may depend on.
    pub(crate) fn last_write(&self) -> WriteId {
        self.last_write
    }

    pub(crate) fn is_durable(&self, id: WriteId) -> bool {
        id <= self.durable_upto
    }

    /// The shell made every write up to `upto` durable: replies held for them go out.
    pub(crate) fn durable(&mut self, upto: WriteId) {
        debug_assert!(upto <= self.last_issued, "durable beyond the last write issued");
        self.durable_upto = self.durable_upto.max(upto.min(self.last_issued));
        // Writes become durable in order, so what is held (queued in write order) goes
        // out from the front.
        while let Some((write, _)) = self.held.front() {
            if !self.is_durable(*write) {
                break;
            }
            let Some((_, output)) = self.held.pop_front() else { break };
            self.outputs.push_back(output);
        }
        debug_assert!(self.held.iter().all(|(w, _)| !self.is_durable(*w)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: u64) -> StoreWrite {
        StoreWrite::Epoch { epoch }
    }

    #[test]
    fn writes_are_numbered_in_order() {
        let mut out = Outbox::default();
        assert_eq!(out.write(epoch(1)), 1);
        assert_eq!(out.write(epoch(2)), 2);
        assert_eq!(out.last_write(), 2);
        assert!(matches!(out.pop(), Some(Output::Write { id: 1, .. })));
        assert!(matches!(out.pop(), Some(Output::Write { id: 2, .. })));
        assert!(out.pop().is_none());
    }

    #[test]
    fn a_reply_waits_for_the_writes_before_it() {
        let mut out = Outbox::default();
        out.write(epoch(1));
        out.reply_when_durable(7, ClientReply::Moved { master: Sid(1) });
        out.write(epoch(2));
        out.reply_when_durable(8, ClientReply::Moved { master: Sid(1) });
        while out.pop().is_some() {}
        out.durable(1);
        assert!(matches!(out.pop(), Some(Output::Reply { id: 7, .. })));
        assert!(out.pop().is_none(), "the second reply waits for write 2");
        out.durable(2);
        assert!(matches!(out.pop(), Some(Output::Reply { id: 8, .. })));
    }

    #[test]
    fn a_reply_with_nothing_pending_goes_at_once() {
        let mut out = Outbox::default();
        out.write(epoch(1));
        out.durable(1);
        while out.pop().is_some() {}
        out.reply_when_durable(3, ClientReply::Moved { master: Sid(2) });
        assert!(matches!(out.pop(), Some(Output::Reply { id: 3, .. })));
    }

    #[test]
    fn a_lazy_write_holds_back_nothing() {
        let mut out = Outbox::default();
        out.write(epoch(1));
        let acked = out.write(StoreWrite::LogAcked { peer: Sid(2), seqs: vec![4] });
        assert_eq!(acked, 2, "a lazy write is numbered in order with the rest");
        assert_eq!(out.last_write(), 1, "what a reply waits for is the last write that is not lazy");
        out.reply_when_durable(7, ClientReply::Moved { master: Sid(1) });
        while out.pop().is_some() {}
        out.durable(1);
        assert!(
            matches!(out.pop(), Some(Output::Reply { id: 7, .. })),
            "the reply goes before the lazy write is durable"
        );
        out.write(epoch(3));
        out.reply_when_durable(8, ClientReply::Moved { master: Sid(1) });
        while out.pop().is_some() {}
        out.durable(2);
        assert!(out.pop().is_none(), "a write that is not lazy after it is still waited for");
        out.durable(3);
        assert!(matches!(out.pop(), Some(Output::Reply { id: 8, .. })));
    }

    #[test]
    fn durability_never_passes_the_last_write() {
        let mut out = Outbox::default();
        out.write(epoch(1));
        out.durable(1);
        assert!(out.is_durable(1));
        assert!(!out.is_durable(2));
    }
}
