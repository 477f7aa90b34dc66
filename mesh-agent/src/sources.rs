//! Who counts as a node-local client: `dns.allowFrom`, or by default loopback, the node's own addresses and its
//! container bridges' subnets — plus the VIP pool, since a local process reaching a VIP often speaks from it.
//! Services are for this node's own clients; the userspace proxy checks every new connection against this list.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::config::Config;
use crate::dns::AllowList;

/// Who may use the VIPs and ask the DNS server, kept current. The kernel path needs no check: its hooks only see
/// sockets of processes on the node.
pub type Sources = Arc<ArcSwap<AllowList>>;

/// Addresses come and go (DHCP, new bridges): the default list is re-read this often.
const REFRESH: Duration = Duration::from_secs(5);

/// The node-local list for `config`, kept current by a background task when it is the default one.
pub fn spawn(config: &Config) -> Result<Sources> {
    let read = {
        let (config_nets, listen, pool) =
            (config.dns.allow_from.clone(), config.dns.listen.ip(), config.device.vip_pool);
        move || -> std::io::Result<AllowList> {
            let mut nets =
                if config_nets.is_empty() { AllowList::local(listen)?.nets().to_vec() } else { config_nets.clone() };
            nets.push(pool);
            Ok(AllowList::new(ipnet::IpNet::aggregate(&nets)))
        }
    };
    let sources: Sources = Arc::new(ArcSwap::from_pointee(read().context("reading the node's addresses")?));
    info!(sources = ?sources.load().nets(), "VIPs serve these clients");
    if config.dns.allow_from.is_empty() {
        let shared = Arc::clone(&sources);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match read() {
                    Ok(next) if **shared.load() != next => {
                        info!(sources = ?next.nets(), "node-local clients changed");
                        shared.store(Arc::new(next));
                    }
                    Ok(_) => {}
                    Err(e) => warn!("reading the node's addresses: {e}"),
                }
            }
        });
    }
    Ok(sources)
}
