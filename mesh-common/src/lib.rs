//! Types shared by the kernel programs (`mesh-ebpf`) and the agent.
//!
//! Every type crossing the user/kernel boundary is `#[repr(C)]`, carries explicit padding and has its size
//! asserted at compile time, so both sides agree on the layout byte for byte.
#![cfg_attr(not(test), no_std)]

pub mod maps;

pub mod hash {
    /// A 32-bit integer mix (Murmur3's finaliser): cheap enough for the kernel, spreads client addresses evenly.
    /// The agent and the kernel programs both index Maglev tables with it, so they must agree.
    #[inline(always)]
    pub const fn hash_u32(mut x: u32) -> u32 {
        x ^= x >> 16;
        x = x.wrapping_mul(0x85eb_ca6b);
        x ^= x >> 13;
        x = x.wrapping_mul(0xc2b2_ae35);
        x ^= x >> 16;
        x
    }
}
