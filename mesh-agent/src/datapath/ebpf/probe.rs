//! What this kernel can do, found by asking it: each hook is probed by loading a two-instruction program with
//! that attach type, so the answer holds for backports and custom configs where version numbers would lie.

use std::io;
use std::path::Path;

use aya::maps::MapType;
use aya::util::KernelVersion;
use serde::Serialize;

/// One kernel capability and why we think so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feature {
    pub available: bool,
    pub why: String,
}

/// The kernel's answers, per feature.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub kernel: String,
    /// bpf(2) may load programs here (root, or CAP_BPF + CAP_NET_ADMIN).
    pub bpf: Feature,
    /// Kernel BTF: informational, the programs use only stable context fields and need no CO-RE.
    pub btf: Feature,
    /// BPF ring buffers (5.8): the programs' log map needs one, so nothing loads without it.
    pub ringbuf: Feature,
    /// TCP and connected UDP.
    pub connect4: Feature,
    /// The same from IPv6 sockets to mapped addresses (`::ffff:VIP`).
    pub connect6: Feature,
    /// Unconnected UDP (also from IPv6 sockets: the kernel sends datagrams to mapped addresses as IPv4).
    pub sendmsg4: Feature,
    /// UDP replies appear to come from the VIP.
    pub recvmsg4: Feature,
    pub recvmsg6: Feature,
    /// getpeername() returns the VIP.
    pub getpeername4: Feature,
    pub getpeername6: Feature,
    /// Atomic fetch-and-add (5.12): exact round robin under concurrent connects.
    pub atomic_fetch: Feature,
    /// bpf_set_retval in connect hooks (5.18): a refused connect() fails with ECONNREFUSED, not EPERM.
    pub set_retval: Feature,
}

impl Probe {
    /// Why the eBPF data path cannot start at all, if it cannot.
    pub fn blocker(&self) -> Option<String> {
        [
            ("bpf()", &self.bpf),
            ("ring buffers", &self.ringbuf),
            ("cgroup/connect4", &self.connect4),
            ("cgroup/connect6", &self.connect6),
        ]
        .into_iter()
        .find(|(_, f)| !f.available)
        .map(|(name, f)| format!("{name} unavailable: {}", f.why))
    }
}

/// Asks the running kernel. Needs the privileges the agent runs with; without them every feature reads as
/// unavailable, with the reason.
pub fn probe() -> Probe {
    let version = KernelVersion::current();
    if version.as_ref().is_ok_and(|v| *v < KernelVersion::new(5, 11, 0)) {
        raise_memlock();
    }
    let kernel = version.map_or_else(|e| format!("unknown ({e})"), |v| v.to_string());
    let bpf = match load(ATTACH_CONNECT4, &[mov(0, 1), EXIT]) {
        Ok(()) => yes("bpf() loads programs"),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            no(format!("bpf() not permitted ({e}): run as root or with CAP_BPF and CAP_NET_ADMIN"))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => no("kernel built without bpf()"),
        Err(e) => yes(format!("bpf() answers ({e})")),
    };
    let btf = if Path::new("/sys/kernel/btf/vmlinux").exists() {
        yes("/sys/kernel/btf/vmlinux present")
    } else {
        no("no /sys/kernel/btf/vmlinux (not needed: the programs use no CO-RE)")
    };
    let ringbuf = match aya::sys::is_map_supported(MapType::RingBuf) {
        Ok(true) => yes("BPF_MAP_TYPE_RINGBUF supported"),
        Ok(false) => no("no BPF_MAP_TYPE_RINGBUF (kernel 5.8)"),
        Err(e) => no(format!("probing ring buffers failed: {e}")),
    };
    let hook = |attach_type, name: &str, since: &str| match load(attach_type, &[mov(0, 1), EXIT]) {
        Ok(()) => yes(format!("cgroup/{name} programs load")),
        Err(e) => no(format!("cgroup/{name} programs do not load ({e}); the hook needs kernel {since}")),
    };
    let connect4 = hook(ATTACH_CONNECT4, "connect4", "4.17");
    let connect6 = hook(ATTACH_CONNECT6, "connect6", "4.17");
    let sendmsg4 = hook(ATTACH_SENDMSG4, "sendmsg4", "4.18");
    let recvmsg4 = hook(ATTACH_RECVMSG4, "recvmsg4", "5.2");
    let recvmsg6 = hook(ATTACH_RECVMSG6, "recvmsg6", "5.2");
    let getpeername4 = hook(ATTACH_GETPEERNAME4, "getpeername4", "5.8");
    let getpeername6 = hook(ATTACH_GETPEERNAME6, "getpeername6", "5.8");
    // *(u64 *)(r10 - 8) = 0; r2 = 1; r2 = atomic_fetch_add((u64 *)(r10 - 8), r2)
    let fetch_add = [mov(1, 0), stx_dw(10, 1, -8), mov(2, 1), insn(0xdb, 10, 2, -8, BPF_ADD | BPF_FETCH)];
    let atomic_fetch = match load(ATTACH_CONNECT4, &[&fetch_add[..], &[mov(0, 1), EXIT]].concat()) {
        Ok(()) => yes("atomic fetch-and-add: round robin alternates exactly"),
        Err(e) => no(format!(
            "no atomic fetch-and-add ({e}; kernel 5.12): round robin alternates exactly for sequential \
             connects, approximately under concurrent ones"
        )),
    };
    let set_retval =
        match load(ATTACH_CONNECT4, &[mov(1, -libc::ECONNREFUSED), call(BPF_FUNC_SET_RETVAL), mov(0, 1), EXIT]) {
            Ok(()) => yes("bpf_set_retval: connect() to a service without backends fails with ECONNREFUSED"),
            Err(e) => no(format!(
                "no bpf_set_retval in connect hooks ({e}; kernel 5.18): connect() to a service without backends \
             fails with EPERM"
            )),
        };
    Probe {
        kernel,
        bpf,
        btf,
        ringbuf,
        connect4,
        connect6,
        sendmsg4,
        recvmsg4,
        recvmsg6,
        getpeername4,
        getpeername6,
        atomic_fetch,
        set_retval,
    }
}

