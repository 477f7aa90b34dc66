//! The proxy suite's targets. Every target has a topology of its own, so nothing (conntrack hooks, a proxy's
//! sockets) affects another target's numbers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::netns::{self, log_tail, Cgroup, Topology, BACKEND_IP};
use crate::bench::tools::Client;
use crate::cmd;

pub const VIP: &str = "10.250.0.10";
pub const HTTP_PORT: u16 = 80;
pub const IPERF_PORT: u16 = 5201;
/// A second port the backend answers HTTP on: catalog changes in the scale measurements move a service between
/// the two, so every change is real and every state serves.
pub const ALT_HTTP_PORT: u16 = 8080;
pub const ADMIN: &str = "127.0.0.1:19099";
const BODY: &str = "hello from bench\n";

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Target {
    /// Clients connect to the backend's own address: the physical limit.
    Direct,
    /// kube-proxy's mode: a DNAT rule per service port in the node's OUTPUT chain.
    IptablesDnat,
    /// haproxy in tcp mode, listening on the VIP: splice-auto for HTTP, always splicing the iperf3 stream.
    Haproxy,
    /// mesh-agent with `dataplane.mode: userspace`.
    AgentUserspace,
    /// mesh-agent with `dataplane.mode: ebpf`, the clients in the child cgroup it attaches to.
    AgentEbpf,
}

pub const ALL: [Target; 5] =
    [Target::Direct, Target::IptablesDnat, Target::Haproxy, Target::AgentUserspace, Target::AgentEbpf];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::IptablesDnat => "iptables-dnat",
            Target::Haproxy => "haproxy",
            Target::AgentUserspace => "agent-userspace",
            Target::AgentEbpf => "agent-ebpf",
        }
    }
}

/// A target, set up and answering on `host`: what the clients need, and what the agent says it is doing.
pub struct Ready {
    pub topology: Topology,
    pub host: &'static str,
    pub cgroup: Option<Cgroup>,
    pub datapath: Option<serde_json::Value>,
    pub agent: Option<RunningAgent>,
}

/// What the scale measurements need of a running agent.
pub struct RunningAgent {
    pub pid: u32,
    pub catalog: PathBuf,
    pub services: usize,
}

/// Brings up the topology, the backends and `target` with `services` services, and checks one request gets the
/// backend's answer. The measured service is the last one: the others are padding the data path must look past,
/// as kube-proxy's iptables chain matches every service before it in order.
pub fn prepare(target: Target, work: &Path, agent: Result<&Path, &str>, services: usize) -> Result<Ready> {
    if target == Target::Haproxy && services > 1 {
        bail!("measured at 1 service only: a proxy's cost per connection does not grow with its frontends");
    }
    let mut topo = Topology::new(&format!("{}-{services}", target.name()))?;
    start_backends(&mut topo, work)?;
    let mut ready = Ready { host: VIP, cgroup: None, datapath: None, agent: None, topology: topo };
    match target {
        Target::Direct => ready.host = BACKEND_IP,
        Target::IptablesDnat => dnat(&ready.topology, work, services)?,
        Target::Haproxy => haproxy(&mut ready.topology, work)?,
        Target::AgentUserspace | Target::AgentEbpf => {
            let agent = agent.map_err(|why| anyhow::anyhow!("{why}"))?;
            let cgroup = if target == Target::AgentEbpf { Some(Cgroup::new(target.name())?) } else { None };
            let (datapath, running) =
                start_agent(&mut ready.topology, work, agent, cgroup.as_ref().map(|c| c.0.as_path()), services)?;
            ready.datapath = Some(datapath);
            ready.agent = Some(running);
            ready.cgroup = cgroup;
        }
    }
    check_answer(&ready)?;
    Ok(ready)
}

impl Ready {
    pub fn client(&self) -> Client<'_> {
        Client { ns: &self.topology.node, host: self.host, cgroup: self.cgroup.as_ref().map(|c| c.0.as_path()) }
    }
}

