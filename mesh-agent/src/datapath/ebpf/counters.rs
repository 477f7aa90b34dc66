//! The kernel programs' per-frontend counters, read when asked (a scrape) through a handle of their own: at
//! 10,000 frontends a read is 10,000 lookups, which neither the hot path nor a catalog change should wait behind.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use arc_swap::ArcSwap;
use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::maps::{names, FrontendCounters};
use tracing::debug;

use super::pins::PinDir;
use crate::catalog::ServiceId;
use crate::datapath::Frontend;

/// One frontend's counts, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCounts {
    pub frontend: Frontend,
    pub service: ServiceId,
    /// connect()s sent to a backend: TCP connections and connected UDP sockets.
    pub connects: u64,
    /// Unconnected UDP datagrams sent to a backend.
    pub datagrams: u64,
    /// connect()s and datagrams refused for want of a ready backend.
    pub refused: u64,
}

pub struct KernelCounters {
    map: Mutex<PerCpuArray<MapData, FrontendCounters>>,
    /// The frontends and their ids, as of the last apply.
    ids: ArcSwap<Vec<(Frontend, ServiceId, u32)>>,
}

impl KernelCounters {
    pub(super) fn open(pins: &PinDir) -> anyhow::Result<Arc<Self>> {
        let path = pins.map(names::COUNTERS);
        let open = || -> Result<_, aya::maps::MapError> { Map::from_map_data(MapData::from_pin(&path)?)?.try_into() };
        let map = open().with_context(|| format!("opening {}", path.display()))?;
        Ok(Arc::new(Self { map: Mutex::new(map), ids: ArcSwap::from_pointee(Vec::new()) }))
    }

    pub(super) fn publish(&self, ids: Vec<(Frontend, ServiceId, u32)>) {
        self.ids.store(Arc::new(ids));
    }

    /// Every frontend's counts now, in frontend order. A frontend whose entry cannot be read is left out.
    pub fn read(&self) -> Vec<KernelCounts> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        self.ids
            .load()
            .iter()
            .filter_map(|(frontend, service, id)| {
                let per_cpu = map.get(id, 0).inspect_err(|e| debug!(%frontend, error = %e, "reading counters")).ok()?;
                let sum = |field: fn(&FrontendCounters) -> u64| per_cpu.iter().map(field).sum();
                Some(KernelCounts {
                    frontend: *frontend,
                    service: service.clone(),
                    connects: sum(|c| c.connects),
                    datagrams: sum(|c| c.datagrams),
                    refused: sum(|c| c.refused),
                })
            })
            .collect()
    }
}
