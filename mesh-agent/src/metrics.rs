//! Prometheus metrics (prometheus-client). Everything is read from the published view when scraped, so the hot
//! paths only bump their own atomics and never touch the registry.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::dns;
use crate::view::View;

pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// `dns`: the DNS server's counters, when it runs.
    pub fn new(view: Arc<View>, dns: Option<Arc<dns::Stats>>) -> Self {
        let mut registry = Registry::with_prefix("mesh_agent");
        registry.register(
            "catalog_apply_duration_seconds",
            "Time each catalog snapshot took to reach IPAM, edge0 and the data path",
            view.apply_seconds.clone(),
        );
        registry.register_collector(Box::new(ViewCollector { view, dns }));
        Self { registry }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

struct ViewCollector {
    view: Arc<View>,
    dns: Option<Arc<dns::Stats>>,
}

impl std::fmt::Debug for ViewCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: `name` with a value per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    let Some((_, first)) = series.peek() else { return Ok(()) };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(v: impl TryInto<i64>) -> ConstGauge {
    ConstGauge::new(v.try_into().unwrap_or(i64::MAX))
}

impl Collector for ViewCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = &self.view;
        let catalog = view.catalog_source.status();
        family(&mut e, "services", "Services in the catalog", [(vec![], gauge(view.service_count()))])?;
        family(&mut e, "catalog_synced", "1 once every catalog source has loaded", [(vec![], gauge(catalog.synced))])?;
        family(
            &mut e,
            "ready",
            "1 when the agent is ready (catalog loaded, data path programmed)",
            [(vec![], gauge(view.ready()))],
        )?;
        let applies = view.applies.load(std::sync::atomic::Ordering::Relaxed);
        family(
            &mut e,
            "catalog_applies",
            "Catalog snapshots applied (sources, health changes, retries)",
            [(vec![], ConstCounter::new(applies))],
        )?;
        let micros = view.last_apply_micros.load(std::sync::atomic::Ordering::Relaxed);
        family(
            &mut e,
            "catalog_last_apply_seconds",
            "Time the last catalog snapshot took to reach IPAM, edge0 and the data path",
            [(vec![], ConstGauge::new(micros as f64 / 1e6))],
        )?;
        if let Some(k) = &catalog.kubernetes {
            family(
                &mut e,
                "catalog_kubernetes_state",
                "The Kubernetes source's state (1 for the current one)",
                [(vec![("state", k.state.as_str().to_owned())], gauge(1))],
            )?;
            let stale = k.stale_since.map(|t| crate::catalog::kubernetes::status::now().saturating_sub(t)).unwrap_or(0);
            family(
                &mut e,
                "catalog_kubernetes_stale_seconds",
                "How long the Kubernetes objects served may have been behind the API (0 when synced)",
                [(vec![], gauge(stale))],
            )?;
            family(
                &mut e,
                "catalog_kubernetes_objects",
                "Objects the Kubernetes source holds",
                [
                    (vec![("kind", "Service".to_owned())], gauge(k.services)),
                    (vec![("kind", "EndpointSlice".to_owned())], gauge(k.endpoint_slices)),
                ],
            )?;
        }
        if let Some(d) = view.datapath() {
            family(&mut e, "datapath_mode", "The data path in use", [(vec![("mode", d.mode.clone())], gauge(1))])?;
            family(&mut e, "frontends", "Programmed VIP:port frontends", [(vec![], gauge(d.frontends))])?;
            family(
                &mut e,
                "datapath_map_entries",
                "Entries in each eBPF map",
                d.maps.iter().map(|(m, (n, _))| (vec![("map", m.clone())], gauge(*n))),
            )?;
            family(
                &mut e,
                "datapath_map_capacity",
                "Capacity of each eBPF map",
                d.maps.iter().map(|(m, (_, c))| (vec![("map", m.clone())], gauge(*c))),
            )?;
        }
        let stats = view.frontend_stats();
        let labels = |f: &crate::datapath::Frontend, s: &crate::datapath::FrontendStats| -> Labels {
            vec![("service", s.service.to_string()), ("frontend", f.to_string())]
        };
        let per_frontend = |value: fn(&crate::datapath::FrontendStats) -> u64| {
            stats.iter().map(move |(f, s)| (labels(f, s), ConstCounter::new(value(s))))
        };
        family(
            &mut e,
            "proxy_connections",
            "Connections (UDP: flows) the proxy accepted",
            per_frontend(|s| s.connections),
        )?;
        family(&mut e, "proxy_received_bytes", "Bytes from clients to backends", per_frontend(|s| s.bytes_in))?;
        family(&mut e, "proxy_sent_bytes", "Bytes from backends to clients", per_frontend(|s| s.bytes_out))?;
        family(
            &mut e,
            "proxy_failures",
            "Connections reset for want of a reachable backend (UDP: dropped datagrams)",
            per_frontend(|s| s.failures),
        )?;
        family(
            &mut e,
            "proxy_rejected",
            "Connections (UDP: datagrams) refused because the client is not node-local",
            per_frontend(|s| s.rejected),
        )?;
        family(
            &mut e,
            "proxy_active_connections",
            "Connections (UDP: flows) open now",
            stats.iter().map(|(f, s)| (labels(f, s), gauge(s.active))),
        )?;
        let per_backend = |value: fn(&crate::datapath::BackendStats) -> u64| {
            stats.iter().flat_map(move |(f, s)| {
                s.backends.iter().map(move |b| {
                    let mut l = labels(f, s);
                    l.push(("backend", b.backend.to_string()));
                    (l, ConstCounter::new(value(b)))
                })
            })
        };
        family(&mut e, "backend_selections", "Times the balancer chose each backend", per_backend(|b| b.selected))?;
        family(
            &mut e,
            "backend_connect_failures",
            "Failed connects to each backend",
            per_backend(|b| b.connect_failures),
        )?;
        let kernel = view.kernel_counts();
        let per_kernel_frontend = |value: fn(&crate::datapath::KernelCounts) -> u64| {
            kernel.iter().map(move |c| {
                let labels = vec![("service", c.service.to_string()), ("frontend", c.frontend.to_string())];
                (labels, ConstCounter::new(value(c)))
            })
        };
        family(
            &mut e,
            "ebpf_connects",
            "connect()s the kernel sent to a backend: TCP connections and connected UDP sockets",
            per_kernel_frontend(|c| c.connects),
        )?;
        family(
            &mut e,
            "ebpf_datagrams",
            "Unconnected UDP datagrams the kernel sent to a backend",
            per_kernel_frontend(|c| c.datagrams),
        )?;
        family(
            &mut e,
            "ebpf_refused",
            "connect()s and datagrams the kernel refused for want of a ready backend",
            per_kernel_frontend(|c| c.refused),
        )?;
        if let Some(dns) = &self.dns {
            family(
                &mut e,
                "dns_responses",
                "DNS responses sent, by who answered (local: the cluster zone, upstream: forwarded, acl: refused \
                 for the client's address) and response code",
                dns.responses().into_iter().map(|(source, rcode, n)| {
                    (vec![("source", source.as_str().to_owned()), ("rcode", rcode.to_owned())], ConstCounter::new(n))
                }),
            )?;
            family(
                &mut e,
                "dns_request_duration_seconds",
                "Time from reading a DNS query to sending its response, by who answered",
                dns.latency().into_iter().map(|(source, h)| (vec![("source", source.as_str().to_owned())], h)),
            )?;
            family(
                &mut e,
                "dns_dropped_queries",
                "DNS queries left unanswered: malformed (no header, or a response), overloaded (too many waiting)",
                dns.dropped()
                    .into_iter()
                    .map(|(why, n)| (vec![("reason", why.as_str().to_owned())], ConstCounter::new(n))),
            )?;
        }
        Ok(())
    }
}
