//! `dns.manageResolvConf`: points the node's resolv.conf at the agent while it runs, so apps resolve service names
//! (`web.default`, or `web` for the default namespace) with no setup of their own, and restores the original on exit.
//! The original is also kept beside the file, so an agent that was killed restores it on its next start.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const PATH: &str = "/etc/resolv.conf";
const MARKER: &str = "# Written by mesh-agent (dns.manageResolvConf)";

pub struct ResolvConf {
    path: PathBuf,
    original: String,
}

impl ResolvConf {
    /// The resolv.conf the node had before any agent wrote it: the file itself, or the kept original when the file is
    /// still the agent's (its last run did not get to restore it).
    pub fn original(path: &Path) -> Result<String> {
        let current = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        if !current.starts_with(MARKER) {
            return Ok(current);
        }
        let backup = backup_path(path);
        std::fs::read_to_string(&backup).with_context(|| format!("{}: cannot read", backup.display()))
    }

    /// Writes the agent's resolv.conf over `path`, keeping the original beside it.
    pub fn install(path: &Path, listen: SocketAddr, domain: &str) -> Result<Self> {
        if listen.port() != 53 {
            bail!("field `dns.manageResolvConf`: resolv.conf cannot name port {}; listen on port 53", listen.port());
        }
        let original = Self::original(path)?;
        let backup = backup_path(path);
        std::fs::write(&backup, &original).with_context(|| format!("{}: cannot write", backup.display()))?;
        write_in_place(path, &render(&original, listen, domain))?;
        Ok(Self { path: path.to_owned(), original })
    }

    pub fn restore(self) -> Result<()> {
        write_in_place(&self.path, &self.original)?;
        let _ = std::fs::remove_file(backup_path(&self.path));
        Ok(())
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".mesh-agent-original");
    PathBuf::from(name)
}

/// Rewrites the file's contents rather than renaming over it: resolv.conf is often a bind mount (containers,
/// `ip netns exec`), which a rename cannot replace.
fn write_in_place(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::File::create(path).with_context(|| format!("{}: cannot write", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("{}: cannot write", path.display()))
}

/// The agent's resolv.conf: its address as the only nameserver (it forwards the rest to the original ones), the
/// cluster search domains ahead of the original ones, and ndots:5 as in a Kubernetes pod.
fn render(original: &str, listen: SocketAddr, domain: &str) -> String {
    let mut search = vec![format!("default.svc.{domain}"), format!("svc.{domain}"), domain.to_owned()];
    let mut options = vec!["ndots:5".to_owned()];
    for line in original.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search" | "domain") => search.extend(words.map(str::to_owned)),
            Some("options") => options.extend(words.filter(|o| !o.starts_with("ndots:")).map(str::to_owned)),
            _ => {}
        }
    }
    let mut seen = std::collections::HashSet::new();
    search.retain(|s| seen.insert(s.clone()));
    format!(
        "{MARKER}; the original is restored when the agent stops.\nnameserver {}\nsearch {}\noptions {}\n",
        listen.ip(),
        search.join(" "),
        options.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cluster_search_domains_first() {
        let original = "nameserver 10.0.0.2\nsearch corp.example\noptions ndots:1 timeout:2\n";
        let text = render(original, "169.254.96.16:53".parse().unwrap(), "cluster.local");
        assert!(text.starts_with(MARKER));
        assert!(text.contains("\nnameserver 169.254.96.16\n"), "{text}");
        assert!(!text.contains("10.0.0.2"), "{text}");
        assert!(
            text.contains("\nsearch default.svc.cluster.local svc.cluster.local cluster.local corp.example\n"),
            "{text}"
        );
        assert!(text.contains("\noptions ndots:5 timeout:2\n"), "{text}");
    }

    #[test]
    fn install_restore_and_recovery_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        let listen = "169.254.96.16:53".parse().unwrap();
        std::fs::write(&path, "nameserver 10.0.0.2\n").unwrap();
        let installed = ResolvConf::install(&path, listen, "cluster.local").unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("nameserver 169.254.96.16"));
        // a second agent after a crash still finds the original
        assert_eq!(ResolvConf::original(&path).unwrap(), "nameserver 10.0.0.2\n");
        let again = ResolvConf::install(&path, listen, "cluster.local").unwrap();
        drop(installed);
        again.restore().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "nameserver 10.0.0.2\n");
        assert!(!backup_path(&path).exists());
    }

    #[test]
    fn other_ports_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "").unwrap();
        assert!(ResolvConf::install(&path, "127.0.0.1:5353".parse().unwrap(), "cluster.local").is_err());
    }
}
