//! ESEARCH (RFC 4731) and ESORT (RFC 5267): `SEARCH RETURN (...)` and `SORT RETURN
//! (...)`. imap-codec 2.0.0-alpha.10 parses neither clause, so it is cut out of the
//! command here, before the codec sees the rest; the options then shape the answer.
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
}

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
    for option in listed.split(|b| *b == b' ').filter(|o| !o.is_empty()) {
        seen += 1;
        if seen > OPTIONS_MAX {
            return Some(Err("too many RETURN options".into()));
        }
        match option.to_ascii_uppercase().as_slice() {
            b"MIN" => options.min = true,
            b"MAX" => options.max = true,
            b"COUNT" => options.count = true,
            b"ALL" => options.all = true,
            other => {
                let name = String::from_utf8_lossy(&other[..other.len().min(32)]).into_owned();
                return Some(Err(format!("RETURN option {name} is not supported")));
            }
        }
    }
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
        assert!(cut("a SEARCH RETURN (PARTIAL 1:10) ALL\r\n").unwrap().is_err());
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
