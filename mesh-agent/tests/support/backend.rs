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

/// A server in a process of its own (python3), so that a test can SIGKILL it as a crash would (listening socket
/// and established connections together), or so that its descriptors do not count against the test process's
/// limit. Killed on drop.
pub struct ServerProcess {
    pub name: String,
    pub addr: SocketAddr,
    child: Option<std::process::Child>,
}

/// HTTP/1.1 answering every GET with the server's name.
const HTTP_SERVER: &str = r#"
import http.server, sys

name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    # The default listen backlog of 5 would drop SYNs of a burst: a failure the test did not cause.
    request_queue_size = 1024

Server((host, port), Handler).serve_forever()
"#;

/// TCP echo keeping every connection it accepts (one coroutine each), with a listen backlog of argv[4]; the
/// namespace's net.core.somaxconn caps it.
const ECHO_SERVER: &str = r#"
import asyncio, sys

name, host, port, backlog = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def echo(reader, writer):
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(echo, host, port, backlog=backlog)
    await server.serve_forever()

asyncio.run(main())
"#;

impl ServerProcess {
    /// An HTTP server named `name` on `addr` in `ns`, once it accepts connections.
    pub fn http(ns: &Netns, name: &str, addr: SocketAddr) -> Self {
        Self::start(ns, HTTP_SERVER, name, addr, &[])
    }

    /// An echo server on `addr` in `ns` with room for `backlog` connections not yet accepted.
    pub fn echo(ns: &Netns, addr: SocketAddr, backlog: u32) -> Self {
        Self::start(ns, ECHO_SERVER, "echo", addr, &[&backlog.to_string()])
    }

    fn start(ns: &Netns, script: &str, name: &str, addr: SocketAddr, extra: &[&str]) -> Self {
        let child = ns
            .command("python3")
            .args(["-c", script, name, &addr.ip().to_string(), &addr.port().to_string()])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting python3");
        let server = Self { name: name.to_owned(), addr, child: Some(child) };
        let listening = super::wait_for(Duration::from_secs(10), || {
            ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
        });
        assert!(listening.is_some(), "{name} does not listen on {addr}");
        server
    }

    /// SIGKILL, as a crash or the OOM killer ends a process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
