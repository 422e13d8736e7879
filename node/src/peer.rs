//! Peer links over TCP: the handshake that names and authenticates both servers, then
//! the core's text codec in both directions, optionally through raw DEFLATE.
//!
//! Handshake (one line each way, each at most [`HANDSHAKE_LINE_MAX`] bytes):
//!
//! ```text
//! dialer   -> TANDEM/4 HELLO <dialer id> <nonce A> <deflate 0|1>
//! acceptor -> TANDEM/4 CHALLENGE <acceptor id> <nonce B> <HMAC(secret, "acceptor", ids, A, B)>
//! dialer   -> PROOF <HMAC(secret, "dialer", ids, A, B)>
//! acceptor -> OK <deflate 0|1>            (or ERROR <reason>, then close)
//! ```
//!
//! Both proofs cover both fresh nonces and both ids, and the roles differ, so a proof can
//! be neither replayed nor reflected; a side without the secret learns nothing but a
//! MAC over nonces it cannot choose twice.
//!
//! `TANDEM/<n>` names the peer protocol: servers speak to peers of the same version
//! only, and refuse another with a line that names both (version 2 added store
//! identities to LINKSTATE, MEMBERS and ACK; version 3 a record's pushed bit in its size
//! and the EXPUNGED-PUSHED tombstone fate, which a version 2 server would misread;
//! version 4 the EXPUNGED-DELETED fate, a deletion's expunge, which version 3 refuses).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tandem_core::msg::Envelope;
use tandem_core::types::Sid;
use tandem_core::wire::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// A peer connection: plain TCP, or TLS over it.
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> PeerIo for T {}
pub type PeerStream = Box<dyn PeerIo>;

/// The stream with raw DEFLATE both ways (IMAP's COMPRESS=DEFLATE, RFC 4978, and the
/// replica link's `X-REPLICATE 3 DEFLATE`).
pub fn deflated(stream: PeerStream) -> PeerStream {
    let (reader, writer) = tokio::io::split(stream);
    let reader = async_compression::tokio::bufread::DeflateDecoder::new(tokio::io::BufReader::new(reader));
    let writer = async_compression::tokio::write::DeflateEncoder::new(writer);
    Box::new(tokio::io::join(reader, writer))
}

pub const HANDSHAKE_LINE_MAX: usize = 512;
/// A link with nothing to send sends an empty line this often, so that its peer can tell
/// a quiet link from a dead one (a halted process, a silent middlebox, a cut cable).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// A link that brought nothing (not even a keepalive) for this long is closed; the core
/// then routes around the peer and, if it was the root or a master, fails over.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(8);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Envelopes queued for one peer before the link is dropped as too slow (the core's
/// replication log resends whatever was lost with it).
pub const SEND_QUEUE_MAX: usize = 65_536;
/// Bytes buffered from a peer without a whole command in them (a body is at most
/// 64 MiB, and a line of the codec at most 1 MiB).
const RECEIVE_BUFFER_MAX: usize = 80 * 1024 * 1024;

#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a finished handshake agreed.
#[derive(Debug, Clone, Copy)]
pub struct Agreed {
    pub peer: Sid,
    pub deflate: bool,
}

