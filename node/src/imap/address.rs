//! Address lists as ENVELOPE shows them, read from the header's own bytes (RFC 5322
//! `address-list`, with the obsolete forms mail still carries). ENVELOPE wants the fields
//! as written: an encoded word stays encoded and an 8-bit byte stays that byte, for the
//! client to decode. A general mail parser decodes them, so this small reader keeps the
//! bytes instead. One pass over the tokens, no recursion, no backtracking; comments nest
//! with a counter.

/// One ENVELOPE address (RFC 3501 `address`): display name, source route, mailbox, host.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Address {
    pub name: Option<Vec<u8>>,
    pub route: Option<Vec<u8>>,
    pub mailbox: Option<Vec<u8>>,
    pub host: Option<Vec<u8>>,
}

/// An address list's entries in order; a group is marked by its start and its end, as
/// ENVELOPE marks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Address(Address),
    GroupStart(Vec<u8>),
    GroupEnd,
}

/// Entries read from one header at most; the rest of a longer list is left out.
pub const ENTRIES_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An atom, a quoted string (unquoted), or a domain literal (with its brackets).
    Word(Vec<u8>),
    /// A comment's text without its outer parentheses.
    Comment(Vec<u8>),
    Special(u8),
}

const SPECIALS: &[u8] = b"()<>[]:;@\\,\"";

fn tokens(value: &[u8]) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'"' => {
                let mut word = Vec::new();
                i += 1;
                while i < value.len() && value[i] != b'"' {
                    if value[i] == b'\\' && i + 1 < value.len() {
                        i += 1;
                    }
                    word.push(value[i]);
                    i += 1;
                }
                i += 1;
                out.push(Token::Word(word));
            }
            b'(' => {
                let mut depth = 1usize;
                let mut text = Vec::new();
                i += 1;
                while i < value.len() {
                    match value[i] {
                        b'\\' if i + 1 < value.len() => {
                            i += 1;
                        }
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    text.push(value[i]);
                    i += 1;
                }
                i += 1;
                out.push(Token::Comment(text));
            }
            b'[' => {
                let end = memchr::memchr(b']', &value[i..]).map_or(value.len(), |e| i + e + 1);
                out.push(Token::Word(value[i..end].to_vec()));
                i = end;
            }
            _ if SPECIALS.contains(&b) => {
                out.push(Token::Special(b));
                i += 1;
            }
            _ => {
                let start = i;
                while i < value.len() && !SPECIALS.contains(&value[i]) && !b" \t\r\n".contains(&value[i]) {
                    i += 1;
                }
                out.push(Token::Word(value[start..i].to_vec()));
            }
        }
    }
    out
}

fn joined(words: &[Vec<u8>], separator: &[u8]) -> Option<Vec<u8>> {
    (!words.is_empty()).then(|| words.join(separator))
}

/// The entries of an address-list field's value (unfolded).
pub fn entries(value: &[u8]) -> Vec<Entry> {
    let tokens = tokens(value);
    let mut out = Vec::new();
    let mut in_group = false;
    // Words and the first comment since the last address or group mark.
    let mut phrase: Vec<Vec<u8>> = Vec::new();
    let mut comment: Option<Vec<u8>> = None;
    // An address already read whose list item has not ended (a comment may follow it).
    let mut pending: Option<Address> = None;
    let mut i = 0;
    let flush = |out: &mut Vec<Entry>,
                 phrase: &mut Vec<Vec<u8>>,
                 comment: &mut Option<Vec<u8>>,
                 pending: &mut Option<Address>| {
        let comment = comment.take();
        if let Some(mut address) = pending.take() {
            if address.name.is_none() {
                address.name = comment;
            }
            out.push(Entry::Address(address));
        } else if !phrase.is_empty() {
            // A bare word: a mailbox without a host.
            out.push(Entry::Address(Address { name: comment, mailbox: joined(phrase, b""), ..Address::default() }));
        }
        phrase.clear();
    };
    while i < tokens.len() && out.len() < ENTRIES_MAX {
        match &tokens[i] {
            Token::Word(word) if pending.is_none() => phrase.push(word.clone()),
            Token::Word(_) => {}
            Token::Comment(text) => {
                comment.get_or_insert_with(|| text.trim_ascii().to_vec());
            }
            Token::Special(b'<') if pending.is_none() => {
                let (address, next) = angle_address(&tokens, i + 1);
                pending = Some(Address { name: joined(&phrase, b" "), ..address });
                phrase.clear();
                comment = None;
                i = next;
                continue;
            }
            Token::Special(b'@') if pending.is_none() => {
                let mut host = Vec::new();
                let mut j = i + 1;
                while let Some(token) = tokens.get(j) {
                    match token {
                        Token::Word(w) => host.extend_from_slice(w),
                        Token::Comment(_) => {}
                        _ => break,
                    }
                    j += 1;
                }
                pending = Some(Address {
                    mailbox: joined(&phrase, b""),
                    host: (!host.is_empty()).then_some(host),
                    ..Address::default()
                });
                phrase.clear();
                comment = None;
                // Comments among the host's words are read again for the display name.
                i = (i + 1).min(j);
                while i < j {
                    if let Token::Comment(text) = &tokens[i] {
                        comment.get_or_insert_with(|| text.trim_ascii().to_vec());
                    }
                    i += 1;
                }
                continue;
            }
            Token::Special(b':') if !in_group && pending.is_none() => {
                out.push(Entry::GroupStart(joined(&phrase, b" ").unwrap_or_default()));
                phrase.clear();
                comment = None;
                in_group = true;
            }
            Token::Special(b',') => flush(&mut out, &mut phrase, &mut comment, &mut pending),
            Token::Special(b';') if in_group => {
                flush(&mut out, &mut phrase, &mut comment, &mut pending);
                out.push(Entry::GroupEnd);
                in_group = false;
            }
            Token::Special(_) => {}
        }
        i += 1;
    }
    flush(&mut out, &mut phrase, &mut comment, &mut pending);
    if in_group {
        out.push(Entry::GroupEnd);
    }
    out.truncate(ENTRIES_MAX);
    out
}

