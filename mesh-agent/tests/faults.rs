//! The agent under failure: things break around it and it keeps its last good state, says what broke, and
//! recovers by itself where it can.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use support::agent::{catalog, Agent, Options};
use support::backend::{http_get, HttpBackend};
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
fn many_connections_leak_no_descriptors() {
    if !require_root("many_connections_leak_no_descriptors") {
        return;
    }
    let t = Topology::new();
    let _a = HttpBackend::start(&t.backends, "a", backend(0));
    let _b = HttpBackend::start(&t.backends, "b", backend(1));
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[backend(0), backend(1)]));
    // `ip netns exec` execs the agent, so the child's pid is the agent's.
    let pid = agent.pid().unwrap();
    assert!(get(&t).is_some(), "served before the load");
    let before = open_fds(pid);
    const ROUNDS: usize = 5;
    const CONCURRENT: usize = 2000;
    let ok = t.node.run(|| {
        let mut ok = 0;
        for _ in 0..ROUNDS {
            let conns: Vec<TcpStream> = (0..CONCURRENT)
                .filter_map(|_| TcpStream::connect_timeout(&vip(), Duration::from_secs(5)).ok())
                .collect();
            ok += conns.len();
        }
        ok
    });
    assert_eq!(ok, ROUNDS * CONCURRENT, "every connection accepted");
    let settled = wait_for(Duration::from_secs(10), || (open_fds(pid) <= before + 4).then_some(()));
    assert!(settled.is_some(), "descriptors before {before}, after {}", open_fds(pid));
}
