//! Sockets and loops. UDP: one SO_REUSEPORT socket per core, each with a loop that answers the hot path in place and
//! hands the rest to the hickory handler in a task of its own. TCP: hickory's server with the same handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::debug;

use super::handler::{encode_udp, Handler};
use super::wire::{self, Fast};

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries waiting on hickory (mostly on an upstream) at once; beyond this, UDP queries are dropped, as a loaded
/// resolver does, rather than piling up tasks.
const MAX_SLOW_IN_FLIGHT: usize = 1024;
/// Receive buffer per UDP socket, to ride out bursts.
const UDP_RCVBUF: usize = 4 << 20;
/// Large enough for any query; a longer datagram is cut and then fails to parse (FORMERR).
const MAX_QUERY: usize = 4096;

pub struct Server {
    udp: JoinSet<()>,
    tcp: hickory_server::Server<Handler>,
}

impl Server {
    pub fn bind(listen: SocketAddr, handler: Handler) -> Result<Self> {
        let sockets = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slow = Arc::new(Semaphore::new(MAX_SLOW_IN_FLIGHT));
        let mut udp = JoinSet::new();
        for _ in 0..sockets {
            let socket = Arc::new(udp_socket(listen).with_context(|| format!("DNS: binding UDP {listen}"))?);
            udp.spawn(serve_udp(socket, handler.clone(), Arc::clone(&slow)));
        }
        let mut tcp = hickory_server::Server::new(handler);
        tcp.register_listener(
            tcp_listener(listen).with_context(|| format!("DNS: binding TCP {listen}"))?,
            TCP_IDLE,
            16,
        );
        Ok(Self { udp, tcp })
    }

    pub async fn shutdown(&mut self) {
        self.udp.shutdown().await;
        if let Err(e) = self.tcp.shutdown_gracefully().await {
            debug!("DNS: TCP server: {e}");
        }
    }
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
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn udp_socket(listen: SocketAddr) -> Result<UdpSocket> {
    let socket = socket(listen, Type::DGRAM)?;
    socket.set_reuse_port(true)?;
    // best effort: the kernel caps it at net.core.rmem_max
    let _ = socket.set_recv_buffer_size(UDP_RCVBUF);
    socket.bind(&listen.into())?;
    Ok(UdpSocket::from_std(socket.into())?)
}

fn tcp_listener(listen: SocketAddr) -> Result<TcpListener> {
    let socket = socket(listen, Type::STREAM)?;
    socket.bind(&listen.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

async fn serve_udp(socket: Arc<UdpSocket>, handler: Handler, slow: Arc<Semaphore>) {
    let mut buf = vec![0u8; MAX_QUERY];
    let mut out = Vec::with_capacity(MAX_QUERY);
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier sends surface here; they concern that client only
                debug!("DNS: UDP receive: {e}");
                continue;
            }
        };
        let packet = &buf[..len];
        let fast = if handler.allow.load().allows(src.ip()) {
            wire::answer(&handler.table.load(), packet, &mut out)
        } else {
            Fast::Slow
        };
        match fast {
            Fast::Reply => {
                if let Err(e) = socket.send_to(&out, src).await {
                    debug!("DNS: UDP send to {src}: {e}");
                }
            }
            Fast::Drop => {}
            Fast::Slow => {
                let Ok(permit) = Arc::clone(&slow).try_acquire_owned() else {
                    // debug, not warn: under a flood this line would be the flood
                    debug!("DNS: {MAX_SLOW_IN_FLIGHT} queries in flight; dropping one from {src}");
                    continue;
                };
                let (packet, handler, socket) = (packet.to_vec(), handler.clone(), Arc::clone(&socket));
                tokio::spawn(async move {
                    answer_slow(packet, src, handler, socket).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn answer_slow(packet: Vec<u8>, src: SocketAddr, handler: Handler, socket: Arc<UdpSocket>) {
    let formerr = wire::formerr(&packet);
    let request = match Request::from_bytes(packet, src, Protocol::Udp) {
        Ok(request) => request,
        Err(e) => {
            debug!("DNS: malformed query from {src}: {e}");
            if let Some(reply) = formerr {
                let _ = socket.send_to(&reply, src).await;
            }
            return;
        }
    };
    let max_payload = request.max_payload();
    handler.handle_request::<_, TokioTime>(&request, UdpResponder { socket, dst: src, max_payload }).await;
}

/// Sends hickory's responses on the UDP socket the query came in on, within the client's payload size.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
    max_payload: u16,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_udp(response, self.max_payload).ok_or("encoding the response")?;
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}
