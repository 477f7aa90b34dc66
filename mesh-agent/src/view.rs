//! What the agent shows about itself: the read model the reconciler publishes and the admin API serves.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, ClusterIp, SourceState, TargetPort};
use crate::datapath::{DatapathStatus, Frontend, FrontendStats, KernelCounters, KernelCounts, ProxyCounters};
use crate::ipam::Assignment;
use crate::reconcile::Resolved;

/// One service as `/api/v1/services` and `mesh-agent services` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub name: String,
    pub namespace: String,
    /// The VIP, if it has one (headless services and those whose VIP could not be assigned have none).
    pub vip: Option<IpAddr>,
    pub headless: bool,
    /// Why the service has no VIP, when it should have one.
    pub vip_error: Option<String>,
    pub session_affinity_seconds: Option<u64>,
    pub ports: Vec<PortView>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortView {
    pub name: String,
    pub port: u16,
    pub protocol: String,
    pub target_port: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub ip: IpAddr,
    /// The endpoint's port for each service port (by service port name), where it has one.
    pub ports: Vec<u16>,
    pub node: Option<String>,
    pub hostname: Option<String>,
    pub ready: bool,
    /// False while health checks hold the endpoint out of rotation.
    #[serde(default = "yes")]
    pub healthy: bool,
}

fn yes() -> bool {
    true
}

impl ServiceView {
    pub fn all(catalog: &Catalog, assignment: &Assignment, unhealthy: &BTreeSet<SocketAddr>) -> Vec<ServiceView> {
        catalog
            .services
            .iter()
            .map(|(id, svc)| ServiceView {
                name: id.name.clone(),
                namespace: id.namespace.clone(),
                vip: assignment.vips.get(id).copied(),
                headless: svc.cluster_ip == ClusterIp::Headless,
                vip_error: assignment.errors.get(id).map(|e| e.to_string()),
                session_affinity_seconds: svc.affinity.map(|d| d.as_secs()),
                ports: svc
                    .ports
                    .iter()
                    .map(|p| PortView {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol.as_str().into(),
                        target_port: match &p.target_port {
                            TargetPort::Number(n) => n.to_string(),
                            TargetPort::Name(n) => n.clone(),
                        },
                    })
                    .collect(),
                endpoints: svc
                    .endpoint_sets
                    .iter()
                    .flat_map(|set| {
                        let ports: Vec<u16> = set.ports.iter().map(|p| p.port).collect();
                        set.endpoints.iter().map(move |e| EndpointView {
                            ip: e.ip,
                            healthy: !ports.iter().any(|p| unhealthy.contains(&SocketAddr::new(e.ip, *p))),
                            ports: ports.clone(),
                            node: e.node_name.clone(),
                            hostname: e.hostname.clone(),
                            ready: e.ready,
                        })
                    })
                    .collect(),
            })
            .collect()
    }
}

/// What `/api/v1/services` is built from when asked: the snapshot DNS answers from and the health checks' verdicts.
/// Building 10,000 service views on every catalog change would add to each change's latency for a page read rarely.
#[derive(Default)]
struct Published {
    resolved: Arc<Resolved>,
    unhealthy: Arc<BTreeSet<SocketAddr>>,
}

/// The latest published state. Readers never block the reconciler.
pub struct View {
    published: ArcSwap<Published>,
    datapath: ArcSwap<Option<DatapathStatus>>,
    /// Set once the data path has started.
    proxy_counters: OnceLock<Arc<ProxyCounters>>,
    /// Set once the data path has started, if the kernel serves frontends.
    kernel_counters: OnceLock<Arc<KernelCounters>>,
    /// Set once the first catalog has been applied to the data path.
    programmed: AtomicBool,
    /// Catalog snapshots applied, and how long the last one took (µs), for the metrics.
    pub applies: AtomicU64,
    pub last_apply_micros: AtomicU64,
    /// How long each snapshot took to reach IPAM, edge0 and the data path: the catalog's lag behind its sources.
    pub apply_seconds: Histogram,
    pub catalog_source: Arc<SourceState>,
}

impl View {
    pub fn new(catalog_source: Arc<SourceState>) -> Self {
        Self {
            published: ArcSwap::from_pointee(Published::default()),
            datapath: ArcSwap::from_pointee(None),
            proxy_counters: OnceLock::new(),
            kernel_counters: OnceLock::new(),
            programmed: AtomicBool::new(false),
            applies: AtomicU64::new(0),
            last_apply_micros: AtomicU64::new(0),
            // 100 µs to ~26 s.
            apply_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 19)),
            catalog_source,
        }
    }

    pub fn publish(&self, resolved: Arc<Resolved>, unhealthy: Arc<BTreeSet<SocketAddr>>, datapath: DatapathStatus) {
        self.published.store(Arc::new(Published { resolved, unhealthy }));
        self.datapath.store(Arc::new(Some(datapath)));
        self.programmed.store(true, Ordering::Release);
    }

    pub fn set_proxy_counters(&self, counters: Arc<ProxyCounters>) {
        let _ = self.proxy_counters.set(counters);
    }

    /// What the userspace proxy counted per frontend, read now.
    pub fn frontend_stats(&self) -> Vec<(Frontend, FrontendStats)> {
        self.proxy_counters.get().map(|c| c.read()).unwrap_or_default()
    }

    pub fn set_kernel_counters(&self, counters: Arc<KernelCounters>) {
        let _ = self.kernel_counters.set(counters);
    }

    /// What the kernel programs counted per frontend, read now; empty without the eBPF data path.
    pub fn kernel_counts(&self) -> Vec<KernelCounts> {
        self.kernel_counters.get().map(|c| c.read()).unwrap_or_default()
    }

    pub fn services(&self) -> Vec<ServiceView> {
        let p = self.published.load();
        ServiceView::all(&p.resolved.catalog, &p.resolved.assignment, &p.unhealthy)
    }

    pub fn service_count(&self) -> usize {
        self.published.load().resolved.catalog.services.len()
    }

    pub fn datapath(&self) -> Option<DatapathStatus> {
        (*self.datapath.load_full()).clone()
    }

    /// Ready: the catalog has been loaded and the data path programmed with it.
    pub fn ready(&self) -> bool {
        self.programmed.load(Ordering::Acquire) && self.catalog_source.synced()
    }
}
