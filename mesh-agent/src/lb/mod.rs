//! Load-balancing strategies. One definition serves both datapaths: the userspace proxy calls [`Balancer::pick`],
//! the eBPF datapath pushes the same inputs (backend order, Maglev table, affinity timeout) into its maps, and the
//! kernel programs apply the same rules.

pub mod affinity;
pub mod maglev;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use affinity::AffinityTable;

/// How a service spreads new connections over its ready backends. Names are EdgeMesh's
/// (`mesh.loadbalance.strategy-name`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Strategy {
    /// Exact alternation: connection n goes to backend n mod count.
    #[default]
    RoundRobin,
    /// Uniformly random backend per connection.
    Random,
    /// Maglev consistent hashing of the client address: a client keeps its backend while the set is stable, and
    /// a change of the set moves only about 1/n of the clients.
    ConsistentHash,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "RoundRobin",
            Strategy::Random => "Random",
            Strategy::ConsistentHash => "ConsistentHash",
        }
    }
}

/// The load-balancing policy of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Policy {
    pub strategy: Strategy,
    /// `sessionAffinity: ClientIP` with its timeout: a client keeps its backend while it returns within it.
    pub affinity: Option<Duration>,
}

/// The round-robin position of one frontend. It outlives backend-set updates so alternation stays exact across
/// them.
#[derive(Debug, Default)]
pub struct Cursor(AtomicU64);

impl Cursor {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// Picks backends for one frontend. Immutable but for its atomic cursor and affinity table, so readers share it
/// without locks; an update builds a new one (see [`Balancer::update`]).
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    backends: Arc<[SocketAddr]>,
    maglev: Option<maglev::Table>,
    cursor: Arc<Cursor>,
    affinity: Option<Arc<AffinityTable>>,
}

impl Balancer {
    pub fn new(policy: Policy, backends: Arc<[SocketAddr]>) -> Self {
        let maglev = (policy.strategy == Strategy::ConsistentHash && !backends.is_empty())
            .then(|| maglev::Table::build(&backends, maglev::DEFAULT_SIZE));
        let affinity = policy.affinity.map(|timeout| Arc::new(AffinityTable::new(timeout)));
        Self { policy, backends, maglev, cursor: Arc::default(), affinity }
    }

    /// The balancer for a new backend set, keeping this one's cursor and the affinity entries that still point to
    /// a backend of the new set.
    pub fn update(&self, policy: Policy, backends: Arc<[SocketAddr]>) -> Self {
        let mut next = Self::new(policy, backends);
        if policy.strategy == self.policy.strategy {
            next.cursor = Arc::clone(&self.cursor);
        }
        if let (Some(old), Some(timeout)) = (&self.affinity, policy.affinity) {
            if old.timeout() == timeout {
                old.retain_backends(&next.backends);
                next.affinity = Some(Arc::clone(old));
            }
        }
        next
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn backends(&self) -> &[SocketAddr] {
        &self.backends
    }

    /// The backend for a new connection from `client`, or `None` when there is no ready backend.
    pub fn pick(&self, client: IpAddr) -> Option<SocketAddr> {
        if self.backends.is_empty() {
            return None;
        }
        if let Some(table) = &self.affinity {
            if let Some(backend) = table.lookup(client) {
                return Some(backend);
            }
        }
        let backend = self.backends[self.pick_index(client)];
        if let Some(table) = &self.affinity {
            table.remember(client, backend);
        }
        Some(backend)
    }

    /// The backend to try after `failed` could not be reached: the next one in order, so bounded retries visit
    /// distinct backends. Forgets `failed` for the client's affinity.
    pub fn next_after(&self, client: IpAddr, failed: SocketAddr) -> Option<SocketAddr> {
        let pos = self.backends.iter().position(|b| *b == failed)?;
        let backend = self.backends[(pos + 1) % self.backends.len()];
        if let Some(table) = &self.affinity {
            table.remember(client, backend);
        }
        Some(backend)
    }

    fn pick_index(&self, client: IpAddr) -> usize {
        let n = self.backends.len();
        match self.policy.strategy {
            Strategy::RoundRobin => (self.cursor.next() % n as u64) as usize,
            Strategy::Random => fastrand::usize(..n),
            Strategy::ConsistentHash => match &self.maglev {
                Some(table) => table.lookup(client_hash(client)) as usize,
                None => 0,
            },
        }
    }
}

/// The hash of a client address that ConsistentHash indexes its table with; the kernel side computes the same.
pub fn client_hash(client: IpAddr) -> u32 {
    match client {
        IpAddr::V4(v4) => mesh_common::hash::hash_u32(u32::from_be_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let words = [0, 4, 8, 12].map(|i| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]));
            words.into_iter().fold(0, |acc, w| mesh_common::hash::hash_u32(acc ^ w))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Arc<[SocketAddr]> {
        (0..n).map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i))).collect()
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn round_robin_alternates_exactly() {
        let b = Balancer::new(Policy { strategy: Strategy::RoundRobin, affinity: None }, backends(3));
        let picks: Vec<_> = (0..6).map(|_| b.pick(CLIENT).unwrap().port()).collect();
        assert_eq!(picks, [8000, 8001, 8002, 8000, 8001, 8002]);
    }

    #[test]
    fn round_robin_keeps_its_cursor_across_updates() {
        let policy = Policy { strategy: Strategy::RoundRobin, affinity: None };
        let b = Balancer::new(policy, backends(2));
        assert_eq!(b.pick(CLIENT).unwrap().port(), 8000);
        let b = b.update(policy, backends(2));
        assert_eq!(b.pick(CLIENT).unwrap().port(), 8001);
    }

    #[test]
    fn random_reaches_every_backend() {
        let b = Balancer::new(Policy { strategy: Strategy::Random, affinity: None }, backends(3));
        let seen: std::collections::HashSet<_> = (0..200).map(|_| b.pick(CLIENT).unwrap()).collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn consistent_hash_is_stable_per_client() {
        let b = Balancer::new(Policy { strategy: Strategy::ConsistentHash, affinity: None }, backends(5));
        for i in 0..50u8 {
            let client = IpAddr::from([192, 0, 2, i]);
            let first = b.pick(client);
            assert!((0..5).all(|_| b.pick(client) == first));
        }
    }

    #[test]
    fn affinity_sticks_and_survives_updates() {
        let policy = Policy { strategy: Strategy::RoundRobin, affinity: Some(Duration::from_secs(60)) };
        let b = Balancer::new(policy, backends(3));
        let first = b.pick(CLIENT).unwrap();
        assert!((0..5).all(|_| b.pick(CLIENT) == Some(first)));
        let b = b.update(policy, backends(3));
        assert_eq!(b.pick(CLIENT), Some(first));
    }

    #[test]
    fn no_backend_no_pick() {
        let b = Balancer::new(Policy { strategy: Strategy::RoundRobin, affinity: None }, backends(0));
        assert_eq!(b.pick(CLIENT), None);
    }

    #[test]
    fn next_after_visits_the_others() {
        let b = Balancer::new(Policy { strategy: Strategy::RoundRobin, affinity: None }, backends(3));
        let first = b.pick(CLIENT).unwrap();
        let second = b.next_after(CLIENT, first).unwrap();
        let third = b.next_after(CLIENT, second).unwrap();
        assert_eq!([first, second, third].iter().collect::<std::collections::HashSet<_>>().len(), 3);
    }
}
