//! Kubernetes manifests → catalog: `v1 Service`, `discovery.k8s.io/v1 EndpointSlice` and legacy `v1 Endpoints`,
//! in multi-document YAML or a `List`.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Endpoints, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{
    Catalog, ClusterIp, Endpoint, EndpointPort, EndpointSet, Protocol, Service, ServiceId, ServicePort, TargetPort,
};

/// The label that ties an EndpointSlice to its service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY: Duration = Duration::from_secs(10_800);

/// Kubernetes objects as read from one or more sources.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<K8sService>,
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Vec<Endpoints>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

impl Objects {
    /// Parses multi-document YAML. An error names the document's first line, the field path and the reason.
    pub fn parse(text: &str) -> Result<Self> {
        let mut objects = Objects::default();
        for (start_line, doc) in documents(text) {
            objects.extend(Self::parse_document(start_line, doc)?);
        }
        Ok(objects)
    }

    /// Parses one document of [`documents`]; errors name lines counted from `start_line`.
    pub fn parse_document(start_line: usize, doc: &str) -> Result<Self> {
        let mut objects = Objects::default();
        objects.add_document(doc).map_err(|e| anyhow!("line {}: {e}", start_line + e.line))?;
        Ok(objects)
    }

    pub fn extend(&mut self, other: Objects) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.endpoints.extend(other.endpoints);
    }

    fn add_document(&mut self, doc: &str) -> Result<(), DocError> {
        let value: serde_yaml::Value = serde_yaml::from_str(doc).map_err(DocError::yaml)?;
        if value.is_null() {
            return Ok(()); // empty or comment-only document
        }
        let meta: TypeMeta = serde_yaml::from_value(value.clone()).map_err(DocError::yaml)?;
        match (meta.api_version.as_str(), meta.kind.as_str()) {
            ("v1", "List") => {
                let list: List = typed(doc)?;
                for (i, item) in list.items.into_iter().enumerate() {
                    self.add_value(item).map_err(|e| DocError::other(anyhow!("items[{i}]: {e:#}")))?;
                }
                Ok(())
            }
            _ => self.add_typed(&meta, doc),
        }
    }

    fn add_typed(&mut self, meta: &TypeMeta, doc: &str) -> Result<(), DocError> {
        match (meta.api_version.as_str(), meta.kind.as_str()) {
            ("v1", "Service") => self.services.push(typed(doc)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => self.slices.push(typed(doc)?),
            ("v1", "Endpoints") => self.endpoints.push(typed(doc)?),
            (api, kind) => return Err(DocError::other(unsupported(api, kind))),
        }
        Ok(())
    }

    fn add_value(&mut self, item: serde_json::Value) -> Result<()> {
        let meta: TypeMeta = serde_json::from_value(item.clone())?;
        match (meta.api_version.as_str(), meta.kind.as_str()) {
            ("v1", "Service") => self.services.push(typed_value(item)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => self.slices.push(typed_value(item)?),
            ("v1", "Endpoints") => self.endpoints.push(typed_value(item)?),
            (api, kind) => return Err(unsupported(api, kind)),
        }
        Ok(())
    }

    /// Joins services with their endpoints (see [`join`]).
    pub fn to_catalog(&self) -> Result<Catalog> {
        join([&self.convert()?])
    }

    /// The objects in the catalog's model, not yet joined. Objects that make no sense (a service without a name, a
    /// port out of range) are errors naming the object.
    pub fn convert(&self) -> Result<Converted> {
        let services = self.services.iter().map(convert_service).collect::<Result<_>>()?;
        let mut slices = Vec::new();
        for slice in &self.slices {
            let Some(name) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else { continue };
            let id = ServiceId { namespace: namespace(&slice.metadata), name: name.clone() };
            let set = convert_slice(slice).with_context(|| format!("EndpointSlice {}", object_id(&slice.metadata)))?;
            slices.push((id, set));
        }
        let mut endpoints = Vec::new();
        for ep in &self.endpoints {
            let id =
                ServiceId { namespace: namespace(&ep.metadata), name: ep.metadata.name.clone().unwrap_or_default() };
            let sets = convert_endpoints(ep).with_context(|| format!("Endpoints {}", object_id(&ep.metadata)))?;
            endpoints.push((id, sets));
        }
        Ok(Converted { services, slices, endpoints })
    }
}

/// Objects converted to the model: services without endpoints, and the endpoint sets with the service they
/// belong to. Much smaller than the API objects, and what a source keeps of each document it has read.
#[derive(Debug, Default)]
pub struct Converted {
    services: Vec<Service>,
    /// `None`: a slice that names its service but carries no addresses (FQDN).
    slices: Vec<(ServiceId, Option<EndpointSet>)>,
    endpoints: Vec<(ServiceId, Vec<EndpointSet>)>,
}

/// Joins the services of all `parts` with their endpoints; endpoints of unknown services are kept out silently, as
/// Kubernetes keeps them until their service appears.
pub fn join<'a, P>(parts: P) -> Result<Catalog>
where
    P: IntoIterator<Item = &'a Converted> + Clone,
{
    let mut services = BTreeMap::new();
    for service in parts.clone().into_iter().flat_map(|c| &c.services) {
        if services.insert(service.id.clone(), service.clone()).is_some() {
            bail!("Service {}: defined twice", service.id);
        }
    }
    let mut sliced = HashSet::new();
    for (id, set) in parts.clone().into_iter().flat_map(|c| &c.slices) {
        if let (Some(service), Some(set)) = (services.get_mut(id), set) {
            service.endpoint_sets.push(set.clone());
        }
        sliced.insert(id);
    }
    // Legacy Endpoints count only for services without slices, as kube-proxy prefers slices.
    for (id, sets) in parts.into_iter().flat_map(|c| &c.endpoints) {
        if sliced.contains(id) {
            continue;
        }
        if let Some(service) = services.get_mut(id) {
            service.endpoint_sets.extend(sets.iter().cloned());
        }
    }
    Ok(Catalog { services })
}

fn unsupported(api: &str, kind: &str) -> anyhow::Error {
    anyhow!("unsupported object apiVersion {api:?} kind {kind:?} (want v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Endpoints or v1 List)")
}

/// A document's error and the line within the document it points at (0 when unknown).
struct DocError {
    line: usize,
    error: anyhow::Error,
}

impl DocError {
    fn yaml(e: serde_yaml::Error) -> Self {
        let line = e.location().map(|l| l.line().saturating_sub(1)).unwrap_or(0);
        Self { line, error: anyhow!("{}", e.to_string().split(" at line ").next().unwrap_or_default()) }
    }

    fn other(error: anyhow::Error) -> Self {
        Self { line: 0, error }
    }
}

impl std::fmt::Display for DocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

fn typed<T: DeserializeOwned>(doc: &str) -> Result<T, DocError> {
    let de = serde_yaml::Deserializer::from_str(doc);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let mut err = DocError::yaml(e.into_inner());
        err.error = anyhow!("field `{path}`: {}", err.error);
        err
    })
}

