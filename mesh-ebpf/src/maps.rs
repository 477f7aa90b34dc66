//! The maps, pinned by name so a restarted agent adopts them. Capacities here are placeholders: the agent sizes
//! them from its config before loading.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use mesh_common::maps::{
    AffinityKey, AffinityValue, Backend, BackendKey, FrontendCounters, MaglevKey, MaglevTable, RevNatKey, RevNatValue,
    ServiceKey, ServiceValue, SockNat, TcpNat, AFFINITY_ENTRIES, REV_NAT_ENTRIES, TCP_NAT_SLOTS,
};

#[map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(1024, 0);

#[map(name = "backends")]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(2048, 0);

// 2 KiB values, only for ConsistentHash services: allocate on use, not up front.
#[map(name = "maglev")]
pub static MAGLEV: HashMap<MaglevKey, MaglevTable> = HashMap::pinned(2048, BPF_F_NO_PREALLOC);

/// Round-robin position per service id.
#[map(name = "rr")]
pub static RR: Array<u64> = Array::pinned(1024, 0);

#[map(name = "affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(AFFINITY_ENTRIES, 0);

/// Unconnected UDP sockets' reverse translations, per socket and backend.
#[map(name = "rev_nat")]
pub static REV_NAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(REV_NAT_ENTRIES, 0);

/// TCP sockets' reverse translations, by socket cookie.
#[map(name = "tcp_nat")]
pub static TCP_NAT: Array<TcpNat> = Array::pinned(TCP_NAT_SLOTS, 0);

/// Connected UDP sockets' reverse translation, on the socket itself. Socket storage must be defined with BTF, which
/// has no pinning attribute here: the agent pins it by name.
#[btf_map(name = "sock_nat")]
pub static SOCK_NAT: SkStorage<SockNat> = SkStorage::new();

/// What the programs did per service id, per CPU: no atomics and no cache line shared between CPUs.
#[map(name = "counters")]
pub static COUNTERS: PerCpuArray<FrontendCounters> = PerCpuArray::pinned(1024, 0);
