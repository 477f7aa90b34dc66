//! The Kubernetes source: list-watches `v1 Service` and `discovery.k8s.io/v1 EndpointSlice` (kube-rs watchers:
//! resource versions, re-list on 410 Gone, backoff) from an API server or KubeEdge's metaServer, and publishes the
//! catalog of what it sees. The last-known objects are cached in stateDir and served at start, so a node without
//! its cloud link keeps resolving and routing.

mod client;
pub mod filter;
pub mod status;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

pub use status::{Status, SyncState};

use self::filter::Filter;
use self::status::Health;
use self::store::Store;
use super::{cache, Catalog, SourceState};
use crate::config::KubernetesConfig;

/// Publish at most this often, so a burst of changes is one snapshot for the reconciler.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// While stale, how often to ask whether the API is back (the watchers resume on their own backoff, up to 30 s).
const PROBE: Duration = Duration::from_secs(2);
/// The server ends each watch after this; a link that died silently is noticed within it (plus 5 s).
const WATCH_TIMEOUT_SECS: u32 = 60;
/// Between attempts to build a client, e.g. while a kubeconfig is not yet provisioned.
const CLIENT_RETRY: Duration = Duration::from_secs(5);

/// Starts the source. The first catalog (the cache's objects, or empty) is ready before this returns.
pub fn spawn(config: KubernetesConfig, state_dir: &Path, state: Arc<SourceState>) -> watch::Receiver<Arc<Catalog>> {
    let filter = Filter { mode: config.service_filter_mode };
    let mut store = Store::new(filter);
    let mut health = Health::new(state);
    let cache_path = state_dir.join(cache::FILE);
    if let Some(cached) = cache::load(&cache_path) {
        store.load(cached.snapshot);
        health.from_cache(cached.saved_at, store.counts());
        info!(services = store.counts().0, "serving the cached Kubernetes objects until the API answers");
    }
    let (tx, rx) = watch::channel(Arc::new(store.build()));
    let cache = cache::spawn_writer(cache_path);
    tokio::spawn(async move {
        let Some(client) = connect(&config, &mut health, &tx).await else { return };
        Source { filter, store, health, tx, cache }.run(client).await;
    });
    rx
}

async fn connect(
    config: &KubernetesConfig,
    health: &mut Health,
    tx: &watch::Sender<Arc<Catalog>>,
) -> Option<kube::Client> {
    loop {
        match client::connect(config).await {
            Ok((client, url)) => {
                health.server(url);
                return Some(client);
            }
            Err(e) => health.failed(format!("{e:#}")),
        }
        tokio::select! {
            _ = tokio::time::sleep(CLIENT_RETRY) => {}
            _ = tx.closed() => return None,
        }
    }
}

struct Source {
    filter: Filter,
    store: Store,
    health: Health,
    tx: watch::Sender<Arc<Catalog>>,
    cache: watch::Sender<Arc<store::Snapshot>>,
}

impl Source {
    async fn run(mut self, client: kube::Client) {
        let selector = self.filter.label_selector();
        let config = watcher::Config::default().labels(&selector).timeout(WATCH_TIMEOUT_SECS);
        let services_api: Api<K8sService> = Api::all(client.clone());
        let mut services = watcher(services_api.clone(), config.clone()).default_backoff().boxed();
        let mut slices = watcher(Api::<EndpointSlice>::all(client), config).default_backoff().boxed();

        // Nothing is published until both kinds are listed once: services without their endpoints would
        // replace the cache's good state with a broken one.
        let mut listed = (false, false);
        let mut publish_at: Option<Instant> = None;
        let mut last_publish = Instant::now() - DEBOUNCE;
        let mut probe = tokio::time::interval(PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = tokio::select! {
                Some(result) = services.next() => self.handle(result, &mut listed.0, Store::service_event),
                Some(result) = slices.next() => self.handle(result, &mut listed.1, Store::slice_event),
                _ = tokio::time::sleep_until(publish_at.unwrap_or_else(Instant::now)), if publish_at.is_some() => {
                    publish_at = None;
                    last_publish = Instant::now();
                    self.publish();
                    continue;
                }
                _ = probe.tick(), if !self.health.is_synced() && listed == (true, true) => {
                    self.probe(&services_api, &selector).await;
                    continue;
                }
                _ = self.tx.closed() => return,
            };
            if listed == (true, true) {
                if current {
                    self.health.synced();
                }
                if self.store.is_dirty() && publish_at.is_none() {
                    publish_at = Some(Instant::now().max(last_publish + DEBOUNCE));
                }
            }
        }
    }

    /// Applies one watcher result; returns whether it shows the objects are current.
    fn handle<K>(
        &mut self,
        result: watcher::Result<watcher::Event<K>>,
        listed: &mut bool,
        apply: fn(&mut Store, watcher::Event<K>),
    ) -> bool {
        match result {
            Ok(event) => {
                *listed |= matches!(event, watcher::Event::InitDone);
                // `Init` and `InitApply` are a re-list under way.
                let current = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                apply(&mut self.store, event);
                current
            }
            Err(e) => {
                self.failed(e);
                false
            }
        }
    }

    fn failed(&mut self, e: watcher::Error) {
        match &e {
            // The watch fell too far behind; the watcher re-lists, which is routine.
            watcher::Error::WatchError(status) if status.code == 410 => {
                info!("Kubernetes watch expired (410 Gone), re-listing")
            }
            _ => self.health.failed(e.to_string()),
        }
    }

    fn publish(&mut self) {
        let started = std::time::Instant::now();
        let catalog = self.store.build();
        self.health.published(self.store.counts(), self.store.errors().next().cloned());
        debug!(services = catalog.services.len(), took = ?started.elapsed(), "Kubernetes catalog built");
        self.tx.send_replace(Arc::new(catalog));
        self.cache.send_replace(Arc::new(self.store.snapshot()));
    }

    /// While stale: a cheap list tells whether the API answers again; the watchers then resume where they left off.
    async fn probe(&mut self, api: &Api<K8sService>, selector: &str) {
        let params = ListParams::default().labels(selector).limit(1);
        match tokio::time::timeout(PROBE, api.list(&params)).await {
            Ok(Ok(_)) => self.health.synced(),
            Ok(Err(e)) => self.health.failed(format!("probing the API: {e}")),
            Err(_) => self.health.failed(format!("probing the API: no answer within {PROBE:?}")),
        }
    }
}
