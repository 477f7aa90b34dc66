//! The agent under test: the real `mesh-agent` binary run inside a node namespace with its own state dir, config
//! and catalog file. SIGTERM (then SIGKILL) on drop; its log is printed when the test failed.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use super::netns::Netns;
use super::wait_for;

pub const ADMIN: &str = "127.0.0.1:9099";

pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    ns_path: String,
    _tmp: Option<tempfile::TempDir>,
}

/// The parts of the config a test chooses; the rest is fixed by the harness.
pub struct Options<'a> {
    pub mode: &'a str,
    pub strategy: &'a str,
    /// Extra top-level config keys (YAML), e.g. `device: {vipPool: 10.250.0.0/30}`.
    pub extra: &'a str,
    /// Extra keys under `catalog:` besides the harness's file, e.g. `kubernetes: {enable: true, server: URL}`.
    pub catalog: &'a str,
    /// Extra keys under `dataplane:` besides `mode`, one `key: value` per line, e.g. `cgroupPath: /sys/fs/cgroup/x`.
    pub dataplane: &'a str,
    /// Run the agent with the host's mounts (see [`Netns::command_keep_mounts`]) instead of `ip netns exec`'s:
    /// the eBPF data path needs the host's /sys/fs/cgroup and /sys/fs/bpf.
    pub host_mounts: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self { mode: "userspace", strategy: "RoundRobin", extra: "", catalog: "", dataplane: "", host_mounts: false }
    }
}

impl Agent {
    /// Starts an agent in `ns` serving `catalog`, and waits until it is ready.
    pub fn start(ns: &Netns, options: &Options, catalog: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join("catalog.yaml"), catalog).unwrap();
        let mut agent = Self::start_in(ns, &dir, options);
        agent._tmp = Some(tmp);
        agent
    }

    /// Like [`Agent::start`], but an agent that exits before it is ready is an `Err` with its log, for tests that
    /// tell "cannot run here" (e.g. no eBPF) from a failure.
    pub fn try_start(ns: &Netns, options: &Options, catalog: &str) -> Result<Self, String> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        std::fs::write(dir.join("catalog.yaml"), catalog).unwrap();
        let mut agent = Self::try_start_in(ns, &dir, options)?;
        agent._tmp = Some(tmp);
        Ok(agent)
    }

    /// Starts an agent on an existing directory (its state and catalog), as a restart does.
    pub fn start_in(ns: &Netns, dir: &Path, options: &Options) -> Self {
        let agent = Self::spawn_in(ns, dir, options);
        agent.wait_ready();
        agent
    }

    /// [`Agent::start_in`] that returns the log instead of panicking when the agent exits before it is ready.
    pub fn try_start_in(ns: &Netns, dir: &Path, options: &Options) -> Result<Self, String> {
        let mut agent = Self::spawn_in(ns, dir, options);
        let ready = wait_for(Duration::from_secs(20), || {
            if agent.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some()) {
                return Some(false);
            }
            (agent.get("/readyz").ok()?.0 == 200).then_some(true)
        });
        match ready {
            Some(true) => Ok(agent),
            Some(false) => {
                agent.child = None;
                Err(agent.log())
            }
            None => panic!("agent not ready within 20 s; log:\n{}", agent.log()),
        }
    }

    fn spawn_in(ns: &Netns, dir: &Path, options: &Options) -> Self {
        let config = format!(
            "nodeName: test-node\nstateDir: {dir}/state\ncatalog:\n  files: [{dir}/catalog.yaml]\n  {catalog}\n\
             dataplane:\n  mode: {mode}\n  {dataplane}\nloadBalancer:\n  strategy: {strategy}\n{extra}\n",
            dir = dir.display(),
            catalog = options.catalog,
            mode = options.mode,
            dataplane = options.dataplane.replace('\n', "\n  "),
            strategy = options.strategy,
            extra = options.extra,
        );
        std::fs::write(dir.join("config.yaml"), config).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let program = env!("CARGO_BIN_EXE_mesh-agent");
        let child = if options.host_mounts { ns.command_keep_mounts(program) } else { ns.command(program) }
            .args(["run", "--config"])
            .arg(dir.join("config.yaml"))
            .env("RUST_LOG", "info,mesh_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning mesh-agent");
        Self { child: Some(child), dir: dir.to_owned(), ns_path: format!("/run/netns/{}", ns.name), _tmp: None }
    }

    pub fn wait_ready(&self) {
        let ready = wait_for(Duration::from_secs(20), || (self.get("/readyz").ok()?.0 == 200).then_some(()));
        assert!(ready.is_some(), "agent not ready within 20 s; log:\n{}", self.log());
    }

    /// GET on the admin API from inside the node namespace: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let (ns_path, path) = (self.ns_path.clone(), path.to_owned());
        std::thread::spawn(move || {
            super::netns::enter(&ns_path);
            let mut conn = TcpStream::connect_timeout(&ADMIN.parse().unwrap(), Duration::from_secs(2))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(conn, "GET {path} HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            conn.read_to_string(&mut response)?;
            let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Ok((status, body))
        })
        .join()
        .expect("admin client thread")
    }

    /// The value of one series of `/metrics`, given as printed: `name{labels}`.
    pub fn metric(&self, series: &str) -> Option<u64> {
        let (_, text) = self.get("/metrics").ok()?;
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn services(&self) -> serde_json::Value {
        let (status, body) = self.get("/api/v1/services").expect("admin API");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("services JSON")
    }

    /// The VIP of `namespace/name`, once it has one.
    pub fn vip(&self, namespace: &str, name: &str) -> IpAddr {
        let found = wait_for(Duration::from_secs(5), || {
            self.services().as_array()?.iter().find_map(|s| {
                (s["namespace"] == namespace && s["name"] == name).then(|| s["vip"].as_str()?.parse().ok())?
            })
        });
        found.unwrap_or_else(|| panic!("{namespace}/{name} has no VIP; services: {}", self.services()))
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.dir.join("catalog.yaml")
    }

    /// Replaces the catalog file atomically, as a careful operator (or a config manager) does.
    pub fn write_catalog(&self, text: &str) {
        let tmp = self.dir.join(".catalog.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.catalog_path()).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits up to `limit` for the agent to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_for(limit, || child.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- agent log ({}) ----\n{}", self.dir.display(), self.log());
        }
    }
}

/// A catalog with one service `default/NAME` (clusterIP as given: an address, "" for a pool VIP, or "None"),
/// TCP port 80 (`http`) and UDP port 53 (`dns`) on each backend `ip:port` (the same port for both protocols).
pub fn catalog(name: &str, cluster_ip: &str, backends: &[SocketAddr]) -> String {
    let cluster_ip = if cluster_ip.is_empty() { String::new() } else { format!("\n  clusterIP: {cluster_ip}") };
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:{cluster_ip}\n  ports:\n  \
         - {{name: http, port: 80, protocol: TCP}}\n  - {{name: dns, port: 53, protocol: UDP}}\n"
    );
    for (i, b) in backends.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: default\n  \
             labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: {port}, protocol: TCP}}\n\
             - {{name: dns, port: {port}, protocol: UDP}}\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: test-node\n",
            port = b.port(),
            ip = b.ip(),
        ));
    }
    out
}
