//! Sockets. UDP: one SO_REUSEPORT socket per core, each served by a thread of its own (`udp`). TCP: hickory's server
//! with the same handler.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tracing::debug;

use super::handler::Handler;
use super::udp::{self, Shared};

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Receive buffer per UDP socket, to ride out bursts.
const UDP_RCVBUF: usize = 4 << 20;
/// How long a UDP thread waits for a query before it checks whether to stop.
const UDP_STOP_CHECK: Duration = Duration::from_millis(200);

pub struct Server {
    udp: Vec<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    tcp: hickory_server::Server<Handler>,
}

impl Server {
    /// Binds and starts serving; call from within the runtime, which runs the queries the hot path leaves.
    pub fn bind(listen: SocketAddr, handler: Handler) -> Result<Self> {
        let shared = Arc::new(Shared::new(handler.clone(), Handle::current()));
        let mut udp = Vec::new();
        for i in 0..udp_threads() {
            let socket = Arc::new(udp_socket(listen).with_context(|| format!("DNS: binding UDP {listen}"))?);
            let shared = Arc::clone(&shared);
            let thread =
                std::thread::Builder::new().name(format!("dns-udp-{i}")).spawn(move || udp::serve(socket, shared, i));
            udp.push(thread.context("DNS: starting a UDP thread")?);
        }
        let mut tcp = hickory_server::Server::new(handler);
        tcp.register_listener(
            tcp_listener(listen).with_context(|| format!("DNS: binding TCP {listen}"))?,
            TCP_IDLE,
            16,
        );
        Ok(Self { udp, shared, tcp })
    }

    pub async fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut self.udp);
        // each notices within its receive timeout
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
        if let Err(e) = self.tcp.shutdown_gracefully().await {
            debug!("DNS: TCP server: {e}");
        }
    }
}

/// One UDP thread per core.
pub fn udp_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn socket(listen: SocketAddr, kind: Type) -> Result<Socket> {
    let socket = Socket::new(Domain::for_address(listen), kind, None)?;
    // the listen address lives on edge0, which the agent may be (re)creating
    if listen.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// A blocking socket for a UDP thread; its receive timeout is how often the thread checks for shutdown.
fn udp_socket(listen: SocketAddr) -> Result<std::net::UdpSocket> {
    let socket = socket(listen, Type::DGRAM)?;
    socket.set_nonblocking(false)?;
    socket.set_reuse_port(true)?;
    socket.set_read_timeout(Some(UDP_STOP_CHECK))?;
    // best effort: the kernel caps it at net.core.rmem_max
    let _ = socket.set_recv_buffer_size(UDP_RCVBUF);
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

fn tcp_listener(listen: SocketAddr) -> Result<TcpListener> {
    let socket = socket(listen, Type::STREAM)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}
