//! Reverse translation: a socket sent to a backend sees the VIP as its peer (getpeername, UDP replies).
//!
//! A connected socket has one peer, so its translation lives on the socket (socket-local storage): no hash insert
//! per connection, nothing to evict, freed with the socket. An unconnected UDP socket may send to many
//! backends, so its translations go to an LRU map keyed by socket cookie and backend.

use mesh_common::maps::{Backend, RevNatKey, RevNatValue, ServiceKey, SockNat};

use crate::{
    maps::{REV_NAT, SOCK_NAT},
    sock::Addr,
};

fn key(cookie: u64, backend: &Backend) -> RevNatKey {
    RevNatKey { cookie, addr: backend.addr, port: backend.port, _pad: 0 }
}

/// Remembers that this socket's `backend` stands for `frontend`. `per_datagram` (sendmsg) looks first, so a UDP
/// socket sending many datagrams to one backend does not rewrite its entry each time.
pub fn remember(addr: &Addr, backend: &Backend, frontend: &ServiceKey, per_datagram: bool) {
    let value = RevNatValue { vip: frontend.vip, port: frontend.port, _pad: 0 };
    if !per_datagram {
        // SAFETY: the context's socket is a full socket in every sock_addr hook; a null result (out of memory)
        // only means getpeername shows the backend.
        if let Some(entry) = unsafe { SOCK_NAT.get_or_insert_ptr_mut(addr.ctx(), None).as_mut() } {
            *entry = SockNat { backend: *backend, frontend: value };
        }
        return;
    }
    let key = key(addr.socket_cookie(), backend);
    // SAFETY: a copy is read; a concurrent update at worst makes us write the same value again.
    if unsafe { REV_NAT.get(key) } != Some(&value) {
        // An LRU map makes room by itself; failure only means the replies show the backend.
        let _ = REV_NAT.insert(key, value, 0);
    }
}

/// Shows the VIP instead of the backend this socket talks to, if we translated it.
pub fn restore(addr: &Addr) {
    let peer = addr.backend();
    // SAFETY: as in `remember`; a copy is taken.
    let connected = unsafe { SOCK_NAT.get_ptr_mut(addr.ctx()).as_ref() }.copied();
    let frontend = match connected {
        Some(entry) if entry.backend == peer => Some(entry.frontend),
        // Unconnected UDP, or a socket connected by an agent from before socket storage (upgrade).
        // SAFETY: as above.
        _ => unsafe { REV_NAT.get(key(addr.socket_cookie(), &peer)) }.copied(),
    };
    if let Some(frontend) = frontend {
        addr.set(frontend.vip, frontend.port);
    }
}
