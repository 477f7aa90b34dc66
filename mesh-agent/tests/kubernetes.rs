//! The Kubernetes catalog source against a fake API server that replays real API JSON, with kube-rs as the real
//! client: sync, changes, 410 re-lists, outages and the stateDir cache (no root needed, loopback only), then the
//! whole agent in a node namespace: a service added to the API answers curl and dig through its VIP.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_agent::catalog::kubernetes::filter::PROXY_NAME_LABEL;
use mesh_agent::catalog::kubernetes::{self, Status, SyncState};
use mesh_agent::catalog::{cache, Catalog, ClusterIp, ServiceId, SourceState};
use mesh_agent::config::{KubernetesConfig, ServiceFilterMode};
use serde_json::json;
use tokio::sync::watch;

use support::fake_apiserver::{endpoint_slice, service, with_label, FakeApiServer, Kind};

/// How long a test waits for the source to catch up: generous, as the watchers back off (0.8 s, doubling) after
/// an outage.
const PATIENCE: Duration = Duration::from_secs(20);

struct Source {
    catalogs: watch::Receiver<Arc<Catalog>>,
    state: Arc<SourceState>,
}

impl Source {
    fn start(url: &str, state_dir: &Path) -> Self {
        Self::start_with(url, state_dir, ServiceFilterMode::FilterIfLabelExists)
    }

    fn start_with(url: &str, state_dir: &Path, mode: ServiceFilterMode) -> Self {
        let config =
            KubernetesConfig { enable: true, server: url.into(), service_filter_mode: mode, ..Default::default() };
        let state = Arc::new(SourceState::default());
        let catalogs = kubernetes::spawn(config, state_dir, Arc::clone(&state));
        Self { catalogs, state }
    }

    fn current(&self) -> Arc<Catalog> {
        self.catalogs.borrow().clone()
    }

    /// The first published catalog for which `ok` holds.
    async fn wait(&mut self, what: &str, ok: impl Fn(&Catalog) -> bool) -> Arc<Catalog> {
        let found = tokio::time::timeout(PATIENCE, self.catalogs.wait_for(|c| ok(c))).await;
        if let Some(catalog) = found.ok().and_then(|r| r.ok().map(|c| c.clone())) {
            return catalog;
        }
        panic!("{what}: not within {PATIENCE:?}; catalog: {:?}; status: {:?}", self.current(), self.status())
    }

    fn status(&self) -> Status {
        self.state.status().kubernetes.expect("the Kubernetes status")
    }

    async fn wait_status(&self, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.status();
            if ok(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}; status: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn id(namespace: &str, name: &str) -> ServiceId {
    ServiceId { namespace: namespace.into(), name: name.into() }
}

/// `ip:port` of the ready backends of `namespace/name`'s first port, or `None` without the service.
fn backends(catalog: &Catalog, namespace: &str, name: &str) -> Option<Vec<String>> {
    let svc = catalog.services.get(&id(namespace, name))?;
    Some(svc.backends(svc.ports.first()?).iter().map(|b| format!("{}:{}", b.ip, b.port)).collect())
}

fn has(catalog: &Catalog, namespace: &str, name: &str) -> bool {
    catalog.services.contains_key(&id(namespace, name))
}

fn web() -> serde_json::Value {
    service("shop", "web", "10.96.0.10", &[("http", 80, json!("http"))])
}

fn web_slice(name: &str, addresses: &[(&str, bool)]) -> serde_json::Value {
    endpoint_slice("shop", name, "web", &[("http", 8080)], addresses, "edge-1")
}

#[tokio::test]
async fn initial_sync_named_ports_headless_and_filters() {
    let api = FakeApiServer::start();
    api.apply(web());
    api.apply(web_slice("web-a", &[("10.1.0.2", true), ("10.1.0.3", false)]));
    api.apply(service("shop", "db", "None", &[("pg", 5432, json!(5432))]));
    api.apply(endpoint_slice("shop", "db-a", "db", &[("pg", 5432)], &[("10.1.0.7", true)], "edge-2"));
    let other = service("shop", "other", "10.96.0.12", &[("http", 80, json!(80))]);
    api.apply(with_label(other, PROXY_NAME_LABEL, "istio"));
    api.apply(service("default", "kubernetes", "10.96.0.1", &[("https", 443, json!(6443))]));
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&api.url(), dir.path());

    let catalog = source.wait("initial sync", |c| has(c, "shop", "db")).await;
    let web = &catalog.services[&id("shop", "web")];
    assert_eq!(web.cluster_ip, ClusterIp::Fixed("10.96.0.10".parse().unwrap()));
    assert_eq!(backends(&catalog, "shop", "web").unwrap(), ["10.1.0.2:8080"], "named port resolved, unready left out");
    assert_eq!(web.backends(&web.ports[0])[0].node_name.as_deref(), Some("edge-1"));
    let db = &catalog.services[&id("shop", "db")];
    assert_eq!(db.cluster_ip, ClusterIp::Headless);
    assert_eq!(db.endpoint_sets[0].endpoints[0].ip.to_string(), "10.1.0.7");
    assert_eq!(catalog.services.len(), 2, "labelled and default/kubernetes skipped: {:?}", catalog.services.keys());

    let status = source.status();
    assert_eq!((status.state, status.services, status.endpoint_slices), (SyncState::Synced, 2, 2));
    assert_eq!(status.server.trim_end_matches('/'), api.url());
    assert!(status.serving() && status.last_error.is_none());
}

#[tokio::test]
async fn adds_updates_and_deletes_follow_the_watch() {
    let api = FakeApiServer::start();
    api.apply(web());
    api.apply(web_slice("web-a", &[("10.1.0.2", true)]));
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&api.url(), dir.path());
    source.wait("initial sync", |c| backends(c, "shop", "web").is_some_and(|b| b.len() == 1)).await;

