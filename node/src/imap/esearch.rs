//! ESEARCH (RFC 4731), ESORT and CONTEXT=SEARCH (RFC 5267): `SEARCH RETURN (...)` and
//! `SORT RETURN (...)`, with PARTIAL and UPDATE, and CANCELUPDATE. imap-codec
//! 2.0.0-alpha.10 parses none of these, so the clause is cut out of the command here,
//! before the codec sees the rest (CANCELUPDATE is parsed here whole); the options then
//! shape the answer.
//!
//! Only the command's first line is looked at (the clause comes before any criterion,
//! so before any literal), with a fixed bound on its options: no recursion, no
//! backtracking, nothing that grows with the input.

/// What `RETURN (...)` asked for. An empty list means ALL (RFC 4731 section 3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReturnOptions {
    pub min: bool,
    pub max: bool,
    pub count: bool,
    pub all: bool,
    /// PARTIAL: the results at these positions (1-based, `low <= high`; negative ones
    /// count from the end, RFC 9394).
    pub partial: Option<(i64, i64)>,
    /// UPDATE: the session keeps telling the client how the result changes.
    pub update: bool,
}

/// The results of `hits` at the positions `range` names, in order (see
/// [`ReturnOptions::partial`]).
fn partial_of<T: Copy>(hits: &[T], (low, high): (i64, i64)) -> Vec<T> {
    let len = hits.len() as i64;
    // Negative positions count back from the last result (-1 is the last).
    let (first, last) = if low < 0 { (len + high + 1, len + low + 1) } else { (low, high) };
    let first = first.max(1);
    let last = last.min(len);
    if first > last {
        return Vec::new();
    }
    hits[(first - 1) as usize..last as usize].to_vec()
}

/// A PARTIAL range: `n:m` of non-zero numbers of one sign, in either order.
fn parse_range(text: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(text).ok()?;
    let (a, b) = text.split_once(':')?;
    let number = |t: &str| -> Option<i64> {
        let digits = t.strip_prefix('-').unwrap_or(t);
        if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: i64 = t.parse().ok()?;
        (n != 0 && n.unsigned_abs() <= u64::from(u32::MAX)).then_some(n)
    };
    let (a, b) = (number(a)?, number(b)?);
    if (a < 0) != (b < 0) {
        return None;
    }
    Some(if a.abs() <= b.abs() { (a, b) } else { (b, a) })
}

/// `TAG CANCELUPDATE "tag1" ...` (RFC 5267 section 4.3): the tags, or Err with a reason;
/// None when `message` is another command.
pub fn cancel_update(message: &[u8]) -> Option<Result<Vec<String>, String>> {
    let line_end = memchr::memchr(b'\n', message).unwrap_or(message.len());
    let line = message[..line_end].strip_suffix(b"\r").unwrap_or(&message[..line_end]);
    let mut at = 0;
    let tag = word(line, &mut at)?;
    if tag.is_empty() || !word(line, &mut at)?.eq_ignore_ascii_case(b"CANCELUPDATE") {
        return None;
    }
    let mut tags = Vec::new();
    while let Some(quoted) = word(line, &mut at) {
        if tags.len() >= UPDATES_MAX * 4 {
            return Some(Err("too many tags".into()));
        }
        let inner = quoted.strip_prefix(b"\"").and_then(|q| q.strip_suffix(b"\""));
        match inner.filter(|t| !t.is_empty() && t.iter().all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\')) {
            Some(t) => tags.push(String::from_utf8_lossy(t).into_owned()),
            None => return Some(Err("CANCELUPDATE wants quoted tags".into())),
        }
    }
    if tags.is_empty() {
        return Some(Err("CANCELUPDATE wants at least one tag".into()));
    }
    Some(Ok(tags))
}

/// Searches one session keeps updating at once; a further one is answered without
/// updates and a NOUPDATE (RFC 5267 section 4.4).
pub const UPDATES_MAX: usize = 8;

/// Options in one RETURN list at most: four distinct ones exist here.
const OPTIONS_MAX: usize = 8;

