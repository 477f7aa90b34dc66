//! Typed handles on the pinned maps, and their fill for the status page.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{Array, HashMap, MapData, MapError, MapInfo};
use aya::{Ebpf, Pod};
use mesh_common::maps::{
    names, AffinityKey, AffinityValue, Backend, BackendKey, MaglevKey, MaglevTable, RevNatKey, RevNatValue, ServiceKey,
    ServiceValue,
};

use super::pins::PinDir;

pub type Map<K, V> = HashMap<MapData, K, V>;

pub struct Tables {
    pub services: Map<ServiceKey, ServiceValue>,
    pub backends: Map<BackendKey, Backend>,
    pub maglev: Map<MaglevKey, MaglevTable>,
    pub rr: Array<MapData, u64>,
    pub affinity: Map<AffinityKey, AffinityValue>,
    pub rev_nat: Map<RevNatKey, RevNatValue>,
    /// max_entries as the kernel has them: a pinned map keeps the capacity it was created with.
    capacity: BTreeMap<&'static str, u32>,
    /// The LRU maps' fill and when it was counted (see [`Tables::fill`]).
    walked: Mutex<Option<(Instant, [usize; 2])>>,
}

/// The kernel keeps no entry count for hash maps, so the LRU maps are walked key by key (~65k syscalls when
/// full); status pages may be polled often, so a count is reused for this long.
const WALK_EVERY: Duration = Duration::from_secs(10);

impl Tables {
    /// Takes the maps out of a loaded object. A pinned map left by an agent with another layout fails here,
    /// before any program is attached.
    pub fn take(ebpf: &mut Ebpf, pins: &PinDir) -> anyhow::Result<Self> {
        let mut capacity = BTreeMap::new();
        for name in names::ALL {
            let info = MapInfo::from_pin(pins.map(name)).with_context(|| format!("map {name} is not pinned"))?;
            capacity.insert(name, info.max_entries());
        }
        Ok(Self {
            services: typed(ebpf, pins, names::SERVICES)?,
            backends: typed(ebpf, pins, names::BACKENDS)?,
            maglev: typed(ebpf, pins, names::MAGLEV)?,
            rr: typed(ebpf, pins, names::RR)?,
            affinity: typed(ebpf, pins, names::AFFINITY)?,
            rev_nat: typed(ebpf, pins, names::REV_NAT)?,
            capacity,
            walked: Mutex::new(None),
        })
    }

    pub fn capacity(&self, name: &str) -> u32 {
        self.capacity.get(name).copied().unwrap_or(0)
    }

    /// Map name → (entries, capacity). `written` gives the counts the agent keeps for the maps it writes;
    /// the kernel-filled LRU maps are counted by walking them, at most every [`WALK_EVERY`].
    pub fn fill(&self, written: [(&'static str, usize); 3]) -> BTreeMap<String, (usize, usize)> {
        let mut walked = self.walked.lock().unwrap_or_else(|e| e.into_inner());
        let [affinity, rev_nat] = match *walked {
            Some((at, counts)) if at.elapsed() < WALK_EVERY => counts,
            _ => {
                let counts = [self.affinity.keys().count(), self.rev_nat.keys().count()];
                *walked = Some((Instant::now(), counts));
                counts
            }
        };
        let rr = (names::RR, self.capacity(names::RR) as usize);
        written
            .into_iter()
            .chain([(names::AFFINITY, affinity), (names::REV_NAT, rev_nat), rr])
            .map(|(name, entries)| (name.to_string(), (entries, self.capacity(name) as usize)))
            .collect()
    }
}

fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    name: &str,
) -> anyhow::Result<T> {
    let map = ebpf.take_map(name).with_context(|| format!("the object has no map {name}"))?;
    map.try_into().map_err(|e| {
        anyhow::anyhow!(
            "pinned map {} does not fit this agent ({e}); it was left by another version: remove {} to start \
             fresh (this interrupts service until the agent has loaded again)",
            pins.map(name).display(),
            pins.root().display()
        )
    })
}

/// Deletes `key`, which may already be gone.
pub fn remove<K: Pod, V: Pod>(map: &mut Map<K, V>, key: &K) -> Result<(), MapError> {
    match map.remove(key) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
