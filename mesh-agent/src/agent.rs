//! `mesh-agent run`: wires the parts together and runs until SIGTERM/SIGINT.
//!
//! catalog files + Kubernetes API (merged) ─▶ Reconciler ─▶ IPAM, edge0, data path ─▶ View ─▶ admin API

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::info;

use crate::catalog::{self, SourceState};
use crate::config::Config;
use crate::datapath;
use crate::device::Device;
use crate::health::Health;
use crate::ipam::Ipam;
use crate::metrics::Metrics;
use crate::reconcile::Reconciler;
use crate::view::View;
use crate::{admin, dns, sources, state_file};

pub async fn run(config: Config) -> Result<()> {
    info!(node = %config.node_name, version = env!("CARGO_PKG_VERSION"), "starting");
    state_file::ensure_dir(&config.state_dir)?;
    raise_fd_limit();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let source_state = Arc::new(SourceState::default());
    let mut catalogs = catalog::file::spawn(config.catalog.files.clone(), Arc::clone(&source_state));
    if config.catalog.kubernetes.enable {
        let api =
            catalog::kubernetes::spawn(config.catalog.kubernetes.clone(), &config.state_dir, Arc::clone(&source_state));
        catalogs = catalog::merge::spawn(catalogs, api);
    }
    let view = Arc::new(View::new(source_state));
    let dns_stats = config.dns.enable.then(|| Arc::new(dns::Stats::default()));
    let metrics = Arc::new(Metrics::new(Arc::clone(&view), dns_stats.clone()));
    let admin = admin::server::serve(
        config.admin.listen,
        Arc::clone(&view),
        metrics,
        config.node_name.clone(),
        shutdown_rx.clone(),
    )
    .await?;

    let device = Device::create(&config.device.name).await?;
    let dns_address: BTreeSet<_> = config.dns.enable.then_some(config.dns.listen.ip()).into_iter().collect();
    let ipam = Ipam::load(config.device.vip_pool, dns_address.iter().copied().collect(), &config.state_dir);
    let health = Health::spawn(config.health.clone());
    let reporter = health.clone();
    let failures = Arc::new(move |backend| reporter.report_failure(backend));
    let sources = sources::spawn(&config)?;
    let datapath = datapath::start(&config, failures, Arc::clone(&sources)).context("starting the data path")?;
    if let Some(counters) = datapath.kernel_counters() {
        view.set_kernel_counters(counters);
    }
    if let Some(counters) = datapath.proxy_counters() {
        view.set_proxy_counters(counters);
    }
    let reconciler =
        Reconciler::new(ipam, device, datapath, dns_address, config.load_balancer.strategy, Arc::clone(&view), health);
    let resolved = reconciler.subscribe();
    let dns = match dns_stats {
        Some(stats) => Some(dns::start(&config.dns, resolved, shutdown_rx.clone(), sources, stats).await?),
        None => None,
    };
    let reconciling = tokio::spawn(reconciler.run(catalogs, shutdown_rx));

    wait_for_signal().await?;
    info!("shutting down");
    let _ = shutdown_tx.send(true);
    // The data path detaches (unless told to stay); dropping the rest removes edge0 with its addresses.
    reconciling.await.context("reconciler task")?.shutdown(config.dataplane.drain_timeout).await;
    if let Some(dns) = dns {
        let _ = dns.await;
    }
    let _ = admin.await;
    info!("stopped");
    Ok(())
}

/// Every proxied connection holds two to six descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn wait_for_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
