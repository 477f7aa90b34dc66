//! The cluster zone as a precomputed table: every name the Kubernetes DNS specification (schema 1.1.0) defines for
//! the catalog, with its records and, per record type, the answer section already encoded. Built off the hot path on
//! each catalog change and swapped in whole, so a lookup is one hash probe with no lock and no allocation.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;

use hickory_server::proto::op::Query;
use hickory_server::proto::rr::rdata::{A, AAAA, PTR, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};
use tracing::warn;

use crate::catalog::{ClusterIp, Service};
use crate::reconcile::Resolved;

/// The schema version `dns-version.<zone>` announces.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// What a table is built for: the zone and the TTL of every record (and of negative answers).
#[derive(Debug, Clone)]
pub struct Zone {
    pub domain: String,
    pub ttl: u32,
}

/// Records of one type at one name.
#[derive(Debug)]
pub struct RrSet {
    pub rtype: RecordType,
    pub records: Vec<Record>,
    /// The answer section for a query of this name and type, encoded to follow a question section that starts at
    /// offset 12 and holds this name uncompressed: names are compressed against the question.
    pub wire: Box<[u8]>,
}

/// One name of the table. An empty node is an empty non-terminal (e.g. `svc.<zone>`): it exists, so queries for it
/// get NODATA rather than NXDOMAIN.
#[derive(Debug, Default)]
pub struct Node {
    pub rrsets: Vec<RrSet>,
}

impl Node {
    pub fn rrset(&self, rtype: RecordType) -> Option<&RrSet> {
        self.rrsets.iter().find(|s| s.rtype == rtype)
    }
}

/// Where a name stands in the table.
#[derive(Debug)]
pub enum Lookup<'t> {
    Node(&'t Node),
    /// Under the zone but not in it.
    NxDomain,
    /// Not ours: forward it.
    Outside,
}

#[derive(Debug)]
pub struct Table {
    /// Keyed by the lowercased wire form of the name (labels with length bytes, ending in the root label).
    names: HashMap<Box<[u8]>, Node>,
    zone_wire: Box<[u8]>,
    soa: Record,
    /// The SOA as one uncompressed resource record, for the authority section of negative answers.
    soa_wire: Box<[u8]>,
}

impl Table {
    /// Builds the table for `resolved`. Services whose names are no valid DNS names are left out with a warning.
    pub fn build(resolved: &Resolved, zone: &Zone, serial: u32) -> Table {
        let origin = match Name::from_ascii(format!("{}.", zone.domain.trim_end_matches('.'))) {
            Ok(name) => name.to_lowercase(),
            Err(e) => {
                // config validation keeps this from happening; serve an empty root-less table rather than panic
                warn!(domain = %zone.domain, "invalid DNS domain: {e}");
                Name::root()
            }
        };
        let mut builder = Builder { origin: origin.clone(), ttl: zone.ttl, records: HashMap::new() };
        let soa = builder.soa(serial);
        builder.add(origin.clone(), RData::SOA(soa.clone()));
        if let Ok(version) = Name::from_ascii("dns-version").and_then(|n| n.append_domain(&origin)) {
            builder.add(version, RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])));
        }
        for (id, svc) in &resolved.catalog.services {
            if let Err(e) = builder.service(svc, resolved.assignment.vips.get(id).copied()) {
                warn!(service = %id, "no DNS records: {e}");
            }
        }
        let soa = Record::from_rdata(origin.clone(), zone.ttl, RData::SOA(soa));
        builder.finish(&origin, soa)
    }

    /// Looks up a lowercased wire-form name.
    pub fn lookup(&self, wire: &[u8]) -> Lookup<'_> {
        if let Some(node) = self.names.get(wire) {
            return Lookup::Node(node);
        }
        if in_zone(wire, &self.zone_wire) {
            Lookup::NxDomain
        } else {
            Lookup::Outside
        }
    }

    pub fn soa(&self) -> &Record {
        &self.soa
    }

    pub fn soa_wire(&self) -> &[u8] {
        &self.soa_wire
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Whether `wire` is `zone` or below it: `zone` must be a suffix that starts at a label boundary.
fn in_zone(wire: &[u8], zone: &[u8]) -> bool {
    if wire.len() < zone.len() || !wire.ends_with(zone) {
        return false;
    }
    let boundary = wire.len() - zone.len();
    let mut pos = 0;
    while pos < boundary {
        pos += wire[pos] as usize + 1;
    }
    pos == boundary
}

/// The lowercased, uncompressed wire form of `name`.
pub fn wire_name(name: &Name) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(name.len() + 2);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::UncompressedLowercase);
    // encoding a valid name into a growable buffer cannot fail
    let _ = name.emit(&mut encoder);
    buf.into_boxed_slice()
}

