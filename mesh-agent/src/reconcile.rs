//! The one loop: catalog snapshots in, diffs out to IPAM, edge0, the data path, and the view the admin API shows.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::catalog::{Catalog, ClusterIp, Protocol};
use crate::datapath::{self, Datapath, Frontend, FrontendSpec, Frontends};
use crate::device::Device;
use crate::health::Health;
use crate::ipam::{Assignment, Ipam};
use crate::lb::{Policy, Strategy};
use crate::view::View;

/// A catalog with the VIPs assigned to its services: what DNS answers from and the admin API shows.
#[derive(Debug, Default)]
pub struct Resolved {
    pub catalog: Arc<Catalog>,
    pub assignment: Assignment,
}

/// How often the reconciler checks that edge0 still exists.
const DEVICE_CHECK: Duration = Duration::from_secs(1);

pub struct Reconciler {
    pub ipam: Ipam,
    pub device: Device,
    pub datapath: Box<dyn Datapath>,
    /// Addresses edge0 holds besides the VIPs (the DNS address).
    pub extra_addresses: BTreeSet<IpAddr>,
    pub strategy: Strategy,
    pub view: Arc<View>,
    health: Health,
    resolved: watch::Sender<Arc<Resolved>>,
    frontends: Frontends,
    /// Some frontends failed to apply: try again at the next tick.
    retry: bool,
}

impl Reconciler {
    pub fn new(
        ipam: Ipam,
        device: Device,
        datapath: Box<dyn Datapath>,
        extra_addresses: BTreeSet<IpAddr>,
        strategy: Strategy,
        view: Arc<View>,
        health: Health,
    ) -> Self {
        let (resolved, _) = watch::channel(Arc::default());
        let frontends = Frontends::new();
        Self { ipam, device, datapath, extra_addresses, strategy, view, health, resolved, frontends, retry: false }
    }

