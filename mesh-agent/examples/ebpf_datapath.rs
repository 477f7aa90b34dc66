//! Drives the eBPF data path by hand: attaches to a cgroup, then applies commands read from stdin, one per line.
//!
//! ```text
//! ebpf_datapath CGROUP_DIR [--keep]
//!   upsert tcp|udp VIP:PORT rr|random|hash[/AFFINITY_SECS] BACKEND,BACKEND...   ("-" for no backend)
//!   remove tcp|udp VIP:PORT
//!   status | sweep | quit          (end of input = quit; quit detaches unless --keep)
//! ```

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use mesh_agent::catalog::{Protocol, ServiceId};
use mesh_agent::datapath::ebpf::{default_pin_dir, probe, EbpfDatapath, EbpfOptions};
use mesh_agent::datapath::{Change, Datapath, Frontend, FrontendSpec};
use mesh_agent::lb::{Policy, Strategy};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut args = std::env::args().skip(1);
    let cgroup = PathBuf::from(args.next().context("usage: ebpf_datapath CGROUP_DIR [--keep]")?);
    let keep_on_exit = args.next().as_deref() == Some("--keep");
    let probe = probe();
    let pin_dir = default_pin_dir(&cgroup)?;
    let opts = EbpfOptions { cgroup_path: cgroup, pin_dir, keep_on_exit, max_services: 1024, max_backends: 4096 };
    let mut datapath = EbpfDatapath::start(&opts, &probe)?;
    println!("ready {}", datapath.pin_dir().display());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["quit"] => break,
            ["status"] => serde_json::to_string_pretty(&datapath.status()).map_err(Into::into),
            ["sweep"] => datapath.sweep_adopted().map(|gone| format!("swept {gone:?}")),
            ["remove", proto, vip] => frontend(proto, vip)
                .and_then(|f| datapath.apply(&[Change::Remove(f)]).map_err(Into::into))
                .map(|()| "ok".into()),
            ["upsert", proto, vip, policy, backends] => upsert(proto, vip, policy, backends)
                .and_then(|change| datapath.apply(&[change]).map_err(Into::into))
                .map(|()| "ok".into()),
            _ => Err(anyhow::anyhow!("unknown command")),
        };
        match result {
            Ok(out) => println!("{out}"),
            Err(e) => println!("error: {e:#}"),
        }
    }
    datapath.shutdown();
    Ok(())
}

fn frontend(proto: &str, vip: &str) -> anyhow::Result<Frontend> {
    let addr: SocketAddr = vip.parse()?;
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => bail!("protocol is tcp or udp"),
    };
    Ok(Frontend { vip: addr.ip(), port: addr.port(), protocol })
}

fn upsert(proto: &str, vip: &str, policy: &str, backends: &str) -> anyhow::Result<Change> {
    let (strategy, affinity) = policy.split_once('/').map_or((policy, None), |(s, a)| (s, Some(a)));
    let strategy = match strategy {
        "rr" => Strategy::RoundRobin,
        "random" => Strategy::Random,
        "hash" => Strategy::ConsistentHash,
        _ => bail!("strategy is rr, random or hash"),
    };
    let affinity = affinity.map(|secs| secs.parse().map(Duration::from_secs)).transpose()?;
    let backends = match backends {
        "-" => Vec::new(),
        list => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
    };
    let spec = FrontendSpec {
        service: ServiceId { namespace: "default".into(), name: "demo".into() },
        policy: Policy { strategy, affinity },
        backends: backends.into(),
    };
    Ok(Change::Upsert(frontend(proto, vip)?, spec))
}
