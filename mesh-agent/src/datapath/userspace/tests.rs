//! The proxy end to end on loopback: real sockets, backends on 127.0.0.1, VIPs elsewhere in 127/8 (all local), one
//! VIP per test so tests run in parallel. Timeouts only guard against hangs; nothing asserts a duration.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::*;
use crate::lb::{Policy, Strategy};

const PORT: u16 = 7000;

/// Proxy threads: more than one, so connections spread over listeners of the same frontend.
const THREADS: u16 = 2;

fn vip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 42, 0, n))
}

fn frontend(n: u8, protocol: Protocol) -> Frontend {
    Frontend { vip: vip(n), port: PORT, protocol }
}

fn spec(backends: &[SocketAddr]) -> FrontendSpec {
    FrontendSpec {
        service: ServiceId { namespace: "default".into(), name: "web".into() },
        policy: Policy { strategy: Strategy::RoundRobin, affinity: None },
        backends: backends.into(),
    }
}

fn upsert(dp: &mut UserspaceDatapath, frontend: Frontend, backends: &[SocketAddr]) {
    dp.apply(&[Change::Upsert(frontend, spec(backends))]).unwrap();
}

fn stats_of(dp: &UserspaceDatapath, frontend: Frontend) -> FrontendStats {
    dp.stats().into_iter().find(|(f, _)| *f == frontend).expect("frontend has stats").1
}

/// Fails the test instead of hanging it.
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut).await.unwrap_or_else(|_| panic!("{what} hung"))
}

/// Polls `cond` until it holds (state that settles on another task).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

fn addr(frontend: Frontend) -> SocketAddr {
    SocketAddr::new(frontend.vip, frontend.port)
}

/// A TCP backend that answers every connection with `tag` and closes.
async fn tagged_backend(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move { conn.write_all(tag.as_bytes()).await });
        }
    });
    addr
}

/// A TCP backend that echoes until EOF, then half-closes. Its listen backlog is the proxy's (tokio's default 1,024
/// overflowed under 1,000 concurrent connections and the kernel reset some of them).
async fn echo_backend() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = conn.into_split();
                tokio::io::copy(&mut read, &mut write).await?;
                write.shutdown().await
            });
        }
    });
    addr
}

/// An address nobody listens on: connecting to it is refused. The socket bound there without listening keeps
/// the port from being handed to another test's listener while the returned guard lives.
fn refusing_backend() -> (SocketAddr, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
    (socket.local_addr().unwrap().as_socket().unwrap(), socket)
}

async fn fetch(addr: SocketAddr) -> io::Result<String> {
    let mut conn = TcpStream::connect(addr).await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Sends `data`, half-closes, and returns everything read until EOF.
async fn exchange(addr: SocketAddr, data: &[u8]) -> io::Result<Vec<u8>> {
    let (mut read, mut write) = TcpStream::connect(addr).await?.into_split();
    let send = async {
        write.write_all(data).await?;
        write.shutdown().await
    };
    let mut received = Vec::new();
    tokio::try_join!(send, read.read_to_end(&mut received))?;
    Ok(received)
}

/// The inodes of the sockets listening on `addr`, from /proc/net/tcp: the same inodes mean the same sockets.
fn listener_inodes(addr: SocketAddr) -> Vec<u64> {
    let IpAddr::V4(ip) = addr.ip() else { unreachable!("the tests use IPv4") };
    let local = format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), addr.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<_> = line.split_whitespace().collect();
            (fields[1] == local && fields[3] == "0A").then(|| fields[9].parse().unwrap())
        })
        .collect();
    inodes.sort_unstable();
    inodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_robin_alternates_over_two_backends() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(1, Protocol::Tcp);
    let (a, b) = (tagged_backend("a").await, tagged_backend("b").await);
    upsert(&mut dp, fe, &[a, b]);
    let mut answers = String::new();
    for _ in 0..6 {
        answers += &bounded("fetch", fetch(addr(fe))).await.unwrap();
    }
    assert_eq!(answers, "ababab");
    let stats = stats_of(&dp, fe);
    assert_eq!(stats.connections, 6);
    assert_eq!(stats.backends.iter().map(|b| (b.backend, b.selected)).collect::<Vec<_>>(), [(a, 3), (b, 3)]);
    assert_eq!(dp.status().mode, "userspace");
    assert_eq!(dp.status().frontends, 1);
}

