//! Prometheus metrics (prometheus-client). Gauges that mirror the published view are refreshed when scraped, so
//! the hot paths never touch them.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::view::View;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    services: Gauge,
    frontends: Gauge,
    catalog_synced: Gauge,
    datapath_mode: Family<ModeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mesh_agent");
        let services = Gauge::default();
        let frontends = Gauge::default();
        let catalog_synced = Gauge::default();
        let datapath_mode = Family::<ModeLabels, Gauge>::default();
        registry.register("services", "Services in the catalog", services.clone());
        registry.register("frontends", "Programmed VIP:port frontends", frontends.clone());
        registry.register("catalog_synced", "1 once the catalog has been loaded", catalog_synced.clone());
        registry.register("datapath_mode", "The data path in use (1 for the active mode)", datapath_mode.clone());
        Self { registry: Mutex::new(registry), services, frontends, catalog_synced, datapath_mode }
    }
}

impl Metrics {
    pub fn encode(&self, view: &View) -> Result<String, std::fmt::Error> {
        self.services.set(view.services().len() as i64);
        self.catalog_synced.set(view.catalog_source.synced() as i64);
        if let Some(d) = view.datapath() {
            self.frontends.set(d.frontends as i64);
            self.datapath_mode.clear();
            self.datapath_mode.get_or_create(&ModeLabels { mode: d.mode }).set(1);
        }
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        encode(&mut out, &registry)?;
        Ok(out)
    }
}
