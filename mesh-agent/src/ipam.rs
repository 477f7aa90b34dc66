//! The VIP pool: which service holds which virtual IP. `spec.clusterIP` is used as given; other services get an
//! address from `device.vipPool`, persisted in `stateDir` so the same service keeps its VIP across restarts.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::catalog::{Catalog, ClusterIp, ServiceId};
use crate::state_file;

const STATE_FILE: &str = "vips.json";

/// Why a service has no VIP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("spec.clusterIP {ip} is already the VIP of {holder}")]
    Duplicate { ip: IpAddr, holder: ServiceId },
    #[error("spec.clusterIP {ip} is reserved for the agent's DNS address")]
    Reserved { ip: IpAddr },
    #[error("VIP pool {pool} is exhausted")]
    Exhausted { pool: IpNet },
}

/// The outcome of one assignment: a VIP per service that has one, and why the others have none.
#[derive(Debug, Default)]
pub struct Assignment {
    pub vips: BTreeMap<ServiceId, IpAddr>,
    pub errors: BTreeMap<ServiceId, VipError>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct StateFile {
    pool: Option<IpNet>,
    /// "namespace/name" → VIP, for pool allocations only.
    allocations: BTreeMap<String, IpAddr>,
}

pub struct Ipam {
    pool: IpNet,
    /// Addresses no service may take (the DNS address).
    reserved: Vec<IpAddr>,
    path: PathBuf,
    allocations: BTreeMap<ServiceId, IpAddr>,
    /// Where the next pool search starts, so allocation stays O(1) amortised in a large pool.
    cursor: u128,
    /// The allocations in memory differ from the state file (the last save failed).
    unsaved: bool,
}

impl Ipam {
    /// Loads the allocations persisted in `state_dir`. Entries outside the pool (the pool was changed) are dropped
    /// with a warning; a corrupt state file is moved aside (and named in the log) so the agent still starts.
    pub fn load(pool: IpNet, reserved: Vec<IpAddr>, state_dir: &Path) -> Self {
        let path = state_dir.join(STATE_FILE);
        let state: StateFile = state_file::read_json_or_set_aside(&path);
        let mut allocations = BTreeMap::new();
        for (key, ip) in state.allocations {
            let Some((namespace, name)) = key.split_once('/') else {
                warn!(file = %path.display(), entry = %key, "ignoring malformed allocation");
                continue;
            };
            if !pool.contains(&ip) {
                warn!(file = %path.display(), service = %key, %ip, %pool, "dropping allocation outside the pool");
                continue;
            }
            allocations.insert(ServiceId { namespace: namespace.into(), name: name.into() }, ip);
        }
        Self { pool, reserved, path, allocations, cursor: 0, unsaved: false }
    }

    /// Assigns a VIP to every non-headless service of `catalog`, releases those of services that went, and
    /// persists the pool allocations when they changed.
    ///
    /// Conflicts are resolved deliberately: a fixed clusterIP wins over a pool allocation of the same address
    /// (the pool service moves), two services asking for the same fixed clusterIP → the first in namespace/name
    /// order keeps it and the other gets an error, and a fixed clusterIP outside the pool is used as given.
    pub fn assign(&mut self, catalog: &Catalog) -> Assignment {
        let mut out = Assignment::default();
        let mut taken: HashMap<IpAddr, ServiceId> = HashMap::new();
        for (id, svc) in &catalog.services {
            if let ClusterIp::Fixed(ip) = svc.cluster_ip {
                if self.reserved.contains(&ip) {
                    out.errors.insert(id.clone(), VipError::Reserved { ip });
                } else if let Some(holder) = taken.get(&ip) {
                    out.errors.insert(id.clone(), VipError::Duplicate { ip, holder: holder.clone() });
                } else {
                    taken.insert(ip, id.clone());
                    out.vips.insert(id.clone(), ip);
                }
            }
        }
        let before = self.allocations.clone();
        let auto: Vec<&ServiceId> =
            catalog.services.iter().filter(|(_, s)| s.cluster_ip == ClusterIp::Auto).map(|(id, _)| id).collect();
        self.allocations.retain(|id, ip| auto.contains(&id) && !taken.contains_key(ip));
        for (id, ip) in &self.allocations {
            taken.insert(*ip, id.clone());
            out.vips.insert(id.clone(), *ip);
        }
        for id in auto {
            if self.allocations.contains_key(id) {
                continue;
            }
            match self.next_free(&taken) {
                Some(ip) => {
                    taken.insert(ip, id.clone());
                    self.allocations.insert(id.clone(), ip);
                    out.vips.insert(id.clone(), ip);
                }
                None => {
                    out.errors.insert(id.clone(), VipError::Exhausted { pool: self.pool });
                }
            }
        }
        // An allocation that cannot be saved still serves; saving is retried with every assignment until it works.
        if self.allocations != before || self.unsaved {
            self.unsaved = match self.persist() {
                Ok(()) => false,
                Err(e) => {
                    error!("{e:#}; VIPs stay assigned in memory, saving is retried");
                    true
                }
            };
        }
        out
    }

