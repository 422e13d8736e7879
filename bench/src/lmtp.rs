//! A minimal LMTP client (RFC 2033) and a concurrent delivery driver that records the
//! latency of every message: from the DATA terminator sent to the 250 received.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct LmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LmtpClient {
    pub fn connect(addr: SocketAddr) -> Result<LmtpClient, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("LMTP {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut client = LmtpClient { reader: BufReader::new(stream), writer };
        client.expect("220")?;
        client.send(b"LHLO bench.example\r\n")?;
        client.expect("250")?;
        Ok(client)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer.write_all(bytes).map_err(|e| e.to_string())
    }

    /// Reads one reply (all its continuation lines); Ok when its code is `code`. A 4xx
    /// reply is an error starting with "4".
    fn expect(&mut self, code: &str) -> Result<(), String> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("LMTP server closed the connection".into());
            }
            if !line.starts_with(code) {
                return Err(line.trim_end().to_string());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }

    /// Delivers one message (LF or CRLF lines) to `recipient`; the time from the end of
    /// DATA to the acknowledgement.
    pub fn deliver(&mut self, recipient: &str, message: &[u8]) -> Result<Duration, String> {
        // The server offers PIPELINING: the envelope goes in one write.
        self.send(format!("MAIL FROM:<sender@bench.example>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n").as_bytes())?;
        self.expect("250")?;
        self.expect("250")?;
        self.expect("354")?;
        let mut data = Vec::with_capacity(message.len() + message.len() / 32 + 8);
        for line in message.split_inclusive(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        let sent = Instant::now();
        self.send(&data)?;
        self.expect("250")?;
        Ok(sent.elapsed())
    }
}

/// Outcome of one delivery run.
pub struct DeliveryRun {
    pub delivered: usize,
    pub wall: Duration,
    pub latencies: Vec<Duration>,
}

/// Delivers every message of `messages` over `connections` parallel LMTP sessions.
pub fn deliver_all(
    addr: SocketAddr,
    recipient: &str,
    messages: Arc<Vec<Vec<u8>>>,
    connections: usize,
) -> Result<DeliveryRun, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let (messages, next, recipient) = (messages.clone(), next.clone(), recipient.to_string());
            std::thread::spawn(move || -> Result<Vec<Duration>, String> {
                let mut client = LmtpClient::connect(addr)?;
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(message) = messages.get(i) else { return Ok(latencies) };
                    latencies.push(deliver_retrying(&mut client, &recipient, message)?);
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.join().map_err(|_| "an LMTP worker panicked".to_string())??);
    }
    Ok(DeliveryRun { delivered: latencies.len(), wall: started.elapsed(), latencies })
}

/// Delivers, retrying while the server answers 4xx (a master moving, a replica not yet
/// reachable) for up to a minute; the latency of the attempt that succeeded.
pub fn deliver_retrying(client: &mut LmtpClient, recipient: &str, message: &[u8]) -> Result<Duration, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.deliver(recipient, message) {
            Err(reply) if reply.starts_with('4') && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The `q`-quantile (0..=1) of `values`, sorted in place.
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let rank = ((values.len() - 1) as f64 * q).round() as usize;
    values[rank.min(values.len() - 1)]
}
