//! The UDP loop: a thread per SO_REUSEPORT socket that takes queries in batches with recvmmsg(2), answers the hot
//! path in place and sends the answers back with one sendmmsg(2) — two system calls per batch, and no async runtime
//! between the socket and the table (measured: tokio's wake-ups cost more CPU per query than dnsmasq spends in all).
//! Queries the hot path leaves go to the hickory handler as tasks on the runtime.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tracing::debug;

use super::handler::{encode_udp, Handler};
use super::stats::{Dropped, Shard, Source};
use super::wire::{self, Fast};

/// Queries taken per recvmmsg.
const BATCH: usize = 32;
/// Large enough for any query; a longer datagram is cut and then fails to parse (FORMERR).
const MAX_QUERY: usize = 4096;
/// Queries waiting on hickory (mostly on an upstream) at once; beyond this, UDP queries are dropped, as a loaded
/// resolver does, rather than piling up tasks.
const MAX_SLOW_IN_FLIGHT: usize = 1024;

/// What the loops share: the handler, the runtime for slow queries and their bound, and the stop flag.
pub struct Shared {
    pub handler: Handler,
    pub runtime: Handle,
    pub stop: AtomicBool,
    slow: Arc<Semaphore>,
}

impl Shared {
    pub fn new(handler: Handler, runtime: Handle) -> Self {
        Self { handler, runtime, stop: AtomicBool::new(false), slow: Arc::new(Semaphore::new(MAX_SLOW_IN_FLIGHT)) }
    }
}

/// Buffers for one batch, allocated once per loop.
struct Batch {
    bufs: Vec<[u8; MAX_QUERY]>,
    addrs: Vec<libc::sockaddr_storage>,
    /// Length of each address, kept apart from the msghdrs, which sending reuses.
    addr_lens: Vec<libc::socklen_t>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    replies: Vec<Vec<u8>>,
    /// Which received queries have a reply in `replies`.
    answered: Vec<usize>,
}

impl Batch {
    fn new() -> Self {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let (addr, iov, msg) = unsafe { (zeroed(), zeroed(), zeroed()) };
        Self {
            bufs: vec![[0; MAX_QUERY]; BATCH],
            addrs: vec![addr; BATCH],
            addr_lens: vec![0; BATCH],
            iovs: vec![iov; BATCH],
            msgs: vec![msg; BATCH],
            replies: (0..BATCH).map(|_| Vec::with_capacity(MAX_QUERY)).collect(),
            answered: Vec::with_capacity(BATCH),
        }
    }

    /// Blocks until at least one query is there (or the socket's receive timeout passes), then takes what is queued.
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: MAX_QUERY };
            let hdr = &mut self.msgs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
        }
        // SAFETY: every msghdr points at a live buffer and address of this batch, sized as declared.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.addr_lens[i] = self.msgs[i].msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    fn source(&self, i: usize) -> Option<SocketAddr> {
        let addr = &self.addrs[i];
        let len = self.addr_lens[i] as usize;
        match i32::from(addr.ss_family) {
            libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in there (family and length checked).
                let sin = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the kernel wrote a sockaddr_in6 there (family and length checked).
                let sin6 = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let port = u16::from_be(sin6.sin6_port);
                Some(SocketAddr::V6(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id)))
            }
            _ => None,
        }
    }

    /// Sends every reply to the address its query came from. Replies the kernel refuses are dropped, as a lost
    /// datagram would be; the client retries.
    fn send(&mut self, socket: &UdpSocket) {
        let mut sent = 0;
        while sent < self.answered.len() {
            let count = self.answered.len() - sent;
            for (k, &i) in self.answered[sent..].iter().enumerate() {
                // the query's msghdr is reused for its reply: same peer address, the iovec now on the reply
                self.iovs[i] =
                    libc::iovec { iov_base: self.replies[i].as_mut_ptr().cast(), iov_len: self.replies[i].len() };
                self.msgs[k].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                self.msgs[k].msg_hdr.msg_namelen = self.addr_lens[i];
                self.msgs[k].msg_hdr.msg_iov = &mut self.iovs[i];
                self.msgs[k].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: the first `count` msghdrs point at live replies and addresses.
            let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), self.msgs.as_mut_ptr(), count as libc::c_uint, 0) };
            if n <= 0 {
                debug!("DNS: UDP send: {}", io::Error::last_os_error());
                sent += 1;
            } else {
                sent += n as usize;
            }
        }
        self.answered.clear();
    }
}