/// The command without its RETURN clause, and the options; None when `message` is not a
/// SEARCH or SORT with a RETURN clause (the codec then parses it as it is); Err with a
/// reason for a RETURN clause this server does not do.
pub fn cut_return(message: &[u8]) -> Option<Result<(Vec<u8>, ReturnOptions), String>> {
    let line_end = memchr::memchr(b'\n', message).unwrap_or(message.len());
    let line = &message[..line_end];
    let mut at = 0;
    let tag = word(line, &mut at)?;
    if tag.is_empty() {
        return None;
    }
    let mut command = word(line, &mut at)?;
    if command.eq_ignore_ascii_case(b"UID") {
        command = word(line, &mut at)?;
    }
    if !(command.eq_ignore_ascii_case(b"SEARCH") || command.eq_ignore_ascii_case(b"SORT")) {
        return None;
    }
    let clause_start = at;
    if !word(line, &mut at)?.eq_ignore_ascii_case(b"RETURN") {
        return None;
    }
    if line.get(at) != Some(&b'(') {
        return Some(Err("RETURN wants a parenthesised list of options".into()));
    }
    let close = match memchr::memchr(b')', &line[at..]) {
        Some(i) => at + i,
        None => return Some(Err("RETURN's option list is not closed".into())),
    };
    let mut options = ReturnOptions::default();
    let listed = &line[at + 1..close];
    let mut seen = 0;
    let mut words = listed.split(|b| *b == b' ').filter(|o| !o.is_empty());
    while let Some(option) = words.next() {
        seen += 1;
        if seen > OPTIONS_MAX {
            return Some(Err("too many RETURN options".into()));
        }
        match option.to_ascii_uppercase().as_slice() {
            b"MIN" => options.min = true,
            b"MAX" => options.max = true,
            b"COUNT" => options.count = true,
            b"ALL" => options.all = true,
            b"UPDATE" => options.update = true,
            b"PARTIAL" => match words.next().and_then(parse_range) {
                Some(range) => options.partial = Some(range),
                None => return Some(Err("PARTIAL wants a range of positions, like 1:100".into())),
            },
            other => {
                let name = String::from_utf8_lossy(&other[..other.len().min(32)]).into_owned();
                return Some(Err(format!("RETURN option {name} is not supported")));
            }
        }
    }
    // No option means ALL; UPDATE alone asks for nothing now (RFC 5267 section 4.2).
    if options == ReturnOptions::default() {
        options.all = true;
    }
    if line.get(close + 1) != Some(&b' ') {
        return Some(Err("RETURN's option list must be followed by the criteria".into()));
    }
    let mut rest = Vec::with_capacity(message.len());
    rest.extend_from_slice(&message[..clause_start]);
    rest.extend_from_slice(&message[close + 2..]);
    Some(Ok((rest, options)))
}

/// The next space-separated word of `line` from `*at`, which moves past it and one space;
/// None at the end of the line.
fn word<'a>(line: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let rest = line.get(*at..).filter(|r| !r.is_empty())?;
    let len = memchr::memchr2(b' ', b'\r', rest).unwrap_or(rest.len());
    let w = &rest[..len];
    *at += len;
    if line.get(*at) == Some(&b' ') {
        *at += 1;
    }
    Some(w)
}

