//! Reading and rewriting `struct bpf_sock_addr`.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::maps::{client_ip, client_netns, Backend, ServiceKey, PROTO_TCP, PROTO_UDP};

/// The socket address a hook sees: the destination for connect/sendmsg, the peer for recvmsg/getpeername.
pub struct Addr<'a> {
    ctx: &'a SockAddrContext,
}

impl<'a> Addr<'a> {
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx }
    }

    pub fn ctx(&self) -> &'a SockAddrContext {
        self.ctx
    }

    fn raw(&self) -> *mut bpf_sock_addr {
        self.ctx.sock_addr
    }

    /// The frontend key for this address, or `None` for a protocol services don't use.
    pub fn service_key(&self) -> Option<ServiceKey> {
        // SAFETY: the kernel hands the program a valid context for its whole run.
        let (protocol, vip, port) =
            unsafe { ((*self.raw()).protocol, (*self.raw()).user_ip4, (*self.raw()).user_port) };
        let proto = match protocol as u8 {
            PROTO_TCP => PROTO_TCP,
            PROTO_UDP => PROTO_UDP,
            _ => return None,
        };
        // `user_port` holds the port in network order in its low 16 bits.
        Some(ServiceKey { vip, port: port as u16, proto, _pad: 0 })
    }

    pub fn is_tcp(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.raw()).protocol == PROTO_TCP as u32 }
    }

    pub fn backend(&self) -> Backend {
        // SAFETY: as above.
        unsafe { Backend { addr: (*self.raw()).user_ip4, port: (*self.raw()).user_port as u16, _pad: 0 } }
    }

    /// Rewrites the address; the kernel only accepts 4-byte stores to these fields.
    pub fn set(&self, addr: u32, port: u16) {
        // SAFETY: as above; the fields are writable in every hook we attach.
        unsafe {
            (*self.raw()).user_ip4 = addr;
            (*self.raw()).user_port = port as u32;
        }
    }

    pub fn socket_cookie(&self) -> u64 {
        // SAFETY: a helper call with the program's own context.
        unsafe { bpf_get_socket_cookie(self.ctx.sock_addr.cast()) }
    }

    /// Who the client is, for affinity and Maglev: the socket's bound source address when it has one (the
    /// same input as the userspace path's client address), else its network namespace, because connect() runs
    /// before the kernel picks a source address. `msg_src` is sendmsg's explicit source (0 elsewhere).
    pub fn client(&self, msg_src: u32) -> u64 {
        // SAFETY: `sk` is a non-null socket pointer in sock_addr programs.
        let bound = unsafe { (*(*self.raw()).__bindgen_anon_1.sk).src_ip4 };
        match (msg_src, bound) {
            (0, 0) => client_netns(unsafe { bpf_get_netns_cookie(self.ctx.sock_addr.cast()) }),
            (0, bound) => client_ip(bound),
            (src, _) => client_ip(src),
        }
    }

    /// sendmsg's explicit source address (IP_PKTINFO), 0 when unset. Only sendmsg4 may read it.
    pub fn msg_src(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.raw()).msg_src_ip4 }
    }
}
