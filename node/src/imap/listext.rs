//! LIST-EXTENDED (RFC 5258): selection options, several patterns and return options,
//! with LIST-STATUS (RFC 5819) and SPECIAL-USE (RFC 6154) among them.
//! imap-codec 2.0.0-alpha.10 parses only the base LIST, so an extended one is read here
//! from the command's first line (quoted strings and atoms; a literal is left to the
//! codec, which refuses it), and the answer is worked out from the user's mailboxes and
//! subscriptions by [`answer`], a pure function.
//!
//! Everything is bounded: the line (the front end's command limit), the patterns
//! ([`PATTERNS_MAX`]) and the options ([`OPTIONS_MAX`]); no recursion, no backtracking.

use std::collections::{BTreeMap, BTreeSet};

pub const PATTERNS_MAX: usize = 16;
const OPTIONS_MAX: usize = 8;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListExtended {
    /// SUBSCRIBED selection: subscribed names, existing or not.
    pub subscribed: bool,
    /// RECURSIVEMATCH: also a matching parent whose subscribed descendant does not
    /// match, with CHILDINFO.
    pub recursive: bool,
    pub reference: String,
    pub patterns: Vec<String>,
    /// RETURN (SUBSCRIBED): say `\Subscribed` of each name listed.
    pub return_subscribed: bool,
    /// SPECIAL-USE selection: only mailboxes with a special use (and their parents'
    /// CHILDINFO is not asked for by it).
    pub special_use_only: bool,
    /// RETURN (STATUS (items)): a STATUS response after each selectable mailbox listed,
    /// with these items (upper case, each known to STATUS, no repeats).
    pub return_status: Option<Vec<String>>,
}

/// STATUS items LIST-STATUS may ask for.
pub const STATUS_ITEMS: [&str; 7] =
    ["MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "HIGHESTMODSEQ"];

/// One token of the line.
#[derive(Debug, PartialEq, Eq)]
enum Token {
    Text(String),
    List(Vec<Item>),
}

/// One item of a parenthesised list: a string, or (after STATUS) a flat list.
#[derive(Debug, PartialEq, Eq)]
enum Item {
    Text(String),
    List(Vec<String>),
}

/// The strings of a list that must hold strings only.
fn texts(items: Vec<Item>, what: &str) -> Result<Vec<String>, String> {
    items
        .into_iter()
        .map(|i| match i {
            Item::Text(t) => Ok(t),
            Item::List(_) => Err(format!("a list inside the {what}")),
        })
        .collect()
}

/// The extended LIST in `message`; None when it is not a LIST or is a base one (the
/// codec parses it); Err with a reason the client is told (BAD).
pub fn parse(message: &[u8]) -> Option<Result<ListExtended, String>> {
    let line_end = memchr::memchr(b'\n', message).unwrap_or(message.len());
    let line = message[..line_end].strip_suffix(b"\r").unwrap_or(&message[..line_end]);
    let line = std::str::from_utf8(line).ok()?;
    let mut rest = line;
    let _tag = atom(&mut rest)?;
    if !atom(&mut rest)?.eq_ignore_ascii_case("LIST") {
        return None;
    }
    let tokens = match tokens(rest) {
        Ok(tokens) => tokens,
        // A literal: the codec decides.
        Err(None) => return None,
        Err(Some(why)) => return Some(Err(why)),
    };
    let base = matches!(tokens.as_slice(), [Token::Text(_), Token::Text(_)]);
    if base {
        return None;
    }
    Some(extended(tokens))
}

fn extended(tokens: Vec<Token>) -> Result<ListExtended, String> {
    let mut list = ListExtended::default();
    let mut tokens = tokens.into_iter().peekable();
    let mut has_base_selection = false;
    if matches!(tokens.peek(), Some(Token::List(_))) {
        let Some(Token::List(options)) = tokens.next() else { return Err("LIST selection options".into()) };
        for o in texts(options, "selection options")? {
            match o.to_ascii_uppercase().as_str() {
                "SUBSCRIBED" => {
                    list.subscribed = true;
                    has_base_selection = true;
                }
                "SPECIAL-USE" => {
                    list.special_use_only = true;
                    has_base_selection = true;
                }
                // Every mailbox here is local: REMOTE changes nothing.
                "REMOTE" => {}
                "RECURSIVEMATCH" => list.recursive = true,
                other => return Err(format!("unknown LIST selection option {}", clip(other))),
            }
        }
        if list.recursive && !has_base_selection {
            return Err("RECURSIVEMATCH needs another selection option".into());
        }
    }
    list.reference = match tokens.next() {
        Some(Token::Text(r)) => r,
        _ => return Err("LIST wants a reference name".into()),
    };
    list.patterns = match tokens.next() {
        Some(Token::Text(p)) => vec![p],
        Some(Token::List(p)) if !p.is_empty() => texts(p, "patterns")?,
        _ => return Err("LIST wants a pattern or a list of them".into()),
    };
    if list.patterns.len() > PATTERNS_MAX {
        return Err(format!("at most {PATTERNS_MAX} patterns"));
    }
    match (tokens.next(), tokens.next()) {
        (None, _) => {}
        (Some(Token::Text(word)), Some(Token::List(options))) if word.eq_ignore_ascii_case("RETURN") => {
            let mut options = options.into_iter().peekable();
            while let Some(o) = options.next() {
                let Item::Text(o) = o else { return Err("a list where a return option belongs".into()) };
                match o.to_ascii_uppercase().as_str() {
                    "SUBSCRIBED" => list.return_subscribed = true,
                    // Children and special uses are always said.
                    "CHILDREN" | "SPECIAL-USE" => {}
                    "STATUS" => {
                        let Some(Item::List(items)) = options.next() else {
                            return Err("STATUS wants a list of status items".into());
                        };
                        if list.return_status.is_some() {
                            return Err("STATUS twice".into());
                        }
                        list.return_status = Some(status_items(items)?);
                    }
                    other => return Err(format!("unknown LIST return option {}", clip(other))),
                }
            }
        }
        _ => return Err("after the patterns only RETURN (options)".into()),
    }
    if tokens.next().is_some() {
        return Err("too many arguments".into());
    }
    Ok(list)
}

fn status_items(items: Vec<String>) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let upper = item.to_ascii_uppercase();
        if !STATUS_ITEMS.contains(&upper.as_str()) {
            return Err(format!("unknown status item {}", clip(&item)));
        }
        if !out.contains(&upper) {
            out.push(upper);
        }
    }
    if out.is_empty() {
        return Err("STATUS wants at least one item".into());
    }
    Ok(out)
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The next space-delimited atom.
fn atom<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let text = rest.trim_start_matches(' ');
    let end = text.find(' ').unwrap_or(text.len());
    let (word, after) = text.split_at(end);
    *rest = after;
    (!word.is_empty()).then_some(word)
}