    fn next_free(&mut self, taken: &HashMap<IpAddr, ServiceId>) -> Option<IpAddr> {
        // Hosts only: skip the network and (for IPv4) broadcast addresses.
        let host_bits = (self.pool.max_prefix_len() - self.pool.prefix_len()) as u32;
        let size: u128 = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        let usable = size.saturating_sub(2).min(1 << 24); // an IPv6 /64 is not searched to the end
        let base = to_u128(self.pool.network());
        for step in 0..usable {
            let offset = 1 + (self.cursor + step) % usable;
            let ip = from_u128(base + offset, self.pool.network());
            if !taken.contains_key(&ip) && !self.reserved.contains(&ip) {
                self.cursor = offset;
                return Some(ip);
            }
        }
        None
    }

    fn persist(&self) -> Result<()> {
        let state = StateFile {
            pool: Some(self.pool),
            allocations: self.allocations.iter().map(|(id, ip)| (id.to_string(), *ip)).collect(),
        };
        state_file::write_json(&self.path, &state).context("persisting VIP allocations")
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(n: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Service;

    fn catalog(services: &[(&str, ClusterIp)]) -> Catalog {
        let mut c = Catalog::default();
        for (name, cluster_ip) in services {
            let id = ServiceId { namespace: "default".into(), name: (*name).into() };
            c.services.insert(
                id.clone(),
                Service { id, cluster_ip: *cluster_ip, ports: vec![], affinity: None, endpoint_sets: vec![] },
            );
        }
        c
    }

    fn id(name: &str) -> ServiceId {
        ServiceId { namespace: "default".into(), name: name.into() }
    }

    fn pool(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allocations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(&[("a", ClusterIp::Auto), ("b", ClusterIp::Auto)]);
        let first = Ipam::load(pool("10.250.0.0/24"), vec![], dir.path()).assign(&c);
        // A new service sorted before the others must not shift their VIPs.
        let c2 = catalog(&[("0", ClusterIp::Auto), ("a", ClusterIp::Auto), ("b", ClusterIp::Auto)]);
        let second = Ipam::load(pool("10.250.0.0/24"), vec![], dir.path()).assign(&c2);
        assert_eq!(first.vips[&id("a")], second.vips[&id("a")]);
        assert_eq!(first.vips[&id("b")], second.vips[&id("b")]);
        assert_eq!(second.vips.len(), 3);
    }

    #[test]
    fn released_when_the_service_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(pool("10.250.0.0/30"), vec![], dir.path());
        let a = ipam.assign(&catalog(&[("a", ClusterIp::Auto), ("b", ClusterIp::Auto)]));
        assert_eq!(a.vips.len(), 2);
        let full = ipam.assign(&catalog(&[("a", ClusterIp::Auto), ("b", ClusterIp::Auto), ("c", ClusterIp::Auto)]));
        assert_eq!(full.errors[&id("c")], VipError::Exhausted { pool: pool("10.250.0.0/30") });
        let freed = ipam.assign(&catalog(&[("b", ClusterIp::Auto), ("c", ClusterIp::Auto)]));
        assert_eq!(freed.vips.len(), 2);
        assert_eq!(freed.vips[&id("c")], a.vips[&id("a")]);
    }

    #[test]
    fn fixed_cluster_ips_win_and_duplicates_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(pool("10.250.0.0/24"), vec![], dir.path());
        let a = ipam.assign(&catalog(&[("a", ClusterIp::Auto)])).vips[&id("a")];
        let out = ipam.assign(&catalog(&[
            ("a", ClusterIp::Auto),
            ("b", ClusterIp::Fixed(a)),
            ("c", ClusterIp::Fixed(a)),
            ("d", ClusterIp::Fixed("192.168.7.7".parse().unwrap())),
            ("h", ClusterIp::Headless),
        ]));
        assert_eq!(out.vips[&id("b")], a);
        assert_ne!(out.vips[&id("a")], a, "the pool service moved off the fixed address");
        assert_eq!(out.errors[&id("c")], VipError::Duplicate { ip: a, holder: id("b") });
        assert_eq!(out.vips[&id("d")], "192.168.7.7".parse::<IpAddr>().unwrap());
        assert!(!out.vips.contains_key(&id("h")));
    }

    #[test]
    fn reserved_addresses_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let reserved: IpAddr = "10.250.0.1".parse().unwrap();
        let mut ipam = Ipam::load(pool("10.250.0.0/24"), vec![reserved], dir.path());
        let out = ipam.assign(&catalog(&[("a", ClusterIp::Auto), ("r", ClusterIp::Fixed(reserved))]));
        assert_eq!(out.vips[&id("a")], "10.250.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(out.errors[&id("r")], VipError::Reserved { ip: reserved });
    }

    #[test]
    fn corrupt_state_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let mut ipam = Ipam::load(pool("10.250.0.0/24"), vec![], dir.path());
        assert_eq!(ipam.assign(&catalog(&[("a", ClusterIp::Auto)])).vips.len(), 1);
        let aside = std::fs::read_to_string(dir.path().join(format!("{STATE_FILE}.corrupt"))).unwrap();
        assert_eq!(aside, "{not json");
    }
}
