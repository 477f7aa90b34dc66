//! edge0: the node-local TUN device that holds the DNS address and every service VIP, so the VIPs are local
//! addresses of the node (the userspace proxy binds them; the eBPF path rewrites before a packet is routed).
//! Addresses are managed over netlink.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::{Handle, LinkUnspec};
use tracing::{info, warn};

pub struct Device {
    name: String,
    index: u32,
    netlink: Handle,
    /// Keeps the TUN device alive: it is not persistent, so closing this fd (on drop, or when the process dies)
    /// removes the device with its addresses.
    _tun: tun::Device,
    addresses: BTreeSet<IpAddr>,
}

/// Attempts and backoff while the kernel refuses to create the device (e.g. the old one is still being torn down).
const CREATE_ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

impl Device {
    /// Creates the device, replacing an existing one of the same name (as EdgeMesh did: a leftover from a crashed
    /// agent holds stale VIPs), and brings it up. Retries with exponential backoff.
    pub async fn create(name: &str) -> Result<Self> {
        let (connection, netlink, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(connection);
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match Self::try_create(name, &netlink).await {
                Ok(device) => return Ok(device),
                Err(e) if attempt < CREATE_ATTEMPTS => {
                    warn!(device = name, attempt, "cannot create the device, retrying in {backoff:?}: {e:#}");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e.context(format!("device {name}: giving up after {attempt} attempts"))),
            }
        }
    }

    async fn try_create(name: &str, netlink: &Handle) -> Result<Self> {
        if let Some(index) = link_index(netlink, name).await? {
            info!(device = name, "deleting the existing device");
            netlink.link().del(index).execute().await.context("deleting the existing device")?;
        }
        let mut config = tun::Configuration::default();
        config.tun_name(name);
        let tun = tun::create(&config).map_err(|e| anyhow!("creating TUN device {name}: {e}"))?;
        let index = link_index(netlink, name).await?.ok_or_else(|| anyhow!("device {name} vanished after creation"))?;
        netlink
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {name} up"))?;
        info!(device = name, index, "device created");
        Ok(Self { name: name.into(), index, netlink: netlink.clone(), _tun: tun, addresses: BTreeSet::new() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the device hold exactly `want` (host addresses: /32 and /128). Adds first, then removes, so an address
    /// moving between services is never missing.
    pub async fn sync(&mut self, want: &BTreeSet<IpAddr>) -> Result<()> {
        let mut errors = Vec::new();
        for ip in want.difference(&self.addresses.clone()) {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            match self.netlink.address().add(self.index, *ip, prefix).replace().execute().await {
                Ok(()) => {
                    self.addresses.insert(*ip);
                }
                Err(e) => errors.push(format!("adding {ip}: {e}")),
            }
        }
        let stale: Vec<IpAddr> = self.addresses.difference(want).copied().collect();
        if !stale.is_empty() {
            let messages: Vec<AddressMessage> =
                self.netlink.address().get().set_link_index_filter(self.index).execute().try_collect().await?;
            for msg in messages {
                let Some(ip) = address_of(&msg) else { continue };
                if stale.contains(&ip) {
                    if let Err(e) = self.netlink.address().del(msg).execute().await {
                        errors.push(format!("removing {ip}: {e}"));
                    }
                }
            }
            for ip in stale {
                self.addresses.remove(&ip);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("device {}: {}", self.name, errors.join("; ")))
        }
    }

    /// Whether the device still exists (someone may delete it behind the agent's back).
    pub async fn exists(&self) -> Result<bool> {
        Ok(link_index(&self.netlink, &self.name).await? == Some(self.index))
    }
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}

async fn link_index(netlink: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = netlink.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(anyhow!("looking up device {name}: {e}")),
    }
}