pub(crate) fn start_backends(topo: &mut Topology, work: &Path) -> Result<()> {
    let conf = work.join("nginx.conf");
    let mut text = String::new();
    // One worker: the other core is the client's (and the proxy's, for the proxy targets).
    writeln!(
        text,
        "worker_processes 1;\ndaemon off;\npid {0}/nginx.pid;\nerror_log {0}/nginx-error.log;",
        work.display()
    )?;
    writeln!(text, "events {{ worker_connections 4096; }}")?;
    writeln!(
        text,
        "http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {}/nginx-body;",
        work.display()
    )?;
    writeln!(
        text,
        "  server {{\n    listen {HTTP_PORT} backlog=4096;\n    listen {ALT_HTTP_PORT};\n    location / {{ return 200 \"{}\"; }}\n  }}\n}}",
        BODY.escape_default()
    )?;
    std::fs::write(&conf, text)?;
    let backend = topo.backend.clone();
    let mut nginx = netns::exec(&backend, "nginx");
    nginx.arg("-e").arg(work.join("nginx-error.log")).arg("-c").arg(&conf);
    let log = work.join("nginx.log");
    topo.spawn("nginx", nginx, &log)?;
    topo.wait_listening(&backend, "nginx", HTTP_PORT, &log)?;

    let mut iperf = netns::exec(&backend, "iperf3");
    iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
    let log = work.join("iperf3-server.log");
    topo.spawn("iperf3 -s", iperf, &log)?;
    topo.wait_listening(&backend, "iperf3 -s", IPERF_PORT, &log)
}

/// One DNAT rule per service port in the node's OUTPUT chain, loaded in one iptables-restore; the measured
/// service's rules come last.
fn dnat(topo: &Topology, work: &Path, services: usize) -> Result<()> {
    // Locally generated packets are routed before OUTPUT's DNAT, so the VIP needs a route; there is no default.
    cmd::output(Command::new("ip").args(["-n", &topo.node, "route", "add", &format!("{VIP}/32"), "dev", "veth0"]))?;
    let rule = |vip: &str, port: u16| {
        format!("-A OUTPUT -d {vip}/32 -p tcp --dport {port} -j DNAT --to-destination {BACKEND_IP}:{port}\n")
    };
    let mut rules = String::from("*nat\n");
    for i in 0..services - 1 {
        rules += &rule(&padding_vip(i), HTTP_PORT);
    }
    for port in [HTTP_PORT, IPERF_PORT] {
        rules += &rule(VIP, port);
    }
    rules += "COMMIT\n";
    let path = work.join("iptables.rules");
    std::fs::write(&path, rules)?;
    let mut restore = netns::exec(&topo.node, "iptables-restore");
    restore.arg("--noflush").arg(&path);
    cmd::output(&mut restore).context("iptables-restore of the DNAT rules")?;
    Ok(())
}

/// The VIP of padding service `i` (0-based), from the pool's 10.250.1.1 on, clear of the measured [`VIP`].
fn padding_vip(i: usize) -> String {
    format!("10.250.{}.{}", 1 + i / 250, 1 + i % 250)
}

fn haproxy(topo: &mut Topology, work: &Path) -> Result<()> {
    cmd::output(Command::new("ip").args(["-n", &topo.node, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]))?;
    let mut text = String::from(
        "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n",
    );
    // haproxy at its best on each measure: splice-auto never splices an iperf3 stream (haproxy 2.6 copies it
    // with recvfrom/sendto, ~10 Gbit/s on a full CPU here, vs ~15 spliced), and forced splicing of small HTTP
    // messages costs it ~10% of its requests/s.
    for (name, port, splice) in [
        ("http", HTTP_PORT, "option splice-auto"),
        ("iperf", IPERF_PORT, "option splice-request\n  option splice-response"),
    ] {
        writeln!(text, "listen {name}\n  bind {VIP}:{port}\n  {splice}\n  server backend {BACKEND_IP}:{port}")?;
    }
    let conf = work.join("haproxy.cfg");
    std::fs::write(&conf, text)?;
    let node = topo.node.clone();
    let mut haproxy = netns::exec(&node, "haproxy");
    haproxy.arg("-db").arg("-f").arg(&conf);
    let log = work.join("haproxy.log");
    topo.spawn("haproxy", haproxy, &log)?;
    topo.wait_listening(&node, "haproxy", IPERF_PORT, &log)
}