fn typed_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| anyhow!("field `{}`: {}", e.path(), e.inner()))
}

/// Splits YAML at `---` lines, keeping each document's first line number (1-based) for error messages.
pub fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") || t.starts_with("---#") {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

fn namespace(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into())
}

fn object_id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!("{}/{}", namespace(meta), meta.name.as_deref().unwrap_or("<unnamed>"))
}

fn protocol(p: Option<&str>) -> Result<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => bail!("protocol {other:?} is not supported (TCP or UDP)"),
    }
}

fn port_number(n: i32, field: &str) -> Result<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| anyhow!("{field}: {n} is not a port (1-65535)"))
}

fn convert_service(svc: &K8sService) -> Result<Service> {
    let id = object_id(&svc.metadata);
    let name =
        svc.metadata.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| anyhow!("Service {id}: no metadata.name"))?;
    let spec = svc.spec.clone().unwrap_or_default();
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") => ClusterIp::Auto,
        Some("None") => ClusterIp::Headless,
        Some(ip) => ClusterIp::Fixed(
            ip.parse::<IpAddr>().map_err(|_| anyhow!("Service {id}: spec.clusterIP {ip:?} is not an IP address"))?,
        ),
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("Service {id}: spec.ports[{i}]");
        let port = port_number(p.port, &format!("{field}.port"))?;
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n, &format!("{field}.targetPort"))?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_number(n, &format!("{field}.targetPort"))?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        let protocol = protocol(p.protocol.as_deref()).with_context(|| field.clone())?;
        ports.push(ServicePort { name: p.name.clone().unwrap_or_default(), port, protocol, target_port });
    }
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .and_then(|c| c.client_ip?.timeout_seconds)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(DEFAULT_AFFINITY)
    });
    Ok(Service {
        id: ServiceId { namespace: namespace(&svc.metadata), name },
        cluster_ip,
        ports,
        affinity,
        endpoint_sets: Vec::new(),
    })
}

