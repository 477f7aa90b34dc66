//! Reading and rewriting `struct bpf_sock_addr`.

use core::marker::PhantomData;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::maps::{client_ip, client_netns, Backend, ServiceKey, PROTO_TCP, PROTO_UDP};

/// The address field a hook may touch: the verifier lets IPv4 hooks use `user_ip4` only and IPv6 hooks
/// `user_ip6` only, so each hook is built for one family.
pub trait Family {
    /// The IPv4 address in the context: the address itself, or the one inside an IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, how a dual-stack socket reaches an IPv4 service); `None` for any other IPv6 address.
    ///
    /// # Safety
    /// `ctx` must be the context the kernel passed to a hook of this family.
    unsafe fn ip4(ctx: *const bpf_sock_addr) -> Option<u32>;

    /// Rewrites that IPv4 address; an IPv6 address keeps its mapped prefix.
    ///
    /// # Safety
    /// As for [`Family::ip4`], and the address must be one `ip4` returned.
    unsafe fn set_ip4(ctx: *mut bpf_sock_addr, addr: u32);
}

/// connect4, sendmsg4, recvmsg4, getpeername4.
pub struct V4;

/// connect6, recvmsg6, getpeername6: IPv6 sockets reaching IPv4 services through mapped addresses. (Their
/// unconnected datagrams to a mapped address go through the kernel's IPv4 path, which runs sendmsg4.)
pub struct V6;

impl Family for V4 {
    unsafe fn ip4(ctx: *const bpf_sock_addr) -> Option<u32> {
        // SAFETY: per the trait.
        Some(unsafe { (*ctx).user_ip4 })
    }

    unsafe fn set_ip4(ctx: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: per the trait.
        unsafe { (*ctx).user_ip4 = addr }
    }
}

impl Family for V6 {
    unsafe fn ip4(ctx: *const bpf_sock_addr) -> Option<u32> {
        // Word by word: the kernel accepts only 4-byte loads of `user_ip6` on older kernels.
        // SAFETY: per the trait; the pointers are to fields of the context.
        let word = |i: usize| unsafe { read_volatile(addr_of!((*ctx).user_ip6[i])) };
        (word(0) == 0 && word(1) == 0 && word(2) == 0xffff_u32.to_be()).then(|| word(3))
    }

    unsafe fn set_ip4(ctx: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: per the trait.
        unsafe { write_volatile(addr_of_mut!((*ctx).user_ip6[3]), addr) }
    }
}

/// The socket address a hook sees: the destination for connect/sendmsg, the peer for recvmsg/getpeername.
pub struct Addr<'a, F> {
    ctx: &'a SockAddrContext,
    family: PhantomData<F>,
}

impl<'a, F: Family> Addr<'a, F> {
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx, family: PhantomData }
    }

    pub fn ctx(&self) -> &'a SockAddrContext {
        self.ctx
    }

    fn raw(&self) -> *mut bpf_sock_addr {
        self.ctx.sock_addr
    }

    fn ip4(&self) -> Option<u32> {
        // SAFETY: the kernel hands the program a valid context of its hook's family for its whole run.
        unsafe { F::ip4(self.raw()) }
    }

    fn port(&self) -> u16 {
        // SAFETY: as above. `user_port` holds the port in network order in its low 16 bits.
        unsafe { (*self.raw()).user_port as u16 }
    }

    /// The frontend key for this address, or `None` for a protocol or address services don't use.
    pub fn service_key(&self) -> Option<ServiceKey> {
        // SAFETY: as above.
        let proto = match unsafe { (*self.raw()).protocol } as u8 {
            PROTO_TCP => PROTO_TCP,
            PROTO_UDP => PROTO_UDP,
            _ => return None,
        };
        Some(ServiceKey { vip: self.ip4()?, port: self.port(), proto, _pad: 0 })
    }

    pub fn is_tcp(&self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.raw()).protocol == PROTO_TCP as u32 }
    }

    /// The address as a backend, or `None` when it cannot be one of ours (IPv6 proper).
    pub fn backend(&self) -> Option<Backend> {
        Some(Backend { addr: self.ip4()?, port: self.port(), _pad: 0 })
    }

    /// Rewrites the address; the kernel only accepts 4-byte stores to these fields.
    pub fn set(&self, addr: u32, port: u16) {
        // SAFETY: as above; the fields are writable in every hook we attach, and only addresses `ip4` read are
        // ever rewritten (callers got `Some` from `service_key` or `backend` first).
        unsafe {
            F::set_ip4(self.raw(), addr);
            (*self.raw()).user_port = port as u32;
        }
    }

    pub fn socket_cookie(&self) -> u64 {
        // SAFETY: a helper call with the program's own context.
        unsafe { bpf_get_socket_cookie(self.ctx.sock_addr.cast()) }
    }

    /// Who the client is, for affinity and Maglev: the socket's bound source address when it has one (the
    /// same input as the userspace path's client address; an IPv6 socket bound to a mapped address has it
    /// too), else its network namespace, because connect() runs before the kernel picks a source address.
    /// `msg_src` is sendmsg's explicit source (0 elsewhere).
    pub fn client(&self, msg_src: u32) -> u64 {
        // SAFETY: `sk` is a non-null socket pointer in sock_addr programs.
        let bound = unsafe { (*(*self.raw()).__bindgen_anon_1.sk).src_ip4 };
        match (msg_src, bound) {
            (0, 0) => client_netns(unsafe { bpf_get_netns_cookie(self.ctx.sock_addr.cast()) }),
            (0, bound) => client_ip(bound),
            (src, _) => client_ip(src),
        }
    }
}

impl Addr<'_, V4> {
    /// sendmsg's explicit source address (IP_PKTINFO), 0 when unset. Only sendmsg4 may read it.
    pub fn msg_src(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.raw()).msg_src_ip4 }
    }
}
