//! Forwarding for names outside the cluster zone: hickory's forwarder (hickory-resolver underneath) asks the
//! upstreams over UDP, retries over TCP when an answer comes back truncated, and caches answers for their TTL in a
//! bounded cache. Upstreams come from `dns.upstreams` or, when that is empty, from the node's original
//! /etc/resolv.conf — never the agent's own listen address, which would loop.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use hickory_server::proto::rr::Name;
use hickory_server::resolver::config::{ConnectionConfig, NameServerConfig, ResolverOpts};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::Catalog;
use tracing::{info, warn};

use crate::config::{parse_upstream, DnsConfig};

/// How long a forwarded query may take in all (the resolver retransmits over UDP within it, and tries every
/// upstream); an upstream that is down costs a client this much before SERVFAIL, well below a stub's 5 s.
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Answers kept; the least recently used go first.
const CACHE_ENTRIES: u64 = 4096;
/// Upper bounds on cached TTLs, so a bad upstream answer does not stick for days.
const MAX_POSITIVE_TTL: Duration = Duration::from_secs(3600);
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(300);

pub struct Forwarder {
    catalog: Option<Catalog>,
}

impl Forwarder {
    /// `resolv_conf` is the node's original resolv.conf, whose nameservers are the upstreams when none are set.
    pub fn new(config: &DnsConfig, resolv_conf: &str) -> Result<Self> {
        let upstreams = upstreams(config, resolv_conf)?;
        if upstreams.is_empty() {
            warn!("DNS: no upstream nameserver; names outside {} get SERVFAIL", config.domain);
            return Ok(Self { catalog: None });
        }
        info!(?upstreams, "DNS: forwarding to");
        let name_servers = upstreams
            .iter()
            .map(|addr| {
                let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                udp.port = addr.port();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.timeout = UPSTREAM_TIMEOUT;
        // no second round after the timeout: the client would have given up on us by then
        options.attempts = 0;
        options.cache_size = CACHE_ENTRIES;
        options.positive_max_ttl = Some(MAX_POSITIVE_TTL);
        options.negative_max_ttl = Some(MAX_NEGATIVE_TTL);
        let forward = ForwardZoneHandler::builder_tokio(ForwardConfig { name_servers, options: Some(options) })
            .build()
            .map_err(|e| anyhow!("DNS forwarder: {e}"))?;
        let mut catalog = Catalog::new();
        catalog.upsert(Name::root().into(), vec![Arc::new(forward)]);
        Ok(Self { catalog: Some(catalog) })
    }

    pub fn catalog(&self) -> Option<&Catalog> {
        self.catalog.as_ref()
    }
}

fn upstreams(config: &DnsConfig, resolv_conf: &str) -> Result<Vec<SocketAddr>> {
    let listed = if config.upstreams.is_empty() {
        resolv_conf_nameservers(resolv_conf)
    } else {
        config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| parse_upstream(u).with_context(|| format!("field `dns.upstreams[{i}]`")))
            .collect::<Result<_>>()?
    };
    Ok(listed
        .into_iter()
        .filter(|addr| {
            let own = addr.ip() == config.listen.ip() && addr.port() == config.listen.port();
            if own {
                warn!("DNS: upstream {addr} is this agent's own address; skipped");
            }
            !own
        })
        .collect())
}

/// `nameserver` addresses of a resolv.conf (port 53; an IPv6 zone suffix such as `%eth0` is dropped).
fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let got = resolv_conf_nameservers(text);
        assert_eq!(got, vec!["10.0.0.2:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
    }

    #[test]
    fn own_address_is_never_an_upstream() {
        let config =
            DnsConfig { upstreams: vec!["169.254.96.16".into(), "127.0.0.53:5353".into()], ..DnsConfig::default() };
        assert_eq!(upstreams(&config, "").unwrap(), vec!["127.0.0.53:5353".parse().unwrap()]);
        let config = DnsConfig::default();
        let resolv_conf = "nameserver 169.254.96.16\nnameserver 127.0.0.53\n";
        assert_eq!(upstreams(&config, resolv_conf).unwrap(), vec!["127.0.0.53:53".parse().unwrap()]);
    }
}