    api.apply(web_slice("web-b", &[("10.1.0.4", true)]));
    source.wait("second slice", |c| backends(c, "shop", "web").is_some_and(|b| b.len() == 2)).await;
    api.apply(web_slice("web-a", &[("10.1.0.2", false)]));
    source.wait("endpoint unready", |c| backends(c, "shop", "web") == Some(vec!["10.1.0.4:8080".into()])).await;

    api.apply(service("shop", "web", "10.96.0.10", &[("http", 8000, json!("http"))]));
    source.wait("port changed", |c| c.services.get(&id("shop", "web")).is_some_and(|s| s.ports[0].port == 8000)).await;

    api.apply(service("shop", "api", "", &[("grpc", 9000, json!(9000))]));
    let catalog = source.wait("service added", |c| has(c, "shop", "api")).await;
    assert_eq!(catalog.services[&id("shop", "api")].cluster_ip, ClusterIp::Auto);

    api.delete(Kind::EndpointSlice, "shop", "web-b");
    source.wait("slice deleted", |c| backends(c, "shop", "web") == Some(vec![])).await;
    api.delete(Kind::Service, "shop", "web");
    let catalog = source.wait("service deleted", |c| !has(c, "shop", "web")).await;
    assert!(has(&catalog, "shop", "api"));
}

#[tokio::test]
async fn relists_after_410_gone_and_drops_what_it_missed() {
    let api = FakeApiServer::start();
    api.apply(web());
    api.apply(service("shop", "old", "10.96.0.11", &[("http", 80, json!(80))]));
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&api.url(), dir.path());
    source.wait("initial sync", |c| has(c, "shop", "old")).await;
    let lists = api.lists(Kind::Service);

    // Changes the watch never delivers, then the history is compacted: only a re-list can find them.
    api.hold_events(true);
    api.delete(Kind::Service, "shop", "old");
    api.apply(service("shop", "new", "10.96.0.12", &[("http", 80, json!(80))]));
    api.expire();
    let catalog = source.wait("re-listed", |c| !has(c, "shop", "old") && has(c, "shop", "new")).await;
    assert!(has(&catalog, "shop", "web"));
    assert!(api.lists(Kind::Service) > lists, "a re-list was made");
    assert_eq!(source.status().state, SyncState::Synced);
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_resource_version() {
    let api = FakeApiServer::start();
    api.apply(web());
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&api.url(), dir.path());
    source.wait("initial sync", |c| has(c, "shop", "web")).await;
    let lists = (api.lists(Kind::Service), api.lists(Kind::EndpointSlice));

    api.bookmark();
    api.disconnect_watches();
    api.apply(service("shop", "api", "10.96.0.13", &[("http", 80, json!(80))]));
    source.wait("change after reconnect", |c| has(c, "shop", "api")).await;
    assert_eq!((api.lists(Kind::Service), api.lists(Kind::EndpointSlice)), lists, "resumed, not re-listed");
}

