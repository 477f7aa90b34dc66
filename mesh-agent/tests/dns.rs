//! The agent's DNS server with real clients: dig in the node namespace against 169.254.96.16, dnsmasq as the
//! upstream on a loopback address of the same namespace (nothing leaves it), raw UDP for malformed packets.

mod support;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::time::Duration;

use support::agent::{Agent, Options};
use support::dns::{dig, dns_metrics, Dig, Dnsmasq, SERVER};
use support::netns::Netns;
use support::{require_root, wait_for};

/// web: ClusterIP 10.250.0.10 with two named ports and one unnamed; web6: an IPv6 ClusterIP; db: headless with a
/// named endpoint, a nameless one and an unready one.
const CATALOG: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.250.0.10
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
  - {port: 81, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: default}
spec:
  clusterIP: fd00::a
  ports:
  - {name: http, port: 80, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: None
  ports:
  - {name: pg, port: 5432, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: prod, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports:
- {name: pg, port: 5433, protocol: TCP}
endpoints:
- addresses: ["10.201.0.3"]
  hostname: db-0
  conditions: {ready: true}
- addresses: ["10.201.0.4"]
  conditions: {ready: true}
- addresses: ["10.201.0.5"]
  hostname: db-2
  conditions: {ready: false}
"#;

const UPSTREAM: &str = "127.0.0.53";

/// An agent with DNS TTL 17 and `dns` as further DNS keys; the upstream is always on loopback (by default
/// UPSTREAM, where nothing listens unless the test starts dnsmasq), so no test forwards off the machine.
fn agent(ns: &Netns, dns: &str) -> Agent {
    let sep = if dns.is_empty() { "" } else { ", " };
    let extra = format!("dns: {{ttl: 17, upstreams: [\"{UPSTREAM}\"]{sep}{dns}}}");
    let agent = Agent::start(ns, &Options { extra: &extra, ..Options::default() }, CATALOG);
    // ready means the catalog is applied; the table follows it on its own task
    let answered = wait_for(Duration::from_secs(5), || {
        (dig(ns, &["web.default.svc.cluster.local"]).rdata() == ["10.250.0.10"]).then_some(())
    });
    assert!(answered.is_some(), "DNS never answered for web; log:\n{}", agent.log());
    agent
}

fn assert_negative(d: &Dig, status: &str) {
    assert_eq!(d.status, status, "{}", d.raw);
    assert!(d.answers.is_empty(), "{}", d.raw);
    assert_eq!(d.authority.len(), 1, "{}", d.raw);
    assert!(d.authority[0].starts_with("cluster.local. 17 IN SOA ns.dns.cluster.local. hostmaster.cluster.local."));
}

#[test]
fn cluster_ip_services_follow_the_spec() {
    if !require_root("cluster_ip_services_follow_the_spec") {
        return;
    }
    let ns = Netns::new("dns");
    let _agent = agent(&ns, "");
    let a = dig(&ns, &["web.default.svc.cluster.local", "A"]);
    assert_eq!(a.answers, ["web.default.svc.cluster.local. 17 IN A 10.250.0.10"], "{}", a.raw);
    assert!(a.flags.contains(&"aa".to_owned()), "{}", a.raw);
    let upper = dig(&ns, &["WEB.Default.SVC.Cluster.Local", "A"]);
    assert_eq!(upper.rdata(), ["10.250.0.10"], "names are case-insensitive: {}", upper.raw);
    assert_eq!(dig(&ns, &["web6.default.svc.cluster.local", "AAAA"]).rdata(), ["fd00::a"]);
    let srv = dig(&ns, &["_http._tcp.web.default.svc.cluster.local", "SRV"]);
    assert_eq!(srv.rdata(), ["0 100 80 web.default.svc.cluster.local."], "{}", srv.raw);
    assert_eq!(
        dig(&ns, &["_dns._udp.web.default.svc.cluster.local", "SRV"]).rdata(),
        ["0 100 53 web.default.svc.cluster.local."]
    );
    let ptr = dig(&ns, &["-x", "10.250.0.10"]);
    assert_eq!(ptr.answers, ["10.0.250.10.in-addr.arpa. 17 IN PTR web.default.svc.cluster.local."], "{}", ptr.raw);
    assert_eq!(dig(&ns, &["-x", "fd00::a"]).rdata(), ["web6.default.svc.cluster.local."]);
    assert_eq!(dig(&ns, &["dns-version.cluster.local", "TXT"]).rdata(), ["\"1.1.0\""]);
    let soa = dig(&ns, &["cluster.local", "SOA"]);
    assert_eq!(soa.answers.len(), 1, "{}", soa.raw);
    assert!(soa.answers[0].starts_with("cluster.local. 17 IN SOA ns.dns.cluster.local. hostmaster.cluster.local."));
    // the same over TCP (hickory's path)
    assert_eq!(dig(&ns, &["+tcp", "web.default.svc.cluster.local"]).rdata(), ["10.250.0.10"]);
    // without EDNS (the glibc stub's shape)
    assert_eq!(dig(&ns, &["+noedns", "web.default.svc.cluster.local"]).rdata(), ["10.250.0.10"]);
}

#[test]
fn headless_services_answer_ready_endpoints() {
    if !require_root("headless_services_answer_ready_endpoints") {
        return;
    }
    let ns = Netns::new("dns");
    let _agent = agent(&ns, "");
    let mut a = dig(&ns, &["db.prod.svc.cluster.local"]).rdata();
    a.sort();
    assert_eq!(a, ["10.201.0.3", "10.201.0.4"], "only ready endpoints");
    assert_eq!(dig(&ns, &["db-0.db.prod.svc.cluster.local"]).rdata(), ["10.201.0.3"]);
    assert_eq!(dig(&ns, &["10-201-0-4.db.prod.svc.cluster.local"]).rdata(), ["10.201.0.4"]);
    let srv = dig(&ns, &["+tcp", "_pg._tcp.db.prod.svc.cluster.local", "SRV"]);
    let mut targets = srv.rdata();
    targets.sort();
    assert_eq!(
        targets,
        ["0 100 5433 10-201-0-4.db.prod.svc.cluster.local.", "0 100 5433 db-0.db.prod.svc.cluster.local."],
        "{}",
        srv.raw
    );
    assert_eq!(dig(&ns, &["-x", "10.201.0.3"]).rdata(), ["db-0.db.prod.svc.cluster.local."]);
    assert_negative(&dig(&ns, &["db-2.db.prod.svc.cluster.local"]), "NXDOMAIN");
}

#[test]
fn nxdomain_and_nodata_are_told_apart() {
    if !require_root("nxdomain_and_nodata_are_told_apart") {
        return;
    }
    let ns = Netns::new("dns");
    let _agent = agent(&ns, "");
    assert_negative(&dig(&ns, &["nope.default.svc.cluster.local"]), "NXDOMAIN");
    assert_negative(&dig(&ns, &["_https._tcp.web.default.svc.cluster.local", "SRV"]), "NXDOMAIN");
    // the name exists without records of the type
    assert_negative(&dig(&ns, &["web.default.svc.cluster.local", "AAAA"]), "NOERROR");
    assert_negative(&dig(&ns, &["web.default.svc.cluster.local", "MX"]), "NOERROR");
    // empty non-terminals exist
    assert_negative(&dig(&ns, &["default.svc.cluster.local"]), "NOERROR");
    assert_negative(&dig(&ns, &["svc.cluster.local"]), "NOERROR");
    assert_negative(&dig(&ns, &["+tcp", "_tcp.web.default.svc.cluster.local", "SRV"]), "NOERROR");
}

#[test]
fn other_names_are_forwarded_cached_and_refetched_over_tcp_when_truncated() {
    if !require_root("other_names_are_forwarded_cached_and_refetched_over_tcp_when_truncated") {
        return;
    }
    let ns = Netns::new("dns");
    // twelve 200-byte TXT strings: more than fits in a UDP answer, so the agent must refetch over TCP
    let mut records: Vec<String> =
        (0..12).map(|i| format!("--txt-record=big.example.test,{}{i}", "x".repeat(200))).collect();
    records.extend([
        "--address=/example.test/192.0.2.1".into(),
        "--address=/gone.test/".into(),
        "--local-ttl=300".into(),
    ]);
    let upstream = Dnsmasq::start(&ns, UPSTREAM, &records);
    let _agent = agent(&ns, "");

    let a = dig(&ns, &["www.example.test"]);
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert_eq!(a.rdata(), ["192.0.2.1"]);
    assert_eq!(dig(&ns, &["www.example.test"]).rdata(), ["192.0.2.1"]);
    assert_eq!(upstream.queries_for("www.example.test"), 1, "the second answer came from the cache");
    assert_eq!(dig(&ns, &["nothing.gone.test"]).status, "NXDOMAIN");

    // over UDP the client sees TC; dig then retries over TCP and must get all twelve
    let big = dig(&ns, &["+ignore", "big.example.test", "TXT"]);
    assert!(big.flags.contains(&"tc".to_owned()), "{}", big.raw);
    let big = dig(&ns, &["+tcp", "big.example.test", "TXT"]);
    assert_eq!(big.answers.len(), 12, "{}", big.raw);
}

#[test]
fn upstream_down_is_servfail_within_the_client_timeout() {
    if !require_root("upstream_down_is_servfail_within_the_client_timeout") {
        return;
    }
    let ns = Netns::new("dns");
    // nothing listens there
    let _agent = agent(&ns, "");
    // dig gives up after 3 s; a status means the agent answered before that
    assert_eq!(dig(&ns, &["www.example.test"]).status, "SERVFAIL");
    // and the cluster zone does not depend on the upstream
    assert_eq!(dig(&ns, &["web.default.svc.cluster.local"]).rdata(), ["10.250.0.10"]);
}

#[test]
fn sources_outside_the_allow_list_are_refused() {
    if !require_root("sources_outside_the_allow_list_are_refused") {
        return;
    }
    let ns = Netns::new("dns");
    let agent = Agent::start(
        &ns,
        &Options { extra: "dns: {allowFrom: [10.99.0.0/16], upstreams: [127.0.0.53]}", ..Options::default() },
        CATALOG,
    );
    // dig's source here is a local address, which this list leaves out
    let refused = wait_for(Duration::from_secs(5), || {
        let d = dig(&ns, &["web.default.svc.cluster.local"]);
        (d.status == "REFUSED").then_some(d)
    });
    assert!(refused.is_some_and(|d| d.answers.is_empty()));
    let before = dns_metrics(&agent);
    assert_eq!(dig(&ns, &["www.example.test"]).status, "REFUSED");
    assert_eq!(dig(&ns, &["+tcp", "web.default.svc.cluster.local"]).status, "REFUSED");
    // counted as the ACL's, not as the zone's or the upstream's
    let counted = wait_for(Duration::from_secs(5), || {
        let delta = delta(&before, &dns_metrics(&agent));
        (delta.get(r#"mesh_agent_dns_request_duration_seconds_count{source="acl"}"#) == Some(&2)).then_some(delta)
    });
    let responses = counted.map(|d| only(&d, "mesh_agent_dns_responses_total"));
    assert_eq!(responses, Some(BTreeMap::from([(r#"{source="acl",rcode="REFUSED"}"#.to_owned(), 2)])));
}

/// How much each series grew from `before` to `after`; series that did not grow are left out.
fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(series, v)| (series.clone(), (v - before.get(series).copied().unwrap_or(0.0)) as u64))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// The series of metric `name` in `delta`, keyed by their labels.
fn only(delta: &BTreeMap<String, u64>, name: &str) -> BTreeMap<String, u64> {
    delta.iter().filter_map(|(series, d)| Some((series.strip_prefix(name)?.to_owned(), *d))).collect()
}

#[test]
fn metrics_count_responses_by_source_and_rcode_and_time_them() {
    if !require_root("metrics_count_responses_by_source_and_rcode_and_time_them") {
        return;
    }
    let ns = Netns::new("dns");
    let _upstream =
        Dnsmasq::start(&ns, UPSTREAM, &["--address=/example.test/192.0.2.1".into(), "--address=/gone.test/".into()]);
    let agent = agent(&ns, "");
    let before = dns_metrics(&agent);

    // the cluster zone: the hot path, TCP, and hickory's UDP path (ANY, which dig would send over TCP)
    for _ in 0..5 {
        assert_eq!(dig(&ns, &["web.default.svc.cluster.local"]).status, "NOERROR");
    }
    for _ in 0..3 {
        assert_eq!(dig(&ns, &["nope.default.svc.cluster.local"]).status, "NXDOMAIN");
    }
    assert_eq!(dig(&ns, &["+tcp", "web.default.svc.cluster.local"]).status, "NOERROR");
    assert_eq!(dig(&ns, &["+notcp", "web.default.svc.cluster.local", "ANY"]).status, "NOERROR");
    // forwarded
    assert_eq!(dig(&ns, &["www.example.test"]).status, "NOERROR");
    assert_eq!(dig(&ns, &["nothing.gone.test"]).status, "NXDOMAIN");
    // a runt (dropped) and a header without its question (FORMERR)
    let formerr = ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.send_to(&[0xab, 0xcd, 0x01], (SERVER, 53)).unwrap();
        socket.send_to(&[0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0], (SERVER, 53)).unwrap();
        let mut buf = [0u8; 512];
        socket.recv(&mut buf).map(|_| buf[3] & 0x0f).ok()
    });
    assert_eq!(formerr, Some(1));

    // each answer is counted just after it is sent: wait until all are, in the counters and in the histogram
    let total = 5 + 3 + 1 + 1 + 2 + 1;
    let counted = wait_for(Duration::from_secs(5), || {
        let delta = delta(&before, &dns_metrics(&agent));
        let responses: u64 = only(&delta, "mesh_agent_dns_responses_total").values().sum();
        let timed: u64 = only(&delta, "mesh_agent_dns_request_duration_seconds_count").values().sum();
        let dropped = delta.contains_key(r#"mesh_agent_dns_dropped_queries_total{reason="malformed"}"#);
        (responses == total && timed == total && dropped).then_some(delta)
    });
    let delta = counted.unwrap_or_else(|| panic!("not all counted:\n{}", agent.get("/metrics").unwrap().1));
    let labels = |pairs: &[(&str, u64)]| pairs.iter().map(|(l, n)| (l.to_string(), *n)).collect::<BTreeMap<_, _>>();
    assert_eq!(
        only(&delta, "mesh_agent_dns_responses_total"),
        labels(&[
            (r#"{source="local",rcode="NOERROR"}"#, 7),
            (r#"{source="local",rcode="NXDOMAIN"}"#, 3),
            (r#"{source="local",rcode="FORMERR"}"#, 1),
            (r#"{source="upstream",rcode="NOERROR"}"#, 1),
            (r#"{source="upstream",rcode="NXDOMAIN"}"#, 1),
        ])
    );
    assert_eq!(
        only(&delta, "mesh_agent_dns_request_duration_seconds_count"),
        labels(&[(r#"{source="local"}"#, 11), (r#"{source="upstream"}"#, 2)])
    );
    // every observation lands in a bucket, +Inf holding them all
    for source in ["local", "upstream"] {
        let inf = format!(r#"mesh_agent_dns_request_duration_seconds_bucket{{le="+Inf",source="{source}"}}"#);
        let count = format!(r#"mesh_agent_dns_request_duration_seconds_count{{source="{source}"}}"#);
        assert_eq!(delta.get(&inf), delta.get(&count), "{source}");
    }
    assert_eq!(only(&delta, "mesh_agent_dns_dropped_queries_total"), labels(&[(r#"{reason="malformed"}"#, 1)]));
}

#[test]
fn answers_follow_catalog_changes() {
    if !require_root("answers_follow_catalog_changes") {
        return;
    }
    let ns = Netns::new("dns");
    let agent = agent(&ns, "");
    let next = CATALOG.replace("clusterIP: 10.250.0.10", "clusterIP: 10.250.0.11")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: default}\nspec:\n  clusterIP: 10.250.0.12\n";
    agent.write_catalog(&next);
    let changed = wait_for(Duration::from_secs(5), || {
        (dig(&ns, &["web.default.svc.cluster.local"]).rdata() == ["10.250.0.11"]).then_some(())
    });
    assert!(changed.is_some(), "web still has its old address; log:\n{}", agent.log());
    assert_eq!(dig(&ns, &["new.default.svc.cluster.local"]).rdata(), ["10.250.0.12"]);
    assert!(dig(&ns, &["-x", "10.250.0.10"]).answers.is_empty(), "the old VIP has no name any more");
}

#[test]
fn malformed_packets_get_formerr_or_nothing() {
    if !require_root("malformed_packets_get_formerr_or_nothing") {
        return;
    }
    let ns = Netns::new("dns");
    let agent = agent(&ns, "");
    let header = |qdcount: u8| vec![0xab, 0xcd, 0x01, 0x00, 0, qdcount, 0, 0, 0, 0, 0, 0];
    let with = |mut h: Vec<u8>, tail: &[u8]| {
        h.extend_from_slice(tail);
        h
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("runt", vec![0xab, 0xcd, 0x01], false),
        ("missing question", header(1), true),
        ("truncated question", with(header(1), &[3, b'w', b'e', b'b', 7, b'd', b'e']), true),
        ("label length past the end", with(header(1), &[60, b'a', 0, 0, 1, 0, 1]), true),
        ("bad label type", with(header(1), &[0x80, b'a', 0, 0, 1, 0, 1]), true),
        ("pointer to itself", with(header(1), &[0xc0, 12, 0, 1, 0, 1]), true),
        ("pointer loop", with(header(1), &[1, b'a', 0xc0, 16, 0xc0, 12, 0, 1, 0, 1]), true),
    ];
    let results = ns.run(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut out = Vec::new();
        for (what, packet, formerr) in &cases {
            socket.send_to(packet, (SERVER, 53)).unwrap();
            let mut buf = [0u8; 1500];
            let reply = socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
            out.push((what.to_string(), reply, *formerr));
        }
        out
    });
    for (what, reply, formerr) in results {
        match reply {
            Some(r) if formerr => {
                assert_eq!(&r[..2], &[0xab, 0xcd], "{what}: id");
                assert_eq!(r[2] & 0x80, 0x80, "{what}: a response");
                assert_eq!(r[3] & 0x0f, 1, "{what}: FORMERR");
            }
            None if !formerr => {}
            other => panic!("{what}: unexpected reply {other:?}"),
        }
    }
    // and the server is unharmed
    assert_eq!(dig(&ns, &["web.default.svc.cluster.local"]).rdata(), ["10.250.0.10"], "{}", agent.log());
}

/// Removes a directory on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn managed_resolv_conf_points_apps_at_the_agent_and_is_restored() {
    if !require_root("managed_resolv_conf_points_apps_at_the_agent_and_is_restored") {
        return;
    }
    let ns = Netns::new("dns");
    // `ip netns exec` mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf for what it runs: the agent's
    // resolv.conf, and only this namespace's
    let etc = std::path::PathBuf::from(format!("/etc/netns/{}", ns.name));
    std::fs::create_dir_all(&etc).unwrap();
    let _cleanup = RemoveDir(etc.clone());
    let original = format!("nameserver {UPSTREAM}\nsearch example.test\n");
    std::fs::write(etc.join("resolv.conf"), &original).unwrap();
    let _upstream = Dnsmasq::start(&ns, UPSTREAM, &["--address=/example.test/192.0.2.1".into()]);
    let mut agent =
        Agent::start(&ns, &Options { extra: "dns: {manageResolvConf: true}", ..Options::default() }, CATALOG);

    let written = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
    assert!(written.contains("nameserver 169.254.96.16\n"), "{written}");
    // glibc's resolver, as an app uses it: short names through the search list; other names forwarded to the
    // nameserver the node had
    let getent = |name: &str| {
        let out = ns.command("getent").args(["hosts", name]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
    };
    let found = wait_for(Duration::from_secs(5), || (getent("web.default") == "10.250.0.10").then_some(()));
    assert!(found.is_some(), "web.default did not resolve; log:\n{}", agent.log());
    assert_eq!(getent("web"), "10.250.0.10");
    assert_eq!(getent("www"), "192.0.2.1", "the original search domain and nameserver still work");

    agent.stop();
    assert_eq!(std::fs::read_to_string(etc.join("resolv.conf")).unwrap(), original);
}
