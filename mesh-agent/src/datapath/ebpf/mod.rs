//! The eBPF data path: cgroup sock_addr programs (mesh-ebpf) translate a connect() or UDP sendmsg() to a
//! service VIP into a backend address before any packet exists, and getpeername()/recvmsg() back to the VIP.
//!
//! Layout: `probe` asks the kernel what it can do, `pins` owns the bpffs directory, `programs` loads and
//! attaches through pinned links, `maps` holds the typed map handles, `services` turns frontends into map
//! entries, `counters` reads what the programs counted per frontend, `log` forwards the programs' aya-log
//! records.
//!
//! A connect() to a service without ready backends fails at once: with ECONNREFUSED where the kernel has
//! bpf_set_retval (5.18), else with EPERM (what a cgroup hook's refusal means); no packet goes to the VIP.
//! Kernel floor: 5.8 (ring buffers for the log map, cgroup bpf_link); above it each hook is used where the
//! kernel has it and `handles` sends the rest to the userspace proxy.

mod counters;
mod log;
mod maps;
mod pins;
mod probe;
mod programs;
mod services;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;

pub use counters::{KernelCounters, KernelCounts};
pub use pins::default_pin_dir;
pub use probe::{probe, Feature, Probe};

use self::maps::Tables;
use self::pins::PinDir;
use self::programs::{Attachment, Hook, Sizes};
use self::services::Services;
use super::{ApplyError, Change, Datapath, DatapathStatus, FeatureStatus, Frontend};
use crate::catalog::Protocol;

/// The kernel object, when this build had the BPF toolchain.
pub fn embedded_object() -> Option<&'static [u8]> {
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));
    (!OBJECT.is_empty()).then_some(OBJECT)
}

#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// The cgroup v2 directory whose processes (and descendants) get the data path.
    pub cgroup_path: PathBuf,
    /// Where maps and links are pinned; see [`default_pin_dir`].
    pub pin_dir: PathBuf,
    /// Leave programs attached and maps pinned on [`EbpfDatapath::shutdown`].
    pub keep_on_exit: bool,
    /// Frontends (VIP, port, protocol); sizes fresh maps only.
    pub max_services: u32,
    /// Backends over all frontends; sizes fresh maps only.
    pub max_backends: u32,
}

pub struct EbpfDatapath {
    opts: EbpfOptions,
    probe: Probe,
    pins: PinDir,
    attachments: Vec<Attachment>,
    tables: Tables,
    services: Services,
    counters: Arc<KernelCounters>,
    adopted: usize,
    _logs: Option<log::KernelLogs>,
}

impl EbpfDatapath {
    /// Loads and attaches, or adopts the maps and links a previous agent pinned under `opts.pin_dir` (its
    /// frontends keep working throughout; see [`EbpfDatapath::sweep_adopted`]).
    pub fn start(opts: &EbpfOptions, probe: &Probe) -> anyhow::Result<Self> {
        let Some(object) = embedded_object() else {
            bail!("built without eBPF programs: install bpf-linker (cargo xtask setup) and rebuild");
        };
        if let Some(blocker) = probe.blocker() {
            bail!("this kernel ({}) cannot run the eBPF data path: {blocker}", probe.kernel);
        }
        pins::check_cgroup2(&opts.cgroup_path)?;
        let pins = PinDir::create(&opts.pin_dir)?;
        let sizes = Sizes { max_services: opts.max_services.max(1), max_backends: opts.max_backends.max(1) };
        let mut ebpf = programs::load(object, &pins, probe, &sizes, log::level())?;
        let tables = Tables::take(&mut ebpf, &pins)?;
        let services = Services::adopt(&tables)?;
        let adopted = services.len();
        let counters = KernelCounters::open(&pins)?;
        let logs = log::KernelLogs::start(&mut ebpf)
            .inspect_err(|e| tracing::warn!("eBPF program logs unavailable: {e:#}"))
            .ok();
        let attachments = programs::attach(&mut ebpf, probe, &opts.cgroup_path, &pins)?;
        tracing::info!(
            cgroup = %opts.cgroup_path.display(),
            pins = %pins.root().display(),
            adopted,
            "eBPF data path attached"
        );
        Ok(Self {
            opts: opts.clone(),
            probe: probe.clone(),
            pins,
            attachments,
            tables,
            services,
            counters,
            adopted,
            _logs: logs,
        })
    }

    /// Whether this data path serves `f`; the rest belongs to the userspace proxy.
    pub fn handles(&self, f: &Frontend) -> bool {
        f.vip.is_ipv4()
            && match f.protocol {
                Protocol::Tcp => self.all_attached(&Hook::TCP),
                Protocol::Udp => self.all_attached(&Hook::UDP),
            }
    }

