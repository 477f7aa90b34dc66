//! Kernel-facing tests: they load the real object into this kernel and attach to a child cgroup of their own
//! (never the root one). Traffic through the hooks is the integration tests' job. cgroup sock_addr programs
//! cannot run under BPF_PROG_TEST_RUN (the kernel has no test_run for that program type), so the verifier
//! and real sockets are the only ways to exercise them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::programs::CgroupSockAddr;

use mesh_common::maps::names;

use super::*;
use crate::catalog::ServiceId;
use crate::datapath::FrontendSpec;
use crate::lb::{Policy, Strategy};

/// Why this kernel-facing test cannot run here, if it cannot; under CI that is a failure.
fn cannot_run() -> Option<String> {
    // SAFETY: no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root".to_string())
    } else if embedded_object().is_none() {
        Some("built without the BPF toolchain".into())
    } else {
        probe().blocker()
    };
    if let Some(why) = &why {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI must run the eBPF tests: {why}");
        eprintln!("skipped: {why}");
    }
    why
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A child cgroup of the cgroup2 mount, removed on drop.
struct ChildCgroup(PathBuf);

impl ChildCgroup {
    fn new() -> Self {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let root = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        });
        let dir = root.expect("no cgroup2 mount").join(unique("mesh-ebpf-test"));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn options(cgroup: &ChildCgroup) -> EbpfOptions {
    EbpfOptions {
        cgroup_path: cgroup.0.clone(),
        pin_dir: PathBuf::from("/sys/fs/bpf").join(unique("mesh-agent-test")),
        keep_on_exit: false,
        max_services: 16,
        max_backends: 64,
    }
}

fn spec(strategy: Strategy, ports: &[u16]) -> FrontendSpec {
    FrontendSpec {
        service: ServiceId { namespace: "default".into(), name: "web".into() },
        policy: Policy { strategy, affinity: None },
        backends: ports.iter().map(|p| SocketAddr::from(([10, 201, 0, 2], *p))).collect(),
    }
}

fn frontend(port: u16, protocol: Protocol) -> Frontend {
    Frontend { vip: [10, 250, 0, 10].into(), port, protocol }
}

/// Both variants of every program, with and without the optional helper, pass this kernel's verifier.
#[test]
fn every_program_verifies() {
    if cannot_run().is_some() {
        return;
    }
    let probe = probe();
    let cgroup = ChildCgroup::new();
    let pins = PinDir::create(&options(&cgroup).pin_dir).unwrap();
    let sizes = Sizes { max_services: 4, max_backends: 4 };
    let mut names = vec![
        "connect4_compat",
        "connect6_compat",
        "sendmsg4_compat",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
    ];
    if probe.atomic_fetch.available {
        names.extend(["connect4", "connect6", "sendmsg4"]);
    }
    for set_retval in [false, true].into_iter().filter(|s| !s || probe.set_retval.available) {
        let probe = Probe { set_retval: Feature { available: set_retval, why: String::new() }, ..probe.clone() };
        let mut ebpf = programs::load(embedded_object().unwrap(), &pins, &probe, &sizes, 0).unwrap();
        for name in &names {
            let program: &mut CgroupSockAddr = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program.load().unwrap_or_else(|e| panic!("{name} (set_retval {set_retval}): {e}"));
        }
    }
    pins.remove().unwrap();
}

