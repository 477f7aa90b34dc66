//! The whole agent on the userspace data path, end to end: real sockets, a real agent process, network
//! namespaces. Each test builds its own topology, so they run in parallel.

mod support;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use support::agent::{catalog, Agent, Options};
use support::backend::{http_get, HttpBackend, UdpEcho};
use support::netns::{Topology, BACKEND_IPS};
use support::{require_root, wait_for};

const VIP: &str = "10.250.0.10";

fn backend_addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(BACKEND_IPS[i].parse().unwrap(), port)
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

/// HTTP backends answering their names, backend i on BACKEND_IPS[i]:8080; they stop when the Vec drops.
fn http_backends<const N: usize>(t: &Topology, names: [&str; N]) -> (Vec<HttpBackend>, [SocketAddr; N]) {
    let addrs: [SocketAddr; N] = std::array::from_fn(|i| backend_addr(i, 8080));
    (names.iter().zip(addrs).map(|(name, addr)| HttpBackend::start(&t.backends, name, addr)).collect(), addrs)
}

/// GETs `addr` `n` times from the node namespace, each over a new connection; returns the answering backends.
fn get_many(t: &Topology, addr: SocketAddr, n: usize) -> Vec<String> {
    t.node.run(move || (0..n).map(|_| http_get(addr).expect("GET through the VIP")).collect())
}

#[test]
fn round_robin_alternates_exactly_over_two_backends() {
    if !require_root("round_robin_alternates_exactly_over_two_backends") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a, b]) = http_backends(&t, ["a", "b"]);
    let _agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a, b]));
    let answers = get_many(&t, vip(80), 10);
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "not alternating: {answers:?}");
    assert_eq!(answers.iter().filter(|b| *b == "a").count(), 5, "{answers:?}");
}

#[test]
fn random_reaches_both_backends() {
    if !require_root("random_reaches_both_backends") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a, b]) = http_backends(&t, ["a", "b"]);
    let options = Options { strategy: "Random", ..Options::default() };
    let _agent = Agent::start(&t.node, &options, &catalog("web", VIP, &[a, b]));
    let answers = get_many(&t, vip(80), 40);
    assert!(answers.contains(&"a".to_owned()) && answers.contains(&"b".to_owned()), "{answers:?}");
}

#[test]
fn curl_reaches_the_service() {
    if !require_root("curl_reaches_the_service") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a]) = http_backends(&t, ["a"]);
    let _agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a]));
    let out = t.node.command("curl").args(["-sS", "--max-time", "5", &format!("http://{VIP}/")]).output().unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a");
}

/// With health checks off nothing changes unless the catalog does: the agent applies its catalog once and then
/// rests (it once re-applied in a loop, at 60% of a CPU, when the checker's channel was closed).
#[test]
fn health_checks_off_apply_once_and_rest() {
    if !require_root("health_checks_off_apply_once_and_rest") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a]) = http_backends(&t, ["a"]);
    let options = Options { extra: "health: {enable: false}", ..Options::default() };
    let agent = Agent::start(&t.node, &options, &catalog("web", VIP, &[a]));
    assert_eq!(get_many(&t, vip(80), 2), ["a", "a"]);
    let applies = || agent.metric("mesh_agent_catalog_applies_total").expect("catalog_applies metric");
    let before = applies();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(applies(), before, "applies without a catalog change");
}

#[test]
fn removed_endpoint_stops_receiving_within_a_second() {
    if !require_root("removed_endpoint_stops_receiving_within_a_second") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a, b]) = http_backends(&t, ["a", "b"]);
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a, b]));
    assert_eq!(get_many(&t, vip(80), 2).len(), 2);
    agent.write_catalog(&catalog("web", VIP, &[a]));
    let applied = wait_for(Duration::from_secs(1), || {
        let eps = agent.services()[0]["endpoints"].as_array()?.len();
        (eps == 1).then_some(())
    });
    assert!(applied.is_some(), "catalog edit not applied within 1 s");
    let answers = get_many(&t, vip(80), 6);
    assert!(answers.iter().all(|b| b == "a"), "removed backend still used: {answers:?}");
}

