//! The agent's configuration: YAML, camelCase, every field optional, unknown fields rejected with the path of the
//! field (DESIGN.md "Contracts").

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::health::HealthConfig;
use crate::lb::Strategy;

/// The default config, embedded so `mesh-agent run` works with no file at all.
pub const DEFAULT_YAML: &str = include_str!("../config/default.yaml");

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub device: DeviceConfig,
    pub dns: DnsConfig,
    pub catalog: CatalogConfig,
    pub dataplane: DataplaneConfig,
    pub load_balancer: LoadBalancerConfig,
    pub health: HealthConfig,
    pub tunnel: TunnelConfig,
    pub gateway: GatewayConfig,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: default_node_name(),
            state_dir: PathBuf::from("/var/lib/mesh-agent"),
            device: DeviceConfig::default(),
            dns: DnsConfig::default(),
            catalog: CatalogConfig::default(),
            dataplane: DataplaneConfig::default(),
            load_balancer: LoadBalancerConfig::default(),
            health: HealthConfig::default(),
            tunnel: TunnelConfig::default(),
            gateway: GatewayConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DeviceConfig {
    pub name: String,
    /// Services without a `spec.clusterIP` get their VIP from here. 10.250/16 is private space that neither
    /// Kubernetes' default service range (10.96/12) nor common pod ranges use.
    pub vip_pool: IpNet,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self { name: "edge0".into(), vip_pool: "10.250.0.0/16".parse().expect("valid default pool") }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsConfig {
    pub enable: bool,
    pub listen: SocketAddr,
    pub domain: String,
    pub ttl: u32,
    pub upstreams: Vec<String>,
    pub allow_from: Vec<IpNet>,
    pub manage_resolv_conf: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enable: true,
            listen: "169.254.96.16:53".parse().expect("valid default"),
            domain: "cluster.local".into(),
            ttl: 30,
            upstreams: Vec::new(),
            allow_from: Vec::new(),
            manage_resolv_conf: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CatalogConfig {
    pub files: Vec<PathBuf>,
    pub kubernetes: KubernetesConfig,
}

impl Default for CatalogConfig {
    /// The same with or without a config file: a missing catalog file is an empty catalog.
    fn default() -> Self {
        Self { files: vec![PathBuf::from("/etc/mesh-agent/catalog.yaml")], kubernetes: KubernetesConfig::default() }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub enable: bool,
    /// A kubeconfig file. Empty: `$KUBECONFIG` or `~/.kube/config`, else the in-cluster service account.
    pub kubeconfig: String,
    /// The API server URL, overriding the kubeconfig's (KubeEdge's metaServer: `http://127.0.0.1:10550`).
    pub server: String,
    pub service_filter_mode: ServiceFilterMode,
}

/// Which services EdgeMesh's label `service.edgemesh.kubeedge.io/service-proxy-name` keeps out (EdgeMesh's names).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum ServiceFilterMode {
    /// Services with the label are left to another proxy.
    #[default]
    FilterIfLabelExists,
    /// Only services with the label are served.
    FilterIfLabelDoesNotExist,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DataplaneMode {
    /// eBPF per feature where the kernel has it, the userspace proxy for the rest.
    #[default]
    Auto,
    Ebpf,
    Userspace,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DataplaneConfig {
    pub mode: DataplaneMode,
    /// Empty: the cgroup2 root found in /proc/mounts.
    pub cgroup_path: PathBuf,
    /// Leave the eBPF programs attached and maps pinned when the agent exits, so service continues until the next
    /// agent adopts them (an upgrade without interruption).
    pub keep_on_exit: bool,
    /// Capacity of the eBPF maps: VIP:port frontends, and backends over all frontends. Fixed when the maps are
    /// first created; pinned maps keep theirs.
    pub max_services: u32,
    pub max_backends: u32,
    /// On SIGTERM: how long established proxied connections may finish before the agent exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Threads of the userspace proxy's TCP side; 0: one per CPU.
    pub proxy_threads: u16,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            mode: DataplaneMode::Auto,
            cgroup_path: PathBuf::new(),
            keep_on_exit: false,
            max_services: 16_384,
            max_backends: 65_536,
            drain_timeout: Duration::from_secs(10),
            proxy_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoadBalancerConfig {
    pub strategy: Strategy,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        Self { strategy: Strategy::RoundRobin }
    }
}

/// The node-to-node tunnel (DESIGN.md). Its schema is accepted so configs written for it validate; enabling it
/// is refused until the tunnel ships, rather than silently ignored.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TunnelConfig {
    pub enable: bool,
    pub listen: SocketAddr,
    pub psk: PathBuf,
    pub peers: Vec<TunnelPeer>,
    pub relays: Vec<String>,
    pub tls: Option<TunnelTls>,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            enable: false,
            listen: "0.0.0.0:20006".parse().expect("valid default"),
            psk: PathBuf::new(),
            peers: Vec::new(),
            relays: Vec::new(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelPeer {
    pub node: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// XDP/TC frontends for traffic from outside the node (DESIGN.md); refused when set until the gateway ships.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9099".parse().expect("valid default") }
    }
}

fn default_node_name() -> String {
    if let Ok(name) = std::env::var("NODE_NAME") {
        if !name.is_empty() {
            return name;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

impl Config {
    /// Reads and validates `path`; errors name the file, the field path and the reason.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    /// The embedded default config.
    pub fn embedded() -> Self {
        Self::parse(DEFAULT_YAML).expect("the embedded default config is valid")
    }

    pub fn parse(text: &str) -> Result<Self> {
        // An empty document means "all defaults".
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let at = inner.location().map(|l| format!(" (line {})", l.line())).unwrap_or_default();
                anyhow::anyhow!("field `{path}`{at}: {}", strip_location(&inner.to_string()))
            })?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.node_name.is_empty() {
            bail!("field `nodeName`: must not be empty");
        }
        if self.device.name.is_empty() || self.device.name.len() > 15 {
            bail!("field `device.name`: {:?} is not a valid interface name (1-15 bytes)", self.device.name);
        }
        let pool = self.device.vip_pool;
        if pool.prefix_len() == pool.max_prefix_len() {
            bail!("field `device.vipPool`: {pool} holds a single address; give a range");
        }
        if !is_private(pool.network()) {
            bail!(
                "field `device.vipPool`: {pool} is not private address space (10/8, 172.16/12, 192.168/16, fc00::/7)"
            );
        }
        if self.dns.domain.is_empty() || self.dns.domain.starts_with('.') || self.dns.domain.contains("..") {
            bail!("field `dns.domain`: {:?} is not a valid domain", self.dns.domain);
        }
        for (i, upstream) in self.dns.upstreams.iter().enumerate() {
            parse_upstream(upstream).with_context(|| format!("field `dns.upstreams[{i}]`"))?;
        }
        let server = &self.catalog.kubernetes.server;
        if !server.is_empty() {
            check_server_url(server).context("field `catalog.kubernetes.server`")?;
        }
        if self.dataplane.max_services == 0 || self.dataplane.max_backends == 0 {
            bail!("field `dataplane.maxServices`/`dataplane.maxBackends`: must be at least 1");
        }
        let h = &self.health;
        if h.interval.is_zero() || h.timeout.is_zero() || h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
            bail!("field `health`: interval, timeout and thresholds must be positive");
        }
        if self.tunnel.enable {
            bail!("field `tunnel.enable`: the node-to-node tunnel is not available in this release");
        }
        if !self.gateway.interfaces.is_empty() {
            bail!("field `gateway.interfaces`: the XDP/TC gateway is not available in this release");
        }
        Ok(())
    }
}

/// An upstream is "ip" or "ip:port" ("[v6]:port" for IPv6 with a port).
pub fn parse_upstream(s: &str) -> Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, 53)),
        Err(_) => bail!("{s:?} is not an address (\"ip\" or \"ip:port\")"),
    }
}