/// Start, apply, "crash" (drop without shutdown), adopt, sweep, shut down.
#[test]
fn adopts_pinned_state_and_detaches_on_shutdown() {
    if cannot_run().is_some() {
        return;
    }
    let probe = probe();
    let cgroup = ChildCgroup::new();
    let opts = options(&cgroup);
    let tcp = frontend(80, Protocol::Tcp);
    let udp = frontend(53, Protocol::Udp);
    let refused = frontend(81, Protocol::Tcp);

    let mut first = EbpfDatapath::start(&opts, &probe).unwrap();
    assert!(first.handles(&tcp));
    assert!(!first.handles(&Frontend { vip: "fd00::10".parse().unwrap(), port: 80, protocol: Protocol::Tcp }));
    first
        .apply(&[
            Change::Upsert(tcp, spec(Strategy::RoundRobin, &[8080, 8081])),
            Change::Upsert(udp, spec(Strategy::ConsistentHash, &[5353, 5354, 5355])),
            Change::Upsert(refused, spec(Strategy::Random, &[])),
        ])
        .unwrap();
    // Shrinking a set deletes the slots it leaves behind; the other generation keeps the previous set.
    first.apply(&[Change::Upsert(tcp, spec(Strategy::RoundRobin, &[8080]))]).unwrap();
    let status = first.status();
    assert_eq!(status.frontends, 3);
    assert_eq!(status.maps["services"], (3, 16));
    assert_eq!(status.maps["backends"].0, 2 + 1 + 3);
    assert_eq!(status.maps["maglev"].0, 1);
    let maps = first.pin_dir().join("maps");
    let map_ids = || names::ALL.map(|name| aya::maps::MapInfo::from_pin(maps.join(name)).unwrap().id());
    let ids = map_ids();
    drop(first);

    let mut second = EbpfDatapath::start(&opts, &probe).unwrap();
    // The very maps, the reverse-translation tables included, so live sockets keep showing the VIP.
    assert_eq!(map_ids(), ids);
    assert_eq!(second.status().frontends, 3, "{}", second.status().why);
    assert!(second.status().why.contains("adopted 3"));
    second.apply(&[Change::Upsert(tcp, spec(Strategy::RoundRobin, &[8080]))]).unwrap();
    let mut swept = second.sweep_adopted().unwrap();
    swept.sort();
    assert_eq!(swept, vec![udp, refused]);
    let status = second.status();
    assert_eq!((status.frontends, status.maps["backends"].0, status.maps["maglev"].0), (1, 3, 0));
    let pins = second.pin_dir().to_path_buf();
    second.shutdown();
    assert!(!pins.exists());
}

/// Counters are the kernel's: a restarted agent reports what its predecessor's programs counted, and a frontend
/// given a removed frontend's id starts from zero.
#[test]
fn counters_survive_a_restart_and_start_at_zero_for_a_reused_id() {
    if cannot_run().is_some() {
        return;
    }
    let probe = probe();
    let cgroup = ChildCgroup::new();
    let opts = options(&cgroup);
    let (old, new) = (frontend(80, Protocol::Tcp), frontend(81, Protocol::Tcp));
    let connects = |d: &EbpfDatapath| d.kernel_counters().read().into_iter().map(|c| (c.frontend, c.connects));

    let mut first = EbpfDatapath::start(&opts, &probe).unwrap();
    first.apply(&[Change::Upsert(old, spec(Strategy::RoundRobin, &[8080]))]).unwrap();
    let [(_, _, id)] = first.services.ids().try_into().unwrap();
    // Stand in for the programs: two connects on every CPU.
    let cpus = aya::util::nr_cpus().unwrap();
    let counted = mesh_common::maps::FrontendCounters { connects: 2, ..Default::default() };
    first.tables.counters.set(id, vec![counted; cpus].try_into().unwrap(), 0).unwrap();
    assert_eq!(connects(&first).collect::<Vec<_>>(), [(old, 2 * cpus as u64)]);
    drop(first);

    let mut second = EbpfDatapath::start(&opts, &probe).unwrap();
    second.apply(&[Change::Upsert(old, spec(Strategy::RoundRobin, &[8080]))]).unwrap();
    assert_eq!(connects(&second).collect::<Vec<_>>(), [(old, 2 * cpus as u64)], "lost across the restart");
    second.apply(&[Change::Remove(old), Change::Upsert(new, spec(Strategy::RoundRobin, &[8080]))]).unwrap();
    assert_eq!(second.services.ids(), [(new, spec(Strategy::RoundRobin, &[]).service, id)], "the id is reused");
    assert_eq!(connects(&second).collect::<Vec<_>>(), [(new, 0)]);
    second.shutdown();
}