    /// Removes frontends adopted from a previous agent that the catalog has not upserted since. Call it once
    /// the first full catalog has been applied; until then adopted frontends keep serving.
    pub fn sweep_adopted(&mut self) -> anyhow::Result<Vec<Frontend>> {
        self.services.sweep_unconfirmed(&mut self.tables)
    }

    /// Detaches and unpins everything, unless `keep_on_exit`: then the kernel keeps serving the last state and
    /// the next agent adopts it. Dropping without calling this also keeps everything, as SIGKILL would.
    pub fn shutdown(self) {
        if self.opts.keep_on_exit {
            tracing::info!(pins = %self.pins.root().display(), "leaving the eBPF data path in place");
            return;
        }
        if let Err(e) = programs::detach(self.attachments) {
            tracing::warn!("detaching eBPF programs: {e}");
        }
        drop(self.tables);
        if let Err(e) = self.pins.remove() {
            tracing::warn!("removing eBPF pins: {e}");
        }
    }

    /// The programs' per-frontend counters, readable from any thread.
    pub fn kernel_counters(&self) -> Arc<KernelCounters> {
        Arc::clone(&self.counters)
    }

    pub fn pin_dir(&self) -> &Path {
        self.pins.root()
    }

    fn all_attached(&self, hooks: &[Hook]) -> bool {
        hooks.iter().all(|hook| self.attachments.iter().any(|a| a.hook == *hook && a.program.is_ok()))
    }

    fn features(&self) -> Vec<FeatureStatus> {
        let status = |name: &str, ebpf: bool, why: String| FeatureStatus {
            feature: name.into(),
            implementation: if ebpf { "ebpf" } else { "userspace" }.into(),
            why,
        };
        let hook_why = |hook: &Hook| match self.attachments.iter().find(|a| a.hook == *hook).map(|a| &a.program) {
            Some(Ok(program)) => format!("{}: {program} attached", hook.name()),
            Some(Err(why)) => format!("{}: {why}", hook.name()),
            None => format!("{}: not attached", hook.name()),
        };
        let hooks = |name: &str, hooks: &[Hook]| {
            status(name, self.all_attached(hooks), hooks.iter().map(hook_why).collect::<Vec<_>>().join("; "))
        };
        vec![
            hooks("tcp", &Hook::TCP),
            hooks("udp", &Hook::UDP),
            hooks("getpeername", &Hook::GETPEERNAME),
            status(
                "ipv6",
                false,
                "IPv6 VIPs go to the userspace proxy (no IPv6 service tables in the kernel yet); IPv4 VIPs reached \
                 from IPv6 sockets (::ffff:VIP) are served by connect6/recvmsg6/getpeername6"
                    .into(),
            ),
            status("roundRobin", true, self.probe.atomic_fetch.why.clone()),
            status("refuse", true, self.probe.set_retval.why.clone()),
        ]
    }
}

impl Datapath for EbpfDatapath {
    fn apply(&mut self, changes: &[Change]) -> Result<(), ApplyError> {
        let mut errors = ApplyError::default();
        for change in changes {
            let (frontend, result) = match change {
                Change::Upsert(f, _) if !self.handles(f) => {
                    (f, Err(anyhow::anyhow!("not served by the eBPF data path on this kernel")))
                }
                Change::Upsert(f, spec) => (f, self.services.upsert(&mut self.tables, f, spec)),
                Change::Remove(f) => (f, self.services.remove(&mut self.tables, f)),
            };
            if let Err(e) = result {
                errors.failed.push((*frontend, format!("{e:#}")));
            }
        }
        if self.services.take_ids_changed() {
            self.counters.publish(self.services.ids());
        }
        errors.check()
    }

    fn status(&self) -> DatapathStatus {
        let adopted = match self.adopted {
            0 => String::new(),
            n => format!(", adopted {n} frontends from a previous agent"),
        };
        DatapathStatus {
            mode: "ebpf".into(),
            why: format!(
                "kernel {}: cgroup sock_addr programs on {} pinned under {}{adopted}",
                self.probe.kernel,
                self.opts.cgroup_path.display(),
                self.pins.root().display()
            ),
            features: self.features(),
            programs: self.attachments.iter().filter_map(|a| a.program.clone().ok()).map(String::from).collect(),
            maps: self.tables.fill(self.services.fill()),
            frontends: self.services.len(),
            active_connections: 0,
        }
    }
}
