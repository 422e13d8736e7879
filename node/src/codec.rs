//! The store's record codec lives in the core (recordings use it too): see
//! [`tandem_core::codec`].

pub use tandem_core::codec::{Bincode, RecordCodec};
