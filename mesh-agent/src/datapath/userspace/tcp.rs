//! TCP frontends: accept on VIP:port, connect to a backend (the next one when it cannot be reached), splice.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::splice::{self, PipePool};
use super::stats::bump;
use super::FrontendState;

/// How long a backend gets to accept. A live backend answers within milliseconds; one that silently drops SYNs
/// would otherwise hold the client for the kernel's two minutes of SYN retries. Longer than the first SYN
/// retransmission (1 s), though: a burst that overflows a backend's listen queue loses SYNs routinely, and with
/// exactly 1 s a 1,000-connection burst into backends with a 1,024 backlog timed out 15-20% of attempts just as
/// the retransmitted SYN would have been answered.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(2_000);

/// Backends tried per connection (fewer when the service has fewer): enough to step over an endpoint or two that
/// died since the catalog last said so, few enough that a service whose backends are all down fails fast.
const MAX_ATTEMPTS: usize = 3;

/// Accept queue length; the kernel caps it at net.core.somaxconn. Bursts of new connections queue here rather
/// than being refused while the accept task catches up.
const BACKLOG: i32 = 4096;

/// After an accept error (out of descriptors or memory, mostly), wait this long before accepting again rather than
/// spinning on the same error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);

/// A listening socket shared by the registry and its accept task. The registry closes it synchronously
/// ([`Listener::close`]), so a removed or emptied frontend refuses the very next SYN and the same VIP:port can be
/// bound again at once, which a listener dropped later by an aborted task would not allow.
pub(super) struct Listener(Mutex<Option<TcpListener>>);

impl Listener {
    /// Must run inside the runtime (the socket registers with its reactor).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = super::socket(addr, Type::STREAM)?;
        // One listener per proxy thread on the same VIP:port.
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        // Accepted sockets inherit it: one setsockopt per listener instead of one per connection.
        socket.set_tcp_nodelay(true)?;
        socket.listen(BACKLOG)?;
        Ok(Self(Mutex::new(Some(TcpListener::from_std(socket.into())?))))
    }

    /// The next connection, or `None` once closed. The lock is held only inside one non-blocking accept, never
    /// across an await, and only [`Listener::close`] ever contends for it.
    async fn accept(&self) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        poll_fn(|cx| match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await
    }

    /// Closes the socket now. The accept task may still be parked on it, so the caller aborts that too.
    pub fn close(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Accepts until the listener is closed; each connection runs on its own task, so it outlives the listener.
pub(super) async fn serve(listener: Arc<Listener>, frontend: Arc<FrontendState>, pool: Arc<PipePool>) {
    while let Some(accepted) = listener.accept().await {
        match accepted {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer.ip(), Arc::clone(&frontend), Arc::clone(&pool)));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: IpAddr, frontend: Arc<FrontendState>, pool: Arc<PipePool>) {
    if !frontend.admits(peer) {
        reset(&client);
        return;
    }
    let counters = &frontend.counters;
    bump(&counters.connections, 1);
    let _active = counters.open();
    let Some(backend) = connect(&frontend, peer).await else {
        bump(&counters.failures, 1);
        reset(&client);
        return;
    };
    if let Err(e) = splice::proxy(&client, &backend, &pool, counters).await {
        debug!(error = %e, %peer, "connection aborted");
        // Pass an abort on as an abort: a plain FIN would let the other side take a truncated stream as complete.
        reset(&client);
        reset(&backend);
    }
}

/// Connects to the balancer's pick, then to the next backend after each failure, at most [`MAX_ATTEMPTS`] times.
async fn connect(frontend: &FrontendState, client: IpAddr) -> Option<TcpStream> {
    let route = frontend.route.load_full();
    let mut next = route.pick(client);
    for _ in 0..route.backends().len().min(MAX_ATTEMPTS) {
        let backend = next?;
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_to(backend)).await {
            Ok(Ok(stream)) => return Some(stream),
            Ok(Err(e)) => debug!(%backend, error = %e, "backend connect failed"),
            Err(_) => debug!(%backend, "backend connect timed out"),
        }
        route.connect_failed(backend);
        next = route.next_after(client, backend);
    }
    None
}

/// A connection to `backend`. Unlike `TcpStream::connect`, it asks the kernel for the socket's error
/// (getsockopt SO_ERROR) only when epoll reported one, not after every successful connect.
async fn connect_to(backend: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(backend), Type::STREAM.nonblocking(), None)?;
    // Small writes (requests, a protocol's acks) must leave at once: the proxy adds no batching of its own. The
    // client side has TCP_NODELAY from the listener.
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&backend.into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
        _ => {}
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // A failed connect raises EPOLLERR (and HUP) along with EPOLLOUT; success raises EPOLLOUT alone.
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// Closes with SO_LINGER 0, so the peer gets a RST now instead of a FIN (and nothing lingers in TIME_WAIT).
fn reset(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        debug!(error = %e, "SO_LINGER");
    }
}