/// Serves `socket` as UDP thread `index` until `shared.stop` is set; the socket's receive timeout bounds how long
/// that takes to notice.
pub fn serve(socket: Arc<UdpSocket>, shared: Arc<Shared>, index: usize) {
    let mut batch = Batch::new();
    let stats = shared.handler.stats.udp(index);
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match batch.recv(&socket) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                // ICMP errors of earlier sends surface here; they concern that client only
                debug!("DNS: UDP receive: {e}");
                continue;
            }
        };
        let received = Instant::now();
        let table = shared.handler.table.load();
        let allow = shared.handler.allow.load();
        // hot-path replies per response code, counted once per batch
        let mut rcodes = [0u64; 16];
        for i in 0..n {
            let Some(src) = batch.source(i) else { continue };
            let packet = &batch.bufs[i][..batch.msgs[i].msg_len as usize];
            let fast =
                if allow.allows(src.ip()) { wire::answer(&table, packet, &mut batch.replies[i]) } else { Fast::Slow };
            match fast {
                Fast::Reply => {
                    rcodes[usize::from(batch.replies[i][3] & 0x0f)] += 1;
                    batch.answered.push(i);
                }
                Fast::Drop => stats.dropped(Dropped::Malformed),
                Fast::Slow => slow(&shared, stats, &socket, packet, src, received),
            }
        }
        batch.send(&socket);
        // the batch's replies leave together, each after waiting since the batch was read
        let latency = received.elapsed();
        for (rcode, &count) in rcodes.iter().enumerate().filter(|(_, &count)| count > 0) {
            stats.answered(Source::Local, rcode as u16, count, latency);
        }
    }
}

fn slow(shared: &Shared, stats: &Shard, socket: &Arc<UdpSocket>, packet: &[u8], src: SocketAddr, received: Instant) {
    let Ok(permit) = Arc::clone(&shared.slow).try_acquire_owned() else {
        // debug, not warn: under a flood this line would be the flood
        debug!("DNS: {MAX_SLOW_IN_FLIGHT} queries in flight; dropping one from {src}");
        stats.dropped(Dropped::Overloaded);
        return;
    };
    let (packet, handler, socket) = (packet.to_vec(), shared.handler.clone(), Arc::clone(socket));
    shared.runtime.spawn(async move {
        answer_slow(packet, src, handler, socket, received).await;
        drop(permit);
    });
}

/// Answers a query the hot path left and counts it, timed from when its batch was read.
async fn answer_slow(packet: Vec<u8>, src: SocketAddr, handler: Handler, socket: Arc<UdpSocket>, received: Instant) {
    let stats = handler.stats.shared();
    let formerr = wire::formerr(&packet);
    let request = match Request::from_bytes(packet, src, Protocol::Udp) {
        Ok(request) => request,
        Err(e) => {
            debug!("DNS: malformed query from {src}: {e}");
            match formerr {
                Some(reply) => {
                    if socket.send_to(&reply, src).is_ok() {
                        stats.answered(Source::Local, 1, 1, received.elapsed());
                    }
                }
                None => stats.dropped(Dropped::Malformed),
            }
            return;
        }
    };
    let max_payload = request.max_payload();
    let responder = UdpResponder { socket, dst: src, max_payload };
    let (source, info) = handler.respond::<_, TokioTime>(&request, responder).await;
    stats.answered(source, info.response_code.into(), 1, received.elapsed());
}

/// Sends hickory's responses on the UDP socket the query came in on, within the client's payload size. The socket is
/// blocking (for the loop's sake), but a UDP send only waits when the send buffer is full, which a DNS server's
/// replies do not fill.
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
        self.socket.send_to(&bytes, self.dst)?;
        Ok(info)
    }
}
