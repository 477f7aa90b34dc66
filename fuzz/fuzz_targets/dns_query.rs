//! The DNS query path on arbitrary bytes: the wire-level hot path, then hickory's parser and the zone answer, as a
//! UDP query from an allowed source takes them. Whatever comes in, no panic, and any answer is a response to it.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use mesh_agent::catalog::{
    Catalog, ClusterIp, Endpoint, EndpointPort, EndpointSet, Protocol, Service, ServiceId, ServicePort, TargetPort,
};
use mesh_agent::dns::{handle_packet, Table, Zone};
use mesh_agent::ipam::Assignment;
use mesh_agent::reconcile::Resolved;

/// A ClusterIP service and a headless one with named and nameless endpoints: every record kind the zone has.
fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let port = ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: TargetPort::Number(8080),
        };
        let endpoint = |ip: &str, hostname: Option<&str>| Endpoint {
            ip: ip.parse().unwrap(),
            ready: true,
            node_name: None,
            hostname: hostname.map(Into::into),
        };
        let mut catalog = Catalog::default();
        let mut vips = BTreeMap::new();
        for (name, cluster_ip) in [("web", ClusterIp::Auto), ("db", ClusterIp::Headless)] {
            let id = ServiceId { namespace: "default".into(), name: name.into() };
            let svc = Service {
                id: id.clone(),
                cluster_ip,
                ports: vec![port.clone()],
                affinity: None,
                endpoint_sets: vec![EndpointSet {
                    ports: vec![EndpointPort { name: "http".into(), port: 8080, protocol: Protocol::Tcp }],
                    endpoints: vec![endpoint("10.1.0.1", Some("db-0")), endpoint("fd00::1", None)],
                }],
            };
            catalog.services.insert(id.clone(), svc);
            if name == "web" {
                vips.insert(id, "10.250.0.10".parse().unwrap());
            }
        }
        let resolved = Resolved { catalog: Arc::new(catalog), assignment: Assignment { vips, ..Default::default() } };
        Table::build(&resolved, &Zone { domain: "cluster.local".into(), ttl: 30 }, 1)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(response) = handle_packet(table(), data) {
        assert!(response.len() >= 12, "a response has a header");
        assert_eq!(response[..2], data[..2], "the response carries the query's id");
        assert_eq!(response[2] & 0x80, 0x80, "QR is set");
    }
});