/// An API server URL: http or https with a host, as kube-rs needs it.
fn check_server_url(s: &str) -> Result<()> {
    let uri: http::Uri = s.parse().map_err(|e| anyhow::anyhow!("{s:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => bail!("{s:?} is not an http:// or https:// URL with a host"),
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// serde_yaml appends " at line L column C" to messages; the caller already reports the line once.
fn strip_location(msg: &str) -> &str {
    msg.split(" at line ").next().unwrap_or(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let config = Config::embedded();
        assert_eq!(config.device.name, "edge0");
        assert_eq!(config.admin.listen, "127.0.0.1:9099".parse().unwrap());
    }

    #[test]
    fn a_file_starts_from_the_embedded_defaults() {
        let mut embedded = Config::embedded();
        let mut from_file = Config::parse("admin:\n  listen: 127.0.0.1:9099\n").unwrap();
        // The node name comes from the environment either way.
        (embedded.node_name, from_file.node_name) = (String::new(), String::new());
        assert_eq!(embedded, from_file);
    }

    #[test]
    fn empty_document_is_all_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.dns.listen.port(), 53);
        assert_eq!(config.load_balancer.strategy, Strategy::RoundRobin);
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let err = Config::parse("device:\n  name: edge0\n  vipPol: 10.1.0.0/16\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("device"), "{msg}");
        assert!(msg.contains("vipPol"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn bad_cidr_is_named() {
        let err = Config::parse("device:\n  vipPool: 10.1.0.0/33\n").unwrap_err();
        assert!(format!("{err:#}").contains("device.vipPool"), "{err:#}");
    }

    #[test]
    fn public_pool_is_rejected() {
        let err = Config::parse("device:\n  vipPool: 8.8.0.0/16\n").unwrap_err();
        assert!(format!("{err:#}").contains("not private"), "{err:#}");
    }

    #[test]
    fn bad_address_is_named() {
        let err = Config::parse("admin:\n  listen: localhost\n").unwrap_err();
        assert!(format!("{err:#}").contains("admin.listen"), "{err:#}");
        let err = Config::parse("dns:\n  upstreams: [\"1.2.3\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("dns.upstreams[0]"), "{err:#}");
    }

    #[test]
    fn kubernetes_filter_mode_and_server() {
        let config = Config::parse("catalog:\n  kubernetes: {serviceFilterMode: FilterIfLabelDoesNotExist}\n").unwrap();
        assert_eq!(config.catalog.kubernetes.service_filter_mode, ServiceFilterMode::FilterIfLabelDoesNotExist);
        assert_eq!(
            Config::parse("").unwrap().catalog.kubernetes.service_filter_mode,
            ServiceFilterMode::FilterIfLabelExists
        );
        let err = Config::parse("catalog:\n  kubernetes: {serviceFilterMode: FilterAll}\n").unwrap_err();
        assert!(format!("{err:#}").contains("catalog.kubernetes.serviceFilterMode"), "{err:#}");
        assert!(Config::parse("catalog:\n  kubernetes: {server: \"http://127.0.0.1:10550\"}\n").is_ok());
        let err = Config::parse("catalog:\n  kubernetes: {server: \"127.0.0.1:10550\"}\n").unwrap_err();
        assert!(format!("{err:#}").contains("catalog.kubernetes.server"), "{err:#}");
    }

    #[test]
    fn strategy_names_follow_the_seed() {
        let config = Config::parse("loadBalancer:\n  strategy: Random\n").unwrap();
        assert_eq!(config.load_balancer.strategy, Strategy::Random);
        assert!(Config::parse("loadBalancer:\n  strategy: Fastest\n").is_err());
    }
}