struct Builder {
    origin: Name,
    ttl: u32,
    /// Name → records in insertion order (so answers list endpoints in catalog order).
    records: HashMap<Name, Vec<Record>>,
}

impl Builder {
    fn soa(&self, serial: u32) -> SOA {
        let at = |label: &str| Name::from_ascii(label).and_then(|n| n.append_domain(&self.origin));
        let mname = at("ns.dns").unwrap_or_else(|_| self.origin.clone());
        let rname = at("hostmaster").unwrap_or_else(|_| self.origin.clone());
        // refresh/retry/expire follow CoreDNS; the minimum (negative TTL) is the configured TTL
        SOA::new(mname, rname, serial, 7200, 1800, 86400, self.ttl)
    }

    fn add(&mut self, name: Name, rdata: RData) {
        let record = Record::from_rdata(name.clone(), self.ttl, rdata);
        let records = self.records.entry(name).or_default();
        if !records.contains(&record) {
            records.push(record);
        }
    }

    /// `<label>.<base>`, checked to be one valid label.
    fn child(label: &str, base: &Name) -> Result<Name, String> {
        if label.is_empty() || label.contains('.') {
            return Err(format!("{label:?} is not a DNS label"));
        }
        Name::from_ascii(label).and_then(|l| l.append_domain(base)).map(|n| n.to_lowercase()).map_err(|e| e.to_string())
    }

    fn service(&mut self, svc: &Service, vip: Option<IpAddr>) -> Result<(), String> {
        let svc_zone = Self::child("svc", &self.origin)?;
        let name = Self::child(&svc.id.name, &Self::child(&svc.id.namespace, &svc_zone)?)?;
        let named_ports: Vec<_> = svc.ports.iter().filter(|p| !p.name.is_empty()).collect();
        if svc.cluster_ip != ClusterIp::Headless {
            // a service whose VIP could not be assigned has no address to give: it is left out
            let Some(vip) = vip else { return Ok(()) };
            self.add(name.clone(), address(vip));
            self.add(reverse_name(vip), RData::PTR(PTR(name.clone())));
            for port in named_ports {
                let srv = Self::child(&format!("_{}", port.name), &Self::child(&proto(port.protocol), &name)?)?;
                self.add(srv, RData::SRV(SRV::new(0, 100, port.port, name.clone())));
            }
            return Ok(());
        }
        // Headless: the name exists even with no ready endpoint (NODATA, not NXDOMAIN).
        self.records.entry(name.clone()).or_default();
        for set in &svc.endpoint_sets {
            for endpoint in set.endpoints.iter().filter(|e| e.ready) {
                self.add(name.clone(), address(endpoint.ip));
                // an endpoint without a hostname is named by its dashed address, as CoreDNS does
                let host = match &endpoint.hostname {
                    Some(h) if !h.is_empty() => h.clone(),
                    _ => dashed(endpoint.ip),
                };
                let host = match Self::child(&host, &name) {
                    Ok(host) => host,
                    Err(e) => {
                        warn!(service = %svc.id, "endpoint {} left out: {e}", endpoint.ip);
                        continue;
                    }
                };
                self.add(host.clone(), address(endpoint.ip));
                self.add(reverse_name(endpoint.ip), RData::PTR(PTR(host.clone())));
                for port in &named_ports {
                    let Some(target) = set.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol)
                    else {
                        continue;
                    };
                    let srv = Self::child(&format!("_{}", port.name), &Self::child(&proto(port.protocol), &name)?)?;
                    self.add(srv, RData::SRV(SRV::new(0, 100, target.port, host.clone())));
                }
            }
        }
        Ok(())
    }

    fn finish(self, origin: &Name, soa: Record) -> Table {
        let mut names: HashMap<Box<[u8]>, Node> = HashMap::new();
        for (name, records) in self.records {
            // empty non-terminals between the name and the zone apex
            if origin.zone_of(&name) {
                let mut parent = name.base_name();
                while parent.num_labels() > origin.num_labels() {
                    names.entry(wire_name(&parent)).or_default();
                    parent = parent.base_name();
                }
            }
            let node = match names.entry(wire_name(&name)) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(Node::default()),
            };
            let mut by_type: Vec<(RecordType, Vec<Record>)> = Vec::new();
            for record in records {
                match by_type.iter_mut().find(|(t, _)| *t == record.record_type()) {
                    Some((_, v)) => v.push(record),
                    None => by_type.push((record.record_type(), vec![record])),
                }
            }
            for (rtype, records) in by_type {
                let wire = encode_answers(&name, rtype, &records);
                node.rrsets.push(RrSet { rtype, records, wire });
            }
        }
        let mut soa_wire = Vec::new();
        let mut encoder = BinEncoder::new(&mut soa_wire);
        encoder.set_name_encoding(NameEncoding::Uncompressed);
        let _ = soa.emit(&mut encoder);
        Table { names, zone_wire: wire_name(origin), soa, soa_wire: soa_wire.into_boxed_slice() }
    }
}

