//! Who may ask: `dns.allowFrom`, or by default loopback, the node's own addresses and the subnets of its container
//! bridges (docker0, cni0, cbr0 and the like: any bridge device). The server is no open resolver: everyone else gets
//! REFUSED — for cluster-zone names too, since the catalog describes the node's services to no one else.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<IpNet>,
}

impl AllowList {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    /// The default list, read from the node's interfaces now. `listen` is always in it: a query from the node to
    /// that address comes from that address, and it may not be on edge0 yet when this runs.
    pub fn local(listen: IpAddr) -> io::Result<Self> {
        let mut nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().expect("valid"), "::1/128".parse().expect("valid")];
        nets.push(IpNet::from(listen));
        // Looked up once per interface: edge0 alone holds an address per service, and this runs every few seconds.
        let mut bridges = HashMap::new();
        for (interface, ip, prefix) in interface_addresses()? {
            let bridge = *bridges
                .entry(interface)
                .or_insert_with_key(|name| Path::new("/sys/class/net").join(name).join("bridge").exists());
            let prefix = if bridge { prefix } else { max_prefix(ip) };
            if let Ok(net) = IpNet::new(ip, prefix) {
                nets.push(net.trunc());
            }
        }
        Ok(Self { nets: IpNet::aggregate(&nets) })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// (interface, address, prefix length) of every IPv4 and IPv6 address on the node.
fn interface_addresses() -> io::Result<Vec<(String, IpAddr, u8)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; its pointers are null or valid for its lifetime,
        // and each sockaddr is as large as its family says.
        unsafe {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            let Some(ip) = sockaddr_ip(ifa.ifa_addr) else { continue };
            let prefix = if ifa.ifa_netmask.is_null() {
                max_prefix(ip)
            } else {
                match sockaddr_ip(ifa.ifa_netmask) {
                    Some(IpAddr::V4(m)) => u32::from(m).count_ones() as u8,
                    Some(IpAddr::V6(m)) => u128::from(m).count_ones() as u8,
                    None => max_prefix(ip),
                }
            };
            out.push((name, ip, prefix));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// # Safety
/// `addr` must point to a sockaddr as large as its family says.
unsafe fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    match i32::from((*addr).sa_family) {
        libc::AF_INET => {
            let sin = &*(addr as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let sin6 = &*(addr as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_list_holds_loopback_and_own_addresses() {
        let list = AllowList::local("169.254.96.16".parse().unwrap()).unwrap();
        assert!(list.allows("169.254.96.16".parse().unwrap()));
        assert!(list.allows("127.0.0.1".parse().unwrap()));
        assert!(list.allows("::1".parse().unwrap()));
        assert!(list.allows("::ffff:127.0.0.1".parse().unwrap()), "IPv4-mapped sources count as IPv4");
        assert!(!list.allows("192.0.2.77".parse().unwrap()));
    }

    #[test]
    fn configured_list_is_exact() {
        let list = AllowList::new(vec!["10.1.0.0/16".parse().unwrap()]);
        assert!(list.allows("10.1.2.3".parse().unwrap()));
        assert!(!list.allows("127.0.0.1".parse().unwrap()));
    }
}
