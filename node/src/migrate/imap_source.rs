//! An IMAP account read over IMAP (`tandem import --from imap[s]://user@host[:port]`):
//! LIST, then per folder SELECT (UIDVALIDITY, UIDNEXT), the messages' UIDs, flags and
//! INTERNALDATEs, and their bodies in batches. A blocking client: an import is one
//! conversation at a time.
//!
//! Responses are read whole (a line, plus each literal it announces, bounded) and split
//! into tokens by a flat scanner: no recursion on what the server sends.

use super::{SourceFolder, SourceMeta};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response (line and literals) longer than this ends the import with an error.
const RESPONSE_LEN_MAX: usize = 300 * 1024 * 1024;
const LINE_LEN_MAX: usize = 1024 * 1024;
/// Bodies fetched per UID FETCH.
const BODIES_PER_FETCH: usize = 50;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct ImapSource {
    conn: BufReader<Box<dyn Stream>>,
    tag: u64,
    delimiter: Option<char>,
    /// The folder selected now (its name on the server).
    selected: Option<String>,
    /// tandem name -> the server's name.
    server_names: std::collections::BTreeMap<String, String>,
}

/// Where to import from: `imap://user@host[:port]` or `imaps://...` (port 143 or 993).
pub struct ImapUrl {
    pub tls: bool,
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl ImapUrl {
    pub fn parse(text: &str) -> Result<ImapUrl, String> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("imaps://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("imap://") {
            (false, r)
        } else {
            return Err(format!("{text}: give imap://user@host[:port] or imaps://user@host[:port]"));
        };
        let rest = rest.trim_end_matches('/');
        let (user, hostport) = rest.rsplit_once('@').ok_or_else(|| format!("{text}: no user@ before the host"))?;
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{text}: bad port {p}"))?),
            None => (hostport.to_string(), if tls { 993 } else { 143 }),
        };
        let user = user.replace("%40", "@");
        if user.is_empty() || host.is_empty() {
            return Err(format!("{text}: user and host are needed"));
        }
        Ok(ImapUrl { tls, user, host, port })
    }
}

/// A quoted string for a command (CR, LF and NUL cannot be sent in one).
fn quoted(text: &str) -> Result<String, String> {
    if text.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err("a name or password with a line break cannot be sent".into());
    }
    Ok(format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\"")))
}

#[derive(Debug, PartialEq)]
enum Token {
    Open,
    Close,
    Atom(String),
    Text(Vec<u8>),
}

/// Splits a response into tokens; literals (`{n}` then n bytes) become `Text`.
fn tokens(response: &[u8]) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < response.len() {
        match response[i] {
            b' ' | b'\r' | b'\n' => i += 1,
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b')' => {
                out.push(Token::Close);
                i += 1;
            }
            b'"' => {
                let mut text = Vec::new();
                i += 1;
                while i < response.len() && response[i] != b'"' {
                    if response[i] == b'\\' && i + 1 < response.len() {
                        i += 1;
                    }
                    text.push(response[i]);
                    i += 1;
                }
                i += 1;
                out.push(Token::Text(text));
            }
            b'{' => {
                let close = response[i..].iter().position(|b| *b == b'}').map(|p| i + p);
                let len = close.and_then(|c| {
                    std::str::from_utf8(&response[i + 1..c]).ok()?.trim_end_matches('+').parse::<usize>().ok()
                });
                match (close, len) {
                    (Some(c), Some(len)) => {
                        let start = (c + 3).min(response.len());
                        let end = (start + len).min(response.len());
                        out.push(Token::Text(response[start..end].to_vec()));
                        i = end;
                    }
                    _ => i += 1,
                }
            }
            _ => {
                let start = i;
                let mut depth = 0i32;
                while i < response.len() {
                    match response[i] {
                        b'[' => depth += 1,
                        b']' => depth -= 1,
                        b' ' | b'\r' | b'\n' | b')' | b'(' if depth <= 0 => break,
                        _ => {}
                    }
                    i += 1;
                }
                out.push(Token::Atom(String::from_utf8_lossy(&response[start..i]).to_string()));
            }
        }
    }
    out
}

fn text_of(token: Option<&Token>) -> Option<String> {
    match token? {
        Token::Atom(a) if a.eq_ignore_ascii_case("NIL") => None,
        Token::Atom(a) => Some(a.clone()),
        Token::Text(t) => Some(String::from_utf8_lossy(t).to_string()),
        _ => None,
    }
}

/// One FETCH response's items.
#[derive(Default)]
struct Fetched {
    uid: Option<u32>,
    flags: Vec<String>,
    received: Option<u64>,
    size: Option<u32>,
    body: Option<Vec<u8>>,
}

