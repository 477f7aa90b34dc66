//! A child cgroup (v2) of a test's own: the eBPF data path under test attaches there, never to the root cgroup.
//!
//! BPF cgroup programs act on the sockets of member processes only, and membership is per process (not per
//! thread), so a client under test is a separate process put into the cgroup between fork and exec
//! ([`Cgroup::command`]). On drop (also when a test panics) the cgroup waits for its members to exit (killing
//! stragglers, which can only be this test's clients), removes the pins an agent attached here may have left
//! (SIGKILL, `keepOnExit`), and is removed. Declare it before the `Agent` so the agent stops first.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::netns::Netns;
use super::wait_for;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where the agent pins the maps and links of the data path attached to a cgroup (`default_pin_dir`).
const PINS: &str = "/sys/fs/bpf/mesh-agent";

/// The cgroup2 mount point from /proc/mounts (`/sys/fs/cgroup/unified` on a hybrid host).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect("no cgroup2 mount in /proc/mounts")
}

pub struct Cgroup {
    pub path: PathBuf,
    inode: u64,
}

impl Cgroup {
    /// A fresh child of the cgroup2 root. `role` makes the name readable while a test runs.
    pub fn new(role: &str) -> Self {
        let root = cgroup2_root();
        let path = root.join(format!("mt-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        assert!(path.parent() == Some(root.as_path()) && path != root, "not a child cgroup: {}", path.display());
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        let inode = std::fs::metadata(&path).unwrap().ino();
        Self { path, inode }
    }

    /// The bpffs directory where an agent attached to this cgroup pins its maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(PINS).join(self.inode.to_string())
    }

    /// Makes `cmd`'s process a member before it execs, so the program and all its children are in the cgroup.
    pub fn enter<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let procs = CString::new(self.path.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on data made before.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            })
        }
    }

    /// `program` run inside the network namespace `ns` and this cgroup.
    pub fn command(&self, ns: &Netns, program: &str) -> Command {
        let mut cmd = ns.command(program);
        self.enter(&mut cmd);
        cmd
    }

    /// The member processes.
    pub fn procs(&self) -> Vec<i32> {
        let text = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let empty = |limit| wait_for(limit, || self.procs().is_empty().then_some(())).is_some();
        if !empty(Duration::from_secs(5)) {
            // Only this test's clients are members.
            for pid in self.procs() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            empty(Duration::from_secs(5));
        }
        let pins = self.pin_dir();
        if pins.exists() {
            if let Err(e) = std::fs::remove_dir_all(&pins) {
                eprintln!("removing leftover pins {}: {e}", pins.display());
            }
        }
        // Exited members may take a moment to leave.
        let removed = wait_for(Duration::from_secs(5), || std::fs::remove_dir(&self.path).ok());
        if removed.is_none() {
            eprintln!("could not remove cgroup {}: {:?}", self.path.display(), std::fs::remove_dir(&self.path));
        }
    }
}
