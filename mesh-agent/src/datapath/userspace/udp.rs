//! UDP frontends: one flow per client address, i.e. a socket connected to the backend chosen for that client and a
//! task relaying the backend's replies to the client from the VIP socket, so they come from VIP:port as the client
//! expects. Flows end after [`IDLE_TIMEOUT`] without traffic either way.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, Type};
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use super::stats::bump;
use super::FrontendState;

/// A flow ends after this long without a datagram either way. UDP has no close, so idleness is the only end there
/// is. Like conntrack's `nf_conntrack_udp_timeout` (30 s): request/response protocols (DNS) finish in milliseconds,
/// long-lived ones (QUIC, RTP, WireGuard keepalives) send more often than that, so mostly flows whose client left
/// expire; a shorter timeout would move a live but quiet client to another backend.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Flows per frontend. Each holds a descriptor; new clients beyond this are dropped rather than evicting live flows,
/// so a flood of spoofed sources cannot take a frontend away from its real clients.
const MAX_FLOWS: usize = 4096;

/// The largest UDP payload (over IPv6 jumbograms aside).
const MAX_DATAGRAM: usize = 65_535;

/// Must run inside the runtime (the socket registers with its reactor).
pub(super) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = super::socket(addr, Type::DGRAM)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Serves datagrams to the VIP until aborted; aborting drops the flow table and with it every flow.
pub(super) async fn serve(vip: UdpSocket, frontend: Arc<FrontendState>, idle: Duration) {
    let mut flows = Flows { vip: Arc::new(vip), frontend, idle, table: HashMap::new(), epoch: Instant::now() };
    let mut sweep = tokio::time::interval(idle / 4);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = flows.vip.readable() => match ready {
                Ok(()) => flows.receive(),
                Err(e) => {
                    warn!(error = %e, "UDP frontend socket failed");
                    return;
                }
            },
            _ = sweep.tick() => flows.expire(),
        }
    }
}

struct Flows {
    vip: Arc<UdpSocket>,
    frontend: Arc<FrontendState>,
    idle: Duration,
    table: HashMap<SocketAddr, Flow>,
    /// Flow activity is kept as milliseconds since this instant, to fit an atomic shared with the relay task.
    epoch: Instant,
}

/// One client's flow. Dropping it stops the relay task, which closes the backend socket.
struct Flow {
    backend: Arc<UdpSocket>,
    last_seen: Arc<AtomicU64>,
    relay: AbortHandle,
}

impl Flow {
    /// The relay ends by itself when the backend socket fails (an ICMP unreachable from a backend that went away);
    /// the client's next datagram then opens a new flow, to a backend picked afresh.
    fn is_alive(&self) -> bool {
        !self.relay.is_finished()
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

impl Flows {
    /// Forwards one datagram, if one is waiting, to its client's flow.
    fn receive(&mut self) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let (n, client) = match self.vip.try_recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!(error = %e, "UDP receive");
                return;
            }
        };
        let frontend = Arc::clone(&self.frontend);
        if !frontend.admits(client.ip()) {
            return;
        }
        let counters = &frontend.counters;
        let now = millis_since(self.epoch);
        let Some(flow) = self.flow(client) else {
            bump(&counters.failures, 1);
            return;
        };
        match send_now(&flow.backend, &buf[..n], None) {
            Ok(_) => {
                flow.last_seen.store(now, Ordering::Relaxed);
                bump(&counters.bytes_in, n);
            }
            Err(e) => {
                debug!(%client, error = %e, "UDP send to backend");
                bump(&counters.failures, 1);
            }
        }
    }

    /// The client's live flow, opened if needed; `None` when there is no backend or no room.
    fn flow(&mut self, client: SocketAddr) -> Option<&Flow> {
        if !self.table.get(&client).is_some_and(Flow::is_alive) {
            self.table.remove(&client);
            if self.table.len() >= MAX_FLOWS {
                self.expire();
            }
            if self.table.len() >= MAX_FLOWS {
                return None;
            }
            let flow = self.open(client)?;
            self.table.insert(client, flow);
            bump(&self.frontend.counters.connections, 1);
            self.frontend.counters.set_active(self.table.len());
        }
        self.table.get(&client)
    }

    fn open(&self, client: SocketAddr) -> Option<Flow> {
        let route = self.frontend.route.load();
        let backend = route.pick(client.ip())?;
        let socket = match connect(backend) {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                debug!(%backend, error = %e, "UDP flow socket");
                route.connect_failed(backend);
                return None;
            }
        };
        let last_seen = Arc::new(AtomicU64::new(millis_since(self.epoch)));
        let relay = tokio::spawn(relay(
            Arc::clone(&socket),
            Arc::clone(&self.vip),
            client,
            Arc::clone(&last_seen),
            Arc::clone(&self.frontend),
            self.epoch,
        ));
        Some(Flow { backend: socket, last_seen, relay: relay.abort_handle() })
    }

    /// Drops flows idle for longer than the idle timeout, and those whose relay has ended.
    fn expire(&mut self) {
        let cutoff = millis_since(self.epoch).saturating_sub(self.idle.as_millis() as u64);
        self.table.retain(|_, flow| flow.is_alive() && flow.last_seen.load(Ordering::Relaxed) >= cutoff);
        self.frontend.counters.set_active(self.table.len());
    }
}

/// A socket connected to `backend` from an ephemeral port, so the kernel filters out datagrams from anyone else
/// and reports ICMP errors for it.
fn connect(backend: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Relays the backend's datagrams to `client` from the VIP socket until the backend socket fails or the flow is
/// dropped.
async fn relay(
    backend: Arc<UdpSocket>,
    vip: Arc<UdpSocket>,
    client: SocketAddr,
    last_seen: Arc<AtomicU64>,
    frontend: Arc<FrontendState>,
    epoch: Instant,
) {
    let counters = &frontend.counters;
    loop {
        if let Err(e) = backend.readable().await {
            debug!(%client, error = %e, "UDP flow socket");
            return;
        }
        // On the poll stack, not in the task: a flow costs no buffer while it waits.
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = match backend.try_recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!(%client, error = %e, "UDP flow ended");
                return;
            }
        };
        match send_now(&vip, &buf[..n], Some(client)) {
            Ok(_) => {
                last_seen.store(millis_since(epoch), Ordering::Relaxed);
                bump(&counters.bytes_out, n);
            }
            Err(e) => {
                debug!(%client, error = %e, "UDP send to client");
                bump(&counters.failures, 1);
            }
        }
    }
}

/// Sends with one non-blocking syscall, bypassing tokio's readiness (a freshly registered socket has none yet).
/// A full socket buffer drops the datagram, as the network would: waiting would stall every other client.
fn send_now(socket: &UdpSocket, datagram: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let socket = SockRef::from(socket);
    match to {
        Some(to) => socket.send_to(datagram, &to.into()),
        None => socket.send(datagram),
    }
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}
