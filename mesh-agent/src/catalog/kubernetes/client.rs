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
