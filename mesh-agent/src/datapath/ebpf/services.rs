//! The agent's side of the service maps: frontends in, map entries out, in an order that never shows the
//! kernel a half-written service (backends and Maglev table into the idle generation first, then the service
//! entry flips to it with one update).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use mesh_common::maps::{
    self as kernel, names, AffinityKey, Backend, BackendKey, MaglevKey, MaglevTable, ServiceKey, ServiceValue,
    FLAG_AFFINITY, MAGLEV_SIZE, MAX_BACKENDS_PER_SERVICE,
};

use super::maps::{self, Tables};
use crate::catalog::{Protocol, ServiceId};
use crate::datapath::{Frontend, FrontendSpec};
use crate::lb::{maglev, Policy, Strategy};

const _: () = assert!(maglev::DEFAULT_SIZE as usize == MAGLEV_SIZE, "kernel and agent Maglev tables differ in size");

/// What the agent knows about one frontend's entries.
#[derive(Debug, Clone)]
struct Entry {
    value: ServiceValue,
    /// The current generation's backends, to skip no-op updates and prune affinity.
    backends: Vec<Backend>,
    /// Backend slots written per generation, so a shrinking set deletes what it leaves behind.
    filled: [u32; 2],
    maglev: [bool; 2],
    /// Upserted since this agent started; adopted entries are not until the catalog confirms them.
    confirmed: bool,
    /// The service the frontend belongs to; unknown for an adopted entry until the catalog confirms it.
    service: Option<ServiceId>,
}

pub struct Services {
    entries: BTreeMap<ServiceKey, Entry>,
    free_ids: Vec<u32>,
    /// A frontend came, went or changed service since [`Services::take_ids_changed`] last looked.
    ids_changed: bool,
}