#[tokio::test]
async fn label_changes_move_services_in_and_out_of_the_filter() {
    let api = FakeApiServer::start();
    api.apply(web());
    api.apply(with_label(service("shop", "mine", "10.96.0.14", &[("http", 80, json!(80))]), PROXY_NAME_LABEL, "edge"));
    let dir = tempfile::tempdir().unwrap();

    let mut only_labelled = Source::start_with(&api.url(), dir.path(), ServiceFilterMode::FilterIfLabelDoesNotExist);
    let catalog = only_labelled.wait("initial sync", |c| has(c, "shop", "mine")).await;
    assert!(!has(&catalog, "shop", "web"), "FilterIfLabelDoesNotExist serves only labelled services");

    let other_dir = tempfile::tempdir().unwrap();
    let mut unlabelled = Source::start(&api.url(), other_dir.path());
    unlabelled.wait("initial sync", |c| has(c, "shop", "web") && !has(c, "shop", "mine")).await;

    api.apply(with_label(web(), PROXY_NAME_LABEL, "edge"));
    unlabelled.wait("labelled service leaves", |c| !has(c, "shop", "web")).await;
    only_labelled.wait("labelled service arrives", |c| has(c, "shop", "web")).await;
}

#[tokio::test]
async fn outage_at_start_serves_the_cache_until_the_api_answers() {
    let mut api = FakeApiServer::start();
    api.apply(web());
    api.apply(web_slice("web-a", &[("10.1.0.2", true)]));
    let dir = tempfile::tempdir().unwrap();
    {
        let mut first = Source::start(&api.url(), dir.path());
        first.wait("initial sync", |c| backends(c, "shop", "web").is_some_and(|b| !b.is_empty())).await;
        let cache = dir.path().join(cache::FILE);
        let written = support::wait_for(Duration::from_secs(5), || cache.exists().then_some(()));
        assert!(written.is_some(), "cache written after the first sync");
    }

    api.stop();
    let mut second = Source::start(&api.url(), dir.path());
    let catalog = second.current();
    assert_eq!(backends(&catalog, "shop", "web").unwrap(), ["10.1.0.2:8080"], "served from the cache at once");
    let status = second.status();
    assert_eq!((status.state, status.from_cache), (SyncState::Stale, true));
    assert!(status.stale_since.is_some() && status.services == 1);
    second.wait_status("API failure recorded", |s| s.last_error.is_some()).await;

    // Meanwhile the cluster moved on; the source catches up once the API answers.
    api.apply(service("shop", "late", "10.96.0.15", &[("http", 80, json!(80))]));
    api.resume();
    second.wait("caught up", |c| has(c, "shop", "late")).await;
    let status = second.wait_status("synced", |s| s.state == SyncState::Synced).await;
    assert!(!status.from_cache && status.stale_since.is_none() && status.last_error.is_none(), "{status:?}");
}

#[tokio::test]
async fn outage_midway_keeps_the_state_marked_stale() {
    let mut api = FakeApiServer::start();
    api.apply(web());
    api.apply(web_slice("web-a", &[("10.1.0.2", true)]));
    let dir = tempfile::tempdir().unwrap();
    let mut source = Source::start(&api.url(), dir.path());
    let before = source.wait("initial sync", |c| backends(c, "shop", "web").is_some_and(|b| !b.is_empty())).await;

    api.stop();
    let status = source.wait_status("stale", |s| s.state == SyncState::Stale).await;
    assert!(status.stale_since.is_some() && status.last_error.is_some() && !status.from_cache, "{status:?}");
    assert_eq!(*source.current(), *before, "the last known state is kept");

    api.apply(web_slice("web-b", &[("10.1.0.4", true)]));
    api.resume();
    source.wait("change made during the outage", |c| backends(c, "shop", "web").is_some_and(|b| b.len() == 2)).await;
    source.wait_status("synced again", |s| s.state == SyncState::Synced).await;
}