fn parse_fetch(tokens: &[Token]) -> Option<Fetched> {
    // * <n> FETCH ( items )
    let start = tokens.iter().position(|t| matches!(t, Token::Atom(a) if a.eq_ignore_ascii_case("FETCH")))?;
    let mut items = tokens.get(start + 2..)?.iter();
    let mut out = Fetched::default();
    while let Some(token) = items.next() {
        let Token::Atom(name) = token else { continue };
        match name.to_ascii_uppercase().as_str() {
            "UID" => out.uid = text_of(items.next()).and_then(|t| t.parse().ok()),
            "RFC822.SIZE" => out.size = text_of(items.next()).and_then(|t| t.parse().ok()),
            "INTERNALDATE" => out.received = text_of(items.next()).and_then(|t| internal_date(&t)),
            "FLAGS" => {
                if items.next() != Some(&Token::Open) {
                    continue;
                }
                for flag in items.by_ref() {
                    match flag {
                        Token::Close => break,
                        Token::Atom(f) if !f.eq_ignore_ascii_case("\\Recent") => out.flags.push(f.clone()),
                        _ => {}
                    }
                }
            }
            n if n.starts_with("BODY[") => {
                if let Some(Token::Text(t)) = items.next() {
                    out.body = Some(t.clone());
                }
            }
            _ => {}
        }
    }
    Some(out)
}

/// "17-Jul-1996 02:44:25 -0700" -> seconds since the Unix epoch.
fn internal_date(text: &str) -> Option<u64> {
    let parsed = chrono::DateTime::parse_from_str(text.trim(), "%d-%b-%Y %H:%M:%S %z").ok()?;
    u64::try_from(parsed.timestamp()).ok()
}

impl ImapSource {
    pub fn connect(url: &ImapUrl, password: &str, ca_file: Option<&std::path::Path>) -> Result<ImapSource, String> {
        let addr = format!("{}:{}", url.host, url.port);
        let tcp = TcpStream::connect(&addr).map_err(|e| format!("{addr}: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let stream: Box<dyn Stream> = if url.tls {
            let config = crate::tls::client_trusting(ca_file)?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| e.to_string())?;
            let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(|e| e.to_string())?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        } else {
            Box::new(tcp)
        };
        let mut source = ImapSource {
            conn: BufReader::new(stream),
            tag: 0,
            delimiter: None,
            selected: None,
            server_names: Default::default(),
        };
        let greeting = source.read_response()?;
        if !greeting.starts_with(b"* OK") && !greeting.starts_with(b"* PREAUTH") {
            return Err(format!("{addr}: {}", String::from_utf8_lossy(&greeting).trim_end()));
        }
        let login = format!("LOGIN {} {}", quoted(&url.user)?, quoted(password)?);
        source.command(&login).map_err(|e| format!("login as {}: {e}", url.user))?;
        Ok(source)
    }

