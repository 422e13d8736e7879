//! CREATE-SPECIAL-USE (RFC 6154 section 3): `CREATE name (USE (\Sent))`. imap-codec
//! 2.0.0-alpha.10 parses CREATE without parameters, so the parameters are cut off here
//! and the rest goes to the codec. The use is replicated state: the core stamps it on
//! the mailbox (see `tandem_core::Lifecycle`), and LIST shows it on every server.
//!
//! One forward pass over the command: the tag, CREATE, the mailbox (atom, quoted string
//! or literal, skipped as APPEND's is), then the parameter list, with a fixed bound on
//! its length.

use super::multiappend::astring_end;
use tandem_core::SpecialUse;

/// Use attributes one CREATE may name (there are seven uses).
const USE_ATTRIBUTES_MAX: usize = 16;

/// Why a CREATE's parameters were refused: BAD for syntax, NO \[USEATTR\] for a use this
/// server does not know (RFC 6154 section 3).
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Bad(String),
    UseAttribute(String),
}

/// A CREATE with parameters: the command without them (for the codec) and the uses
/// asked for. None when `message` is not a CREATE or has no parameters.
pub fn cut_create_use(message: &[u8]) -> Option<Result<(Vec<u8>, SpecialUse), Refused>> {
    let verb_start = memchr::memchr(b' ', message)? + 1;
    let verb_end = verb_start + memchr::memchr(b' ', message.get(verb_start..)?)?;
    if !message[verb_start..verb_end].eq_ignore_ascii_case(b"CREATE") {
        return None;
    }
    let name_end = astring_end(message, verb_end + 1)?;
    let rest = message.get(name_end..)?;
    let rest = rest.strip_suffix(b"\r\n").or_else(|| rest.strip_suffix(b"\n")).unwrap_or(rest);
    if rest.is_empty() {
        return None;
    }
    let Some(params) = rest.strip_prefix(b" (").and_then(|p| p.strip_suffix(b")")) else {
        return Some(Err(Refused::Bad("CREATE parameters are a list in parentheses".into())));
    };
    let special_use = match parse_params(params) {
        Ok(special_use) => special_use,
        Err(refused) => return Some(Err(refused)),
    };
    let mut plain = message[..name_end].to_vec();
    plain.extend_from_slice(b"\r\n");
    Some(Ok((plain, special_use)))
}

/// `USE (attr ...)`, the only CREATE parameter this server knows.
fn parse_params(params: &[u8]) -> Result<SpecialUse, Refused> {
    let text = std::str::from_utf8(params).map_err(|_| Refused::Bad("CREATE parameters are not text".into()))?;
    let Some(list) = text
        .get(..4)
        .filter(|name| name.eq_ignore_ascii_case("USE "))
        .and_then(|_| text[4..].strip_prefix('('))
        .and_then(|l| l.strip_suffix(')'))
    else {
        let name: String = text.chars().take_while(|c| *c != ' ').take(32).collect();
        return Err(Refused::Bad(format!("unknown CREATE parameter {name}")));
    };
    let attributes: Vec<&str> = list.split(' ').filter(|a| !a.is_empty()).collect();
    if attributes.len() > USE_ATTRIBUTES_MAX {
        return Err(Refused::Bad(format!("at most {USE_ATTRIBUTES_MAX} use attributes")));
    }
    let mut uses = SpecialUse::NONE;
    for attribute in attributes {
        match SpecialUse::named(attribute) {
            Some(one) => uses = uses.union(one),
            None => {
                let shown: String = attribute.chars().take(32).collect();
                return Err(Refused::UseAttribute(format!("{shown} is not a special use this server knows")));
            }
        }
    }
    Ok(uses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_are_cut_off_and_the_rest_goes_to_the_codec() {
        let (plain, uses) = cut_create_use(b"a1 CREATE MySent (USE (\\Sent \\archive))\r\n").unwrap().unwrap();
        assert_eq!(plain, b"a1 CREATE MySent\r\n");
        assert_eq!(uses, SpecialUse(32 | 2));
        let (plain, uses) = cut_create_use(b"a1 CREATE \"My (Sent)\" (USE ())\r\n").unwrap().unwrap();
        assert_eq!(plain, b"a1 CREATE \"My (Sent)\"\r\n");
        assert_eq!(uses, SpecialUse::NONE);
        let (plain, uses) = cut_create_use(b"a1 CREATE {5+}\r\nS)ent (USE (\\Trash))\r\n").unwrap().unwrap();
        assert_eq!(plain, b"a1 CREATE {5+}\r\nS)ent\r\n");
        assert_eq!(uses, SpecialUse(64));
    }

    #[test]
    fn plain_creates_and_other_commands_are_left_alone() {
        assert_eq!(cut_create_use(b"a1 CREATE Sent\r\n"), None);
        assert_eq!(cut_create_use(b"a1 SELECT Sent (CONDSTORE)\r\n"), None);
        assert_eq!(cut_create_use(b"a1 CREATE {5}\r\n(a b)\r\n"), None);
        assert_eq!(cut_create_use(b""), None);
    }

    #[test]
    fn unknown_uses_and_parameters_are_refused() {
        assert!(matches!(cut_create_use(b"a1 CREATE X (USE (\\Spam))\r\n"), Some(Err(Refused::UseAttribute(_)))));
        assert!(matches!(cut_create_use(b"a1 CREATE X (FOO 1)\r\n"), Some(Err(Refused::Bad(_)))));
        assert!(matches!(cut_create_use(b"a1 CREATE X junk\r\n"), Some(Err(Refused::Bad(_)))));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut message = b"a CREATE ".to_vec();
            message.extend_from_slice(&bytes);
            let _ = cut_create_use(&message);
        }
    }
}