    /// Follows every applied catalog with its VIPs.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Resolved>> {
        self.resolved.subscribe()
    }

    /// Applies every new catalog until `catalogs` closes or `shutdown` fires; returns the reconciler so the caller
    /// can tear down what it holds.
    pub async fn run(
        mut self,
        mut catalogs: watch::Receiver<Arc<Catalog>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Self {
        let mut current = catalogs.borrow_and_update().clone();
        self.apply(&current).await;
        let mut unhealthy = self.health.unhealthy();
        // A closed verdict channel (checks disabled) would resolve `changed()` at once forever: stop polling it.
        let mut health_open = true;
        let mut tick = tokio::time::interval(DEVICE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = catalogs.changed() => {
                    if changed.is_err() {
                        return self;
                    }
                    current = catalogs.borrow_and_update().clone();
                    self.apply(&current).await;
                }
                changed = unhealthy.changed(), if health_open => match changed {
                    Ok(()) => self.apply(&current).await,
                    Err(_) => health_open = false,
                },
                _ = tick.tick() => {
                    self.check_device(&current).await;
                    if self.retry {
                        self.apply(&current).await;
                    }
                }
                _ = shutdown.changed() => return self,
            }
        }
    }

    /// Stops taking connections, lets established ones finish for up to `drain`, then stops the data path as
    /// configured; edge0 and its addresses go when the device drops.
    pub async fn shutdown(mut self, drain: Duration) {
        self.datapath.stop_accepting();
        let deadline = Instant::now() + drain;
        loop {
            let active = self.datapath.status().active_connections;
            if active == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(active, "drain deadline reached, closing the remaining connections");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.datapath.shutdown();
    }

    /// Brings every consumer to `catalog`. Failures of one part are logged and do not stop the others.
    pub async fn apply(&mut self, catalog: &Arc<Catalog>) {
        let started = Instant::now();
        // Read before applying: a catalog built before every source had loaded must not count as complete.
        let complete = self.view.catalog_source.synced();
        let assignment = self.ipam.assign(catalog);
        for (id, e) in &assignment.errors {
            warn!(service = %id, "no VIP: {e}");
        }
        self.retry = false;
        let mut frontends = frontends(catalog, &assignment, self.strategy);
        // Active checks are TCP connects: only TCP backends can be judged by them.
        let tcp = frontends.iter().filter(|(f, _)| f.protocol == Protocol::Tcp);
        self.health.check(tcp.flat_map(|(_, spec)| spec.backends.iter().copied()).collect());
        let unhealthy = Arc::clone(&self.health.unhealthy().borrow());
        without_unhealthy(&mut frontends, &unhealthy);
        let changes = datapath::diff(&self.frontends, &frontends);
        let changed = changes.len();
        let (removals, upserts): (Vec<_>, Vec<_>) =
            changes.into_iter().partition(|c| matches!(c, datapath::Change::Remove(_)));

        // Remove frontends before their addresses go, and add addresses before new frontends use them.
        if let Err(e) = self.datapath.apply(&removals) {
            error!("data path: {e}");
        }
        let mut addresses: BTreeSet<IpAddr> = assignment.vips.values().copied().collect();
        addresses.extend(&self.extra_addresses);
        if let Err(e) = self.device.sync(&addresses).await {
            error!("{e:#}");
        }
        if let Err(e) = self.datapath.apply(&upserts) {
            error!("data path: {e}; retrying them");
            // Not recorded as applied, so the next apply (at the latest the next device check) upserts them again.
            for (frontend, _) in e.failed {
                frontends.remove(&frontend);
                self.retry = true;
            }
        }
        self.frontends = frontends;
        if complete {
            self.datapath.catalog_applied();
        }
        let resolved = Arc::new(Resolved { catalog: Arc::clone(catalog), assignment });
        self.view.publish(Arc::clone(&resolved), unhealthy, self.datapath.status());
        self.resolved.send_replace(resolved);
        self.view.applies.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed();
        self.view.last_apply_micros.store(took.as_micros().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
        self.view.apply_seconds.observe(took.as_secs_f64());
        release_freed_memory();
        if changed > 0 {
            info!(changes = changed, frontends = self.frontends.len(), took = ?started.elapsed(), "catalog applied");
        } else {
            debug!(took = ?started.elapsed(), "catalog applied, no frontend changed");
        }
    }

    /// Recreates edge0 if it was deleted behind the agent's back, then re-adds its addresses.
    async fn check_device(&mut self, catalog: &Arc<Catalog>) {
        match self.device.exists().await {
            Ok(true) => return,
            Ok(false) => warn!(device = self.device.name(), "device disappeared, recreating it"),
            Err(e) => {
                warn!("{e:#}");
                return;
            }
        }
        match Device::create(self.device.name()).await {
            Ok(device) => {
                self.device = device;
                self.apply(catalog).await;
            }
            Err(e) => error!("{e:#}"),
        }
    }
}

/// Hands the memory a catalog change freed back to the system. Building a snapshot of a large catalog allocates
/// and frees tens of megabytes; glibc keeps freed pages in its arenas, so without this an agent's RSS settles at
/// its peak (10,000 services: 155 MiB) instead of what it holds.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes unhealthy backends out of TCP frontends' rotation (UDP backends are not checked). A frontend whose backends are all unhealthy keeps them all: a
/// failing health check then costs nothing, and the proxy's retries still find a backend that answers.
fn without_unhealthy(frontends: &mut Frontends, unhealthy: &BTreeSet<SocketAddr>) {
    if unhealthy.is_empty() {
        return;
    }
    for (_, spec) in frontends.iter_mut().filter(|(f, _)| f.protocol == Protocol::Tcp) {
        let healthy: Arc<[SocketAddr]> = spec.backends.iter().filter(|b| !unhealthy.contains(b)).copied().collect();
        if !healthy.is_empty() && healthy.len() < spec.backends.len() {
            spec.backends = healthy;
        }
    }
}

/// Every frontend of the catalog: one per (VIP, port, protocol) of every service that has a VIP.
pub fn frontends(catalog: &Catalog, assignment: &Assignment, strategy: Strategy) -> Frontends {
    let mut out = Frontends::new();
    for (id, svc) in &catalog.services {
        if svc.cluster_ip == ClusterIp::Headless {
            continue;
        }
        let Some(vip) = assignment.vips.get(id) else {
            continue;
        };
        let policy = Policy { strategy, affinity: svc.affinity };
        for port in &svc.ports {
            let backends: Arc<[SocketAddr]> =
                svc.backends(port).into_iter().map(|b| SocketAddr::new(b.ip, b.port)).collect();
            let frontend = Frontend { vip: *vip, port: port.port, protocol: port.protocol };
            out.insert(frontend, FrontendSpec { service: id.clone(), policy, backends });
        }
    }
    out
}
