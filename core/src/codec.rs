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
