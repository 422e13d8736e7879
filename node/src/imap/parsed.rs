//! What FETCH parses out of a message (ENVELOPE, BODY, BODYSTRUCTURE), kept per GUID for
//! every session of this node: a body is parsed once, and a client that asks for these
//! again (a mail client opening a folder) is answered without reading the body at all.
//! A message's bytes never change under its GUID, so an entry never goes stale; the cache
//! is bounded and forgets the oldest entries first.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tandem_core::types::Guid;

/// The response bytes of one message's parsed FETCH items.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Parsed {
    pub envelope: Vec<u8>,
    pub body: Vec<u8>,
    pub bodystructure: Vec<u8>,
}

impl Parsed {
    /// ENVELOPE, BODY and BODYSTRUCTURE of `msg`, whose MIME tree is `structure`.
    pub fn of(msg: &[u8], structure: &super::mime::Structure) -> Parsed {
        Parsed {
            envelope: super::mime::envelope(msg),
            body: super::mime::describe(msg, structure, false),
            bodystructure: super::mime::describe(msg, structure, true),
        }
    }

    fn bytes(&self) -> usize {
        self.envelope.len() + self.body.len() + self.bodystructure.len() + 64
    }
}

/// Entries kept at most, and bytes of them (whichever is reached first).
const ENTRIES_MAX: usize = 200_000;
const BYTES_MAX: usize = 64 << 20;

#[derive(Default)]
struct Inner {
    by_guid: BTreeMap<Guid, Arc<Parsed>>,
    order: VecDeque<Guid>,
    bytes: usize,
}

#[derive(Default)]
pub struct ParsedCache {
    inner: Mutex<Inner>,
}

impl ParsedCache {
    pub fn get(&self, guid: Guid) -> Option<Arc<Parsed>> {
        self.inner.lock().ok()?.by_guid.get(&guid).cloned()
    }

    pub fn put(&self, guid: Guid, parsed: Arc<Parsed>) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if inner.by_guid.contains_key(&guid) || parsed.bytes() > BYTES_MAX {
            return;
        }
        while inner.by_guid.len() >= ENTRIES_MAX || inner.bytes + parsed.bytes() > BYTES_MAX {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(gone) = inner.by_guid.remove(&oldest) {
                inner.bytes -= gone.bytes();
            }
        }
        inner.bytes += parsed.bytes();
        inner.order.push_back(guid);
        inner.by_guid.insert(guid, parsed);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.by_guid.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(n: usize) -> Arc<Parsed> {
        Arc::new(Parsed { envelope: vec![b'e'; n], body: Vec::new(), bodystructure: Vec::new() })
    }

    #[test]
    fn entries_are_kept_and_the_oldest_go_first() {
        let cache = ParsedCache::default();
        cache.put(Guid(1), parsed(10));
        assert_eq!(cache.get(Guid(1)).map(|p| p.envelope.len()), Some(10));
        for g in 2..(ENTRIES_MAX as u128 + 5) {
            cache.put(Guid(g), parsed(1));
        }
        assert_eq!(cache.len(), ENTRIES_MAX);
        assert!(cache.get(Guid(1)).is_none(), "the oldest went first");
        assert!(cache.get(Guid(ENTRIES_MAX as u128 + 4)).is_some());
    }
}
