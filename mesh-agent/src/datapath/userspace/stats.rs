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
    /// The current backends, in the service's order.
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

/// Per-backend counters of one backend set. Immutable once built, so the accept path reads it without a lock; a
/// backend that stays across an update keeps its counters (shared, so no increment is lost in the swap).
#[derive(Debug)]
pub(super) struct Selections(HashMap<SocketAddr, Arc<BackendCounters>>);

impl Selections {
    pub fn new(backends: &[SocketAddr], previous: Option<&Selections>) -> Self {
        let counters = |b: &SocketAddr| previous.and_then(|p| p.0.get(b)).cloned().unwrap_or_default();
        Self(backends.iter().map(|b| (*b, counters(b))).collect())
    }

    pub fn selected(&self, backend: SocketAddr) {
        if let Some(c) = self.0.get(&backend) {
            bump(&c.selected, 1);
        }
    }

    pub fn connect_failed(&self, backend: SocketAddr) {
        if let Some(c) = self.0.get(&backend) {
            bump(&c.connect_failures, 1);
        }
    }

    pub fn snapshot(&self, order: &[SocketAddr]) -> Vec<BackendStats> {
        let stats = |backend: &SocketAddr| {
            let c = self.0.get(backend).cloned().unwrap_or_default();
            BackendStats {
                backend: *backend,
                selected: c.selected.load(Ordering::Relaxed),
                connect_failures: c.connect_failures.load(Ordering::Relaxed),
            }
        };
        order.iter().map(stats).collect()
    }
}