/// Runs the agent in the node namespace on a catalog of `services` services and waits for `/readyz`; returns its
/// `/api/v1/datapath` answer.
fn start_agent(
    topo: &mut Topology,
    work: &Path,
    agent: &Path,
    cgroup: Option<&Path>,
    services: usize,
) -> Result<(serde_json::Value, RunningAgent)> {
    let catalog = work.join("catalog.yaml");
    write_catalog(&catalog, services, HTTP_PORT)?;
    let mode = if cgroup.is_some() { "ebpf" } else { "userspace" };
    let state = work.join(format!("state-{mode}"));
    let mut config = format!(
        "nodeName: bench\nstateDir: {}\ndns:\n  enable: false\ncatalog:\n  files: [{}]\nadmin:\n  listen: {ADMIN}\n\
         dataplane:\n  mode: {mode}\n",
        state.display(),
        catalog.display()
    );
    if let Some(cgroup) = cgroup {
        writeln!(config, "  cgroupPath: {}", cgroup.display())?;
    }
    let config_path = work.join(format!("agent-{mode}.yaml"));
    std::fs::write(&config_path, config)?;

    let log = work.join(format!("agent-{mode}.log"));
    // Reading and programming 10,000 services takes a while on a small machine.
    let pid = spawn_agent(topo, agent, &config_path, &log, Duration::from_secs(60))?;
    let node = topo.node.clone();
    let url = format!("http://{ADMIN}");
    let datapath = cmd::output(netns::exec(&node, "curl").args(["-sf", "-m", "2", &format!("{url}/api/v1/datapath")]))?;
    let datapath: serde_json::Value = serde_json::from_str(&datapath).context("/api/v1/datapath is not JSON")?;
    let got = datapath.get("mode").and_then(|m| m.as_str()).unwrap_or("?");
    if got != mode {
        bail!("mesh-agent runs the {got} data path, not {mode}: {}", datapath.get("why").unwrap_or(&datapath));
    }
    Ok((datapath, RunningAgent { pid, catalog, services }))
}

/// Runs the agent in the node namespace with `config` (its admin API on [`ADMIN`]) and waits up to `within` for
/// `/readyz`; returns its pid.
pub fn spawn_agent(topo: &mut Topology, agent: &Path, config: &Path, log: &Path, within: Duration) -> Result<u32> {
    let node = topo.node.clone();
    let mut run = netns::exec(&node, agent);
    run.arg("run").arg("--config").arg(config).env("NO_COLOR", "1");
    let pid = topo.spawn("mesh-agent", run, log)?;
    let ready = format!("http://{ADMIN}/readyz");
    let deadline = Instant::now() + within;
    while cmd::probe(netns::exec(&node, "curl").args(["-sf", "-m", "1", &ready])).is_none() {
        topo.check_alive("mesh-agent", log)?;
        if Instant::now() > deadline {
            bail!("mesh-agent not ready after {} s{}", within.as_secs(), log_tail(log));
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(pid)
}

/// Writes the catalog atomically (the agent never reads half a file): `services - 1` padding services with one
/// HTTP port each, then the measured service with its HTTP port's endpoint on `http_port`. Each service has an
/// EndpointSlice, as the Kubernetes API would give it.
pub fn write_catalog(path: &Path, services: usize, http_port: u16) -> Result<()> {
    let mut yaml = String::with_capacity(services * 600);
    let mut service = |name: &str, vip: &str, ports: &[(&str, u16, u16)]| -> std::fmt::Result {
        writeln!(yaml, "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}")?;
        writeln!(yaml, "spec:\n  clusterIP: {vip}\n  ports:")?;
        for (port_name, port, _) in ports {
            writeln!(yaml, "  - {{name: {port_name}, port: {port}, targetPort: {port_name}}}")?;
        }
        writeln!(yaml, "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice")?;
        writeln!(yaml, "metadata:\n  name: {name}-1\n  namespace: default")?;
        writeln!(yaml, "  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:")?;
        for (port_name, _, target) in ports {
            writeln!(yaml, "  - {{name: {port_name}, port: {target}}}")?;
        }
        writeln!(
            yaml,
            "endpoints:\n  - addresses: [{BACKEND_IP}]\n    nodeName: bench\n    conditions: {{ready: true}}"
        )?;
        writeln!(yaml, "---")
    };
    for i in 0..services - 1 {
        service(&format!("pad-{i}"), &padding_vip(i), &[("http", HTTP_PORT, HTTP_PORT)])?;
    }
    service("bench", VIP, &[("http", HTTP_PORT, http_port), ("iperf", IPERF_PORT, IPERF_PORT)])?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// One request through the target, from the client's namespace and cgroup, must reach the backend.
fn check_answer(ready: &Ready) -> Result<()> {
    let client = ready.client();
    let url = format!("http://{}:{HTTP_PORT}/", client.host);
    let mut curl = client.command(10, "curl");
    curl.args(["-sS", "-m", "3", &url]);
    let body = cmd::output(&mut curl).with_context(|| format!("no answer from {url}"))?;
    if body != BODY {
        bail!("{url} answered {body:?}, not the backend's {BODY:?}");
    }
    Ok(())
}
