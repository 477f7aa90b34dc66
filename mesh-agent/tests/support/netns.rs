//! Network namespaces made with iproute2 and entered per thread with setns(2).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace with `lo` up. `role` makes the name readable in `ip netns` while a test runs.
    pub fn new(role: &str) -> Self {
        let name = format!("mt-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Sets a per-namespace sysctl (`net.*`), e.g. `net.core.somaxconn`.
    pub fn sysctl(&self, key: &str, value: &str) {
        let out = self.command("sysctl").args(["-qw", &format!("{key}={value}")]).output().expect("running sysctl");
        assert!(out.status.success(), "sysctl {key}={value}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }

    /// Spawns a thread that enters this namespace, then runs `f`.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// A command that runs inside this network namespace but keeps the host's mounts. `ip netns exec` remounts
    /// /sys for the namespace, which hides /sys/fs/cgroup and /sys/fs/bpf: a program that pins BPF objects for
    /// others (the agent on the eBPF data path) must see the host's bpffs, or its pins die with it.
    pub fn command_keep_mounts(&self, program: &str) -> Command {
        let path = format!("/run/netns/{}", self.name);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut cmd = Command::new(program);
        // SAFETY: between fork and exec only setns(2) on a descriptor opened before.
        unsafe {
            cmd.pre_exec(move || match libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        cmd
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A node namespace and a backend namespace joined by a veth pair: node 10.201.0.1/24, backend 10.201.0.2/24
/// (plus 10.201.0.3 and .4 for tests that want several backend hosts). The node has no default route.
pub struct Topology {
    pub node: Netns,
    pub backends: Netns,
}

pub const NODE_IP: &str = "10.201.0.1";
pub const BACKEND_IPS: [&str; 3] = ["10.201.0.2", "10.201.0.3", "10.201.0.4"];

impl Topology {
    pub fn new() -> Self {
        let node = Netns::new("node");
        let backends = Netns::new("be");
        // Created inside the node namespace so parallel tests never collide on interface names.
        node.ip(&["link", "add", "veth-n", "type", "veth", "peer", "name", "veth-b", "netns", &backends.name]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "veth-n"]);
        node.ip(&["link", "set", "veth-n", "up"]);
        for ip in BACKEND_IPS {
            backends.ip(&["addr", "add", &format!("{ip}/24"), "dev", "veth-b"]);
        }
        backends.ip(&["link", "set", "veth-b", "up"]);
        Self { node, backends }
    }
}