/// No proxy thread runs before a TCP frontend has a listener (on an eBPF node, the kernel serves them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_threads_start_with_the_first_tcp_listener() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let tcp_why = |dp: &UserspaceDatapath| dp.status().features.into_iter().find(|f| f.feature == "tcp").unwrap().why;
    let (udp, tcp) = (frontend(14, Protocol::Udp), frontend(14, Protocol::Tcp));
    upsert(&mut dp, udp, &[udp_backend("u").await]);
    upsert(&mut dp, tcp, &[]);
    assert!(!dp.spawner.workers.started());
    assert!(tcp_why(&dp).contains(&format!("on {THREADS} thread(s) from its first TCP frontend")), "{}", tcp_why(&dp));
    upsert(&mut dp, tcp, &[tagged_backend("a").await]);
    assert!(dp.spawner.workers.started());
    assert!(tcp_why(&dp).starts_with(&format!("splice(2) proxy on {THREADS} thread(s),")), "{}", tcp_why(&dp));
    assert_eq!(listener_inodes(addr(tcp)).len(), usize::from(THREADS));
    assert_eq!(bounded("fetch", fetch(addr(tcp))).await.unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_refused_backend_is_skipped() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(2, Protocol::Tcp);
    let ((dead, _guard), live) = (refusing_backend(), tagged_backend("live").await);
    upsert(&mut dp, fe, &[dead, live]);
    for _ in 0..4 {
        assert_eq!(bounded("fetch", fetch(addr(fe))).await.unwrap(), "live");
    }
    let stats = stats_of(&dp, fe);
    assert_eq!(stats.failures, 0);
    // Round robin picks the dead backend for every other connection; each time the next one takes over.
    assert_eq!(stats.backends[0].connect_failures, 2);
    assert_eq!(stats.backends[1].connect_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_without_backends_refuses() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(3, Protocol::Tcp);
    upsert(&mut dp, fe, &[]);
    let err = bounded("connect", TcpStream::connect(addr(fe))).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert!(!stats_of(&dp, fe).listening);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_all_backends_down_resets_the_client() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(4, Protocol::Tcp);
    let ((one, _one), (two, _two)) = (refusing_backend(), refusing_backend());
    upsert(&mut dp, fe, &[one, two]);
    let err = bounded("fetch", fetch(addr(fe))).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let stats = stats_of(&dp, fe);
    assert_eq!(stats.failures, 1);
    assert_eq!(stats.backends.iter().map(|b| b.connect_failures).sum::<u64>(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_update_switches_backends_on_the_same_listener() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(5, Protocol::Tcp);
    let (a, b) = (tagged_backend("a").await, tagged_backend("b").await);
    upsert(&mut dp, fe, &[a]);
    assert_eq!(bounded("fetch", fetch(addr(fe))).await.unwrap(), "a");
    // A listener per proxy thread, kept across the update.
    let inodes = listener_inodes(addr(fe));
    assert_eq!(inodes.len(), usize::from(THREADS));
    upsert(&mut dp, fe, &[b]);
    assert_eq!(listener_inodes(addr(fe)), inodes);
    for _ in 0..3 {
        assert_eq!(bounded("fetch", fetch(addr(fe))).await.unwrap(), "b");
    }
    assert_eq!(stats_of(&dp, fe).connections, 4);
}

/// Frontends listen on every proxy thread while the listeners stay within [`SPREAD_LISTENERS`], past it on one; a
/// removed frontend's listeners count no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frontends_past_the_listener_budget_listen_on_one_thread() {
    raise_fd_limit();
    let threads = usize::from(THREADS);
    let mut dp = UserspaceDatapath::new(THREADS);
    let backend = tagged_backend("ok").await;
    let tcp = |i: usize| Frontend {
        vip: IpAddr::V4(Ipv4Addr::new(127, 43, (i / 250) as u8, (i % 250 + 1) as u8)),
        port: PORT,
        protocol: Protocol::Tcp,
    };
    let spread = SPREAD_LISTENERS / threads;
    let changes: Vec<_> = (0..spread + 2).map(|i| Change::Upsert(tcp(i), spec(&[backend]))).collect();
    dp.apply(&changes).unwrap();
    assert_eq!(listener_inodes(addr(tcp(0))).len(), threads);
    assert_eq!(listener_inodes(addr(tcp(spread - 1))).len(), threads);
    for late in [spread, spread + 1] {
        assert_eq!(listener_inodes(addr(tcp(late))).len(), 1);
        assert_eq!(bounded("fetch", fetch(addr(tcp(late)))).await.unwrap(), "ok");
    }
    // The two single listeners are over the budget: removing two spread frontends makes room for one.
    dp.apply(&[Change::Remove(tcp(0)), Change::Remove(tcp(1))]).unwrap();
    upsert(&mut dp, tcp(spread + 2), &[backend]);
    assert_eq!(listener_inodes(addr(tcp(spread + 2))).len(), threads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_remove_closes_the_listener_and_lets_connections_finish() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(6, Protocol::Tcp);
    upsert(&mut dp, fe, &[echo_backend().await]);
    let mut open = bounded("connect", TcpStream::connect(addr(fe))).await.unwrap();
    // A round trip first: a connection still in the accept queue would be reset with the listener.
    open.write_all(b"before").await.unwrap();
    let mut before = [0u8; 6];
    bounded("read", open.read_exact(&mut before)).await.unwrap();
    assert_eq!(&before, b"before");

    dp.apply(&[Change::Remove(fe)]).unwrap();
    assert_eq!(listener_inodes(addr(fe)), Vec::<u64>::new());
    let err = bounded("connect", TcpStream::connect(addr(fe))).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert!(dp.stats().is_empty());

    open.write_all(b" and after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut echoed = String::new();
    bounded("read", open.read_to_string(&mut echoed)).await.unwrap();
    assert_eq!(echoed, " and after");

    // Closed synchronously, so the same VIP:port binds again at once.
    upsert(&mut dp, fe, &[tagged_backend("again").await]);
    assert_eq!(bounded("fetch", fetch(addr(fe))).await.unwrap(), "again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_emptied_frontend_refuses_then_listens_again() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(7, Protocol::Tcp);
    let a = tagged_backend("a").await;
    upsert(&mut dp, fe, &[a]);
    upsert(&mut dp, fe, &[]);
    let err = bounded("connect", TcpStream::connect(addr(fe))).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    upsert(&mut dp, fe, &[a]);
    assert_eq!(bounded("fetch", fetch(addr(fe))).await.unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_failure_names_the_frontend_and_others_still_apply() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let (busy, fine) = (frontend(8, Protocol::Tcp), frontend(9, Protocol::Tcp));
    let _squatter = std::net::TcpListener::bind(addr(busy)).unwrap();
    let backend = tagged_backend("ok").await;
    let err = dp.apply(&[Change::Upsert(busy, spec(&[backend])), Change::Upsert(fine, spec(&[backend]))]).unwrap_err();
    assert!(err.to_string().contains("127.42.0.8:7000/TCP"), "{err}");
    assert_eq!(bounded("fetch", fetch(addr(fine))).await.unwrap(), "ok");
    assert_eq!(dp.stats().into_iter().map(|(f, _)| f).collect::<Vec<_>>(), [fine]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_large_transfer_is_spliced_byte_exact_both_ways() {
    const SIZE: usize = 64 << 20;
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(10, Protocol::Tcp);
    upsert(&mut dp, fe, &[echo_backend().await]);
    let mut rng = fastrand::Rng::with_seed(7);
    let data: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(SIZE).collect();
    let echoed = bounded("transfer", exchange(addr(fe), &data)).await.unwrap();
    assert!(echoed == data, "echo differs ({} of {SIZE} bytes back)", echoed.len());
    let stats = stats_of(&dp, fe);
    assert_eq!((stats.bytes_in, stats.bytes_out), (SIZE as u64, SIZE as u64));
    // Both directions went through a pipe, and both pipes came back to the pool.
    assert_eq!(dp.spawner.pipes.idle(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_small_exchanges_are_copied_without_pipes() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(11, Protocol::Tcp);
    upsert(&mut dp, fe, &[echo_backend().await]);
    for i in 0..20 {
        let message = format!("request {i}");
        assert_eq!(bounded("exchange", exchange(addr(fe), message.as_bytes())).await.unwrap(), message.as_bytes());
    }
    assert_eq!(dp.spawner.pipes.idle(), 0);
}

/// When a backend's last bytes and its FIN reach the proxy together, the client gets them together too: one segment
/// carrying both, not the data and then a FIN of its own (what a backend closing after its response, HTTP's
/// `Connection: close`, costs per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_last_bytes_and_fin_reach_the_client_in_one_segment() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            // MSG_MORE holds the bytes until the shutdown adds the FIN: they leave as one segment.
            let conn = socket2::Socket::from(conn.unwrap());
            conn.send_with_flags(b"goodbye", libc::MSG_MORE).unwrap();
            conn.shutdown(std::net::Shutdown::Write).unwrap();
        }
    });
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(13, Protocol::Tcp);
    upsert(&mut dp, fe, &[backend]);
    let mut client = TcpStream::connect(addr(fe)).await.unwrap();
    let mut answer = String::new();
    bounded("answer", client.read_to_string(&mut answer)).await.unwrap();
    assert_eq!(answer, "goodbye");
    // The SYN-ACK, then the bytes with the FIN.
    assert_eq!(segments_received(&client), 2);
}

/// Segments `stream` has received so far (TCP_INFO).
fn segments_received(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes and `len` holds the size of `info`.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info.tcpi_segs_in
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_thousand_concurrent_connections_complete() {
    const N: usize = 1000;
    raise_fd_limit();
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(12, Protocol::Tcp);
    upsert(&mut dp, fe, &[echo_backend().await, echo_backend().await]);
    let clients: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(async move {
                let message = format!("client {i}");
                let echoed = exchange(addr(fe), message.as_bytes()).await.unwrap();
                assert_eq!(echoed, message.as_bytes());
            })
        })
        .collect();
    bounded("clients", async {
        for client in clients {
            client.await.unwrap();
        }
    })
    .await;
    let stats = stats_of(&dp, fe);
    assert_eq!(stats.connections, N as u64);
    assert_eq!(stats.failures, 0);
    eventually("connections closed", || stats_of(&dp, fe).active == 0).await;
}

/// 1,000 proxied connections hold ~4,000 descriptors in this process; a default soft limit of 1,024 would fail
/// the test for the wrong reason.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A UDP backend answering each datagram with `tag|peer|payload`, peer being the address it came from.
async fn udp_backend(tag: &'static str) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let reply = format!("{tag}|{peer}|{}", String::from_utf8_lossy(&buf[..n]));
            let _ = socket.send_to(reply.as_bytes(), peer).await;
        }
    });
    addr
}

/// Sends `payload` to `to` and returns the reply's parts (tag, flow address, payload) and where it came from.
async fn udp_ask(client: &UdpSocket, to: SocketAddr, payload: &str) -> (String, String, String, SocketAddr) {
    client.send_to(payload.as_bytes(), to).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = bounded("reply", client.recv_from(&mut buf)).await.unwrap();
    let reply = String::from_utf8(buf[..n].to_vec()).unwrap();
    let mut parts = reply.splitn(3, '|').map(str::to_owned);
    let mut next = || parts.next().unwrap();
    (next(), next(), next(), from)
}

async fn udp_client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Waits until a socket connected to `addr` gets ICMP port unreachable, i.e. nothing is bound there any more.
async fn udp_until_refused(addr: SocketAddr) {
    let probe = udp_client().await;
    probe.connect(addr).await.unwrap();
    bounded("port closes", async {
        loop {
            let mut buf = [0u8; 64];
            let refused = match probe.send(b"probe").await {
                Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
                Ok(_) => matches!(
                    tokio::time::timeout(Duration::from_millis(50), probe.recv(&mut buf)).await,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused
                ),
            };
            if refused {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_replies_come_from_the_vip() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(20, Protocol::Udp);
    upsert(&mut dp, fe, &[udp_backend("a").await]);
    let client = udp_client().await;
    for i in 0..3 {
        let (tag, _, payload, from) = udp_ask(&client, addr(fe), &format!("ping {i}")).await;
        assert_eq!((tag.as_str(), payload), ("a", format!("ping {i}")));
        assert_eq!(from, addr(fe));
    }
    let stats = stats_of(&dp, fe);
    assert_eq!((stats.connections, stats.active), (1, 1));
    assert!(stats.bytes_in > 0 && stats.bytes_out > stats.bytes_in);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_clients_get_flows_of_their_own() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(21, Protocol::Udp);
    upsert(&mut dp, fe, &[udp_backend("a").await, udp_backend("b").await]);
    let (one, two) = (udp_client().await, udp_client().await);
    let (tag_one, flow_one, _, _) = udp_ask(&one, addr(fe), "1").await;
    let (tag_two, flow_two, _, _) = udp_ask(&two, addr(fe), "2").await;
    assert_eq!((tag_one.as_str(), tag_two.as_str()), ("a", "b"));
    assert_ne!(flow_one, flow_two);
    // A flow keeps its backend and its socket.
    for _ in 0..3 {
        assert_eq!(udp_ask(&one, addr(fe), "1").await.0, "a");
        assert_eq!(udp_ask(&two, addr(fe), "2").await.1, flow_two);
    }
    let stats = stats_of(&dp, fe);
    assert_eq!((stats.connections, stats.active), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_idle_flows_expire() {
    let mut dp = UserspaceDatapath::with_udp_idle_timeout(THREADS, Duration::from_millis(200));
    let fe = frontend(22, Protocol::Udp);
    upsert(&mut dp, fe, &[udp_backend("a").await]);
    let client = udp_client().await;
    let (_, first_flow, _, _) = udp_ask(&client, addr(fe), "1").await;
    eventually("flow expires", || stats_of(&dp, fe).active == 0).await;
    udp_until_refused(first_flow.parse().unwrap()).await;
    let (tag, second_flow, _, _) = udp_ask(&client, addr(fe), "2").await;
    assert_eq!(tag, "a");
    assert_ne!(first_flow, second_flow);
    assert_eq!(stats_of(&dp, fe).connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_without_backends_drops_and_counts() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(23, Protocol::Udp);
    upsert(&mut dp, fe, &[]);
    let client = udp_client().await;
    client.send_to(b"lost", addr(fe)).await.unwrap();
    eventually("drop counted", || stats_of(&dp, fe).failures == 1).await;
    assert_eq!(stats_of(&dp, fe).connections, 0);
    // The socket stayed bound: backends arriving later serve the same client at once.
    upsert(&mut dp, fe, &[udp_backend("late").await]);
    assert_eq!(udp_ask(&client, addr(fe), "again").await.0, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_remove_closes_the_socket_and_its_flows() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let fe = frontend(24, Protocol::Udp);
    upsert(&mut dp, fe, &[udp_backend("a").await]);
    let client = udp_client().await;
    let (_, flow, _, _) = udp_ask(&client, addr(fe), "1").await;
    dp.apply(&[Change::Remove(fe)]).unwrap();
    udp_until_refused(addr(fe)).await;
    udp_until_refused(flow.parse().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counters_handle_reads_each_change_and_the_traffic_since_when_asked() {
    let mut dp = UserspaceDatapath::new(THREADS);
    let counters = dp.counters();
    assert!(counters.read().is_empty());
    let fe = frontend(25, Protocol::Tcp);
    upsert(&mut dp, fe, &[tagged_backend("live").await]);
    for _ in 0..3 {
        assert_eq!(bounded("fetch", fetch(addr(fe))).await.unwrap(), "live");
    }
    // Nothing copies the counters out between the fetches and this read: the handle reads the frontend's own.
    let read = counters.read();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].0, fe);
    assert!(read[0].1.listening);
    assert_eq!(read[0].1.connections, 3);
    assert_eq!(read[0].1.backends.iter().map(|b| b.selected).sum::<u64>(), 3);

    dp.stop_accepting();
    assert!(!counters.read()[0].1.listening);
    dp.apply(&[Change::Remove(fe)]).unwrap();
    assert!(counters.read().is_empty());
}
