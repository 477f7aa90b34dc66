//! Backend selection: the agent's `lb` strategies, applied to the tables it pushed.

use core::{
    arch::asm,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use mesh_common::maps::{
    client_hash, AffinityKey, AffinityValue, Backend, BackendKey, MaglevKey, ServiceValue, FLAG_AFFINITY, MAGLEV_SIZE,
    STRATEGY_CONSISTENT_HASH, STRATEGY_RANDOM,
};

use crate::maps::{AFFINITY, BACKENDS, MAGLEV, RR};

/// The service has no ready backend (or its tables are inconsistent): refuse the connection.
pub struct NoBackend;

/// Picks a backend of `svc` for `client` (computed only when the strategy needs it). `EXACT_RR` uses an
/// atomic fetch-and-add (kernel 5.12); without it round robin reads then increments, which alternates exactly
/// for sequential connections and approximately under concurrent ones.
pub fn pick<const EXACT_RR: bool>(svc: &ServiceValue, client: impl Fn() -> u64) -> Result<Backend, NoBackend> {
    if svc.count == 0 {
        return Err(NoBackend);
    }
    let affinity = svc.flags & FLAG_AFFINITY != 0;
    // The client is needed for affinity and Maglev only; other strategies skip the helper calls.
    let client = if affinity || svc.strategy == STRATEGY_CONSISTENT_HASH { client() } else { 0 };
    // SAFETY: helper calls without arguments.
    let now = if affinity { unsafe { bpf_ktime_get_ns() } } else { 0 };
    let affinity_key = AffinityKey { service: svc.id, _pad: 0, client };
    if affinity {
        if let Some(entry) = AFFINITY.get_ptr_mut(affinity_key) {
            // SAFETY: a map value pointer, valid for this run; racing writers only store the same kind of data.
            let entry = unsafe { &mut *entry };
            if now.wrapping_sub(entry.last_ns) < svc.affinity_timeout_secs as u64 * 1_000_000_000 {
                entry.last_ns = now;
                return Ok(entry.backend);
            }
        }
    }
    let slot = match svc.strategy {
        // SAFETY: a helper call without arguments.
        STRATEGY_RANDOM => (unsafe { bpf_get_prandom_u32() }) % svc.count,
        STRATEGY_CONSISTENT_HASH => maglev(svc, client)?,
        _ => round_robin::<EXACT_RR>(svc)?,
    };
    let key = BackendKey { service: svc.id, slot: slot as u16, generation: svc.generation, _pad: 0 };
    // SAFETY: a copy is taken; backends of the current generation are not rewritten while it is current.
    let backend = *unsafe { BACKENDS.get(key) }.ok_or(NoBackend)?;
    if affinity {
        // An LRU map makes room by itself; failure only costs stickiness for this client.
        let _ = AFFINITY.insert(affinity_key, AffinityValue { backend, last_ns: now }, 0);
    }
    Ok(backend)
}

fn round_robin<const EXACT: bool>(svc: &ServiceValue) -> Result<u32, NoBackend> {
    let counter = RR.get_ptr_mut(svc.id).ok_or(NoBackend)?;
    // SAFETY: an aligned map value pointer, valid for this run. (The bpf target has no CAS, so core's atomic
    // types lack fetch_add; the intrinsic maps to BPF's atomic add.)
    let n = unsafe {
        if EXACT {
            fetch_add(counter)
        } else {
            // The result of this add is unused, so it compiles to the pre-5.12 XADD.
            let n = counter.read_volatile();
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1);
            n
        }
    };
    Ok((n % svc.count as u64) as u32)
}

fn maglev(svc: &ServiceValue, client: u64) -> Result<u32, NoBackend> {
    let key = MaglevKey { service: svc.id, generation: svc.generation, _pad: [0; 3] };
    let table = MAGLEV.get_ptr(key).ok_or(NoBackend)?;
    let index = client_hash(client) % MAGLEV_SIZE as u32;
    // LLVM turns the modulo into multiplications the verifier cannot bound; reading the index back through
    // memory keeps the bounds check below, which the verifier does understand.
    // SAFETY: reads a local.
    let index = unsafe { core::ptr::read_volatile(&index) } as usize;
    // SAFETY: a map value pointer, valid for this run.
    let slot = unsafe { (*table).slots.get(index) }.ok_or(NoBackend)?;
    Ok(*slot as u32)
}

/// BPF's atomic fetch-and-add (kernel 5.12). Written out because LLVM emits it only for `-mcpu=v3`, which
/// aya-build's fixed compiler flags don't allow, and the rest of the object is better off built for any CPU.
///
/// # Safety
/// `counter` must point to a map value.
#[inline(always)]
unsafe fn fetch_add(counter: *mut u64) -> u64 {
    let mut n: u64 = 1;
    // SAFETY: per the caller, a valid and aligned u64.
    unsafe { asm!("{n} = atomic_fetch_add((u64 *)({p} + 0), {n})", p = in(reg) counter, n = inout(reg) n) };
    n
}
