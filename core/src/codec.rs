//! The one place bincode is used: stored records and recordings go through [`RecordCodec`], so the
//! format can change without touching the store (bincode is pinned at 2.0.1 and no
//! longer maintained).

use serde::Serialize;
use serde::de::DeserializeOwned;

pub trait RecordCodec {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String>;
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
    /// Decodes a value from the start of `bytes`, whatever follows it (the first fields
    /// of a record whose rest another build may have laid out differently).
    fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// bincode 2 with its standard configuration (varint integers, little endian).
pub struct Bincode;

impl RecordCodec for Bincode {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
        bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        let (value, used) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(|e| e.to_string())?;
        if used != bytes.len() {
            return Err(format!("{} trailing bytes after a record", bytes.len() - used));
        }
        Ok(value)
    }

    fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map(|(v, _)| v).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Flag, FlagState, Guid, MessageRecord, Sid, Stamp, Tombstone};

    /// A tombstone as stores wrote it before a census's loss had its own fate.
    #[derive(serde::Serialize)]
    struct TombstoneWithBool {
        uid: u32,
        guid: Guid,
        modseq: u64,
        expunged: bool,
    }

    #[test]
    fn a_tombstone_stored_with_a_bool_fate_reads_the_same() {
        for expunged in [false, true] {
            let old = Bincode::encode(&TombstoneWithBool { uid: 7, guid: Guid(9), modseq: 3, expunged }).unwrap();
            let t: Tombstone = Bincode::decode(&old).unwrap();
            assert_eq!(
                t,
                Tombstone {
                    uid: 7,
                    guid: Guid(9),
                    modseq: 3,
                    expunged,
                    lost: false,
                    cancelled: false,
                    pushed: false,
                    deleted: false
                }
            );
            assert_eq!(Bincode::encode(&t).unwrap(), old, "written back byte for byte");
        }
        let lost = Tombstone {
            uid: 7,
            guid: Guid(9),
            modseq: 3,
            expunged: true,
            lost: true,
            cancelled: false,
            pushed: false,
            deleted: false,
        };
        assert_eq!(Bincode::decode::<Tombstone>(&Bincode::encode(&lost).unwrap()).unwrap(), lost);
        let cancel = Tombstone::cancel(7, Guid(9), 3);
        assert_eq!(Bincode::decode::<Tombstone>(&Bincode::encode(&cancel).unwrap()).unwrap(), cancel);
        let pushed = Tombstone { pushed: true, ..Tombstone::expunge(7, Guid(9), 3) };
        assert_eq!(Bincode::decode::<Tombstone>(&Bincode::encode(&pushed).unwrap()).unwrap(), pushed);
        let deletion = Tombstone::deletion(7, Guid(9), 3);
        assert_eq!(Bincode::decode::<Tombstone>(&Bincode::encode(&deletion).unwrap()).unwrap(), deletion);
        let mut bad = Bincode::encode(&lost).unwrap();
        *bad.last_mut().unwrap() = 6;
        assert!(Bincode::decode::<Tombstone>(&bad).unwrap_err().contains("fate"));
    }

    /// A record as stores wrote it before claims were recorded.
    #[derive(serde::Serialize)]
    struct RecordWithoutClaim {
        uid: u32,
        guid: Guid,
        received: u64,
        size: u32,
        checksum: u64,
        modseq: u64,
        flags: std::collections::BTreeMap<Flag, FlagState>,
    }

    #[test]
    fn a_record_stored_before_claims_reads_the_same_and_a_claim_round_trips() {
        let stamp = Stamp { modseq: 2, sid: Sid(1) };
        let flags =
            std::collections::BTreeMap::from([(Flag::new("\\Seen").unwrap(), FlagState { present: true, stamp })]);
        let old =
            RecordWithoutClaim { uid: 7, guid: Guid(9), received: 5, size: 64 << 20, checksum: 3, modseq: 4, flags };
        let bytes = Bincode::encode(&old).unwrap();
        let r: MessageRecord = Bincode::decode(&bytes).unwrap();
        assert_eq!((r.uid, r.size, r.modseq, r.claimed, r.flags.len()), (7, 64 << 20, 4, false, 1));
        assert_eq!(Bincode::encode(&r).unwrap(), bytes, "written back byte for byte");
        let claimed = MessageRecord { claimed: true, ..r.clone() };
        let back: MessageRecord = Bincode::decode(&Bincode::encode(&claimed).unwrap()).unwrap();
        assert_eq!(back, claimed);
        for (claimed, pushed) in [(false, true), (true, true)] {
            let marked = MessageRecord { claimed, pushed, ..r.clone() };
            let back: MessageRecord = Bincode::decode(&Bincode::encode(&marked).unwrap()).unwrap();
            assert_eq!(back, marked);
        }
    }
}