/// The arguments: strings (atoms or quoted) and flat parenthesised lists of them.
/// Err(None) for a literal (not handled here), Err(Some) for a malformed line.
fn tokens(mut rest: &str) -> Result<Vec<Token>, Option<String>> {
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches(' ');
        let Some(first) = rest.chars().next() else { return Ok(out) };
        if out.len() >= 6 {
            return Err(Some("too many arguments".into()));
        }
        if first == '(' {
            rest = &rest[1..];
            let mut items = Vec::new();
            loop {
                rest = rest.trim_start_matches(' ');
                match rest.chars().next() {
                    Some(')') => {
                        rest = &rest[1..];
                        break;
                    }
                    None => return Err(Some("an unclosed list".into())),
                    Some(_) => {
                        if items.len() >= PATTERNS_MAX.max(OPTIONS_MAX) {
                            return Err(Some("too many items in a list".into()));
                        }
                        let after_status =
                            matches!(items.last(), Some(Item::Text(t)) if t.eq_ignore_ascii_case("STATUS"));
                        if after_status && rest.starts_with('(') {
                            items.push(Item::List(flat_list(&mut rest)?));
                        } else {
                            items.push(Item::Text(string(&mut rest, true)?));
                        }
                    }
                }
            }
            out.push(Token::List(items));
        } else {
            out.push(Token::Text(string(&mut rest, false)?));
        }
    }
}

/// A parenthesised list of strings, no deeper (STATUS's items inside RETURN's options).
fn flat_list(rest: &mut &str) -> Result<Vec<String>, Option<String>> {
    *rest = &rest[1..];
    let mut items = Vec::new();
    loop {
        *rest = rest.trim_start_matches(' ');
        match rest.chars().next() {
            Some(')') => {
                *rest = &rest[1..];
                return Ok(items);
            }
            None => return Err(Some("an unclosed list".into())),
            Some('(') => return Err(Some("lists nested too deep".into())),
            Some(_) => {
                if items.len() >= OPTIONS_MAX {
                    return Err(Some("too many items in a list".into()));
                }
                items.push(string(rest, true)?);
            }
        }
    }
}

/// A quoted string or an atom (in a list, an atom ends at `)` too).
fn string(rest: &mut &str, in_list: bool) -> Result<String, Option<String>> {
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    *rest = &quoted[i + 1..];
                    return Ok(value);
                }
                '\\' => match chars.next() {
                    Some((_, e @ ('"' | '\\'))) => value.push(e),
                    _ => return Err(Some("a bad escape in a quoted string".into())),
                },
                c => value.push(c),
            }
        }
        return Err(Some("an unclosed quoted string".into()));
    }
    if rest.starts_with('{') || rest.starts_with("~{") {
        return Err(None);
    }
    let end = rest.find(|c: char| c == ' ' || (in_list && (c == ')' || c == '('))).unwrap_or(rest.len());
    let (word, after) = rest.split_at(end);
    if word.is_empty() || word.contains(['"', '(', ')']) {
        return Err(Some("a malformed argument".into()));
    }
    *rest = after;
    Ok(word.to_string())
}

