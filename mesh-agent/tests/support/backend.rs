//! Backends that tell who answered: an HTTP server whose body names it, and a UDP echo that prefixes its name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::netns::Netns;

/// An HTTP/1.1 backend answering every request with its name, one thread per connection. Stops on drop.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections accepted, the agent's TCP health checks included.
    pub hits: Arc<AtomicUsize>,
    /// HTTP requests answered: what clients (not health checks, which send none) got from this backend.
    pub requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Joined on drop, so the port is closed (and free to bind again) when drop returns.
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl HttpBackend {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Self {
        let (hits, requests, stop) = (Arc::new(AtomicUsize::new(0)), Arc::default(), Arc::new(AtomicBool::new(false)));
        let (h, r, s, body) = (Arc::clone(&hits), Arc::clone(&requests), Arc::clone(&stop), name.to_owned());
        let listener = ns.run(move || TcpListener::bind(addr).expect("binding backend"));
        listener.set_nonblocking(true).unwrap();
        let acceptor = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        h.fetch_add(1, Ordering::Relaxed);
                        let (body, r) = (body.clone(), Arc::clone(&r));
                        std::thread::spawn(move || serve_http(conn, &body, &r));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self { name: name.into(), addr, hits, requests, stop, acceptor: Some(acceptor) }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve_http(mut conn: TcpStream, body: &str, requests: &AtomicUsize) {
    conn.set_nonblocking(false).ok();
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            // Counted before the reply leaves, so a client that has its answer sees the count include it.
            requests.fetch_add(1, Ordering::Relaxed);
            if conn.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One HTTP GET over a fresh connection; returns the body. Runs in the calling thread's namespace.
pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        response.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some((head, body)) = response.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(usize::MAX);
            if body.len() >= len {
                return Ok(body.to_owned());
            }
        }
    }
    Err(std::io::Error::other(format!("incomplete response: {response:?}")))
}

/// A UDP echo that answers `NAME:payload`. Stops on drop.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl UdpEcho {
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = ns.run(move || UdpSocket::bind(addr).expect("binding UDP backend"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (s, name) = (Arc::clone(&stop), name.to_owned());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let mut reply = format!("{name}:").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
