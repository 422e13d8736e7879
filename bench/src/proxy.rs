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
                    std::thread::spawn(move || pump(from, to, &bytes));
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
