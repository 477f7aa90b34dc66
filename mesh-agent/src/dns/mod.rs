//! The node's DNS server: authority for the cluster zone (the Kubernetes DNS specification, schema 1.1.0, built from
//! the catalog) and a forwarder for everything else, on `dns.listen` over UDP and TCP.
//!
//! ```text
//! Resolved ──▶ Table::build ──▶ ArcSwap<Table> ◀── UDP threads (SO_REUSEPORT, one per core, recvmmsg batches):
//!                                      ▲             wire::answer, the hot path
//!                                      │               └─ anything else ─▶ Handler (hickory): zone | forward | REFUSED
//!                                      └──────────────────── TCP (hickory Server) ─▶ Handler
//! ```
//! The hot path exists because hickory's own server reached about half of dnsmasq's query rate (DESIGN.md).
//! Who may ask (`allow`): cluster-zone answers too go only to allowed sources; everyone else gets REFUSED.
//! Every query is counted (`stats`: atomics the `/metrics` scrape reads), by who answered and how, and timed.

mod allow;
mod forward;
mod handler;
mod resolv_conf;
mod server;
mod stats;
pub mod table;
mod udp;
pub mod wire;

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use arc_swap::ArcSwap;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use allow::AllowList;
use resolv_conf::ResolvConf;
pub use stats::Stats;
pub use table::{Table, Zone};

use crate::config::DnsConfig;
use crate::reconcile::Resolved;
use crate::sources::Sources;

/// Binds `config.listen` (UDP and TCP) and serves until `shutdown` turns true; answers follow `resolved`, and every
/// query is counted in `stats`.
pub async fn start(
    config: &DnsConfig,
    mut resolved: watch::Receiver<Arc<Resolved>>,
    mut shutdown: watch::Receiver<bool>,
    allow: Sources,
    stats: Arc<Stats>,
) -> Result<JoinHandle<()>> {
    let zone = Zone { domain: config.domain.clone(), ttl: config.ttl };
    let first = resolved.borrow_and_update().clone();
    let table = Arc::new(ArcSwap::from_pointee(Table::build(&first, &zone, serial())));
    info!(allow = ?allow.load().nets(), "DNS: answering");
    let resolv_conf_path = Path::new(resolv_conf::PATH);
    // a node without resolv.conf has no upstreams: cluster names still work
    let original = ResolvConf::original(resolv_conf_path).unwrap_or_default();
    let forwarder = forward::Forwarder::new(config, &original)?;
    let handler = handler::Handler::new(Arc::clone(&table), Arc::clone(&allow), forwarder, stats);
    let mut server = server::Server::bind(config.listen, handler)?;
    info!(listen = %config.listen, zone = %config.domain, "DNS: serving");
    let managed = if config.manage_resolv_conf {
        Some(ResolvConf::install(resolv_conf_path, config.listen, &config.domain)?)
    } else {
        None
    };

    Ok(tokio::spawn(async move {
        let mut catalog_open = true;
        loop {
            tokio::select! {
                changed = resolved.changed(), if catalog_open => {
                    if changed.is_err() {
                        // the reconciler is gone; keep answering from the last table until shutdown
                        catalog_open = false;
                        continue;
                    }
                    let next = resolved.borrow_and_update().clone();
                    let zone = zone.clone();
                    match tokio::task::spawn_blocking(move || Table::build(&next, &zone, serial())).await {
                        Ok(built) => {
                            debug!(names = built.len(), "DNS: table rebuilt");
                            table.store(Arc::new(built));
                        }
                        Err(e) => warn!("DNS: building the table: {e}"),
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        server.shutdown().await;
        if let Some(managed) = managed {
            if let Err(e) = managed.restore() {
                warn!("DNS: restoring {}: {e:#}", resolv_conf::PATH);
            }
        }
        info!("DNS: stopped");
    }))
}

/// The SOA serial: seconds since the epoch, so it grows across rebuilds and restarts.
fn serial() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(1)
}

/// The response to one UDP query from an allowed source, as far as it can be given without the network: the hot path
/// first, then hickory's parser for the rest — FORMERR when it cannot parse, a zone answer when the name is ours.
/// `None` means no answer (a response, a runt) or a name to forward. The fuzz target drives this.
pub fn handle_packet(table: &Table, packet: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match wire::answer(table, packet, &mut out) {
        wire::Fast::Reply => return Some(out),
        wire::Fast::Drop => return None,
        wire::Fast::Slow => {}
    }
    let request = match Request::from_bytes(packet.to_vec(), ([127, 0, 0, 1], 53).into(), Protocol::Udp) {
        Ok(request) => request,
        Err(_) => return wire::formerr(packet),
    };
    let answer = handler::zone_answer(table, &request)?;
    let edns = handler::response_edns(&request);
    let response = handler::zone_response(&request, &answer, edns.as_ref());
    handler::encode_udp(response, request.max_payload()).map(|(_, bytes)| bytes)
}