fn mac(secret: &[u8], role: &str, dialer: Sid, acceptor: Sid, a: &str, b: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length: the error case of new_from_slice cannot happen.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(format!("tandem/1 {role} {} {} {a} {b}", dialer.0, acceptor.0).as_bytes());
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn nonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, Refused> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match r.read(&mut byte).await {
            Ok(0) => return Err(Refused("connection closed during the handshake".into())),
            Ok(_) => {}
            Err(e) => return Err(Refused(format!("read failed during the handshake: {e}"))),
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > HANDSHAKE_LINE_MAX {
            return Err(Refused("handshake line too long".into()));
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| Refused("handshake line is not text".into()))
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &str) -> Result<(), Refused> {
    w.write_all(format!("{line}\r\n").as_bytes()).await.map_err(|e| Refused(format!("write failed: {e}")))
}

/// The peer protocol this server speaks (see the module's doc).
pub const PROTOCOL: &str = "TANDEM/4";

/// A peer speaking another version of the peer protocol: refused by name, so that an
/// operator upgrading the cluster one server at a time sees why two servers do not talk.
fn other_version(theirs: &str) -> Refused {
    let theirs: String = theirs.chars().take(32).filter(|c| c.is_ascii_graphic()).collect();
    Refused(format!(
        "the peer speaks the peer protocol {theirs} and this server {PROTOCOL}: upgrade every server to the same release"
    ))
}

/// Dials side of the handshake: we expect to reach `peer`.
pub async fn dial_handshake(
    stream: &mut PeerStream,
    me: Sid,
    peer: Sid,
    secret: &[u8],
    deflate: bool,
) -> Result<Agreed, Refused> {
    let ours = nonce();
    write_line(stream, &format!("{PROTOCOL} HELLO {} {ours} {}", me.0, u8::from(deflate))).await?;
    let line = read_line(stream).await?;
    let words: Vec<&str> = line.split(' ').collect();
    let (id, theirs, proof) = match words.as_slice() {
        [PROTOCOL, "CHALLENGE", id, theirs, proof] => (*id, *theirs, *proof),
        ["ERROR", ..] => return Err(Refused(format!("the peer refused us: {line}"))),
        [version, "CHALLENGE", ..] if version.starts_with("TANDEM/") => return Err(other_version(version)),
        _ => return Err(Refused(format!("the peer did not answer with a {PROTOCOL} CHALLENGE"))),
    };
    if id.parse::<u32>().ok() != Some(peer.0) {
        return Err(Refused(format!("expected server {peer}, reached server {id}")));
    }
    let expected = mac(secret, "acceptor", me, peer, &ours, theirs);
    let proof = unhex(proof).ok_or_else(|| Refused("the peer's proof is not hex".into()))?;
    if expected.verify_slice(&proof).is_err() {
        return Err(Refused(format!("server {peer} does not know the cluster secret")));
    }
    let ours_proof = mac(secret, "dialer", me, peer, &ours, theirs).finalize().into_bytes();
    write_line(stream, &format!("PROOF {}", hex(&ours_proof))).await?;
    let line = read_line(stream).await?;
    match line.split(' ').collect::<Vec<_>>().as_slice() {
        ["OK", d] => Ok(Agreed { peer, deflate: *d == "1" }),
        _ => Err(Refused(format!("the peer refused us: {line}"))),
    }
}

/// Accepting side: any configured server but us may dial.
///
/// `certificate`, on a mutual-TLS link, is the dialer's certificate: it must name the
/// server the dialer says it is (`tandem-<id>`), or one server's key could speak for all.
pub async fn accept_handshake(
    stream: &mut PeerStream,
    me: Sid,
    servers: &[Sid],
    secret: &[u8],
    deflate: bool,
    certificate: Option<&rustls::pki_types::CertificateDer<'static>>,
) -> Result<Agreed, Refused> {
    let result = async {
        let line = read_line(stream).await?;
        let words: Vec<&str> = line.split(' ').collect();
        let (id, theirs, wants_deflate) = match words.as_slice() {
            [PROTOCOL, "HELLO", id, theirs, d] => (*id, *theirs, *d == "1"),
            [version, "HELLO", ..] if version.starts_with("TANDEM/") => return Err(other_version(version)),
            _ => return Err(Refused(format!("expected {PROTOCOL} HELLO"))),
        };
        let peer = id.parse::<u32>().ok().map(Sid).filter(|s| *s != me && servers.contains(s));
        let Some(peer) = peer else { return Err(Refused(format!("server {id} is not in this cluster"))) };
        if let Some(cert) = certificate {
            crate::tls::check_names(cert, peer.0).map_err(Refused)?;
        }
        if unhex(theirs).is_none_or(|n| n.len() != 16) {
            return Err(Refused("bad nonce".into()));
        }
        let ours = nonce();
        let proof = mac(secret, "acceptor", peer, me, theirs, &ours).finalize().into_bytes();
        write_line(stream, &format!("{PROTOCOL} CHALLENGE {} {ours} {}", me.0, hex(&proof))).await?;
        let line = read_line(stream).await?;
        let proof = match line.split(' ').collect::<Vec<_>>().as_slice() {
            ["PROOF", p] => unhex(p).ok_or_else(|| Refused("proof is not hex".into()))?,
            _ => return Err(Refused("expected PROOF".into())),
        };
        if mac(secret, "dialer", peer, me, theirs, &ours).verify_slice(&proof).is_err() {
            return Err(Refused(format!("authentication failed for server {peer}")));
        }
        let deflate = deflate && wants_deflate;
        write_line(stream, &format!("OK {}", u8::from(deflate))).await?;
        Ok(Agreed { peer, deflate })
    }
    .await;
    if let Err(e) = &result {
        // Tell the other end why, in one line, and nothing else.
        let _ = write_line(stream, &format!("ERROR {e}")).await;
        let _ = stream.shutdown().await;
    }
    result
}

/// One direction of raw DEFLATE, flushed after every batch so the peer can decode it.
struct Deflater(Compress);

impl Deflater {
    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut consumed = 0;
        loop {
            out.reserve(input.len() / 2 + 64);
            let before_in = self.0.total_in();
            self.0
                .compress_vec(&input[consumed..], out, FlushCompress::Sync)
                .map_err(|e| format!("deflate failed: {e}"))?;
            consumed += (self.0.total_in() - before_in) as usize;
            // Done once all input is in and the flush left spare room in `out`.
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

struct Inflater(Decompress);

impl Inflater {
    fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut consumed = 0;
        loop {
            out.reserve(input.len() * 4 + 1024);
            let (before_in, before_out) = (self.0.total_in(), self.0.total_out());
            let status = self
                .0
                .decompress_vec(&input[consumed..], out, FlushDecompress::Sync)
                .map_err(|e| format!("inflate failed: {e}"))?;
            consumed += (self.0.total_in() - before_in) as usize;
            let produced = self.0.total_out() - before_out;
            if status == Status::StreamEnd {
                return Err("the peer ended its DEFLATE stream".into());
            }
            if consumed == input.len() && out.len() < out.capacity() {
                return Ok(());
            }
            if produced == 0 && consumed == input.len() {
                return Ok(());
            }
        }
    }
}

/// Past the empty lines (keepalives) at `start`, a command boundary.
fn skip_keepalives(pending: &[u8], mut start: usize) -> usize {
    while pending.get(start..start + 2) == Some(b"\r\n") {
        start += 2;
    }
    start
}

/// What a connection reports to the node's event loop.
pub enum LinkEvent {
    Received { peer: Sid, conn: u64, envelope: Envelope },
    Closed { peer: Sid, conn: u64, why: String },
}

/// Runs an authenticated connection until either side ends it. `outgoing` carries the
/// envelopes to send; received ones go to `events`.
pub async fn run_link(
    stream: PeerStream,
    agreed: Agreed,
    conn: u64,
    mut outgoing: mpsc::Receiver<Envelope>,
    events: mpsc::Sender<LinkEvent>,
) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let peer = agreed.peer;
    let deflate = agreed.deflate;
    let write_half = async move {
        let mut encoder = Encoder::new();
        let mut deflater = deflate.then(|| Deflater(Compress::new(Compression::fast(), false)));
        let mut plain = Vec::new();
        let mut packed = Vec::new();
        loop {
            plain.clear();
            match tokio::time::timeout(KEEPALIVE_INTERVAL, outgoing.recv()).await {
                Ok(Some(first)) => encoder.encode(&first, &mut plain),
                Ok(None) => break,
                // Between commands an empty line is a keepalive (the reader skips it).
                Err(_) => plain.extend_from_slice(b"\r\n"),
            }
            // Pipelining: everything already queued goes out in the same write.
            while plain.len() < 1 << 20 {
                match outgoing.try_recv() {
                    Ok(env) => encoder.encode(&env, &mut plain),
                    Err(_) => break,
                }
            }
            let bytes = match deflater.as_mut() {
                Some(d) => {
                    packed.clear();
                    d.compress(&plain, &mut packed)?;
                    &packed
                }
                None => &plain,
            };
            writer.write_all(bytes).await.map_err(|e| format!("write failed: {e}"))?;
            writer.flush().await.map_err(|e| format!("write failed: {e}"))?;
        }
        Ok::<(), String>(())
    };
    let read_events = events.clone();
    let read_half = async move {
        let mut decoder = Decoder::new();
        let mut inflater = deflate.then(|| Inflater(Decompress::new(false)));
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::time::timeout(DEAD_PEER_TIMEOUT, reader.read(&mut chunk))
                .await
                .map_err(|_| format!("nothing from the peer for {DEAD_PEER_TIMEOUT:?}: taken for dead"))?
                .map_err(|e| format!("read failed: {e}"))?;
            if n == 0 {
                return Err::<(), String>("the peer closed the connection".into());
            }
            match inflater.as_mut() {
                Some(i) => i.inflate(&chunk[..n], &mut pending)?,
                None => pending.extend_from_slice(&chunk[..n]),
            }
            let mut start = skip_keepalives(&pending, 0);
            while let Some((envelope, used)) =
                decoder.decode(&pending[start..]).map_err(|e| format!("bad bytes from the peer: {e}"))?
            {
                start = skip_keepalives(&pending, start + used);
                if read_events.send(LinkEvent::Received { peer, conn, envelope }).await.is_err() {
                    return Err("the node is shutting down".into());
                }
            }
            pending.drain(..start);
            if pending.len() > RECEIVE_BUFFER_MAX {
                return Err("the peer sent too much without a whole command".into());
            }
        }
    };
    let why = tokio::select! {
        r = write_half => r.err().unwrap_or_else(|| "the node dropped the link".into()),
        r = read_half => r.err().unwrap_or_default(),
    };
    let _ = events.send(LinkEvent::Closed { peer, conn, why }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trips_in_pieces() {
        let mut d = Deflater(Compress::new(Compression::fast(), false));
        let mut i = Inflater(Decompress::new(false));
        let mut got = Vec::new();
        let mut sent = Vec::new();
        for round in 0..50u32 {
            let plain: Vec<u8> = (0..(round * 997) % 70_000).map(|x| (x % 251) as u8 ^ round as u8).collect();
            sent.extend_from_slice(&plain);
            let mut packed = Vec::new();
            d.compress(&plain, &mut packed).unwrap();
            for piece in packed.chunks(1000) {
                i.inflate(piece, &mut got).unwrap();
            }
            assert_eq!(got, sent);
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
