//! Test harness: network namespaces that stand for a node and its backends, the agent run inside the node
//! namespace, backends and clients run in threads that entered a namespace. Everything is removed on drop, also
//! when a test panics.
//!
//! The node namespace has no default route: a VIP packet the data path failed to rewrite cannot leave it.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod agent;
pub mod backend;
pub mod cgroup;
pub mod dns;
pub mod fake_apiserver;
pub mod load;
pub mod netns;

use std::time::{Duration, Instant};

/// Whether this test can do its real check. Without root it is skipped with a reason, except under CI
/// (`CI=true`), where it fails: a green CI must mean the check ran.
pub fn require_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let why = format!("{test}: needs root to create network namespaces and TUN devices");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why} (CI=true: not skipping)");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lifts this test process's descriptor limit, soft and hard, to `want` where it may (root with
/// CAP_SYS_RESOURCE), else the soft limit to the hard one; returns the limit now in force. Processes it starts,
/// the agent among them, inherit it.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let wanted = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max.max(want) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return want;
        }
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        limit.rlim_cur
    }
}