/// An angle address's route, mailbox and host, from the token after `<`; returns the
/// index after its `>` (or the end).
fn angle_address(tokens: &[Token], from: usize) -> (Address, usize) {
    let mut route = Vec::new();
    let mut local = Vec::new();
    let mut host = Vec::new();
    let mut at_seen = false;
    let mut i = from;
    // An obsolete source route: `@a,@b:` before the address.
    if matches!(tokens.get(i), Some(Token::Special(b'@'))) {
        let colon = tokens[i..].iter().position(|t| matches!(t, Token::Special(b':' | b'>')));
        if let Some(offset) = colon.filter(|o| matches!(tokens[i + o], Token::Special(b':'))) {
            for token in &tokens[i..i + offset] {
                match token {
                    Token::Word(w) => route.extend_from_slice(w),
                    Token::Special(b) => route.push(*b),
                    Token::Comment(_) => {}
                }
            }
            i += offset + 1;
        }
    }
    while let Some(token) = tokens.get(i) {
        i += 1;
        match token {
            Token::Special(b'>') => break,
            Token::Special(b'@') if !at_seen => at_seen = true,
            Token::Word(w) if at_seen => host.extend_from_slice(w),
            Token::Word(w) => local.extend_from_slice(w),
            _ => {}
        }
    }
    let some = |v: Vec<u8>| (!v.is_empty()).then_some(v);
    (Address { name: None, route: some(route), mailbox: some(local), host: some(host) }, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: Option<&str>, route: Option<&str>, mailbox: Option<&str>, host: Option<&str>) -> Entry {
        let v = |s: Option<&str>| s.map(|s| s.as_bytes().to_vec());
        Entry::Address(Address { name: v(name), route: v(route), mailbox: v(mailbox), host: v(host) })
    }

    #[test]
    fn display_names_stay_as_written() {
        assert_eq!(
            entries(b"=?utf-8?q?Caf=C3=A9?= <cafe@example.org>, \"Last, First\" <lf@x.org>"),
            [
                a(Some("=?utf-8?q?Caf=C3=A9?="), None, Some("cafe"), Some("example.org")),
                a(Some("Last, First"), None, Some("lf"), Some("x.org")),
            ]
        );
        assert_eq!(
            entries(b"J\xf6rg <j@x.org>"),
            [Entry::Address(Address {
                name: Some(b"J\xf6rg".to_vec()),
                mailbox: Some(b"j".to_vec()),
                host: Some(b"x.org".to_vec()),
                route: None
            })]
        );
        assert_eq!(
            entries(b"John Q. Public <jqp@x.org>"),
            [a(Some("John Q. Public"), None, Some("jqp"), Some("x.org"))]
        );
    }

    #[test]
    fn comments_routes_groups_and_bare_words() {
        assert_eq!(entries(b"user@domain (Real Name)"), [a(Some("Real Name"), None, Some("user"), Some("domain"))]);
        assert_eq!(entries(b"<@route:user@domain>"), [a(None, Some("@route"), Some("user"), Some("domain"))]);
        assert_eq!(entries(b"<@a,@b:u@d>"), [a(None, Some("@a,@b"), Some("u"), Some("d"))]);
        assert_eq!(
            entries(b"group: g1@d1.org, g2@d2.org;, group2: (foo) ;"),
            [
                Entry::GroupStart(b"group".to_vec()),
                a(None, None, Some("g1"), Some("d1.org")),
                a(None, None, Some("g2"), Some("d2.org")),
                Entry::GroupEnd,
                Entry::GroupStart(b"group2".to_vec()),
                Entry::GroupEnd,
            ]
        );
        assert_eq!(
            entries(b"undisclosed-recipients:;"),
            [Entry::GroupStart(b"undisclosed-recipients".to_vec()), Entry::GroupEnd]
        );
        assert_eq!(entries(b"postmaster"), [a(None, None, Some("postmaster"), None)]);
        assert_eq!(entries(b"a.b.\"c d\"@[10.0.0.1]"), [a(None, None, Some("a.b.c d"), Some("[10.0.0.1]"))]);
        assert_eq!(entries(b""), []);
        assert_eq!(entries(b"((nested) comment) <x@y>"), [a(None, None, Some("x"), Some("y"))]);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_read_without_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let found = entries(&bytes);
            proptest::prop_assert!(found.len() <= ENTRIES_MAX);
        }
    }
}
