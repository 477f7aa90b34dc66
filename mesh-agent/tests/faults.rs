//! The agent under failure: things break around it and it keeps its last good state, says what broke, and
//! recovers by itself where it can.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::agent::{catalog, Agent, Options};
use support::backend::{http_get, HttpBackend, ServerProcess};
use support::load::{kill_under_load, Death, Load, CLIENTS};
use support::netns::{Topology, BACKEND_IPS};
use support::{require_root, wait_for};

const VIP: &str = "10.250.0.10";

fn backend(i: usize) -> SocketAddr {
    SocketAddr::new(BACKEND_IPS[i].parse().unwrap(), 8080)
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

fn get(t: &Topology) -> Option<String> {
    t.node.run(|| http_get(vip()).ok())
}

#[test]
fn edge0_deleted_behind_the_agents_back_is_recreated() {
    if !require_root("edge0_deleted_behind_the_agents_back_is_recreated") {
        return;
    }
    let t = Topology::new();
    let _b = HttpBackend::start(&t.backends, "a", backend(0));
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[backend(0)]));
    assert_eq!(get(&t).as_deref(), Some("a"));
    t.node.ip(&["link", "del", "edge0"]);
    let back = wait_for(Duration::from_secs(10), || get(&t).filter(|b| b == "a"));
    assert!(back.is_some(), "service not restored after edge0 was deleted");
    assert!(agent.log().contains("device disappeared"), "the agent says what happened");
}

#[test]
fn deleted_or_truncated_catalog_keeps_the_last_good_state() {
    if !require_root("deleted_or_truncated_catalog_keeps_the_last_good_state") {
        return;
    }
    let t = Topology::new();
    let _b = HttpBackend::start(&t.backends, "a", backend(0));
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[backend(0)]));
    std::fs::remove_file(agent.catalog_path()).unwrap();
    let reported = wait_for(Duration::from_secs(3), || agent.log().contains("missing").then_some(()));
    assert!(reported.is_some(), "deletion reported:\n{}", agent.log());
    assert_eq!(get(&t).as_deref(), Some("a"));
    // Half a file, as a crash mid-write leaves it.
    let full = catalog("web", VIP, &[backend(0)]);
    agent.write_catalog(&full[..full.len() / 3]);
    let (_, status) = wait_for(Duration::from_secs(3), || {
        let (code, body) = agent.get("/api/v1/status").ok()?;
        body.contains("lastError").then_some((code, body))
    })
    .expect("status answers");
    assert!(status.contains("catalog.yaml"), "{status}");
    assert_eq!(get(&t).as_deref(), Some("a"));
}

#[test]
fn unwritable_state_keeps_serving_and_says_so() {
    if !require_root("unwritable_state_keeps_serving_and_says_so") {
        return;
    }
    let t = Topology::new();
    let _b = HttpBackend::start(&t.backends, "a", backend(0));
    let dir = tempfile::tempdir().unwrap();
    // A directory where the allocation file goes: root ignores file modes, but not this.
    std::fs::create_dir_all(dir.path().join("state/vips.json")).unwrap();
    std::fs::write(dir.path().join("catalog.yaml"), catalog("web", "", &[backend(0)])).unwrap();
    let agent = Agent::start_in(&t.node, dir.path(), &Options::default());
    let vip = SocketAddr::new(agent.vip("default", "web"), 80);
    assert_eq!(t.node.run(move || http_get(vip).ok()).as_deref(), Some("a"));
    assert!(agent.log().contains("vips.json"), "the unwritable state file is named:\n{}", agent.log());
}