impl Services {
    /// Reads back what a previous agent left in pinned maps (or nothing, for fresh maps).
    pub fn adopt(tables: &Tables) -> anyhow::Result<Self> {
        let mut filled: HashMap<(u32, u8), u32> = HashMap::new();
        for key in tables.backends.keys() {
            let key = key.context("reading pinned backends")?;
            let n = filled.entry((key.service, key.generation)).or_default();
            *n = (*n).max(key.slot as u32 + 1);
        }
        let mut maglevs = Vec::new();
        for key in tables.maglev.keys() {
            maglevs.push(key.context("reading pinned Maglev tables")?);
        }
        let mut entries = BTreeMap::new();
        for item in tables.services.iter() {
            let (key, value) = item.context("reading pinned services")?;
            let backends = (0..value.count)
                .map(|slot| tables.backends.get(&backend_key(value.id, value.generation, slot), 0))
                .collect::<Result<_, _>>()
                .with_context(|| format!("pinned service {} lacks a backend", show(&key)))?;
            let gens = [0, 1];
            let entry = Entry {
                value,
                backends,
                filled: gens.map(|g| filled.get(&(value.id, g)).copied().unwrap_or(0)),
                maglev: gens.map(|g| maglevs.contains(&maglev_key(value.id, g))),
                confirmed: false,
                service: None,
            };
            entries.insert(key, entry);
        }
        let used: Vec<u32> = entries.values().map(|e| e.value.id).collect();
        let free_ids = (0..tables.capacity(names::RR)).rev().filter(|id| !used.contains(id)).collect();
        Ok(Self { entries, free_ids, ids_changed: false })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Each frontend whose service is known, with the id its counters are kept under, in frontend order.
    pub fn ids(&self) -> Vec<(Frontend, ServiceId, u32)> {
        let known = self.entries.iter().filter_map(|(key, e)| Some((key, e.service.clone()?, e.value.id)));
        let mut ids: Vec<_> = known.map(|(key, service, id)| (frontend_of(key), service, id)).collect();
        ids.sort_unstable_by_key(|(frontend, _, _)| *frontend);
        ids
    }

    /// Whether [`Services::ids`] changed since the last call: most catalog changes only move backends.
    pub fn take_ids_changed(&mut self) -> bool {
        std::mem::take(&mut self.ids_changed)
    }

    /// Entries the agent writes itself, for the status page: services, backend slots, Maglev tables.
    pub fn fill(&self) -> [(&'static str, usize); 3] {
        let backends = self.entries.values().map(|e| (e.filled[0] + e.filled[1]) as usize).sum();
        let maglevs = self.entries.values().map(|e| e.maglev.iter().filter(|m| **m).count()).sum();
        [(names::SERVICES, self.entries.len()), (names::BACKENDS, backends), (names::MAGLEV, maglevs)]
    }

    pub fn upsert(&mut self, tables: &mut Tables, frontend: &Frontend, spec: &FrontendSpec) -> anyhow::Result<()> {
        let key = service_key(frontend).context("not an IPv4 frontend")?;
        let backends = spec.backends.iter().map(to_backend).collect::<anyhow::Result<Vec<_>>>()?;
        if backends.len() as u32 > MAX_BACKENDS_PER_SERVICE {
            bail!("{} backends: the kernel tables hold at most {MAX_BACKENDS_PER_SERVICE}", backends.len());
        }
        let (strategy, flags, affinity_timeout_secs) = policy(&spec.policy);
        if let Some(entry) = self.entries.get_mut(&key) {
            let v = &entry.value;
            if entry.backends == backends
                && (v.strategy, v.flags, v.affinity_timeout_secs) == (strategy, flags, affinity_timeout_secs)
            {
                entry.confirmed = true;
                if entry.service.as_ref() != Some(&spec.service) {
                    entry.service = Some(spec.service.clone());
                    self.ids_changed = true;
                }
                return Ok(());
            }
        }
        let old = self.entries.get(&key).cloned();
        let (id, generation) = match &old {
            Some(e) => (e.value.id, e.value.generation ^ 1),
            None => (self.free_ids.pop().context("the service map is full (see maxServices)")?, 0),
        };
        if old.is_none() {
            // Counting is secondary to serving: a frontend whose counters cannot be zeroed (an id beyond a counters
            // map created smaller, under pins from an agent without one) is served and reported without them.
            if let Err(e) = tables.reset_counters(id) {
                tracing::warn!(frontend = %frontend, "{e:#}; its counters are not reported");
            }
        }
        // Round robin starts at the first backend for a new frontend or a new strategy, as a new userspace
        // balancer does; otherwise it continues across backend changes.
        if old.as_ref().is_none_or(|e| e.value.strategy != strategy) {
            if let Err(e) = tables.rr.set(id, 0, 0) {
                if old.is_none() {
                    self.free_ids.push(id);
                }
                return Err(e).context("resetting the round-robin counter");
            }
        }
        let mut entry = old.clone().unwrap_or(Entry {
            value: ServiceValue::default(),
            backends: Vec::new(),
            filled: [0; 2],
            maglev: [false; 2],
            confirmed: true,
            service: None,
        });
        let written = write_generation(tables, &mut entry, id, generation, &backends, strategy, &spec.backends);
        if let Err(e) = written {
            if old.is_none() {
                // Nothing points at the half-written generation: clean it up and give the id back.
                entry.value.id = id;
                delete_generations(tables, &entry);
                self.free_ids.push(id);
            } else {
                self.entries.insert(key, entry);
            }
            return Err(e);
        }
        let value = ServiceValue {
            id,
            count: backends.len() as u32,
            affinity_timeout_secs,
            strategy,
            generation,
            flags,
            _pad: 0,
        };
        // The flip: from here on new connections use the generation just written.
        tables.services.insert(key, value, 0).context("writing the service entry")?;
        entry.value = value;
        entry.backends = backends;
        entry.confirmed = true;
        if entry.service.as_ref() != Some(&spec.service) {
            entry.service = Some(spec.service.clone());
            self.ids_changed = true;
        }
        if let Some(old) = old.filter(|o| o.value.flags & FLAG_AFFINITY != 0) {
            // Like the userspace table: a changed timeout (or no affinity) starts over, else drop gone backends.
            let forget_all = old.value.affinity_timeout_secs != affinity_timeout_secs || flags & FLAG_AFFINITY == 0;
            prune_affinity(tables, id, if forget_all { &[] } else { &entry.backends })?;
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    pub fn remove(&mut self, tables: &mut Tables, frontend: &Frontend) -> anyhow::Result<()> {
        let Some(key) = service_key(frontend) else { return Ok(()) };
        let Some(entry) = self.entries.get(&key) else { return Ok(()) };
        // Unhook the frontend first so no connection reads the tables being deleted.
        maps::remove(&mut tables.services, &key).context("deleting the service entry")?;
        let entry = entry.clone();
        self.entries.remove(&key);
        delete_generations(tables, &entry);
        prune_affinity(tables, entry.value.id, &[])?;
        self.free_ids.push(entry.value.id);
        self.ids_changed = true;
        Ok(())
    }

    /// Removes adopted frontends the catalog has not upserted since this agent started; the agent calls it
    /// once its first full catalog is applied. Returns how many went.
    pub fn sweep_unconfirmed(&mut self, tables: &mut Tables) -> anyhow::Result<Vec<Frontend>> {
        let stale: Vec<Frontend> =
            self.entries.iter().filter(|(_, e)| !e.confirmed).map(|(k, _)| frontend_of(k)).collect();
        for f in &stale {
            self.remove(tables, f)?;
        }
        Ok(stale)
    }
}

/// Backend slots, then the Maglev table, of one generation. Records what it wrote in `entry` even on failure.
fn write_generation(
    tables: &mut Tables,
    entry: &mut Entry,
    id: u32,
    generation: u8,
    backends: &[Backend],
    strategy: u8,
    addrs: &[SocketAddr],
) -> anyhow::Result<()> {
    let g = generation as usize;
    let n = backends.len() as u32;
    let stale = entry.filled[g];
    entry.filled[g] = stale.max(n);
    for (slot, backend) in backends.iter().enumerate() {
        tables
            .backends
            .insert(backend_key(id, generation, slot as u32), backend, 0)
            .context("writing backends (is the backend map full? see maxBackends)")?;
    }
    for slot in n..stale {
        maps::remove(&mut tables.backends, &backend_key(id, generation, slot)).context("deleting stale backends")?;
    }
    entry.filled[g] = n;
    if strategy == kernel::STRATEGY_CONSISTENT_HASH && n > 0 {
        entry.maglev[g] = true;
        tables.maglev.insert(maglev_key(id, generation), maglev_table(addrs), 0).context("writing the Maglev table")?;
    } else if entry.maglev[g] {
        maps::remove(&mut tables.maglev, &maglev_key(id, generation)).context("deleting a Maglev table")?;
        entry.maglev[g] = false;
    }
    Ok(())
}

/// Deletes both generations of a frontend that no service entry points to; best effort, as leftovers are
/// only unused entries.
fn delete_generations(tables: &mut Tables, entry: &Entry) {
    for generation in [0, 1] {
        for slot in 0..entry.filled[generation as usize] {
            let _ = maps::remove(&mut tables.backends, &backend_key(entry.value.id, generation, slot));
        }
        if entry.maglev[generation as usize] {
            let _ = maps::remove(&mut tables.maglev, &maglev_key(entry.value.id, generation));
        }
    }
}

/// Drops the service's affinity entries that point outside `keep`, as the userspace table does on update.
fn prune_affinity(tables: &mut Tables, service: u32, keep: &[Backend]) -> anyhow::Result<()> {
    // Collect first: deleting while walking restarts the kernel's iteration.
    let mut doomed: Vec<AffinityKey> = Vec::new();
    for item in tables.affinity.iter() {
        let (key, value) = item.context("reading affinity entries")?;
        if key.service == service && !keep.contains(&value.backend) {
            doomed.push(key);
        }
    }
    for key in doomed {
        maps::remove(&mut tables.affinity, &key).context("deleting an affinity entry")?;
    }
    Ok(())
}

/// The kernel key of a frontend; `None` for IPv6, which these programs do not handle.
pub fn service_key(f: &Frontend) -> Option<ServiceKey> {
    let IpAddr::V4(vip) = f.vip else { return None };
    let proto = match f.protocol {
        Protocol::Tcp => kernel::PROTO_TCP,
        Protocol::Udp => kernel::PROTO_UDP,
    };
    Some(ServiceKey { vip: u32::from_ne_bytes(vip.octets()), port: f.port.to_be(), proto, _pad: 0 })
}

fn frontend_of(key: &ServiceKey) -> Frontend {
    let protocol = if key.proto == kernel::PROTO_UDP { Protocol::Udp } else { Protocol::Tcp };
    Frontend { vip: IpAddr::from(key.vip.to_ne_bytes()), port: u16::from_be(key.port), protocol }
}

fn show(key: &ServiceKey) -> String {
    frontend_of(key).to_string()
}

fn to_backend(addr: &SocketAddr) -> anyhow::Result<Backend> {
    match addr {
        SocketAddr::V4(a) => Ok(Backend { addr: u32::from_ne_bytes(a.ip().octets()), port: a.port().to_be(), _pad: 0 }),
        SocketAddr::V6(_) => bail!("backend {addr} is IPv6; an IPv4 VIP's socket cannot be redirected to it"),
    }
}

/// (strategy, flags, affinity timeout in seconds) for the service entry.
fn policy(policy: &Policy) -> (u8, u8, u32) {
    let strategy = match policy.strategy {
        Strategy::RoundRobin => kernel::STRATEGY_ROUND_ROBIN,
        Strategy::Random => kernel::STRATEGY_RANDOM,
        Strategy::ConsistentHash => kernel::STRATEGY_CONSISTENT_HASH,
    };
    match policy.affinity {
        // At least a second: the kernel keeps whole seconds and 0 would never stick.
        Some(timeout) => (strategy, FLAG_AFFINITY, timeout.as_secs().clamp(1, u32::MAX as u64) as u32),
        None => (strategy, 0, 0),
    }
}

/// The agent's Maglev table for these backends, as slot numbers.
fn maglev_table(backends: &[SocketAddr]) -> MaglevTable {
    let table = maglev::Table::build(backends, maglev::DEFAULT_SIZE);
    let mut slots = [0u16; MAGLEV_SIZE];
    for (slot, backend) in slots.iter_mut().zip(table.slots()) {
        *slot = *backend as u16;
    }
    MaglevTable { slots, _pad: 0 }
}

fn backend_key(service: u32, generation: u8, slot: u32) -> BackendKey {
    BackendKey { service, slot: slot as u16, generation, _pad: 0 }
}

fn maglev_key(service: u32, generation: u8) -> MaglevKey {
    MaglevKey { service, generation, _pad: [0; 3] }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_are_in_network_order() {
        let f = Frontend { vip: [10, 250, 0, 10].into(), port: 80, protocol: Protocol::Tcp };
        let key = service_key(&f).unwrap();
        // As `struct bpf_sock_addr` holds them: the bytes on the wire, in memory order.
        assert_eq!(key.vip.to_ne_bytes(), [10, 250, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, 6);
        assert_eq!(frontend_of(&key), f);
        let b = to_backend(&"10.201.0.2:8080".parse().unwrap()).unwrap();
        assert_eq!((b.addr.to_ne_bytes(), b.port.to_ne_bytes()), ([10, 201, 0, 2], 8080u16.to_be_bytes()));
    }

    #[test]
    fn ipv6_is_not_ours() {
        let f = Frontend { vip: "fd00::1".parse().unwrap(), port: 80, protocol: Protocol::Udp };
        assert!(service_key(&f).is_none());
        assert!(to_backend(&"[fd00::2]:80".parse().unwrap()).is_err());
    }

    #[test]
    fn maglev_slots_are_the_agents() {
        let backends: Vec<SocketAddr> = (0..3).map(|i| SocketAddr::from(([10, 201, 0, 2 + i], 80))).collect();
        let ours = maglev_table(&backends);
        let theirs = maglev::Table::build(&backends, maglev::DEFAULT_SIZE);
        assert!(ours.slots.iter().zip(theirs.slots()).all(|(a, b)| *a as u32 == *b));
        // The kernel indexes with the client hash, as `lb::client_hash` does.
        let client = IpAddr::from([10, 201, 1, 7]);
        let kernel_client = kernel::client_ip(u32::from_ne_bytes([10, 201, 1, 7]));
        let slot = kernel::client_hash(kernel_client) as usize % MAGLEV_SIZE;
        assert_eq!(ours.slots[slot] as u32, theirs.lookup(crate::lb::client_hash(client)));
    }

    #[test]
    fn policy_codes() {
        let p = Policy { strategy: Strategy::ConsistentHash, affinity: Some(Duration::from_secs(10800)) };
        assert_eq!(policy(&p), (kernel::STRATEGY_CONSISTENT_HASH, FLAG_AFFINITY, 10800));
        let p = Policy { strategy: Strategy::Random, affinity: Some(Duration::from_millis(10)) };
        assert_eq!(policy(&p), (kernel::STRATEGY_RANDOM, FLAG_AFFINITY, 1));
        let p = Policy { strategy: Strategy::RoundRobin, affinity: None };
        assert_eq!(policy(&p), (kernel::STRATEGY_ROUND_ROBIN, 0, 0));
    }
}