/// One LIST response: name, attributes, and whether it carries CHILDINFO (SUBSCRIBED).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub attributes: Vec<&'static str>,
    pub childinfo_subscribed: bool,
}

/// What an extended LIST answers, in name order. `existing`: the user's mailboxes
/// (INBOX among them); `subscribed`: the names subscribed (existing or not);
/// `matches(pattern, name)`: the LIST wildcard match, with the reference applied.
pub fn answer(
    list: &ListExtended,
    existing: &BTreeSet<String>,
    subscribed: &BTreeSet<String>,
    matches: impl Fn(&str, &str) -> bool,
    special_use: impl Fn(&str) -> Vec<&'static str>,
) -> Vec<Listed> {
    let matched = |name: &str| list.patterns.iter().any(|p| matches(&format!("{}{p}", list.reference), name));
    // Every name that exists, is subscribed, or is the parent of one of these.
    let mut known: BTreeSet<String> = existing.union(subscribed).cloned().collect();
    let parents: Vec<String> = known.iter().flat_map(|n| parents_of(n)).collect();
    known.extend(parents);
    let has_children = |name: &str| {
        let prefix = format!("{name}/");
        known.range(prefix.clone()..).next().is_some_and(|c| c.starts_with(&prefix))
    };
    let mut out: BTreeMap<String, Listed> = BTreeMap::new();
    for name in known.iter().filter(|n| matched(n)) {
        let exists = existing.contains(name);
        let is_subscribed = subscribed.contains(name);
        if list.subscribed && !is_subscribed {
            continue;
        }
        if !list.subscribed && !exists && !has_children(name) {
            continue;
        }
        let special = if exists { special_use(name) } else { Vec::new() };
        if list.special_use_only && special.is_empty() {
            continue;
        }
        let mut attributes = Vec::new();
        if !exists {
            attributes.push("\\NonExistent");
        }
        attributes.extend(special);
        if is_subscribed && (list.subscribed || list.return_subscribed) {
            attributes.push("\\Subscribed");
        }
        attributes.push(if has_children(name) { "\\HasChildren" } else { "\\HasNoChildren" });
        out.insert(name.clone(), Listed { name: name.clone(), attributes, childinfo_subscribed: false });
    }
    if list.subscribed && list.recursive {
        // A matching parent of a subscribed name that is not listed itself.
        for name in subscribed.iter().filter(|n| !matched(n)) {
            for parent in parents_of(name) {
                if !matched(&parent) {
                    continue;
                }
                let entry = out.entry(parent.clone()).or_insert_with(|| {
                    let mut attributes = Vec::new();
                    if !existing.contains(&parent) {
                        attributes.push("\\NonExistent");
                    }
                    attributes.push("\\HasChildren");
                    Listed { name: parent.clone(), attributes, childinfo_subscribed: false }
                });
                entry.childinfo_subscribed = true;
            }
        }
    }
    out.into_values().collect()
}

