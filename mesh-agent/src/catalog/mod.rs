//! The service catalog: the desired state every consumer reads, as one immutable snapshot per change.
//!
//! Sources (`file`, `kubernetes`) read [`Objects`], convert them to the model below ([`Objects::convert`]) and
//! join services with their endpoints ([`manifest::join`]); `merge` combines the sources' catalogs.

pub mod cache;
pub mod file;
pub mod kubernetes;
pub mod manifest;
pub mod merge;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

pub use manifest::Objects;

/// `namespace/name` of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// Where a service's VIP comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ClusterIp {
    /// No `spec.clusterIP`: the agent allocates one from the pool.
    Auto,
    /// `spec.clusterIP` as given.
    Fixed(IpAddr),
    /// `clusterIP: None`: no VIP, DNS answers the endpoints.
    Headless,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Serves new connections (`conditions.ready`, unset meaning ready).
    pub ready: bool,
    pub node_name: Option<String>,
    pub hostname: Option<String>,
}

/// Endpoints that share one port list (an EndpointSlice, or a subset of legacy Endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSet {
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub id: ServiceId,
    pub cluster_ip: ClusterIp,
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP` timeout.
    pub affinity: Option<Duration>,
    pub endpoint_sets: Vec<EndpointSet>,
}

/// A ready backend address of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortBackend {
    pub ip: IpAddr,
    pub port: u16,
    pub node_name: Option<String>,
}

impl Service {
    /// The ready backends of `port`, in a stable order (the order round robin walks). An endpoint port matches a
    /// service port by name, as kube-proxy matches them; a numeric target port with no endpoint sets' port names
    /// (hand-written catalogs) falls back to the target port itself.
    pub fn backends(&self, port: &ServicePort) -> Vec<PortBackend> {
        let mut out = Vec::new();
        for set in &self.endpoint_sets {
            let target = match set.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) {
                Some(p) => p.port,
                None => match (&port.target_port, set.ports.is_empty()) {
                    (TargetPort::Number(n), true) => *n,
                    _ => continue,
                },
            };
            for e in set.endpoints.iter().filter(|e| e.ready) {
                out.push(PortBackend { ip: e.ip, port: target, node_name: e.node_name.clone() });
            }
        }
        out.sort_by_key(|b| (b.ip, b.port));
        out.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
        out
    }
}

/// The whole desired state: every service with its endpoints, keyed by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Catalog {
    pub services: BTreeMap<ServiceId, Service>,
}

/// A source's health, for status and readiness: synced (with the time of the last good load) and the last
/// error, if the newest input was rejected.
#[derive(Debug, Default)]
pub struct SourceState {
    inner: std::sync::Mutex<SourceStatus>,
}

/// `synced`: every enabled source has loaded; `lastSync` and `lastError` are the catalog files'; `kubernetes` is
/// present when that source is enabled.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub synced: bool,
    /// Seconds since the Unix epoch of the last good load.
    pub last_sync: Option<u64>,
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<kubernetes::Status>,
}

impl SourceStatus {
    /// Every enabled source has something to serve: the files were read, the API objects listed or cached.
    fn all_synced(&self) -> bool {
        self.synced && self.kubernetes.as_ref().is_none_or(kubernetes::Status::serving)
    }
}

impl SourceState {
    pub fn set_synced(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.synced = true;
        s.last_sync = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs());
        s.last_error = None;
    }

    pub fn set_error(&self, error: String) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(error);
    }

    pub fn set_kubernetes(&self, status: kubernetes::Status) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).kubernetes = Some(status);
    }

    /// Whether the newest input of some source was rejected.
    pub fn has_error(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).last_error.is_some()
    }

    /// Whether the catalog files have been read (the file source's own state).
    pub fn files_synced(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).synced
    }

    /// Whether every enabled source has loaded: what readiness waits for.
    pub fn synced(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).all_synced()
    }

    pub fn status(&self) -> SourceStatus {
        let mut status = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        status.synced = status.all_synced();
        status
    }
}