#[test]
fn exhausted_pool_is_reported_per_service() {
    if !require_root("exhausted_pool_is_reported_per_service") {
        return;
    }
    let t = Topology::new();
    let _b = HttpBackend::start(&t.backends, "a", backend(0));
    // A /30 holds two usable addresses.
    let text = ["one", "two", "three"].map(|n| catalog(n, "", &[backend(0)])).join("---\n");
    let options = Options { extra: "device:\n  vipPool: 10.250.7.0/30", ..Options::default() };
    let agent = Agent::start(&t.node, &options, &text);
    let services = agent.services();
    let errors: Vec<_> = services.as_array().unwrap().iter().filter_map(|s| s["vipError"].as_str()).collect();
    assert_eq!(errors.len(), 1, "{services}");
    assert!(errors[0].contains("exhausted"), "{errors:?}");
    let vip = SocketAddr::new(agent.vip("default", "one"), 80);
    assert_eq!(t.node.run(move || http_get(vip).ok()).as_deref(), Some("a"), "the others are served");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn up_to_ten_thousand_simultaneous_connections_leak_no_descriptors() {
    let test = "up_to_ten_thousand_simultaneous_connections_leak_no_descriptors";
    if !require_root(test) {
        return;
    }
    const WANT: usize = 10_000;
    // The agent holds two descriptors per proxied connection plus about 20 of its own (listeners, DNS, netlink,
    // epoll, health checks); it inherits this process's limit. This process holds the client ends only: the
    // backend is a process of its own.
    const AGENT_OWN: usize = 64;
    let limit = support::raise_fd_limit((2 * WANT + AGENT_OWN) as u64) as usize;
    let connections = WANT.min((limit - AGENT_OWN) / 2);
    if connections < WANT {
        eprintln!(
            "{test}: RLIMIT_NOFILE is {limit} and cannot be raised here (no CAP_SYS_RESOURCE): {connections} \
             connections, the most the agent's descriptors allow, instead of {WANT}"
        );
    }
    let t = Topology::new();
    // The proxy connects to the backend as fast as it accepts clients: room in the accept queue for all.
    t.backends.sysctl("net.core.somaxconn", "16384");
    let _echo = ServerProcess::echo(&t.backends, backend(0), 16_384);
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[backend(0)]));
    // `ip netns exec` execs the agent, so the child's pid is the agent's.
    let pid = agent.pid().unwrap();
    let before = open_fds(pid);
    let mut conns = t.node.run(move || {
        let connect = |i| TcpStream::connect_timeout(&vip(), Duration::from_secs(5)).map_err(|e| format!("#{i}: {e}"));
        (0..connections).map(connect).collect::<Result<Vec<_>, _>>()
    });
    let conns = conns.as_mut().expect("every connection accepted");
    // All open at once, each carries its own bytes to the backend and back.
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.write_all(format!("{i:05}").as_bytes()).unwrap();
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut echo = [0u8; 5];
        conn.read_exact(&mut echo).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(echo, *format!("{i:05}").as_bytes(), "connection {i} got another's bytes");
    }
    let peak = open_fds(pid);
    // A few of the agent's own descriptors come and go on their own (a health check's socket, a netlink
    // request), so either sample may hold one more or less than the connections account for.
    const TRANSIENT: usize = 4;
    assert!(peak + TRANSIENT >= before + 2 * connections, "the agent held {peak} descriptors, {before} before");
    conns.clear();
    let settled = wait_for(Duration::from_secs(30), || (open_fds(pid) <= before).then_some(()));
    assert!(settled.is_some(), "descriptors before {before}, at the peak {peak}, after {}", open_fds(pid));
}

/// Userspace: a connect that the dead backend refuses, or that times out, is retried on the next backend within
/// the same client connection, so new requests do not fail. Only requests in flight on the dead backend when it
/// died do: at most one per client loop, since each has one request in flight and its next connect is retried.
/// What the agent counts: no connection ran out of backends (proxy_failures 0), and the failed connects, as the
/// passive health reports that (with the active checks) took the backend out, shown `healthy: false`. The
/// per-backend `backend_connect_failures` is not asserted: the active checks may eject the backend before any
/// client connect to it failed, so zero is a correct count. The in-flight requests the death aborted are not
/// counted by the agent: the proxy passes the reset on.
fn backend_dies_under_load(test: &str, death: Death) {
    if !require_root(test) {
        return;
    }
    let t = Topology::new();
    let mut backends: Vec<ServerProcess> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| ServerProcess::http(&t.backends, name, backend(i)))
        .collect();
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[backend(0), backend(1), backend(2)]));
    let load = Load::start(t.node.command("python3"), vip());
    let outcome = kill_under_load(&agent, &t, &mut backends[2], death, load);
    outcome.assert_bounded("c", &["a", "b"], CLIENTS);
    let labels = format!("service=\"default/web\",frontend=\"{VIP}:80/TCP\"");
    let connections = format!("mesh_agent_proxy_connections_total{{{labels}}}");
    // Counters reach the registry with the reconciler's next one-second refresh.
    let counted = wait_for(Duration::from_secs(3), || {
        (agent.metric(&connections)? >= outcome.requests.len() as u64).then_some(())
    });
    assert!(counted.is_some(), "{} requests, {connections} {:?}", outcome.requests.len(), agent.metric(&connections));
    assert_eq!(agent.metric(&format!("mesh_agent_proxy_failures_total{{{labels}}}")), Some(0));
}

#[test]
fn backend_killed_mid_load_fails_only_in_flight_requests() {
    backend_dies_under_load("backend_killed_mid_load_fails_only_in_flight_requests", Death::Killed);
}

#[test]
fn backend_vanished_mid_load_fails_only_in_flight_requests() {
    backend_dies_under_load("backend_vanished_mid_load_fails_only_in_flight_requests", Death::Vanished);
}
