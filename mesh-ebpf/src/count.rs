//! Per-frontend counters, so the kernel path is as visible in the agent's metrics as the proxy.

use crate::maps::COUNTERS;

/// Counts one translation of frontend `id`: a connect() or (`datagram`) an unconnected UDP sendmsg(), sent to a
/// backend or (`!sent`) refused. Plain adds: the entry is this CPU's alone and the program cannot migrate mid-run
/// (only on a fully preemptible kernel could a run preempted by another on the same CPU lose a count).
#[inline(always)]
pub fn translation(id: u32, datagram: bool, sent: bool) {
    let Some(counters) = COUNTERS.get_ptr_mut(id) else { return };
    // SAFETY: a per-CPU map value pointer, valid for this run.
    let counters = unsafe { &mut *counters };
    match (sent, datagram) {
        (false, _) => counters.refused += 1,
        (true, false) => counters.connects += 1,
        (true, true) => counters.datagrams += 1,
    }
}