#[test]
fn malformed_catalog_edit_keeps_the_old_service() {
    if !require_root("malformed_catalog_edit_keeps_the_old_service") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a]) = http_backends(&t, ["a"]);
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a]));
    agent.write_catalog("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: [{port: eighty}]\n");
    let reported = wait_for(Duration::from_secs(3), || {
        let (_, body) = agent.get("/api/v1/status").ok()?;
        body.contains("catalog.yaml").then_some(body)
    })
    .expect("the bad edit is reported in the status");
    assert!(reported.contains("line 6"), "error names the line: {reported}");
    assert_eq!(get_many(&t, vip(80), 3), ["a", "a", "a"]);
    assert!(agent.log().contains("catalog.yaml"), "error logged with the file");
}

#[test]
fn restart_keeps_the_pool_vip() {
    if !require_root("restart_keeps_the_pool_vip") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a]) = http_backends(&t, ["a"]);
    let text = format!("{}---\n{}", catalog("first", "", &[a]), catalog("web", "", &[a]));
    let mut agent = Agent::start(&t.node, &Options::default(), &text);
    let before = agent.vip("default", "web");
    assert_ne!(before, agent.vip("default", "first"));
    agent.stop().expect("clean exit on SIGTERM");
    // With "first" gone, a fresh allocation would hand its address to "web"; the persisted one must win.
    std::fs::write(agent.catalog_path(), catalog("web", "", &[a])).unwrap();
    let dir = agent.dir.clone();
    let restarted = Agent::start_in(&t.node, &dir, &Options::default());
    assert_eq!(restarted.vip("default", "web"), before);
    let addr = SocketAddr::new(before, 80);
    assert_eq!(t.node.run(move || http_get(addr).unwrap()), "a");
    drop(agent);
}

#[test]
fn no_endpoint_is_refused_at_once() {
    if !require_root("no_endpoint_is_refused_at_once") {
        return;
    }
    let t = Topology::new();
    let _agent = Agent::start(&t.node, &Options::default(), &catalog("empty", VIP, &[]));
    let err = t.node.run(|| {
        let conn = TcpStream::connect_timeout(&vip(80), Duration::from_secs(3));
        match conn {
            Err(e) => e.kind(),
            // An accepted-then-reset connection fails on first use.
            Ok(c) => http_get(c.peer_addr().unwrap()).unwrap_err().kind(),
        }
    });
    assert!(
        matches!(err, std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset),
        "want refused or reset, got {err:?}"
    );
}

#[test]
fn udp_is_proxied_and_replies_come_from_the_vip() {
    if !require_root("udp_is_proxied_and_replies_come_from_the_vip") {
        return;
    }
    let t = Topology::new();
    let (a, b) = (backend_addr(0, 5353), backend_addr(1, 5353));
    let _ea = UdpEcho::start(&t.backends, "a", a);
    let _eb = UdpEcho::start(&t.backends, "b", b);
    let _agent = Agent::start(&t.node, &Options::default(), &catalog("dns", VIP, &[a, b]));
    let replies = t.node.run(|| {
        let mut replies = Vec::new();
        for i in 0..4 {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            sock.send_to(format!("ping{i}").as_bytes(), vip(53)).unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = sock.recv_from(&mut buf).expect("UDP reply through the VIP");
            replies.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
        replies
    });
    for (i, (body, from)) in replies.iter().enumerate() {
        assert_eq!(*from, vip(53), "reply must come from the VIP");
        assert!(body.ends_with(&format!(":ping{i}")), "{body}");
    }
    let names: Vec<_> = replies.iter().map(|(b, _)| b.split(':').next().unwrap().to_owned()).collect();
    assert!(names.contains(&"a".into()) && names.contains(&"b".into()), "flows spread over backends: {names:?}");
}

#[test]
fn thousand_concurrent_connections_complete() {
    if !require_root("thousand_concurrent_connections_complete") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a, b]) = http_backends(&t, ["a", "b"]);
    let _agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a, b]));
    let ok = t.node.run(|| {
        // Open all 1,000 first so they are concurrent, then use each.
        let conns: Vec<TcpStream> =
            (0..1000).map(|_| TcpStream::connect_timeout(&vip(80), Duration::from_secs(5)).expect("connect")).collect();
        let mut ok = 0;
        for mut c in conns {
            use std::io::{Read, Write};
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).unwrap();
            if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200") {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(ok, 1000);
}

#[test]
fn edge0_holds_the_vips_and_goes_on_exit() {
    if !require_root("edge0_holds_the_vips_and_goes_on_exit") {
        return;
    }
    let t = Topology::new();
    let a = backend_addr(0, 8080);
    let mut agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a]));
    let addrs = t.node.command("ip").args(["-o", "addr", "show", "dev", "edge0"]).output().unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains(&format!("{VIP}/32")), "{addrs}");
    assert!(addrs.contains("169.254.96.16/32"), "DNS address on edge0: {addrs}");
    agent.stop().expect("clean exit");
    let gone = t.node.command("ip").args(["link", "show", "edge0"]).output().unwrap();
    assert!(!gone.status.success(), "edge0 removed on exit");
}

