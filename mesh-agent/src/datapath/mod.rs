//! The data path: how a connection to a service VIP reaches a backend. One trait, two implementations: the eBPF
//! socket-level rewrite (`ebpf`) and the userspace splice proxy (`userspace`). The reconciler feeds either the
//! same diffs.

pub mod ebpf;
mod split;
pub mod userspace;

pub use crate::sources::Sources;
pub use ebpf::{KernelCounters, KernelCounts};
pub use split::start;
pub use userspace::{BackendStats, FrontendStats, ProxyCounters};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::catalog::{Protocol, ServiceId};
use crate::lb::Policy;

/// What a client connects to: a service VIP, port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.vip, self.port), self.protocol.as_str())
    }
}

/// Where a frontend's connections go. `backends` holds ready endpoints only, in a stable order; empty means
/// "refuse connections at once".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceId,
    pub policy: Policy,
    pub backends: Arc<[SocketAddr]>,
}

/// The desired frontends of the whole catalog.
pub type Frontends = BTreeMap<Frontend, FrontendSpec>;

/// One step from the old frontends to the new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(Frontend, FrontendSpec),
    Remove(Frontend),
}

/// The changes that turn `old` into `new`: only frontends that differ, so one endpoint edit in a large catalog
/// touches one frontend.
pub fn diff(old: &Frontends, new: &Frontends) -> Vec<Change> {
    let removed = old.keys().filter(|f| !new.contains_key(f)).map(|f| Change::Remove(*f));
    let upserted =
        new.iter().filter(|(f, spec)| old.get(f) != Some(spec)).map(|(f, spec)| Change::Upsert(*f, spec.clone()));
    removed.chain(upserted).collect()
}

/// Frontends a data path could not program, with why; the other changes took effect.
#[derive(Debug, Default)]
pub struct ApplyError {
    pub failed: Vec<(Frontend, String)>,
}

impl ApplyError {
    pub fn check(self) -> Result<(), ApplyError> {
        if self.failed.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} frontend(s) failed:", self.failed.len())?;
        for (frontend, why) in &self.failed {
            write!(f, " {frontend}: {why};")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApplyError {}

/// Where a data path reports backends it could not connect to (passive health checking).
pub type FailureSink = Arc<dyn Fn(SocketAddr) + Send + Sync>;

/// What the admin API and `mesh-agent status` show about the data path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    /// `ebpf` or `userspace` (per feature, see `features`).
    pub mode: String,
    /// Why this mode was chosen.
    pub why: String,
    /// Per feature (tcp, udp, getpeername, ...): which implementation serves it and why.
    pub features: Vec<FeatureStatus>,
    /// Loaded kernel programs (empty on the userspace path).
    pub programs: Vec<String>,
    /// Map name → (entries, capacity).
    pub maps: BTreeMap<String, (usize, usize)>,
    pub frontends: usize,
    /// Connections (and UDP flows) the userspace proxy carries now; the kernel path keeps none.
    #[serde(default)]
    pub active_connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureStatus {
    pub feature: String,
    pub implementation: String,
    pub why: String,
}

/// A data path implementation. `apply` gets every change once, in order; a frontend that cannot be programmed is
/// reported in the error and the others still take effect.
pub trait Datapath: Send {
    fn apply(&mut self, changes: &[Change]) -> Result<(), ApplyError>;
    fn status(&self) -> DatapathStatus;
    /// The first whole catalog has been applied: state left by a previous agent that it did not confirm can go.
    fn catalog_applied(&mut self) {}
    /// The proxy's per-frontend counters, where it serves frontends.
    fn proxy_counters(&self) -> Option<Arc<ProxyCounters>> {
        None
    }
    /// The kernel programs' per-frontend counters, where eBPF serves frontends.
    fn kernel_counters(&self) -> Option<Arc<KernelCounters>> {
        None
    }
    /// Stops taking new connections; those established go on (graceful shutdown drains them).
    fn stop_accepting(&mut self) {}
    /// Stops serving: detaches what the agent attached, unless configured to leave it in place.
    fn shutdown(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::Strategy;

    fn spec(ports: &[u16]) -> FrontendSpec {
        FrontendSpec {
            service: ServiceId { namespace: "default".into(), name: "web".into() },
            policy: Policy { strategy: Strategy::RoundRobin, affinity: None },
            backends: ports.iter().map(|p| SocketAddr::from(([10, 0, 0, 1], *p))).collect(),
        }
    }

    fn frontend(port: u16) -> Frontend {
        Frontend { vip: [10, 250, 0, 1].into(), port, protocol: Protocol::Tcp }
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let old: Frontends =
            [(frontend(80), spec(&[1])), (frontend(81), spec(&[1])), (frontend(82), spec(&[1]))].into();
        let new: Frontends =
            [(frontend(80), spec(&[1])), (frontend(81), spec(&[1, 2])), (frontend(83), spec(&[1]))].into();
        let changes = diff(&old, &new);
        assert_eq!(
            changes,
            vec![
                Change::Remove(frontend(82)),
                Change::Upsert(frontend(81), spec(&[1, 2])),
                Change::Upsert(frontend(83), spec(&[1]))
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