/// Before 5.11 BPF memory counts against RLIMIT_MEMLOCK, where pinned maps of a previous agent already use up
/// the default 64 KiB and every load fails with EPERM. aya raises it on its first EPERM; the probe comes first.
fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::warn!("raising RLIMIT_MEMLOCK: {}", io::Error::last_os_error());
    }
}

fn yes(why: impl Into<String>) -> Feature {
    Feature { available: true, why: why.into() }
}

fn no(why: impl Into<String>) -> Feature {
    Feature { available: false, why: why.into() }
}

// uapi values (linux/bpf.h); stable ABI.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_CONNECT4: u32 = 10;
const ATTACH_CONNECT6: u32 = 11;
const ATTACH_SENDMSG4: u32 = 14;
const ATTACH_RECVMSG4: u32 = 19;
const ATTACH_RECVMSG6: u32 = 20;
const ATTACH_GETPEERNAME4: u32 = 29;
const ATTACH_GETPEERNAME6: u32 = 30;
const BPF_FUNC_SET_RETVAL: i32 = 187;
const BPF_ADD: i32 = 0x00;
const BPF_FETCH: i32 = 0x01;
const EXIT: Insn = insn(0x95, 0, 0, 0, 0);

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: src << 4 | dst, off, imm }
}

/// `dst = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const fn mov(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}

/// `*(u64 *)(dst + off) = src` (BPF_STX | BPF_MEM | BPF_DW).
const fn stx_dw(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x7b, dst, src, off, 0)
}

const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}

/// The head of `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type` (all that old kernels know).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads and at once unloads a cgroup sock_addr program with this attach type.
fn load(expected_attach_type: u32, insns: &[Insn]) -> io::Result<()> {
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    // SAFETY: `attr` and what it points to outlive the call; the kernel reads only `size_of` bytes.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoadAttr, size_of::<ProgLoadAttr>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us and nobody else holds.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_matches_the_kernel_layout() {
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(size_of::<Insn>(), 8);
    }

    #[test]
    fn registers_pack_source_high() {
        let i = stx_dw(10, 1, -8);
        assert_eq!((i.code, i.regs, i.off), (0x7b, 0x1a, -8));
    }

    /// Runs the real probe where bpf() is allowed; says why not otherwise.
    #[test]
    fn probe_answers_per_feature() {
        let p = probe();
        if !p.bpf.available {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run this as root: {}", p.bpf.why);
            eprintln!("skipped: {}", p.bpf.why);
            return;
        }
        assert!(p.connect4.available && p.connect6.available, "{p:?}");
        // A kernel with getpeername4 (5.8) has all the older hooks, and each IPv4 hook came with its IPv6 twin.
        if p.getpeername4.available {
            assert!(p.sendmsg4.available && p.recvmsg4.available, "{p:?}");
        }
        assert_eq!((p.recvmsg6.available, p.getpeername6.available), (p.recvmsg4.available, p.getpeername4.available));
    }
}