#[test]
fn cli_shows_services_endpoints_and_status() {
    if !require_root("cli_shows_services_endpoints_and_status") {
        return;
    }
    let t = Topology::new();
    let (a, b) = (backend_addr(0, 8080), backend_addr(1, 8080));
    let _agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a, b]));
    let run = |args: &[&str]| {
        let out = t.node.command(env!("CARGO_BIN_EXE_mesh-agent")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let services = run(&["services"]);
    assert!(services.contains("NAMESPACE") && services.contains("web") && services.contains(VIP), "{services}");
    assert!(services.contains("80/TCP,53/UDP") && services.contains("2/2"), "{services}");
    let json: serde_json::Value = serde_json::from_str(&run(&["services", "-o", "json"])).unwrap();
    assert_eq!(json[0]["vip"], VIP);
    let endpoints = run(&["endpoints", "web"]);
    assert!(endpoints.contains(BACKEND_IPS[0]) && endpoints.contains(BACKEND_IPS[1]), "{endpoints}");
    let status = run(&["status"]);
    assert!(status.contains("ready:     true") && status.contains("datapath:  userspace"), "{status}");
    assert!(status.contains("applied:   ") && !status.contains("applied:   0 "), "{status}");
    let missing = t.node.command(env!("CARGO_BIN_EXE_mesh-agent")).args(["endpoints", "nope"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("default/nope"));
}

/// The health of `ip` as the admin API shows it.
fn endpoint_healthy(agent: &Agent, ip: &str) -> Option<bool> {
    let services = agent.services();
    let endpoints = services[0]["endpoints"].as_array()?.clone();
    endpoints.iter().find(|e| e["ip"] == ip)?["healthy"].as_bool()
}

#[test]
fn dead_backend_leaves_rotation_and_returns() {
    if !require_root("dead_backend_leaves_rotation_and_returns") {
        return;
    }
    let t = Topology::new();
    let (a, b) = (backend_addr(0, 8080), backend_addr(1, 8080));
    let _ba = HttpBackend::start(&t.backends, "a", a);
    let bb = HttpBackend::start(&t.backends, "b", b);
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a, b]));
    drop(bb);
    let out =
        wait_for(Duration::from_secs(2), || (endpoint_healthy(&agent, BACKEND_IPS[1]) == Some(false)).then_some(()));
    assert!(out.is_some(), "dead backend still in rotation after 2 s: {}", agent.services());
    assert_eq!(get_many(&t, vip(80), 4), ["a", "a", "a", "a"]);
    let bb = HttpBackend::start(&t.backends, "b", b);
    let back =
        wait_for(Duration::from_secs(5), || (endpoint_healthy(&agent, BACKEND_IPS[1]) == Some(true)).then_some(()));
    assert!(back.is_some(), "revived backend not back in rotation");
    let answers = get_many(&t, vip(80), 4);
    assert!(answers.contains(&"b".to_owned()), "{answers:?}");
    drop(bb);
}

