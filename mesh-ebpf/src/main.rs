//! mesh-agent's kernel programs: service load balancing at the socket layer. A connect() or UDP sendmsg() to a
//! service VIP is rewritten to a backend before any packet exists, so no proxy and no per-packet NAT sits in
//! the path; getpeername() and UDP replies are rewritten back so the application only ever sees the VIP.
//!
//! Each entry point names its hook and family and calls the shared code below. IPv6 hooks serve dual-stack
//! sockets reaching IPv4 services through mapped addresses (`::ffff:VIP`). The map layouts live in `mesh-common`.
#![no_std]
#![no_main]
#![feature(core_intrinsics, asm_experimental_arch)]
#![allow(internal_features)]

mod count;
mod maps;
mod nat;
mod pick;
mod sock;

use aya_ebpf::{helpers::generated::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext, Global};
use aya_log_ebpf::debug;
use mesh_common::maps::PROTO_UDP;

use crate::{
    maps::SERVICES,
    pick::NoBackend,
    sock::{Addr, Family, V4, V6},
};

/// Set by the agent when the kernel has bpf_set_retval for these hooks (5.18): a refused connect() then fails
/// with ECONNREFUSED instead of EPERM.
#[unsafe(no_mangle)]
static HAS_SET_RETVAL: Global<u8> = Global::new(0);

const ECONNREFUSED: i32 = 111;
/// Verdicts of connect/sendmsg hooks; recvmsg and getpeername hooks must always allow.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    connect::<true, V4>(&ctx)
}

/// connect4 for kernels before 5.12 (no atomic fetch-and-add).
#[cgroup_sock_addr(connect4)]
pub fn connect4_compat(ctx: SockAddrContext) -> i32 {
    connect::<false, V4>(&ctx)
}

/// Dual-stack sockets: an IPv6 socket connecting to `::ffff:VIP` (as Java's do by default) reaches the service.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    connect::<true, V6>(&ctx)
}

/// connect6 for kernels before 5.12.
#[cgroup_sock_addr(connect6)]
pub fn connect6_compat(ctx: SockAddrContext) -> i32 {
    connect::<false, V6>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::<true>(&ctx)
}

/// sendmsg4 for kernels before 5.12.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4_compat(ctx: SockAddrContext) -> i32 {
    sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore::<V4>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore::<V6>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore::<V4>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore::<V6>(&ctx)
}

/// TCP and connected UDP: VIP:port → a backend for the socket's lifetime.
#[inline(always)]
fn connect<const EXACT_RR: bool, F: Family>(ctx: &SockAddrContext) -> i32 {
    verdict(translate::<EXACT_RR, F>(ctx, None))
}

/// Unconnected UDP: each datagram to VIP:port is sent to a backend picked for it. IPv6 sockets need no sendmsg6:
/// the kernel sends their datagrams to mapped addresses down its IPv4 path, which runs sendmsg4.
#[inline(always)]
fn sendmsg<const EXACT_RR: bool>(ctx: &SockAddrContext) -> i32 {
    let msg_src = Addr::<V4>::new(ctx).msg_src();
    verdict(translate::<EXACT_RR, V4>(ctx, Some(msg_src)))
}

/// The peer a socket sees (getpeername, a UDP reply's source) becomes the VIP again.
#[inline(always)]
fn restore<F: Family>(ctx: &SockAddrContext) -> i32 {
    nat::restore(&Addr::<F>::new(ctx));
    ALLOW
}

/// VIP:port → a backend. `msg_src` is sendmsg's explicit source address (0 when unset), `None` for connect.
/// Inlined: across a BPF call an `Option` travels in two registers, and for `None` the verifier rejects the
/// payload's as never written.
#[inline(always)]
fn translate<const EXACT_RR: bool, F: Family>(ctx: &SockAddrContext, msg_src: Option<u32>) -> Result<(), NoBackend> {
    let addr = Addr::<F>::new(ctx);
    let Some(key) = addr.service_key() else { return Ok(()) };
    // SAFETY: a copy is taken; the agent replaces service entries whole.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else { return Ok(()) };
    let picked = pick::pick::<EXACT_RR>(&svc, || addr.client(msg_src.unwrap_or(0)));
    count::translation(svc.id, msg_src.is_some(), picked.is_ok());
    let backend = picked?;
    addr.set(backend.addr, backend.port);
    nat::remember(&addr, &backend, &key, msg_src.is_some());
    debug!(
        ctx,
        "{} {:i}:{} -> {:i}:{}",
        if key.proto == PROTO_UDP { "udp" } else { "tcp" },
        u32::from_be(key.vip),
        u16::from_be(key.port),
        u32::from_be(backend.addr),
        u16::from_be(backend.port)
    );
    Ok(())
}

/// A VIP without a ready backend fails at once and no packet ever leaves for the VIP.
fn verdict(result: Result<(), NoBackend>) -> i32 {
    match result {
        Ok(()) => ALLOW,
        Err(NoBackend) => {
            if HAS_SET_RETVAL.load() != 0 {
                // SAFETY: only reached when the agent found the helper available for these hooks.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            REFUSE
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could get here; this only satisfies the compiler.
    loop {}
}

/// No GPL-only helper is used, so the project's own license will do.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
