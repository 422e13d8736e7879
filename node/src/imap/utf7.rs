//! Modified UTF-7 (RFC 3501 section 5.1.3), the mailbox-name encoding of IMAP clients
//! that have not enabled UTF8=ACCEPT (RFC 6855). Names are kept as such clients write
//! them; a session with UTF8=ACCEPT converts at its edge: what it is sent is encoded
//! before lookup, what it is shown is decoded.
//!
//! Linear in the name, no recursion; a malformed name is left as it is (it names a
//! mailbox a client made, and must stay reachable).

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

/// UTF-8 text as modified UTF-7: printable ASCII as itself (`&` as `&-`), anything else
/// as `&` + modified BASE64 of its UTF-16 + `-`.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        out.push('&');
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(BASE64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out.push('-');
        pending.clear();
    };
    for c in text.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut units = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut units));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Modified UTF-7 as UTF-8 text; None when it is not well formed (the caller shows the
/// name as it is).
pub fn decode(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'&' {
            if !(0x20..0x7f).contains(&b) {
                return None;
            }
            out.push(b as char);
            i += 1;
            continue;
        }
        let end = i + 1 + bytes[i + 1..].iter().position(|&c| c == b'-')?;
        let run = &bytes[i + 1..end];
        i = end + 1;
        if run.is_empty() {
            out.push('&');
            continue;
        }
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut units = Vec::with_capacity(run.len() * 6 / 16);
        let mut octets = Vec::with_capacity(2);
        for &c in run {
            let v = BASE64.iter().position(|&x| x == c)? as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                octets.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
                if octets.len() == 2 {
                    units.push(u16::from_be_bytes([octets[0], octets[1]]));
                    octets.clear();
                }
            }
        }
        // Leftover bits must be zero padding, and no half UTF-16 unit may remain.
        if bits != 0 || !octets.is_empty() {
            return None;
        }
        let text = String::from_utf16(&units).ok()?;
        // A run that encodes printable ASCII is not the canonical form.
        if text.chars().any(|c| (' '..='~').contains(&c)) {
            return None;
        }
        out.push_str(&text);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_examples() {
        assert_eq!(encode("~peter/mail/台北/日本語"), "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
        assert_eq!(decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-").as_deref(), Some("~peter/mail/台北/日本語"));
        assert_eq!(encode("Entwürfe & Co"), "Entw&APw-rfe &- Co");
        assert_eq!(decode("Entw&APw-rfe &- Co").as_deref(), Some("Entwürfe & Co"));
        assert_eq!(encode("😀"), "&2D3eAA-");
        assert_eq!(decode("&2D3eAA-").as_deref(), Some("😀"));
    }

    #[test]
    fn malformed_names_are_not_decoded() {
        for bad in ["&", "&U,BTFw", "&AGE-", "&Jjo!-", "caf\u{e9}", "&2D0-"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_text_round_trips(text in "\\PC{0,40}") {
            let encoded = encode(&text);
            prop_assert!(encoded.bytes().all(|b| (0x20..0x7f).contains(&b)));
            prop_assert_eq!(decode(&encoded), Some(text));
        }
    }
}