/// The ESEARCH response for `hits` (message numbers or UIDs, in the answer's order:
/// ascending for SEARCH, sorted for SORT), with `modseq` when the criteria named MODSEQ
/// (RFC 7162 section 3.1.5: the highest of the messages returned).
pub fn response(tag: &str, uid: bool, options: ReturnOptions, hits: &[(u32, u64)], sorted: bool) -> String {
    let mut out = format!("* ESEARCH (TAG \"{tag}\")");
    if uid {
        out.push_str(" UID");
    }
    // MIN and MAX: the lowest and highest for SEARCH; for SORT the first and last in
    // the sort order (RFC 5267 section 3.2).
    let (first, last) = if sorted {
        (hits.first().copied(), hits.last().copied())
    } else {
        (hits.iter().min().copied(), hits.iter().max().copied())
    };
    let mut returned_modseq = 0u64;
    if options.min
        && let Some((n, modseq)) = first
    {
        out.push_str(&format!(" MIN {n}"));
        returned_modseq = returned_modseq.max(modseq);
    }
    if options.max
        && let Some((n, modseq)) = last
    {
        out.push_str(&format!(" MAX {n}"));
        returned_modseq = returned_modseq.max(modseq);
    }
    if options.count {
        out.push_str(&format!(" COUNT {}", hits.len()));
    }
    if let Some(range) = options.partial {
        let part = partial_of(hits, range);
        let numbers: Vec<u32> = part.iter().map(|h| h.0).collect();
        let listed = if numbers.is_empty() { "NIL".to_string() } else { super::session::uid_set(&numbers) };
        out.push_str(&format!(" PARTIAL ({}:{} {listed})", range.0, range.1));
        returned_modseq = returned_modseq.max(part.iter().map(|h| h.1).max().unwrap_or(0));
    }
    if options.all && !hits.is_empty() {
        out.push_str(&format!(" ALL {}", super::session::uid_set(&hits.iter().map(|h| h.0).collect::<Vec<_>>())));
        returned_modseq = hits.iter().map(|h| h.1).max().unwrap_or(0);
    }
    if options.count && !options.all && !options.min && !options.max {
        returned_modseq = hits.iter().map(|h| h.1).max().unwrap_or(0);
    }
    if returned_modseq > 0 {
        out.push_str(&format!(" MODSEQ {returned_modseq}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(s: &str) -> Option<Result<(String, ReturnOptions), String>> {
        cut_return(s.as_bytes()).map(|r| r.map(|(b, o)| (String::from_utf8(b).unwrap(), o)))
    }

    #[test]
    fn the_return_clause_is_cut_out_and_its_options_kept() {
        let (rest, o) = cut("a1 SEARCH RETURN (MIN count) SEEN\r\n").unwrap().unwrap();
        assert_eq!(rest, "a1 SEARCH SEEN\r\n");
        assert_eq!(o, ReturnOptions { min: true, count: true, ..Default::default() });
        let (rest, o) = cut("a2 uid search return () 1:* SUBJECT {3}\r\nabc\r\n").unwrap().unwrap();
        assert_eq!(rest, "a2 uid search 1:* SUBJECT {3}\r\nabc\r\n");
        assert_eq!(o, ReturnOptions { all: true, ..Default::default() });
        let (rest, _) = cut("s SORT RETURN (ALL) (ARRIVAL) US-ASCII ALL\r\n").unwrap().unwrap();
        assert_eq!(rest, "s SORT (ARRIVAL) US-ASCII ALL\r\n");
    }

    #[test]
    fn other_commands_and_plain_searches_are_left_to_the_codec() {
        assert!(cut("a SEARCH ALL\r\n").is_none());
        assert!(cut("a FETCH 1 RETURN (x)\r\n").is_none());
        assert!(cut("a UID SEARCH\r\n").is_none());
        assert!(cut("").is_none());
        assert!(cut("a SEARCH RETURNED\r\n").is_none());
    }

    #[test]
    fn unsupported_or_malformed_clauses_are_refused() {
        assert!(cut("a SEARCH RETURN (SAVE) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (PARTIAL 1) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (PARTIAL 1:*) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (PARTIAL *:1) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (PARTIAL 0:3) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (PARTIAL -1:3) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (PARTIAL) ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN MIN ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (MIN ALL\r\n").unwrap().is_err());
        assert!(cut("a SEARCH RETURN (MIN)\r\n").unwrap().is_err());
        assert!(cut(&format!("a SEARCH RETURN ({}) ALL\r\n", "MIN ".repeat(20))).unwrap().is_err());
    }

    #[test]
    fn responses_carry_what_was_asked() {
        let hits = [(1, 0), (2, 0), (3, 0), (5, 0)];
        let all = ReturnOptions { all: true, ..Default::default() };
        assert_eq!(response("t", false, all, &hits, false), "* ESEARCH (TAG \"t\") ALL 1:3,5");
        let min_max = ReturnOptions { min: true, max: true, ..Default::default() };
        assert_eq!(response("t", true, min_max, &hits, false), "* ESEARCH (TAG \"t\") UID MIN 1 MAX 5");
        let count = ReturnOptions { count: true, ..Default::default() };
        assert_eq!(response("t", false, count, &[], false), "* ESEARCH (TAG \"t\") COUNT 0");
        assert_eq!(response("t", false, min_max, &[], false), "* ESEARCH (TAG \"t\")");
        let sorted = [(3, 0), (1, 0), (2, 0)];
        assert_eq!(response("t", false, all, &sorted, true), "* ESEARCH (TAG \"t\") ALL 3,1:2");
        assert_eq!(response("t", false, min_max, &sorted, true), "* ESEARCH (TAG \"t\") MIN 3 MAX 2");
    }

    #[test]
    fn partial_returns_the_results_at_those_positions() {
        let (_, o) = cut("a SEARCH RETURN (PARTIAL 4:2) ALL\r\n").unwrap().unwrap();
        assert_eq!(o.partial, Some((2, 4)));
        assert!(!o.all);
        let five = [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)];
        let p = |low, high| ReturnOptions { partial: Some((low, high)), ..Default::default() };
        assert_eq!(response("t", false, p(1, 1), &five, false), "* ESEARCH (TAG \"t\") PARTIAL (1:1 1)");
        assert_eq!(response("t", false, p(1, 6), &five, false), "* ESEARCH (TAG \"t\") PARTIAL (1:6 1:5)");
        assert_eq!(response("t", false, p(6, 6), &five, false), "* ESEARCH (TAG \"t\") PARTIAL (6:6 NIL)");
        assert_eq!(response("t", false, p(-1, -2), &five, false), "* ESEARCH (TAG \"t\") PARTIAL (-1:-2 4:5)");
        let gaps = [(1, 0), (2, 0), (4, 0), (5, 0)];
        assert_eq!(response("t", true, p(2, 3), &gaps, false), "* ESEARCH (TAG \"t\") UID PARTIAL (2:3 2,4)");
    }

    #[test]
    fn update_alone_asks_for_nothing_now_and_cancelupdate_names_tags() {
        let (_, o) = cut("a SEARCH RETURN (UPDATE) SEEN\r\n").unwrap().unwrap();
        assert_eq!(o, ReturnOptions { update: true, ..Default::default() });
        let (_, o) = cut("a SEARCH RETURN (UPDATE ALL) SEEN\r\n").unwrap().unwrap();
        assert!(o.update && o.all);
        assert_eq!(cancel_update(b"b CANCELUPDATE \"a\" \"x1\"\r\n"), Some(Ok(vec!["a".into(), "x1".into()])));
        assert!(cancel_update(b"b CANCELUPDATE a\r\n").unwrap().is_err());
        assert!(cancel_update(b"b CANCELUPDATE\r\n").unwrap().is_err());
        assert!(cancel_update(b"b NOOP\r\n").is_none());
    }

    #[test]
    fn modseq_is_the_highest_of_the_messages_returned() {
        let hits = [(1, 5), (2, 9), (3, 7)];
        let min = ReturnOptions { min: true, ..Default::default() };
        assert_eq!(response("t", false, min, &hits, false), "* ESEARCH (TAG \"t\") MIN 1 MODSEQ 5");
        let min_max = ReturnOptions { min: true, max: true, ..Default::default() };
        assert_eq!(response("t", false, min_max, &hits, false), "* ESEARCH (TAG \"t\") MIN 1 MAX 3 MODSEQ 7");
        let all = ReturnOptions { all: true, ..Default::default() };
        assert_eq!(response("t", false, all, &hits, false), "* ESEARCH (TAG \"t\") ALL 1:3 MODSEQ 9");
        assert_eq!(response("t", false, all, &[], false), "* ESEARCH (TAG \"t\")");
    }
}
