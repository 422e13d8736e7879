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
    use crate::types::{Guid, Tombstone};

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
            assert_eq!(t, Tombstone { uid: 7, guid: Guid(9), modseq: 3, expunged, lost: false });
            assert_eq!(Bincode::encode(&t).unwrap(), old, "written back byte for byte");
        }
        let lost = Tombstone { uid: 7, guid: Guid(9), modseq: 3, expunged: true, lost: true };
        assert_eq!(Bincode::decode::<Tombstone>(&Bincode::encode(&lost).unwrap()).unwrap(), lost);
        let mut bad = Bincode::encode(&lost).unwrap();
        *bad.last_mut().unwrap() = 3;
        assert!(Bincode::decode::<Tombstone>(&bad).unwrap_err().contains("fate"));
    }
}