#[tokio::test]
async fn never_synced_without_api_or_cache() {
    let mut api = FakeApiServer::start();
    api.stop();
    let dir = tempfile::tempdir().unwrap();
    let source = Source::start(&api.url(), dir.path());
    let status = source.wait_status("error", |s| s.last_error.is_some()).await;
    assert_eq!(status.state, SyncState::NeverSynced);
    assert!(!status.serving() && source.current().services.is_empty());
}

/// 10,000 services with 50,000 endpoints (five per slice): initial list to first catalog, one change, a restart
/// from the cache. A measurement, so not in the default run:
/// `cargo test --release -p mesh-agent --test kubernetes -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale measurement"]
async fn scale_10k_services_50k_endpoints() {
    const SERVICES: usize = 10_000;
    let _ = tracing_subscriber::fmt().with_env_filter("mesh_agent=debug").try_init();
    let api = FakeApiServer::start();
    fill(&api, SERVICES, "10.96");
    let dir = tempfile::tempdir().unwrap();
    let rss = |what: &str| eprintln!("{what}: RSS {} MiB", rss_kib() / 1024);
    rss("objects in the fake API");

    let started = Instant::now();
    let mut source = Source::start(&api.url(), dir.path());
    let catalog = source.wait("initial sync", |c| c.services.len() == SERVICES).await;
    eprintln!("list + build of {SERVICES} services: {:?}", started.elapsed());
    let endpoints: usize = catalog.services.values().flat_map(|s| &s.endpoint_sets).map(|e| e.endpoints.len()).sum();
    assert_eq!(endpoints, 5 * SERVICES);
    rss("after the sync");

    let started = Instant::now();
    api.apply(endpoint_slice("bulk", "svc-7-a", "svc-7", &[("http", 8080)], &[("10.200.0.1", true)], "edge-1"));
    source.wait("one change", |c| backends(c, "bulk", "svc-7").is_some_and(|b| b.len() == 1)).await;
    eprintln!("one endpoint change to a new catalog: {:?}", started.elapsed());

    let cache = dir.path().join(cache::FILE);
    support::wait_for(Duration::from_secs(30), || cache.exists().then_some(())).expect("cache written");
    eprintln!("cache: {} MiB", std::fs::metadata(&cache).unwrap().len() / (1024 * 1024));
    let started = Instant::now();
    let restarted = Source::start("http://127.0.0.1:1", dir.path());
    assert_eq!(restarted.current().services.len(), SERVICES);
    eprintln!("restart from the cache: {:?}", started.elapsed());
}

/// `services` services `bulk/svc-N` with ClusterIPs in `prefix`.0.0/16, each with one slice of five endpoints.
fn fill(api: &FakeApiServer, services: usize, prefix: &str) {
    for i in 0..services {
        let name = format!("svc-{i}");
        let ip = format!("{prefix}.{}.{}", i / 250, i % 250 + 1);
        api.apply(service("bulk", &name, &ip, &[("http", 80, json!("http"))]));
        let addresses: Vec<String> = (0..5).map(|j| format!("10.{}.{}.{}", 100 + j, i / 250, i % 250 + 1)).collect();
        let addresses: Vec<(&str, bool)> = addresses.iter().map(|a| (a.as_str(), true)).collect();
        api.apply(endpoint_slice("bulk", &format!("{name}-a"), &name, &[("http", 8080)], &addresses, "edge-1"));
    }
}

fn rss_kib() -> u64 {
    rss_kib_of("self")
}

fn rss_kib_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}

mod end_to_end {
    use super::*;
    use support::agent::{Agent, Options};
    use support::backend::HttpBackend;
    use support::netns::{Topology, BACKEND_IPS};
    use support::{require_root, wait_for};