    /// One response: a line and the literals it announces.
    fn read_response(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            let mut line = Vec::new();
            (&mut self.conn).take(LINE_LEN_MAX as u64).read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err("the server closed the connection".into());
            }
            out.extend_from_slice(&line);
            let trimmed = line.strip_suffix(b"\r\n").or_else(|| line.strip_suffix(b"\n")).unwrap_or(&line);
            let literal = trimmed
                .strip_suffix(b"}")
                .and_then(|t| t.iter().rposition(|b| *b == b'{').map(|p| &t[p + 1..]))
                .and_then(|n| std::str::from_utf8(n).ok()?.trim_end_matches('+').parse::<usize>().ok());
            let Some(len) = literal else { return Ok(out) };
            if out.len() + len > RESPONSE_LEN_MAX {
                return Err(format!("a response of more than {RESPONSE_LEN_MAX} bytes"));
            }
            let start = out.len();
            out.resize(start + len, 0);
            self.conn.read_exact(&mut out[start..]).map_err(|e| e.to_string())?;
        }
    }

    /// Sends a command; returns its untagged responses once it completed OK.
    fn command(&mut self, command: &str) -> Result<Vec<Vec<u8>>, String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let line = format!("{tag} {command}\r\n");
        self.conn.get_mut().write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        self.conn.get_mut().flush().map_err(|e| e.to_string())?;
        let mut untagged = Vec::new();
        loop {
            let response = self.read_response()?;
            if response.starts_with(tag.as_bytes()) && response.get(tag.len()) == Some(&b' ') {
                let status = String::from_utf8_lossy(&response[tag.len() + 1..]).trim_end().to_string();
                if status.len() >= 2 && status[..2].eq_ignore_ascii_case("OK") {
                    return Ok(untagged);
                }
                return Err(status);
            }
            untagged.push(response);
        }
    }

    pub fn folders(&mut self) -> Result<Vec<SourceFolder>, String> {
        let mut names = Vec::new();
        for response in self.command("LIST \"\" \"*\"")? {
            let t = tokens(&response);
            if !matches!(t.get(1), Some(Token::Atom(a)) if a.eq_ignore_ascii_case("LIST")) {
                continue;
            }
            let close = t.iter().position(|x| *x == Token::Close).unwrap_or(0);
            let noselect = t[..close].iter().any(|x| matches!(x, Token::Atom(a) if a.eq_ignore_ascii_case("\\Noselect") || a.eq_ignore_ascii_case("\\NonExistent")));
            let delimiter = text_of(t.get(close + 1)).and_then(|d| d.chars().next());
            let Some(name) = text_of(t.get(close + 2)) else { continue };
            self.delimiter = self.delimiter.or(delimiter);
            if !noselect {
                names.push(name);
            }
        }
        let mut subscribed = std::collections::BTreeSet::new();
        for response in self.command("LSUB \"\" \"*\"")? {
            let t = tokens(&response);
            let close = t.iter().position(|x| *x == Token::Close).unwrap_or(0);
            if let Some(name) = text_of(t.get(close + 2)) {
                subscribed.insert(name);
            }
        }
        let mut folders = Vec::new();
        for server_name in names {
            let untagged = self.command(&format!("EXAMINE {}", quoted(&server_name)?))?;
            self.selected = Some(server_name.clone());
            let code = |word: &str| {
                untagged.iter().find_map(|r| {
                    let text = String::from_utf8_lossy(r);
                    let at = text.find(word)?;
                    text[at + word.len()..].trim_start().split(']').next()?.trim().parse::<u32>().ok()
                })
            };
            let name = self.tandem_name(&server_name);
            self.server_names.insert(name.clone(), server_name.clone());
            folders.push(SourceFolder {
                subscribed: subscribed.contains(&server_name),
                uidvalidity: code("[UIDVALIDITY").unwrap_or(0),
                uidnext: code("[UIDNEXT").unwrap_or(1),
                name,
            });
        }
        folders.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(folders)
    }

    fn tandem_name(&self, server_name: &str) -> String {
        if server_name.eq_ignore_ascii_case("INBOX") {
            return "INBOX".into();
        }
        match self.delimiter {
            Some(d) if d != '/' => server_name.replace(d, "/"),
            _ => server_name.to_string(),
        }
    }

    fn select(&mut self, folder: &SourceFolder) -> Result<(), String> {
        let server_name = self.server_names.get(&folder.name).cloned().unwrap_or_else(|| folder.name.clone());
        if self.selected.as_deref() != Some(server_name.as_str()) {
            self.command(&format!("EXAMINE {}", quoted(&server_name)?))?;
            self.selected = Some(server_name);
        }
        Ok(())
    }

    pub fn list(&mut self, folder: &SourceFolder) -> Result<Vec<SourceMeta>, String> {
        self.select(folder)?;
        let mut metas = Vec::new();
        for response in self.command("UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)")? {
            let Some(f) = parse_fetch(&tokens(&response)) else { continue };
            let Some(uid) = f.uid else { continue };
            metas.push(SourceMeta { uid, flags: f.flags, received: f.received.unwrap_or(0), size: f.size, path: None });
        }
        metas.sort_by_key(|m| m.uid);
        metas.dedup_by_key(|m| m.uid);
        Ok(metas)
    }

    /// Bodies of `uids` (at most a batch), by UID.
    pub fn bodies(&mut self, folder: &SourceFolder, uids: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, String> {
        self.select(folder)?;
        let mut out = Vec::new();
        for chunk in uids.chunks(BODIES_PER_FETCH) {
            let set = chunk.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            for response in self.command(&format!("UID FETCH {set} (UID BODY.PEEK[])"))? {
                let Some(f) = parse_fetch(&tokens(&response)) else { continue };
                if let (Some(uid), Some(body)) = (f.uid, f.body) {
                    out.push((uid, body));
                }
            }
        }
        Ok(out)
    }

    pub fn logout(mut self) {
        let _ = self.command("LOGOUT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_responses_and_urls_parse() {
        let r = b"* 3 FETCH (UID 7 FLAGS (\\Seen $Work \\Recent) INTERNALDATE \"13-Sep-2020 12:30:00 +0000\" RFC822.SIZE 25)\r\n";
        let f = parse_fetch(&tokens(r)).unwrap();
        assert_eq!((f.uid, f.size, f.received), (Some(7), Some(25), Some(1_600_000_200)));
        assert_eq!(f.flags, ["\\Seen", "$Work"]);
        let r = b"* 1 FETCH (UID 9 BODY[] {5}\r\nab)\r\n)\r\n";
        let f = parse_fetch(&tokens(r)).unwrap();
        assert_eq!((f.uid, f.body.as_deref()), (Some(9), Some(&b"ab)\r\n"[..])));
        let u = ImapUrl::parse("imaps://a%40b.org@mail.example:1993").unwrap();
        assert_eq!((u.tls, u.user.as_str(), u.host.as_str(), u.port), (true, "a@b.org", "mail.example", 1993));
        assert!(ImapUrl::parse("http://x").is_err());
        assert_eq!(quoted("a\"b\\c").unwrap(), "\"a\\\"b\\\\c\"");
        assert!(quoted("a\r\nb").is_err());
    }
}
