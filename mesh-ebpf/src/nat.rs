//! Reverse translation: a socket sent to a backend sees the VIP as its peer (getpeername, UDP replies).

use mesh_common::maps::{Backend, RevNatKey, RevNatValue, ServiceKey};

use crate::{maps::REV_NAT, sock::Addr};

fn key(cookie: u64, backend: &Backend) -> RevNatKey {
    RevNatKey { cookie, addr: backend.addr, port: backend.port, _pad: 0 }
}

/// Remembers that this socket's `backend` stands for `frontend`. A connect translates once per socket, so its
/// entry is written straight away; `per_datagram` (sendmsg) looks first, so a UDP socket sending many datagrams
/// to one backend does not rewrite the entry each time.
pub fn remember(addr: &Addr, backend: &Backend, frontend: &ServiceKey, per_datagram: bool) {
    let key = key(addr.socket_cookie(), backend);
    let value = RevNatValue { vip: frontend.vip, port: frontend.port, _pad: 0 };
    // SAFETY: a copy is read; a concurrent update at worst makes us write the same value again.
    if !per_datagram || unsafe { REV_NAT.get(key) } != Some(&value) {
        // An LRU map makes room by itself; failure only means getpeername shows the backend.
        let _ = REV_NAT.insert(key, value, 0);
    }
}

/// Shows the VIP instead of the backend this socket talks to, if we translated it.
pub fn restore(addr: &Addr) {
    let key = key(addr.socket_cookie(), &addr.backend());
    // SAFETY: as above.
    if let Some(frontend) = unsafe { REV_NAT.get(key) } {
        addr.set(frontend.vip, frontend.port);
    }
}