    #[test]
    fn a_service_added_to_the_api_answers_curl_and_dig_within_a_second() {
        if !require_root("a_service_added_to_the_api_answers_curl_and_dig_within_a_second") {
            return;
        }
        let t = Topology::new();
        let backend = SocketAddr::new(BACKEND_IPS[0].parse().unwrap(), 8080);
        let _backend = HttpBackend::start(&t.backends, "a", backend);
        let api = FakeApiServer::start_in(&format!("/run/netns/{}", t.node.name));
        let catalog = format!("kubernetes: {{enable: true, server: \"{}\"}}", api.url());
        let agent = Agent::start(&t.node, &Options { catalog: &catalog, ..Options::default() }, "");

        api.apply(service("default", "web", "10.250.0.10", &[("http", 80, json!("http"))]));
        api.apply(endpoint_slice("default", "web-a", "web", &[("http", 8080)], &[(BACKEND_IPS[0], true)], "test-node"));
        let curl = || {
            let out = t.node.command("curl").args(["-sS", "--max-time", "0.5", "http://10.250.0.10/"]).output().ok()?;
            (out.status.success() && out.stdout == b"a").then_some(())
        };
        assert!(wait_for(Duration::from_secs(1), curl).is_some(), "curl through the VIP; log:\n{}", agent.log());
        let dig = || {
            let dig = support::dns::dig(&t.node, &["web.default.svc.cluster.local"]);
            (dig.rdata() == ["10.250.0.10"]).then_some(())
        };
        assert!(wait_for(Duration::from_secs(1), dig).is_some(), "dig; log:\n{}", agent.log());
        let (_, body) = agent.get("/api/v1/status").unwrap();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["catalog"]["kubernetes"]["state"], "synced", "{body}");
        assert_eq!(status["catalog"]["synced"], true, "{body}");
        let (_, metrics) = agent.get("/metrics").unwrap();
        assert!(metrics.contains("mesh_agent_catalog_kubernetes_state{state=\"synced\"} 1"), "{metrics}");
        let out = t.node.command(env!("CARGO_BIN_EXE_mesh-agent")).arg("status").output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.contains("kubernetes:") && printed.contains("synced"), "{printed}");
    }

    /// The whole agent (userspace data path) following 10,000 services / 50,000 endpoints: time to have every VIP
    /// on edge0, and the agent's RSS. A measurement:
    /// `cargo test --release -p mesh-agent --test kubernetes -- --ignored --nocapture agent_scale`.
    #[test]
    #[ignore = "scale measurement"]
    fn agent_scale_10k_services_50k_endpoints() {
        if !require_root("agent_scale_10k_services_50k_endpoints") {
            return;
        }
        const SERVICES: usize = 10_000;
        let t = Topology::new();
        let api = FakeApiServer::start_in(&format!("/run/netns/{}", t.node.name));
        fill(&api, SERVICES, "10.250");
        let catalog = format!("kubernetes: {{enable: true, server: \"{}\"}}", api.url());
        let started = Instant::now();
        let agent = Agent::start(&t.node, &Options { catalog: &catalog, ..Options::default() }, "");
        let edge0_addresses = || {
            let out = t.node.command("ip").args(["-o", "-4", "addr", "show", "dev", "edge0"]).output().ok()?;
            (String::from_utf8_lossy(&out.stdout).lines().count() > SERVICES).then_some(())
        };
        assert!(wait_for(Duration::from_secs(120), edge0_addresses).is_some(), "{}", agent.log());
        eprintln!("agent start to {SERVICES} VIPs on edge0: {:?}", started.elapsed());
        let pids = t.node.command("ip").args(["netns", "pids", &t.node.name]).output().unwrap();
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "mesh-agent" {
                eprintln!("agent RSS: {} MiB", rss_kib_of(pid) / 1024);
            }
        }

        let started = Instant::now();
        api.apply(endpoint_slice("bulk", "svc-7-a", "svc-7", &[("http", 8080)], &[("10.200.0.1", true)], "edge-1"));
        let changed = || {
            let svc = agent.services().as_array()?.iter().find(|s| s["name"] == "svc-7")?.clone();
            (svc["endpoints"].as_array()?.len() == 1).then_some(())
        };
        assert!(wait_for(Duration::from_secs(30), changed).is_some());
        eprintln!("one endpoint change through the agent: {:?}", started.elapsed());
        let log = agent.log();
        for line in log.lines().filter(|l| l.contains("catalog applied") || l.contains("catalog built")) {
            eprintln!("{line}");
        }
    }
}
