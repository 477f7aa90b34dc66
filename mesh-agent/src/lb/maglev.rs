//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of `size` slots (a prime) filled from
//! each backend's permutation, so every backend owns about size/n slots and a change of the backend set moves
//! few of them. The eBPF datapath copies the same table into its per-service map.

use std::net::SocketAddr;

/// Slots per service: prime, at least ~100x a typical backend count for an even spread.
pub const DEFAULT_SIZE: u32 = 1021;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    slots: Vec<u32>,
}

impl Table {
    /// Fills `size` slots (a prime) with indices into `backends`, which must not be empty.
    pub fn build(backends: &[SocketAddr], size: u32) -> Self {
        assert!(!backends.is_empty(), "a Maglev table needs at least one backend");
        let m = size as u64;
        let perms: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| {
                let key = backend_key(b);
                let offset = fnv1a(key, 0xcbf2_9ce4_8422_2325) % m;
                let skip = fnv1a(key, 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut slots = vec![u32::MAX; size as usize];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size as usize {
                    break 'fill;
                }
            }
        }
        Self { slots }
    }

    pub fn lookup(&self, hash: u32) -> u32 {
        self.slots[(hash as usize) % self.slots.len()]
    }

    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

fn backend_key(b: &SocketAddr) -> [u8; 18] {
    let mut key = [0u8; 18];
    match b.ip() {
        std::net::IpAddr::V4(v4) => key[12..16].copy_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => key[..16].copy_from_slice(&v6.octets()),
    }
    key[16..].copy_from_slice(&b.port().to_be_bytes());
    key
}

fn fnv1a(bytes: [u8; 18], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i))).collect()
    }

    #[test]
    fn spreads_evenly() {
        let table = Table::build(&backends(4), DEFAULT_SIZE);
        let mut counts = [0u32; 4];
        for s in table.slots() {
            counts[*s as usize] += 1;
        }
        assert!(counts.iter().all(|c| (240..=272).contains(c)), "{counts:?}");
    }

    #[test]
    fn removing_a_backend_moves_few_slots() {
        let before = Table::build(&backends(5), DEFAULT_SIZE);
        let mut fewer = backends(5);
        let removed = fewer.remove(2);
        let after = Table::build(&fewer, DEFAULT_SIZE);
        let all = backends(5);
        let moved = before
            .slots()
            .iter()
            .zip(after.slots())
            .filter(|(b, a)| all[**b as usize] != removed && all[**b as usize] != fewer[**a as usize])
            .count();
        // Slots of surviving backends rarely move (Maglev's bound is loose; well under a fifth here).
        assert!(moved < DEFAULT_SIZE as usize / 5, "{moved} slots moved");
    }
}
