//! The service load-balancing maps: names, keys and values.
//!
//! Addresses and ports are kept in network byte order exactly as `struct bpf_sock_addr` holds them
//! (`user_ip4`, the low 16 bits of `user_port`), so the kernel compares and copies them without swapping.
//!
//! An update never exposes a half-written service: each service has two generations of backend slots (and of
//! its Maglev table). The agent fills the generation not in use, then flips [`ServiceValue::generation`] with
//! one map update; a program that read the old value still finds the old generation intact.

use core::mem::size_of;

/// Map names, as in the object file and under the pin directory.
pub mod names {
    pub const SERVICES: &str = "services";
    pub const BACKENDS: &str = "backends";
    pub const MAGLEV: &str = "maglev";
    pub const RR: &str = "rr";
    pub const AFFINITY: &str = "affinity";
    pub const REV_NAT: &str = "rev_nat";
    pub const TCP_NAT: &str = "tcp_nat";
    pub const SOCK_NAT: &str = "sock_nat";
    pub const COUNTERS: &str = "counters";
    /// Every map the agent pins and adopts.
    pub const ALL: [&str; 9] = [SERVICES, BACKENDS, MAGLEV, RR, AFFINITY, REV_NAT, TCP_NAT, SOCK_NAT, COUNTERS];
}

/// Slots of a Maglev table; the agent's `lb::maglev::DEFAULT_SIZE` (a prime).
pub const MAGLEV_SIZE: usize = 1021;
/// Maglev slots hold backend slot numbers as `u16`.
pub const MAX_BACKENDS_PER_SERVICE: u32 = u16::MAX as u32;
/// LRU capacity for ClientIP affinity entries (per client and service).
pub const AFFINITY_ENTRIES: u32 = 65_536;
/// LRU capacity for unconnected UDP sockets' reverse translations (per socket and backend), for their replies. A
/// socket evicted from it sees its backend's address instead of the VIP. Connected sockets keep theirs elsewhere
/// ([`TcpNat`], [`SockNat`]), so connection churn never evicts a UDP socket's entry.
pub const REV_NAT_ENTRIES: u32 = 65_536;

/// Slots of the TCP reverse-translation table ([`TcpNat`]), a power of two: a TCP socket's slot is its cookie's
/// low bits, so its entry lasts until this many newer sockets have taken cookies (6.5 s at 20,000 connections/s).
/// getpeername() comes right after connect() in practice; 3 MiB of array.
pub const TCP_NAT_SLOTS: u32 = 1 << 17;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// [`ServiceValue::strategy`]: the agent's `lb::Strategy`.
pub const STRATEGY_ROUND_ROBIN: u8 = 0;
pub const STRATEGY_RANDOM: u8 = 1;
pub const STRATEGY_CONSISTENT_HASH: u8 = 2;

/// [`ServiceValue::flags`]: `sessionAffinity: ClientIP`.
pub const FLAG_AFFINITY: u8 = 1;

/// A frontend: VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into the `rr` and `counters` arrays and part of every per-service key; allocated by the agent,
    /// 0..max_services.
    pub id: u32,
    /// Ready backends in the current generation; 0 refuses connections.
    pub count: u32,
    pub affinity_timeout_secs: u32,
    pub strategy: u8,
    /// 0 or 1: which backend slots and Maglev table are current.
    pub generation: u8,
    pub flags: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: u32,
    pub slot: u16,
    pub generation: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevKey {
    pub service: u32,
    pub generation: u8,
    pub _pad: [u8; 3],
}

/// Backend slot per Maglev slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub slots: [u16; MAGLEV_SIZE],
    pub _pad: u16,
}

/// Who a client is, for affinity and Maglev: its bound source address, or its network namespace when the
/// socket has no source address yet at connect() time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service: u32,
    pub _pad: u32,
    /// [`client_ip`] or [`client_netns`].
    pub client: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Backend,
    /// `bpf_ktime_get_ns` of the last connection.
    pub last_ns: u64,
}

/// A translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The frontend to show instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub vip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A TCP socket's translation, in a direct-mapped array indexed by the socket cookie's low bits: one plain store
/// per connect. An LRU entry (locks) or socket storage (allocation, and a free at close) cost connect4 0.6-0.8 µs
/// more, 2-3% of a new connection here. A newer socket may take the slot over; `cookie` tells.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpNat {
    pub cookie: u64,
    pub backend: Backend,
    pub frontend: RevNatValue,
}

/// A connected UDP socket's translation, kept in socket-local storage: written once by connect, freed with the
/// socket, never evicted, since its replies need it for the socket's whole life. `backend` is checked before
/// restoring, since a socket may reconnect elsewhere.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockNat {
    pub backend: Backend,
    pub frontend: RevNatValue,
}

/// What the programs did for one frontend on one CPU (a per-CPU array indexed by [`ServiceValue::id`]; the agent
/// sums the CPUs and zeroes an id before giving it to a new frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendCounters {
    /// connect()s sent to a backend: TCP connections and connected UDP sockets.
    pub connects: u64,
    /// Unconnected UDP datagrams sent to a backend.
    pub datagrams: u64,
    /// connect()s and datagrams refused for want of a ready backend.
    pub refused: u64,
}

const _: () = assert!(size_of::<ServiceKey>() == 8);
const _: () = assert!(size_of::<ServiceValue>() == 16);
const _: () = assert!(size_of::<BackendKey>() == 8);
const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(size_of::<MaglevKey>() == 8);
const _: () = assert!(size_of::<MaglevTable>() == 2044);
const _: () = assert!(size_of::<AffinityKey>() == 16);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<RevNatKey>() == 16);
const _: () = assert!(size_of::<RevNatValue>() == 8);
const _: () = assert!(size_of::<TcpNat>() == 24);
const _: () = assert!(size_of::<SockNat>() == 16);
const _: () = assert!(size_of::<FrontendCounters>() == 24);

/// [`AffinityKey::client`] for a client with a source address (network byte order).
#[inline(always)]
pub const fn client_ip(addr: u32) -> u64 {
    addr as u64
}

/// [`AffinityKey::client`] for a client known by its network namespace cookie. The top bit keeps it apart
/// from addresses; netns cookies are small counters.
#[inline(always)]
pub const fn client_netns(cookie: u64) -> u64 {
    cookie | 1 << 63
}

/// The hash a Maglev table is indexed with, for a [`AffinityKey::client`] value. For an address it is the
/// agent's `lb::client_hash` (the address as a big-endian integer), so both data paths agree.
#[inline(always)]
pub const fn client_hash(client: u64) -> u32 {
    if client >> 63 == 0 {
        crate::hash::hash_u32(u32::from_be(client as u32))
    } else {
        crate::hash::hash_u32(client as u32 ^ (client >> 32) as u32)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all are #[repr(C)] of integers with explicit padding fields, so every byte is initialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for FrontendCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hash_of_an_address_is_the_agents() {
        // lb::client_hash(10.0.0.1) == hash_u32(0x0a000001); the kernel holds the address in network order.
        let addr = u32::from_ne_bytes([10, 0, 0, 1]);
        assert_eq!(client_hash(client_ip(addr)), crate::hash::hash_u32(0x0a00_0001));
    }

    #[test]
    fn netns_clients_never_collide_with_addresses() {
        assert_ne!(client_netns(1), client_ip(1));
        assert_ne!(client_netns(0xffff_ffff), client_ip(0xffff_ffff));
    }
}
