//! The data path `dataplane.mode` asks for: eBPF for every frontend the kernel can serve, the userspace proxy
//! for the rest (per feature, not all-or-nothing), or the proxy alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::ebpf::{self, EbpfDatapath, EbpfOptions, KernelCounters};
use super::userspace::{ProxyCounters, UserspaceDatapath};
use super::{ApplyError, Change, Datapath, DatapathStatus, FailureSink, Frontend, Sources};
use crate::config::{Config, DataplaneMode};

/// Starts the data path for `config`. `ebpf` fails when the eBPF path cannot start; `auto` then falls back to
/// the proxy and says why.
pub fn start(config: &Config, failures: FailureSink, sources: Sources) -> Result<Box<dyn Datapath>> {
    let ebpf = match config.dataplane.mode {
        DataplaneMode::Userspace => Err("dataplane.mode is userspace".to_owned()),
        DataplaneMode::Ebpf => Ok(start_ebpf(config)?),
        DataplaneMode::Auto => start_ebpf(config).map_err(|e| format!("{e:#}")),
    };
    let why = match &ebpf {
        Ok(_) => "eBPF where the kernel serves the frontend, userspace proxy for the rest".to_owned(),
        Err(why) => why.clone(),
    };
    match &ebpf {
        Ok(_) => info!("data path: {why}"),
        Err(_) if config.dataplane.mode == DataplaneMode::Userspace => info!("data path: userspace proxy"),
        Err(why) => warn!("data path: userspace proxy, eBPF unavailable: {why}"),
    }
    Ok(Box::new(Split {
        ebpf: ebpf.ok(),
        userspace: UserspaceDatapath::new(config.dataplane.proxy_threads)
            .with_failure_sink(failures)
            .with_sources(sources),
        why,
        owners: BTreeMap::new(),
        swept: false,
    }))
}

fn start_ebpf(config: &Config) -> Result<EbpfDatapath> {
    let cgroup_path = match &config.dataplane.cgroup_path {
        p if p.as_os_str().is_empty() => cgroup2_root()?,
        p => p.clone(),
    };
    let pin_dir = ebpf::default_pin_dir(&cgroup_path).with_context(|| format!("cgroup {}", cgroup_path.display()))?;
    let options = EbpfOptions {
        cgroup_path,
        pin_dir,
        keep_on_exit: config.dataplane.keep_on_exit,
        max_services: config.dataplane.max_services,
        max_backends: config.dataplane.max_backends,
    };
    EbpfDatapath::start(&options, &ebpf::probe())
}

/// The cgroup2 mount point from /proc/mounts (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| Path::new(f[1]).to_owned())
        .context("no cgroup2 mount in /proc/mounts: set dataplane.cgroupPath or use dataplane.mode userspace")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Ebpf,
    Userspace,
}

struct Split {
    ebpf: Option<EbpfDatapath>,
    userspace: UserspaceDatapath,
    why: String,
    /// Which path serves each frontend.
    owners: BTreeMap<Frontend, Owner>,
    /// Whether frontends adopted from a previous agent and absent from the catalog have been removed.
    swept: bool,
}

impl Split {
    fn owner(&self, frontend: &Frontend) -> Owner {
        match &self.ebpf {
            Some(e) if e.handles(frontend) => Owner::Ebpf,
            _ => Owner::Userspace,
        }
    }
}

impl Datapath for Split {
    fn apply(&mut self, changes: &[Change]) -> Result<(), ApplyError> {
        let (mut kernel, mut proxy) = (Vec::new(), Vec::new());
        for change in changes {
            let (frontend, owner) = match change {
                Change::Upsert(f, _) => (f, self.owner(f)),
                Change::Remove(f) => (f, self.owners.get(f).copied().unwrap_or(Owner::Userspace)),
            };
            match change {
                Change::Upsert(..) => self.owners.insert(*frontend, owner),
                Change::Remove(_) => self.owners.remove(frontend),
            };
            match owner {
                Owner::Ebpf => kernel.push(change.clone()),
                Owner::Userspace => proxy.push(change.clone()),
            }
        }
        let mut errors = ApplyError::default();
        if let Some(ebpf) = &mut self.ebpf {
            if let Err(e) = ebpf.apply(&kernel) {
                errors.failed.extend(e.failed.into_iter().map(|(f, why)| (f, format!("eBPF: {why}"))));
            }
        }
        if let Err(e) = self.userspace.apply(&proxy) {
            errors.failed.extend(e.failed.into_iter().map(|(f, why)| (f, format!("userspace: {why}"))));
        }
        errors.check()
    }

    fn catalog_applied(&mut self) {
        if self.swept {
            return;
        }
        self.swept = true;
        if let Some(ebpf) = &mut self.ebpf {
            match ebpf.sweep_adopted() {
                Ok(gone) if !gone.is_empty() => info!(removed = gone.len(), "removed stale adopted frontends"),
                Ok(_) => {}
                Err(e) => warn!("sweeping adopted frontends: {e:#}"),
            }
        }
    }

    fn status(&self) -> DatapathStatus {
        let proxy = self.userspace.status();
        let Some(ebpf) = &self.ebpf else {
            return DatapathStatus { why: self.why.clone(), ..proxy };
        };
        let mut status = ebpf.status();
        let proxied = self.owners.values().filter(|o| **o == Owner::Userspace).count();
        if proxied > 0 {
            status.mode = "ebpf+userspace".into();
        }
        status.why = format!("{}; {}; {proxied} frontend(s) on the userspace proxy", self.why, status.why);
        status.frontends += proxy.frontends;
        status.active_connections = proxy.active_connections;
        status
    }

    fn stop_accepting(&mut self) {
        self.userspace.stop_accepting();
    }

    fn proxy_counters(&self) -> Option<Arc<ProxyCounters>> {
        Some(self.userspace.counters())
    }

    fn kernel_counters(&self) -> Option<Arc<KernelCounters>> {
        self.ebpf.as_ref().map(EbpfDatapath::kernel_counters)
    }

    fn shutdown(self: Box<Self>) {
        if let Some(ebpf) = self.ebpf {
            ebpf.shutdown();
        }
    }
}
