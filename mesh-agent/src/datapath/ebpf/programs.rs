//! Loading the object against the pinned maps, and attaching its programs to the cgroup through pinned links.
//!
//! A link pinned under bpffs outlives the agent, so SIGKILL or an upgrade does not interrupt service. A new
//! agent attaches its own programs next to the old ones (cgroup links always run in multi-program mode), then
//! replaces the pins, which detaches the old programs: at no moment is a hook without a program. While both
//! run, the second sees an address the first already translated and leaves it alone.

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::Context;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use mesh_common::maps::names;

use super::pins::PinDir;
use super::probe::{Feature, Probe};

/// A cgroup sock_addr hook we attach. The IPv6 hooks serve dual-stack sockets reaching IPv4 services through
/// mapped addresses (`::ffff:VIP`); their unconnected datagrams pass sendmsg4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Recvmsg4,
    Recvmsg6,
    Getpeername4,
    Getpeername6,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Recvmsg4,
        Hook::Recvmsg6,
        Hook::Getpeername4,
        Hook::Getpeername6,
    ];

    /// What TCP needs: without them the data path cannot start.
    pub const TCP: [Hook; 2] = [Hook::Connect4, Hook::Connect6];
    /// What UDP needs: without them UDP frontends go to the userspace proxy.
    pub const UDP: [Hook; 5] = [Hook::Connect4, Hook::Connect6, Hook::Sendmsg4, Hook::Recvmsg4, Hook::Recvmsg6];
    /// getpeername() returning the VIP.
    pub const GETPEERNAME: [Hook; 2] = [Hook::Getpeername4, Hook::Getpeername6];

    /// The attach point's name, also the link's pin name.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Recvmsg4 => "recvmsg4",
            Hook::Recvmsg6 => "recvmsg6",
            Hook::Getpeername4 => "getpeername4",
            Hook::Getpeername6 => "getpeername6",
        }
    }

    /// The program for this kernel: hooks that pick backends have a variant without atomic fetch-and-add.
    fn program(self, probe: &Probe) -> &'static str {
        match (self, probe.atomic_fetch.available) {
            (Hook::Connect4, false) => "connect4_compat",
            (Hook::Connect6, false) => "connect6_compat",
            (Hook::Sendmsg4, false) => "sendmsg4_compat",
            _ => self.name(),
        }
    }

    fn feature(self, probe: &Probe) -> &Feature {
        match self {
            Hook::Connect4 => &probe.connect4,
            Hook::Connect6 => &probe.connect6,
            Hook::Sendmsg4 => &probe.sendmsg4,
            Hook::Recvmsg4 => &probe.recvmsg4,
            Hook::Recvmsg6 => &probe.recvmsg6,
            Hook::Getpeername4 => &probe.getpeername4,
            Hook::Getpeername6 => &probe.getpeername6,
        }
    }
}

/// Map capacities for a fresh load (pinned maps keep theirs).
pub struct Sizes {
    pub max_services: u32,
    pub max_backends: u32,
}

/// Loads the object; maps come from `pins` when present, else are created and pinned there.
pub fn load(object: &[u8], pins: &PinDir, probe: &Probe, sizes: &Sizes, log_level: u8) -> anyhow::Result<Ebpf> {
    let set_retval = u8::from(probe.set_retval.available);
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pins.maps())
        // Defined with BTF, which carries no pinning attribute from aya-ebpf: pinned by name here.
        .map_pin_path(names::SOCK_NAT, pins.map(names::SOCK_NAT))
        .map_max_entries(names::SERVICES, sizes.max_services)
        .map_max_entries(names::RR, sizes.max_services)
        .map_max_entries(names::COUNTERS, sizes.max_services)
        // Two generations per service, so an update never overwrites slots in use.
        .map_max_entries(names::BACKENDS, sizes.max_backends.saturating_mul(2))
        .map_max_entries(names::MAGLEV, sizes.max_services.saturating_mul(2))
        .override_global("HAS_SET_RETVAL", &set_retval, true)
        .override_global(aya_log::LEVEL, &log_level, true);
    loader.load(object).context("loading the eBPF object")
}

/// The outcome per hook.
pub struct Attachment {
    pub hook: Hook,
    /// The attached program, or why there is none.
    pub program: Result<&'static str, String>,
    link: Option<PinnedLink>,
}

/// Attaches every hook the kernel has. The connect hooks are required; another hook that fails is reported
/// and left to the userspace path.
pub fn attach(ebpf: &mut Ebpf, probe: &Probe, cgroup: &Path, pins: &PinDir) -> anyhow::Result<Vec<Attachment>> {
    let cgroup_dir = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let mut attachments = Vec::new();
    for hook in Hook::ALL {
        let feature = hook.feature(probe);
        let result = if feature.available {
            attach_one(ebpf, hook, hook.program(probe), &cgroup_dir, pins)
        } else {
            Err(anyhow::anyhow!("{}", feature.why))
        };
        match result {
            Ok(link) => attachments.push(Attachment { hook, program: Ok(hook.program(probe)), link: Some(link) }),
            Err(e) if Hook::TCP.contains(&hook) => {
                return Err(e.context(format!("attaching cgroup/{} to {}", hook.name(), cgroup.display())))
            }
            Err(e) => {
                // Nothing may run that the status does not show: drop a predecessor's link for this hook.
                unpin(&pins.link(hook.name()))?;
                tracing::warn!(hook = hook.name(), "eBPF hook unavailable, userspace takes over: {e:#}");
                attachments.push(Attachment { hook, program: Err(format!("{e:#}")), link: None });
            }
        }
    }
    Ok(attachments)
}

fn attach_one(ebpf: &mut Ebpf, hook: Hook, name: &str, cgroup: &File, pins: &PinDir) -> anyhow::Result<PinnedLink> {
    let program: &mut CgroupSockAddr =
        ebpf.program_mut(name).with_context(|| format!("the object has no program {name}"))?.try_into()?;
    program.load().with_context(|| format!("loading {name}"))?;
    // Cgroup links take no flags and always join the multi-program list.
    let id = program.attach(cgroup, CgroupAttachMode::Single).with_context(|| format!("attaching {name}"))?;
    let link = FdLink::try_from(program.take_link(id)?).context("kernel without bpf_link for cgroups (5.7)")?;
    let path = pins.link(hook.name());
    unpin(&path)?;
    link.pin(&path).with_context(|| format!("pinning {}", path.display()))
}

/// Detaches: removing the pin drops the kernel's last reference once our descriptor closes.
pub fn detach(attachments: Vec<Attachment>) -> io::Result<()> {
    for link in attachments.into_iter().filter_map(|a| a.link) {
        drop(link.unpin()?);
    }
    Ok(())
}

fn unpin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
