//! Stable hashes. Digests and checksums cross the wire and the disk, so they must not
//! depend on the Rust version or the process (std's hasher promises neither).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over the concatenation of `parts`.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    h
}

/// FNV-1a fed piece by piece: the same value as [`fnv64`] over the concatenation of
/// everything written. Writing formatted text into it hashes the text without building it.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(pub u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(FNV_OFFSET)
    }
}

impl Fnv64 {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
}

impl std::fmt::Write for Fnv64 {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.write(s.as_bytes());
        Ok(())
    }
}

/// A 64-bit finaliser (splitmix64) so that XOR-combined item hashes do not cancel on
/// structured input.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A hasher for maps keyed by GUID (asked by key, never walked): GUIDs are random
/// already, so their bits are mixed once.
#[derive(Default)]
pub struct GuidHasher(u64);

impl std::hash::Hasher for GuidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = mix64(self.0 ^ fnv64(&[bytes]));
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = mix64(self.0 ^ (v as u64) ^ mix64((v >> 64) as u64));
    }
}

pub fn body_checksum(body: &[u8]) -> u64 {
    mix64(fnv64(&[body]))
}
