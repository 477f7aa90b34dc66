//! Typed handles on the pinned maps, and their fill for the status page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Context;
use aya::maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues};
use aya::{Ebpf, Pod};
use mesh_common::maps::{
    names, AffinityKey, AffinityValue, Backend, BackendKey, FrontendCounters, MaglevKey, MaglevTable, RevNatKey,
    RevNatValue, ServiceKey, ServiceValue,
};

use tracing::debug;

use super::pins::PinDir;

pub type Map<K, V> = HashMap<MapData, K, V>;

pub struct Tables {
    pub services: Map<ServiceKey, ServiceValue>,
    pub backends: Map<BackendKey, Backend>,
    pub maglev: Map<MaglevKey, MaglevTable>,
    pub rr: Array<MapData, u64>,
    pub affinity: Map<AffinityKey, AffinityValue>,
    pub counters: PerCpuArray<MapData, FrontendCounters>,
    /// Possible CPUs: the length of every per-CPU value.
    cpus: usize,
    /// Only the kernel writes it; held so the programs loaded after [`Tables::take`] can refer to it.
    _rev_nat: Map<RevNatKey, RevNatValue>,
    /// max_entries as the kernel has them: a pinned map keeps the capacity it was created with.
    capacity: BTreeMap<&'static str, u32>,
    /// The LRU maps' fill (affinity, reverse NAT), counted by [`walk`]; it stops when this drops the sender.
    walked: Arc<[AtomicUsize; 2]>,
    _walker: mpsc::Sender<()>,
}

/// The kernel keeps no entry count for hash maps, so the LRU maps are walked key by key: ~65k syscalls and tens of
/// milliseconds when full. A thread of its own does that this often, so no catalog change waits behind a walk.
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
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let walked = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (walker, stop) = mpsc::channel();
        let lru = [pins.map(names::AFFINITY), pins.map(names::REV_NAT)];
        let counts = Arc::clone(&walked);
        std::thread::Builder::new()
            .name("ebpf-map-fill".into())
            .spawn(move || walk(&lru, &counts, &stop))
            .context("starting the map fill counter")?;
        Ok(Self {
            services: typed(ebpf, pins, names::SERVICES)?,
            backends: typed(ebpf, pins, names::BACKENDS)?,
            maglev: typed(ebpf, pins, names::MAGLEV)?,
            rr: typed(ebpf, pins, names::RR)?,
            affinity: typed(ebpf, pins, names::AFFINITY)?,
            counters: typed(ebpf, pins, names::COUNTERS)?,
            cpus,
            _rev_nat: typed(ebpf, pins, names::REV_NAT)?,
            capacity,
            walked: Arc::clone(&walked),
            _walker: walker,
        })
    }

    /// Zeroes frontend `id`'s counters on every CPU, so a reused id starts from nothing.
    pub fn reset_counters(&mut self, id: u32) -> anyhow::Result<()> {
        let zeroes = PerCpuValues::try_from(vec![FrontendCounters::default(); self.cpus])?;
        self.counters.set(id, zeroes, 0).context("zeroing the frontend's counters")
    }

    pub fn capacity(&self, name: &str) -> u32 {
        self.capacity.get(name).copied().unwrap_or(0)
    }

    /// Map name → (entries, capacity). `written` gives the counts the agent keeps for the maps it writes;
    /// the kernel-filled LRU maps are as [`walk`] last counted them.
    pub fn fill(&self, written: [(&'static str, usize); 3]) -> BTreeMap<String, (usize, usize)> {
        let [affinity, rev_nat] = [0, 1].map(|i| self.walked[i].load(Ordering::Relaxed));
        let rr = (names::RR, self.capacity(names::RR) as usize);
        written
            .into_iter()
            .chain([(names::AFFINITY, affinity), (names::REV_NAT, rev_nat), rr])
            .map(|(name, entries)| (name.to_string(), (entries, self.capacity(name) as usize)))
            .collect()
    }
}

/// Counts the entries of the pinned LRU maps (affinity, reverse NAT) every [`WALK_EVERY`] until `stop`'s sender is
/// dropped.
fn walk(paths: &[PathBuf; 2], counts: &[AtomicUsize; 2], stop: &mpsc::Receiver<()>) {
    loop {
        // Opened afresh each time: handles of its own, and a map an operator removed is simply not counted.
        let entries = [entries::<AffinityKey, AffinityValue>(&paths[0]), entries::<RevNatKey, RevNatValue>(&paths[1])];
        for ((path, count), entries) in paths.iter().zip(counts).zip(entries) {
            match entries {
                Ok(n) => count.store(n, Ordering::Relaxed),
                Err(e) => debug!(map = %path.display(), error = %e, "cannot count entries"),
            }
        }
        if stop.recv_timeout(WALK_EVERY) != Err(mpsc::RecvTimeoutError::Timeout) {
            return;
        }
    }
}

fn entries<K: Pod, V: Pod>(path: &Path) -> Result<usize, MapError> {
    let map: Map<K, V> = aya::maps::Map::from_map_data(MapData::from_pin(path)?)?.try_into()?;
    Ok(map.keys().count())
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