fn convert_slice(slice: &EndpointSlice) -> Result<Option<EndpointSet>> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Ok(None); // FQDN slices carry no addresses to balance over
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(n) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            port: port_number(n, &format!("ports[{i}].port"))?,
            protocol: protocol(p.protocol.as_deref()).with_context(|| format!("ports[{i}]"))?,
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let conditions = e.conditions.clone().unwrap_or_default();
        // Kubernetes: unset `ready` means ready; a terminating endpoint takes no new connections.
        let ready = conditions.ready.unwrap_or(true) && !conditions.terminating.unwrap_or(false);
        for (j, a) in e.addresses.iter().enumerate() {
            let ip = a.parse().map_err(|_| anyhow!("endpoints[{i}].addresses[{j}]: {a:?} is not an IP address"))?;
            endpoints.push(Endpoint { ip, ready, node_name: e.node_name.clone(), hostname: e.hostname.clone() });
        }
    }
    Ok(Some(EndpointSet { ports, endpoints }))
}

fn convert_endpoints(ep: &Endpoints) -> Result<Vec<EndpointSet>> {
    let mut sets = Vec::new();
    for (s, subset) in ep.subsets.iter().flatten().enumerate() {
        let mut ports = Vec::new();
        for (i, p) in subset.ports.iter().flatten().enumerate() {
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(p.port, &format!("subsets[{s}].ports[{i}].port"))?,
                protocol: protocol(p.protocol.as_deref()).with_context(|| format!("subsets[{s}].ports[{i}]"))?,
            });
        }
        let mut endpoints = Vec::new();
        let all = subset.addresses.iter().flatten().map(|a| (a, true));
        let not_ready = subset.not_ready_addresses.iter().flatten().map(|a| (a, false));
        for (i, (a, ready)) in all.chain(not_ready).enumerate() {
            let ip = a.ip.parse().map_err(|_| anyhow!("subsets[{s}] address {i}: {:?} is not an IP address", a.ip))?;
            endpoints.push(Endpoint { ip, ready, node_name: a.node_name.clone(), hostname: a.hostname.clone() });
        }
        sets.push(EndpointSet { ports, endpoints });
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  sessionAffinity: ClientIP
  ports: [{ name: http, port: 80, targetPort: http }]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-abc, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [{ name: http, port: 8080 }]
endpoints:
  - addresses: [10.1.0.2]
    nodeName: edge-1
  - addresses: [10.1.0.3]
    conditions: { ready: false }
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: { name: dns }
    spec: { ports: [{ port: 53, protocol: UDP }] }
  - apiVersion: v1
    kind: Endpoints
    metadata: { name: dns }
    subsets: [{ addresses: [{ ip: 10.1.0.9 }], ports: [{ port: 5353, protocol: UDP }] }]
"#;

    #[test]
    fn joins_services_slices_and_endpoints() {
        let catalog = Objects::parse(CATALOG).unwrap().to_catalog().unwrap();
        let web = &catalog.services[&ServiceId { namespace: "shop".into(), name: "web".into() }];
        assert_eq!(web.cluster_ip, ClusterIp::Fixed("10.96.0.10".parse().unwrap()));
        assert_eq!(web.affinity, Some(DEFAULT_AFFINITY));
        let backends = web.backends(&web.ports[0]);
        assert_eq!(backends.len(), 1, "not-ready endpoint excluded");
        assert_eq!((backends[0].port, backends[0].node_name.as_deref()), (8080, Some("edge-1")));

        let dns = &catalog.services[&ServiceId { namespace: "default".into(), name: "dns".into() }];
        assert_eq!(dns.cluster_ip, ClusterIp::Auto);
        assert_eq!(dns.ports[0].protocol, Protocol::Udp);
        assert_eq!(dns.backends(&dns.ports[0])[0].port, 5353);
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\nspec:\n  ports: [{port: \"eighty\"}]\n";
        let err = format!("{:#}", Objects::parse(text).unwrap_err());
        assert!(err.contains("line 10"), "{err}");
        assert!(err.contains("spec.ports"), "{err}");
    }

    #[test]
    fn unsupported_kinds_are_named() {
        let err = format!("{:#}", Objects::parse("apiVersion: apps/v1\nkind: Deployment\n").unwrap_err());
        assert!(err.contains("Deployment"), "{err}");
    }

    #[test]
    fn headless_and_bad_cluster_ip() {
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None}\n";
        let catalog = Objects::parse(ok).unwrap().to_catalog().unwrap();
        assert_eq!(catalog.services.values().next().unwrap().cluster_ip, ClusterIp::Headless);
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: 10.0.0.300}\n";
        let err = format!("{:#}", Objects::parse(bad).unwrap().to_catalog().unwrap_err());
        assert!(err.contains("default/h") && err.contains("clusterIP"), "{err}");
    }
}
