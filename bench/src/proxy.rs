//! A byte-counting TCP proxy on loopback for one peer link (dialer -> acceptor), that
//! can be cut and healed to make an outage, and remembers when the link came back.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct CountingProxy {
    pub addr: SocketAddr,
    /// Payload bytes forwarded, both directions, since start.
    bytes: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    /// When the last connection was let through.
    connected_at: Arc<Mutex<Option<Instant>>>,
}

impl CountingProxy {
    pub fn start(upstream: SocketAddr) -> std::io::Result<CountingProxy> {
        CountingProxy::start_delayed(upstream, std::time::Duration::ZERO)
    }

    /// Like `start`, with every byte held for `one_way` before it is passed on, in each
    /// direction (a slow link's latency; bandwidth is not limited).
    pub fn start_delayed(upstream: SocketAddr, one_way: std::time::Duration) -> std::io::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let proxy = CountingProxy {
            addr,
            bytes: Arc::default(),
            cut: Arc::default(),
            live: Arc::default(),
            connected_at: Arc::default(),
        };
        let (bytes, cut, live, connected_at) =
            (proxy.bytes.clone(), proxy.cut.clone(), proxy.live.clone(), proxy.connected_at.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
                if let Ok(mut live) = live.lock() {
                    live.extend([c2, s2]);
                }
                if let Ok(mut at) = connected_at.lock() {
                    *at = Some(Instant::now());
                }
                let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else { continue };
                for (from, to) in [(c3, s3), (server, client)] {
                    let bytes = bytes.clone();
                    if one_way.is_zero() {
                        std::thread::spawn(move || pump(from, to, &bytes));
                    } else {
                        std::thread::spawn(move || pump_delayed(from, to, &bytes, one_way));
                    }
                }
            }
        });
        Ok(proxy)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    pub fn connected_at(&self) -> Option<Instant> {
        self.connected_at.lock().ok().and_then(|at| *at)
    }

    /// Drops every connection and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Ok(mut live) = self.live.lock() {
            for s in live.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, bytes: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// `pump` through a queue: each chunk is written `delay` after it was read.
fn pump_delayed(mut from: TcpStream, mut to: TcpStream, bytes: &AtomicU64, delay: std::time::Duration) {
    let (queue, chunks) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let Ok(mut writer_to) = to.try_clone() else { return };
    let writer = std::thread::spawn(move || {
        for (due, chunk) in chunks {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if writer_to.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::SeqCst);
                if queue.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.join();
    let _ = to.flush();
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