/// One request on an open keep-alive connection; returns the body.
fn request(conn: &mut TcpStream) -> std::io::Result<String> {
    use std::io::{Read, Write};
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf)?;
    let response = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

#[test]
fn sigterm_drains_established_connections() {
    if !require_root("sigterm_drains_established_connections") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a]) = http_backends(&t, ["a"]);
    let mut agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a]));
    // A socket keeps the namespace it was made in, so the test thread can use it.
    let mut conn = t.node.run(|| TcpStream::connect_timeout(&vip(80), Duration::from_secs(3))).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(request(&mut conn).unwrap(), "a");
    agent.terminate();
    let refused = wait_for(Duration::from_secs(5), || {
        t.node.run(|| TcpStream::connect_timeout(&vip(80), Duration::from_secs(1)).is_err()).then_some(())
    });
    assert!(refused.is_some(), "new connections still accepted after SIGTERM");
    assert_eq!(request(&mut conn).unwrap(), "a", "the established connection is served while draining");
    assert!(agent.wait_exit(Duration::from_millis(200)).is_none(), "exited before the connection closed");
    drop(conn);
    let status = agent.wait_exit(Duration::from_secs(5)).expect("exits once drained");
    assert!(status.success(), "{status:?}");
}

#[test]
fn metrics_count_connections_and_backend_selections() {
    if !require_root("metrics_count_connections_and_backend_selections") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a, b]) = http_backends(&t, ["a", "b"]);
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a, b]));
    get_many(&t, vip(80), 4);
    let labels = format!("service=\"default/web\",frontend=\"{VIP}:80/TCP\"");
    let want = [
        format!("mesh_agent_proxy_connections_total{{{labels}}} 4"),
        format!("mesh_agent_backend_selections_total{{{labels},backend=\"{a}\"}} 2"),
        format!("mesh_agent_backend_selections_total{{{labels},backend=\"{b}\"}} 2"),
        "mesh_agent_datapath_mode{mode=\"userspace\"} 1".to_owned(),
        "mesh_agent_ready 1".to_owned(),
        "mesh_agent_catalog_applies_total ".to_owned(),
        "mesh_agent_catalog_last_apply_seconds ".to_owned(),
        "mesh_agent_catalog_apply_duration_seconds_count ".to_owned(),
    ];
    // Counters reach the registry with the reconciler's next one-second refresh.
    let text = wait_for(Duration::from_secs(3), || {
        let (_, text) = agent.get("/metrics").ok()?;
        want.iter().all(|w| text.contains(w.as_str())).then_some(text)
    });
    assert!(text.is_some(), "metrics missing {want:?}:\n{}", agent.get("/metrics").unwrap().1);
}

#[test]
fn clients_from_other_hosts_are_refused_and_counted() {
    if !require_root("clients_from_other_hosts_are_refused_and_counted") {
        return;
    }
    let t = Topology::new();
    let (_backends, [a]) = http_backends(&t, ["a"]);
    let agent = Agent::start(&t.node, &Options::default(), &catalog("web", VIP, &[a]));
    // The backend namespace stands for a host on the LAN that routes the VIP range to the node.
    t.backends.ip(&["route", "add", "10.250.0.0/16", "via", support::netns::NODE_IP]);
    let remote = t.backends.run(|| http_get(vip(80)));
    assert!(remote.is_err(), "a LAN client was served: {remote:?}");
    assert_eq!(get_many(&t, vip(80), 1), ["a"], "node-local clients are served");
    let labels = format!("service=\"default/web\",frontend=\"{VIP}:80/TCP\"");
    let counted = wait_for(Duration::from_secs(3), || {
        let (_, text) = agent.get("/metrics").ok()?;
        text.contains(&format!("mesh_agent_proxy_rejected_total{{{labels}}} 1")).then_some(())
    });
    assert!(counted.is_some(), "refusal not counted:\n{}", agent.get("/metrics").unwrap().1);
}
