//! The bench topology: a "node" namespace (clients, proxies, the agent) and a "backend" namespace (the
//! servers), joined by one veth pair. Neither has a default route, so nothing a bench target does can send a
//! packet off the machine. Dropping a [`Topology`] stops what it started and deletes both namespaces.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd;

pub const NODE_IP: &str = "10.251.0.1";
pub const BACKEND_IP: &str = "10.251.0.2";
/// Namespace (and cgroup) names start with this and the owning xtask's pid, so leftovers of a killed run can be
/// told apart from a concurrent run's.
const PREFIX: &str = "mxb";

pub struct Topology {
    pub node: String,
    pub backend: String,
    children: Vec<(String, Child)>,
}

/// PROGRAM in network namespace `ns`. nsenter switches only the network namespace, where `ip netns exec` also
/// remounts /sys and so hides the cgroup2 mount the eBPF target needs. nsenter execs the program, so a spawned
/// child's pid is the program's.
pub fn exec(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(program);
    cmd
}

impl Topology {
    pub fn new(tag: &str) -> Result<Self> {
        let base = format!("{PREFIX}{}-{tag}", std::process::id());
        let topo = Self { node: format!("{base}-node"), backend: format!("{base}-backend"), children: Vec::new() };
        for ns in [&topo.node, &topo.backend] {
            cmd::output(Command::new("ip").args(["netns", "add", ns]))?;
        }
        cmd::output(Command::new("ip").args(["link", "add", "veth0", "netns", &topo.node, "type", "veth"]).args([
            "peer",
            "name",
            "veth0",
            "netns",
            &topo.backend,
        ]))?;
        for (ns, addr) in [(&topo.node, NODE_IP), (&topo.backend, BACKEND_IP)] {
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "veth0"])?;
            ip(ns, &["link", "set", "veth0", "up"])?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        // New-connection runs open well over the default 28k ephemeral ports' worth of connections.
        sysctl(&topo.node, "net.ipv4.ip_local_port_range=1024 65535")?;
        sysctl(&topo.node, "net.ipv4.tcp_tw_reuse=1")?;
        Ok(topo)
    }

    /// Starts a long-running program (built with [`exec`]) with its output in `log`; returns its pid.
    pub fn spawn(&mut self, name: &str, mut command: Command, log: &Path) -> Result<u32> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = command.spawn().with_context(|| format!("cannot start {name}: {}", cmd::display(&command)))?;
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Waits until something in `ns` listens on TCP `port`, failing early if `name` (started by
    /// [`spawn`](Self::spawn)) has exited.
    pub fn wait_listening(&mut self, ns: &str, name: &str, port: u16, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let filter = format!("sport = :{port}");
            let listening = cmd::probe(exec(ns, "ss").args(["-Hltn", &filter])).is_some_and(|o| !o.trim().is_empty());
            if listening {
                return Ok(());
            }
            self.check_alive(name, log)?;
            if Instant::now() > deadline {
                bail!("{name} does not listen on port {port} after 10 s{}", log_tail(log));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn check_alive(&mut self, name: &str, log: &Path) -> Result<()> {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited ({status}){}", log_tail(log));
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Newest first: the agent and proxies go before the backends they talk to.
        for (_, child) in self.children.drain(..).rev() {
            terminate(child);
        }
        for ns in [&self.node, &self.backend] {
            let _ = cmd::output(Command::new("ip").args(["netns", "del", ns]));
        }
    }
}

fn terminate(mut child: Child) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(["-n", ns]).args(args)).map(drop)
}

fn sysctl(ns: &str, setting: &str) -> Result<()> {
    cmd::output(exec(ns, "sysctl").args(["-qw", setting])).map(drop)
}

/// The last lines of a log, for an error message.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(5)..];
    format!(":\n    {}", tail.join("\n    "))
}

/// A child cgroup for the eBPF target: the agent attaches there and the clients join it, so BPF never
/// touches the root cgroup.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let path = cmd::cgroup2_root()?.join(format!("{PREFIX}{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Removes namespaces and cgroups left by bench runs that were killed before they could clean up.
pub fn sweep_stale() {
    let is_stale = |name: &str| {
        let pid = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let namespaces = cmd::probe(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for ns in namespaces.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| is_stale(n)) {
        println!("bench: removing namespace {ns} left by an earlier run");
        let _ = cmd::output(Command::new("ip").args(["netns", "del", ns]));
    }
    if let Ok(root) = cmd::cgroup2_root() {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if is_stale(&entry.file_name().to_string_lossy()) {
                println!("bench: removing cgroup {} left by an earlier run", entry.path().display());
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// Runs `f` on a thread that has joined network namespace `ns` (a thread's namespace is its own, so the rest of
/// the bench stays where it is): for measurements that talk to a namespace's loopback many times a second, where
/// a process per request would measure process start-up.
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // SAFETY: setns with a valid namespace descriptor affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("cannot join network namespace {ns}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("the measurement in {ns} panicked"))
    })
}