/// Encodes `records` as they follow a header and the question `name`/`rtype`, and returns only the records' bytes:
/// their compression pointers refer to the question at offset 12, which every response has in the same place.
fn encode_answers(name: &Name, rtype: RecordType, records: &[Record]) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    // growable buffer, valid names: these cannot fail
    let _ = encoder.emit_vec(&[0; 12]);
    let _ = Query::query(name.clone(), rtype).emit(&mut encoder);
    let start = encoder.len();
    for record in records {
        let _ = record.emit(&mut encoder);
    }
    buf[start..].into()
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

fn proto(protocol: crate::catalog::Protocol) -> String {
    format!("_{}", protocol.as_str().to_ascii_lowercase())
}

/// `10-0-0-1`, or for IPv6 the address with its colons dashed (`fd00--1`), as CoreDNS names endpoints.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// `1.0.0.10.in-addr.arpa.` or the nibble form under `ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> Name {
    let text = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    };
    Name::from_ascii(text).expect("a reverse name is a valid name")
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::catalog::{Catalog, Endpoint, EndpointPort, EndpointSet, Protocol, ServiceId, ServicePort, TargetPort};
    use crate::ipam::Assignment;

    fn service(namespace: &str, name: &str, cluster_ip: ClusterIp, endpoints: Vec<Endpoint>) -> Service {
        Service {
            id: ServiceId { namespace: namespace.into(), name: name.into() },
            cluster_ip,
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: TargetPort::Number(8080),
                },
                ServicePort { name: "".into(), port: 81, protocol: Protocol::Tcp, target_port: TargetPort::Number(81) },
                ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: TargetPort::Number(53),
                },
            ],
            affinity: None,
            endpoint_sets: vec![EndpointSet {
                ports: vec![EndpointPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }],
                endpoints,
            }],
        }
    }

    pub fn endpoint(ip: &str, ready: bool, hostname: Option<&str>) -> Endpoint {
        Endpoint { ip: ip.parse().unwrap(), ready, node_name: None, hostname: hostname.map(Into::into) }
    }

    /// web (VIP 10.250.0.10), web6 (VIP fd00::a), db (headless: db-0 at 10.1.0.1, a nameless 10.1.0.2, an unready
    /// 10.1.0.3), broken (no VIP), many (headless, 100 ready endpoints).
    pub fn sample() -> Table {
        let mut catalog = Catalog::default();
        let mut vips = BTreeMap::new();
        for (name, ip, eps) in [
            ("web", ClusterIp::Auto, vec![endpoint("10.1.0.9", true, None)]),
            ("web6", ClusterIp::Fixed("fd00::a".parse().unwrap()), vec![]),
            ("broken", ClusterIp::Auto, vec![]),
            (
                "db",
                ClusterIp::Headless,
                vec![
                    endpoint("10.1.0.1", true, Some("db-0")),
                    endpoint("10.1.0.2", true, None),
                    endpoint("10.1.0.3", false, Some("db-2")),
                ],
            ),
            ("many", ClusterIp::Headless, (0..100).map(|i| endpoint(&format!("10.2.0.{i}"), true, None)).collect()),
        ] {
            let svc = service("default", name, ip, eps);
            match name {
                "web" => vips.insert(svc.id.clone(), "10.250.0.10".parse().unwrap()),
                "web6" => vips.insert(svc.id.clone(), "fd00::a".parse().unwrap()),
                _ => None,
            };
            catalog.services.insert(svc.id.clone(), svc);
        }
        let resolved = Resolved { catalog: Arc::new(catalog), assignment: Assignment { vips, ..Default::default() } };
        Table::build(&resolved, &Zone { domain: "cluster.local".into(), ttl: 30 }, 7)
    }

    fn node<'t>(table: &'t Table, name: &str) -> Option<&'t Node> {
        match table.lookup(&wire_name(&Name::from_ascii(name).unwrap())) {
            Lookup::Node(node) => Some(node),
            _ => None,
        }
    }

    fn rdata(table: &Table, name: &str, rtype: RecordType) -> Vec<String> {
        node(table, name)
            .and_then(|n| n.rrset(rtype))
            .map(|s| s.records.iter().map(|r| r.data.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn cluster_ip_service_records() {
        let t = sample();
        assert_eq!(rdata(&t, "web.default.svc.cluster.local.", RecordType::A), ["10.250.0.10"]);
        assert_eq!(rdata(&t, "web6.default.svc.cluster.local.", RecordType::AAAA), ["fd00::a"]);
        assert_eq!(
            rdata(&t, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            ["0 100 80 web.default.svc.cluster.local."]
        );
        assert_eq!(
            rdata(&t, "_dns._udp.web.default.svc.cluster.local.", RecordType::SRV),
            ["0 100 53 web.default.svc.cluster.local."]
        );
        assert_eq!(rdata(&t, "10.0.250.10.in-addr.arpa.", RecordType::PTR), ["web.default.svc.cluster.local."]);
        let v6 = reverse_name("fd00::a".parse().unwrap()).to_string();
        assert!(v6.starts_with("a.0.0.0.") && v6.ends_with(".0.0.d.f.ip6.arpa."), "{v6}");
        assert_eq!(rdata(&t, &v6, RecordType::PTR), ["web6.default.svc.cluster.local."]);
        // endpoints of a ClusterIP service are not published
        assert!(node(&t, "10-1-0-9.web.default.svc.cluster.local.").is_none());
        // no VIP, no name
        assert!(node(&t, "broken.default.svc.cluster.local.").is_none());
    }

    #[test]
    fn headless_service_records() {
        let t = sample();
        assert_eq!(rdata(&t, "db.default.svc.cluster.local.", RecordType::A), ["10.1.0.1", "10.1.0.2"]);
        assert_eq!(rdata(&t, "db-0.db.default.svc.cluster.local.", RecordType::A), ["10.1.0.1"]);
        assert_eq!(rdata(&t, "10-1-0-2.db.default.svc.cluster.local.", RecordType::A), ["10.1.0.2"]);
        assert!(node(&t, "db-2.db.default.svc.cluster.local.").is_none(), "unready endpoints are not published");
        assert_eq!(
            rdata(&t, "_http._tcp.db.default.svc.cluster.local.", RecordType::SRV),
            ["0 100 8080 db-0.db.default.svc.cluster.local.", "0 100 8080 10-1-0-2.db.default.svc.cluster.local."]
        );
        // the endpoints have no `dns` port, so no SRV for it
        assert!(node(&t, "_dns._udp.db.default.svc.cluster.local.").is_none());
        assert_eq!(rdata(&t, "1.0.1.10.in-addr.arpa.", RecordType::PTR), ["db-0.db.default.svc.cluster.local."]);
    }

    #[test]
    fn zone_records_and_empty_non_terminals() {
        let t = sample();
        assert_eq!(rdata(&t, "dns-version.cluster.local.", RecordType::TXT), ["1.1.0"]);
        assert_eq!(
            rdata(&t, "cluster.local.", RecordType::SOA),
            ["ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 30"]
        );
        for ent in ["svc.cluster.local.", "default.svc.cluster.local.", "_tcp.web.default.svc.cluster.local."] {
            assert!(node(&t, ent).is_some_and(|n| n.rrsets.is_empty()), "{ent} is an empty non-terminal");
        }
        let lookup = |name: &str| t.lookup(&wire_name(&Name::from_ascii(name).unwrap()));
        assert!(matches!(lookup("nope.default.svc.cluster.local."), Lookup::NxDomain));
        assert!(matches!(lookup("WEB.Default.SVC.cluster.LOCAL."), Lookup::Node(_)), "case-insensitive");
        assert!(matches!(lookup("example.com."), Lookup::Outside));
        assert!(matches!(lookup("xcluster.local."), Lookup::Outside), "suffix match is per label");
        assert!(matches!(lookup("9.9.9.9.in-addr.arpa."), Lookup::Outside), "unknown reverse names are forwarded");
    }

    #[test]
    fn in_zone_checks_label_boundaries() {
        let zone = wire_name(&Name::from_ascii("cluster.local.").unwrap());
        let wire = |s: &str| wire_name(&Name::from_ascii(s).unwrap());
        assert!(in_zone(&wire("cluster.local."), &zone));
        assert!(in_zone(&wire("a.b.cluster.local."), &zone));
        assert!(!in_zone(&wire("acluster.local."), &zone));
        assert!(!in_zone(&wire("local."), &zone));
    }
}
