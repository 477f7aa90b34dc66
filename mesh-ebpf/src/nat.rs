//! Reverse translation: a socket sent to a backend sees the VIP as its peer (getpeername, UDP replies).
//!
//! Each kind of socket keeps it where it costs least for what it needs:
//! - TCP: getpeername() comes right after connect() in practice, and a TCP connection is the hot path, so one
//!   plain store into a slot chosen by the socket cookie; a much newer socket may take the slot over.
//! - connected UDP: replies need it for the socket's whole life, so it lives on the socket (socket-local
//!   storage): never evicted, freed with the socket.
//! - unconnected UDP: a socket may send to many backends, so an LRU map keyed by socket cookie and backend.

use core::ptr::{addr_of_mut, write_volatile};

use mesh_common::maps::{Backend, RevNatKey, RevNatValue, ServiceKey, SockNat, PROTO_TCP, TCP_NAT_SLOTS};

use crate::{
    maps::{REV_NAT, SOCK_NAT, TCP_NAT},
    sock::{Addr, Family},
};

fn key(cookie: u64, backend: &Backend) -> RevNatKey {
    RevNatKey { cookie, addr: backend.addr, port: backend.port, _pad: 0 }
}

fn slot(cookie: u64) -> u32 {
    cookie as u32 & (TCP_NAT_SLOTS - 1)
}

/// Remembers that this socket's `backend` stands for `frontend`. `per_datagram` (sendmsg) looks first, so a UDP
/// socket sending many datagrams to one backend does not rewrite its entry each time.
pub fn remember<F: Family>(addr: &Addr<F>, backend: &Backend, frontend: &ServiceKey, per_datagram: bool) {
    let value = RevNatValue { vip: frontend.vip, port: frontend.port, _pad: 0 };
    if per_datagram {
        let key = key(addr.socket_cookie(), backend);
        // SAFETY: a copy is read; a concurrent update at worst makes us write the same value again.
        if unsafe { REV_NAT.get(key) } != Some(&value) {
            // An LRU map makes room by itself; failure only means the replies show the backend.
            let _ = REV_NAT.insert(key, value, 0);
        }
    } else if frontend.proto == PROTO_TCP {
        let cookie = addr.socket_cookie();
        let Some(entry) = TCP_NAT.get_ptr_mut(slot(cookie)) else { return };
        // SAFETY: an array value pointer, valid for this run. The cookie goes first, so a reader of the socket
        // that had the slot before sees it is no longer theirs before anything else changes.
        unsafe {
            write_volatile(addr_of_mut!((*entry).cookie), cookie);
            write_volatile(addr_of_mut!((*entry).backend), *backend);
            write_volatile(addr_of_mut!((*entry).frontend), value);
        }
    } else {
        // SAFETY: the context's socket is a full socket in every sock_addr hook; a null result (out of memory)
        // only means the replies show the backend.
        if let Some(entry) = unsafe { SOCK_NAT.get_or_insert_ptr_mut(addr.ctx(), None).as_mut() } {
            *entry = SockNat { backend: *backend, frontend: value };
        }
    }
}

/// Shows the VIP instead of the backend this socket talks to, if we translated it.
pub fn restore<F: Family>(addr: &Addr<F>) {
    let Some(peer) = addr.backend() else { return };
    let frontend = if addr.is_tcp() {
        let cookie = addr.socket_cookie();
        TCP_NAT.get(slot(cookie)).copied().filter(|e| e.cookie == cookie && e.backend == peer).map(|e| e.frontend)
    } else {
        // SAFETY: as in `remember`; a copy is taken.
        let connected = unsafe { SOCK_NAT.get_ptr_mut(addr.ctx()).as_ref() }.copied();
        connected.filter(|e| e.backend == peer).map(|e| e.frontend)
    };
    // Unconnected UDP, or a socket connected by an agent from before these tables (upgrade).
    // SAFETY: as above.
    let frontend = frontend.or_else(|| unsafe { REV_NAT.get(key(addr.socket_cookie(), &peer)) }.copied());
    if let Some(frontend) = frontend {
        addr.set(frontend.vip, frontend.port);
    }
}
