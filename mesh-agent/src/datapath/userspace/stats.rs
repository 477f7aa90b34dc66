//! Per-frontend counters, bumped with relaxed atomics on the data path and read as a serializable snapshot (the
//! admin API exports them as Prometheus metrics).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::catalog::ServiceId;

/// What one frontend has done since it was created (an update keeps them; a removal drops them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendStats {
    pub service: ServiceId,
    /// Whether a socket is bound on VIP:port. A TCP frontend without backends has none, so clients are refused.
    pub listening: bool,
    /// TCP connections accepted; UDP flows created.
    pub connections: u64,
    /// TCP connections open now; UDP flows alive now.
    pub active: u64,
    /// Bytes forwarded from clients to backends.
    pub bytes_in: u64,
    /// Bytes forwarded from backends to clients.
    pub bytes_out: u64,
    /// TCP: connections reset because no backend was ready or none could be reached. UDP: datagrams dropped (no
    /// backend, flow table full, socket buffer full).
    pub failures: u64,
    /// Connections (UDP: datagrams) from clients outside the node-local set, refused.
    pub rejected: u64,
    /// The current backends, in the service's order, then up to 16 that left rotation (newest first).
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStats {
    pub backend: SocketAddr,
    /// Times the balancer chose this backend (every connect attempt, every new UDP flow).
    pub selected: u64,
    /// TCP connect attempts to it that failed or timed out.
    pub connect_failures: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub connections: AtomicU64,
    active: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub failures: AtomicU64,
    pub rejected: AtomicU64,
}

impl Counters {
    /// Counts one more active connection until the guard drops, whichever way the connection ends.
    pub fn open(&self) -> Active<'_> {
        bump(&self.active, 1);
        Active(&self.active)
    }

    pub fn set_active(&self, n: usize) {
        self.active.store(n as u64, Ordering::Relaxed);
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self, service: ServiceId, listening: bool, backends: Vec<BackendStats>) -> FrontendStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FrontendStats {
            service,
            listening,
            connections: get(&self.connections),
            active: get(&self.active),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            failures: get(&self.failures),
            rejected: get(&self.rejected),
            backends,
        }
    }
}

pub(super) fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

pub(super) struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct BackendCounters {
    selected: AtomicU64,
    connect_failures: AtomicU64,
}

static ZERO: BackendCounters = BackendCounters { selected: AtomicU64::new(0), connect_failures: AtomicU64::new(0) };

/// Backends out of rotation whose counters are still shown, newest first. Bounded, so a frontend whose endpoints
/// churn (pods rescheduled to new addresses) does not grow without end.
const RETIRED: usize = 16;

/// Per-backend counters of one backend set. Immutable once built, so the accept path reads it without a lock; a
/// backend that stays across an update keeps its counters (shared, so no increment is lost in the swap). A backend
/// that leaves keeps them too, among the retired: the connect failures that got a backend ejected by the health
/// checks must not vanish with it.
#[derive(Debug)]
pub(super) struct Selections {
    current: HashMap<SocketAddr, Arc<BackendCounters>>,
    retired: Vec<(SocketAddr, Arc<BackendCounters>)>,
}

impl Selections {
    pub fn new(backends: &[SocketAddr], previous: Option<&Selections>) -> Self {
        let kept = |b: &SocketAddr| {
            let previous = previous?;
            previous.current.get(b).or_else(|| previous.retired.iter().find(|(r, _)| r == b).map(|(_, c)| c)).cloned()
        };
        let current: HashMap<_, _> = backends.iter().map(|b| (*b, kept(b).unwrap_or_default())).collect();
        let retired = match previous {
            Some(p) => {
                let mut left: Vec<_> = p.current.iter().filter(|(b, _)| !current.contains_key(b)).collect();
                left.sort_by_key(|(b, _)| **b);
                let left = left.into_iter().map(|(b, c)| (*b, Arc::clone(c)));
                let older = p.retired.iter().filter(|(b, _)| !current.contains_key(b)).cloned();
                left.chain(older).take(RETIRED).collect()
            }
            None => Vec::new(),
        };
        Self { current, retired }
    }

    pub fn selected(&self, backend: SocketAddr) {
        if let Some(c) = self.current.get(&backend) {
            bump(&c.selected, 1);
        }
    }

    pub fn connect_failed(&self, backend: SocketAddr) {
        if let Some(c) = self.current.get(&backend) {
            bump(&c.connect_failures, 1);
        }
    }

    /// The backends of `order` (the current ones), then the retired.
    pub fn snapshot(&self, order: &[SocketAddr]) -> Vec<BackendStats> {
        let stats = |backend: SocketAddr, c: &BackendCounters| BackendStats {
            backend,
            selected: c.selected.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
        };
        let current = order.iter().map(|b| stats(*b, self.current.get(b).map(Arc::as_ref).unwrap_or(&ZERO)));
        current.chain(self.retired.iter().map(|(b, c)| stats(*b, c))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn stats(i: u8, selected: u64, connect_failures: u64) -> BackendStats {
        BackendStats { backend: backend(i), selected, connect_failures }
    }

    #[test]
    fn a_backend_out_of_rotation_keeps_its_counters() {
        let both = Selections::new(&[backend(1), backend(2)], None);
        both.selected(backend(1));
        both.connect_failed(backend(2));
        let one = Selections::new(&[backend(1)], Some(&both));
        assert_eq!(one.snapshot(&[backend(1)]), [stats(1, 1, 0), stats(2, 0, 1)]);
        // Back in rotation, with the same counters, and no longer among the retired.
        let again = Selections::new(&[backend(1), backend(2)], Some(&one));
        again.connect_failed(backend(2));
        assert_eq!(again.snapshot(&[backend(1), backend(2)]), [stats(1, 1, 0), stats(2, 0, 2)]);
    }

    #[test]
    fn retired_backends_are_bounded_newest_first() {
        let mut selections = Selections::new(&[backend(0)], None);
        for i in 1..=40 {
            selections = Selections::new(&[backend(i)], Some(&selections));
        }
        let shown = selections.snapshot(&[backend(40)]);
        assert_eq!(shown.len(), 1 + RETIRED);
        assert_eq!(shown[1].backend, backend(39), "the newest retired first");
    }
}