/// "a/b/c" -> ["a/b", "a"].
fn parents_of(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = name;
    while let Some(cut) = at.rfind('/') {
        at = &at[..cut];
        if !at.is_empty() {
            out.push(at.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<Result<ListExtended, String>> {
        parse(s.as_bytes())
    }

    #[test]
    fn base_lists_are_left_to_the_codec() {
        assert!(p("a LIST \"\" *\r\n").is_none());
        assert!(p("a LIST \"\" \"x y\"\r\n").is_none());
        assert!(p("a LSUB \"\" (x)\r\n").is_none());
        assert!(p("a LIST \"\" {3}\r\n").is_none());
    }

    #[test]
    fn extended_forms_are_read() {
        let l = p("a LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (\"a/b\" c%) RETURN (children)\r\n").unwrap().unwrap();
        assert!(l.subscribed && l.recursive);
        assert_eq!(l.patterns, vec!["a/b".to_string(), "c%".into()]);
        let l = p("a list \"\" x return (subscribed)\r\n").unwrap().unwrap();
        assert!(l.return_subscribed && !l.subscribed);
        assert!(p("a LIST (remote) \"\" %\r\n").unwrap().is_ok());
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(p("a LIST (imaptest) \"\" \"\"\r\n").unwrap().is_err());
        assert!(p("a LIST (recursivematch) \"\" \"\"\r\n").unwrap().is_err());
        assert!(p("a LIST (recursivematch remote) \"\" \"\"\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" \"\" return (imaptest)\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" (\"unclosed\r\n").unwrap().is_err());
        let many = format!("a LIST \"\" ({})\r\n", "x ".repeat(40));
        assert!(p(&many).unwrap().is_err());
    }

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn glob(pattern: &str, name: &str) -> bool {
        // Enough for the tests: `*` at the end, `%` at the end, or a literal name.
        if let Some(prefix) = pattern.strip_suffix('*') {
            name.starts_with(prefix)
        } else if let Some(prefix) = pattern.strip_suffix('%') {
            name.starts_with(prefix) && !name[prefix.len()..].contains('/')
        } else {
            pattern == name
        }
    }

    fn no_use(_: &str) -> Vec<&'static str> {
        Vec::new()
    }

    #[test]
    fn list_status_and_special_use_are_read() {
        let l =
            p("a LIST \"\" % RETURN (SUBSCRIBED STATUS (messages unseen messages) SPECIAL-USE)\r\n").unwrap().unwrap();
        assert!(l.return_subscribed);
        assert_eq!(l.return_status, Some(vec!["MESSAGES".to_string(), "UNSEEN".into()]));
        let l = p("a LIST (SPECIAL-USE) \"\" *\r\n").unwrap().unwrap();
        assert!(l.special_use_only && l.return_status.is_none());
        assert!(p("a LIST \"\" % RETURN (STATUS)\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" % RETURN (STATUS ())\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" % RETURN (STATUS (SIZE))\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" % RETURN (STATUS (MESSAGES (UNSEEN)))\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" % RETURN (STATUS (MESSAGES) STATUS (UNSEEN))\r\n").unwrap().is_err());
        assert!(p("a LIST \"\" % RETURN ((MESSAGES))\r\n").unwrap().is_err());
        assert!(p("a LIST (STATUS (x)) \"\" %\r\n").unwrap().is_err());
    }

    #[test]
    fn special_use_selection_lists_only_special_mailboxes() {
        let existing = names(&["INBOX", "Sent", "Trash", "work"]);
        let special = |n: &str| match n {
            "Sent" => vec!["\\Archive", "\\Sent"],
            "Trash" | "Gone" => vec!["\\Trash"],
            _ => Vec::new(),
        };
        let list = ListExtended { special_use_only: true, patterns: vec!["*".into()], ..Default::default() };
        let got = answer(&list, &existing, &BTreeSet::new(), glob, special);
        assert_eq!(got.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), vec!["Sent", "Trash"]);
        assert_eq!(got[0].attributes, vec!["\\Archive", "\\Sent", "\\HasNoChildren"]);
        // Without the selection every mailbox is listed, each special one with its use;
        // a name that does not exist has none.
        let list = ListExtended { subscribed: true, patterns: vec!["*".into()], ..Default::default() };
        let got = answer(&list, &existing, &names(&["Gone", "work"]), glob, special);
        assert_eq!(got[0].attributes, vec!["\\NonExistent", "\\Subscribed", "\\HasNoChildren"]);
    }

    #[test]
    fn recursivematch_names_parents_whose_subscribed_children_are_not_listed() {
        let existing =
            names(&["INBOX", "b", "b/t1", "b/t2", "b/t2/t1", "b/t7", "b/t7/t7", "b/t8", "b/t8/t8", "b/t8/t9"]);
        let subscribed = names(&["b/t1", "b/t2/t1", "b/t6", "b/t7/t7", "b/t8/t8", "b/t8/t9"]);
        let list = |patterns: &[&str]| ListExtended {
            subscribed: true,
            recursive: true,
            patterns: patterns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let got = answer(&list(&["b/t2%"]), &existing, &subscribed, glob, no_use);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "b/t2");
        assert!(got[0].childinfo_subscribed && !got[0].attributes.contains(&"\\Subscribed"));
        let got = answer(&list(&["b/t2", "b/t2/t1"]), &existing, &subscribed, glob, no_use);
        assert_eq!(got.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), vec!["b/t2/t1"]);
        let all = answer(&list(&["b/*"]), &existing, &subscribed, glob, no_use);
        let t6 = all.iter().find(|l| l.name == "b/t6").unwrap();
        assert!(t6.attributes.contains(&"\\NonExistent") && t6.attributes.contains(&"\\Subscribed"));
        assert!(!all.iter().any(|l| l.name == "b/t7"), "t7's subscribed child is listed itself");
    }

    #[test]
    fn a_percent_pattern_shows_parents_that_only_have_children() {
        let existing = names(&["INBOX", "b", "b/t4/t5"]);
        let list = ListExtended { patterns: vec!["b/%".into()], ..Default::default() };
        let got = answer(&list, &existing, &BTreeSet::new(), glob, no_use);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].attributes, vec!["\\NonExistent", "\\HasChildren"]);
    }
}
