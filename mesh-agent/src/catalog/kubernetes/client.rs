//! The API client: from a kubeconfig, a plain `server` URL (KubeEdge's metaServer), or inferred (`$KUBECONFIG`,
//! `~/.kube/config`, then the in-cluster service account).

use std::time::Duration;

use anyhow::{Context, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::config::KubernetesConfig;

/// An unreachable API must not hold up the start for kube's default 30 s: the cache serves meanwhile.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client and the URL it talks to.
pub async fn connect(config: &KubernetesConfig) -> Result<(kube::Client, String)> {
    let mut kube_config = if !config.kubeconfig.is_empty() {
        let kubeconfig = Kubeconfig::read_from(&config.kubeconfig)
            .with_context(|| format!("catalog.kubernetes.kubeconfig {}", config.kubeconfig))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("catalog.kubernetes.kubeconfig {}", config.kubeconfig))?
    } else if !config.server.is_empty() {
        kube::Config::new(server_url(&config.server)?)
    } else {
        kube::Config::infer().await.context(
            "catalog.kubernetes: no kubeconfig or server given, and neither $KUBECONFIG, ~/.kube/config nor an \
             in-cluster service account was found",
        )?
    };
    // `server` with a kubeconfig: its credentials, this address (e.g. the metaServer with edgecore's certificates).
    if !config.server.is_empty() {
        kube_config.cluster_url = server_url(&config.server)?;
    }
    kube_config.connect_timeout = Some(CONNECT_TIMEOUT);
    let url = kube_config.cluster_url.to_string();
    let client = kube::Client::try_from(kube_config).with_context(|| format!("Kubernetes client for {url}"))?;
    Ok((client, url))
}

fn server_url(server: &str) -> Result<http::Uri> {
    server.parse().with_context(|| format!("catalog.kubernetes.server {server:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\ncurrent-context: edge\n\
        clusters: [{name: c, cluster: {server: \"https://10.0.0.1:6443\", insecure-skip-tls-verify: true}}]\n\
        users: [{name: u, user: {token: abc}}]\n\
        contexts: [{name: edge, context: {cluster: c, user: u}}]\n";

    #[tokio::test]
    async fn kubeconfig_credentials_with_the_server_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, KUBECONFIG).unwrap();
        let mut config = KubernetesConfig { kubeconfig: path.display().to_string(), ..Default::default() };
        assert_eq!(connect(&config).await.unwrap().1, "https://10.0.0.1:6443/");
        config.server = "https://127.0.0.1:10550".into();
        assert_eq!(connect(&config).await.unwrap().1, "https://127.0.0.1:10550/");
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named() {
        let config = KubernetesConfig { kubeconfig: "/nonexistent/kubeconfig".into(), ..Default::default() };
        let Err(err) = connect(&config).await else { panic!("connected") };
        let err = format!("{err:#}");
        assert!(err.contains("catalog.kubernetes.kubeconfig /nonexistent/kubeconfig"), "{err}");
    }
}
