//! One catalog from the file and Kubernetes sources. Precedence: the local operator wins — a service in a catalog
//! file replaces the API's service of the same namespace/name whole, endpoints included, so a node can pin or
//! override a service while its cloud link is down.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::debug;

use super::Catalog;

pub fn merge(files: &Arc<Catalog>, api: &Arc<Catalog>) -> Arc<Catalog> {
    // The common cases share the source's snapshot instead of copying 10,000 services.
    if files.services.is_empty() {
        return Arc::clone(api);
    }
    if api.services.is_empty() {
        return Arc::clone(files);
    }
    let mut merged = Catalog::clone(api);
    let mut overridden = 0;
    for (id, svc) in &files.services {
        overridden += merged.services.insert(id.clone(), svc.clone()).is_some() as usize;
    }
    if overridden > 0 {
        debug!(overridden, "catalog files override services from the Kubernetes API");
    }
    Arc::new(merged)
}

/// Follows both sources, publishing their merge on every change of either.
pub fn spawn(
    mut files: watch::Receiver<Arc<Catalog>>,
    mut api: watch::Receiver<Arc<Catalog>>,
) -> watch::Receiver<Arc<Catalog>> {
    let (tx, rx) = watch::channel(merge(&files.borrow_and_update(), &api.borrow_and_update()));
    tokio::spawn(async move {
        loop {
            let changed = tokio::select! {
                changed = files.changed() => changed,
                changed = api.changed() => changed,
                _ = tx.closed() => return,
            };
            if changed.is_err() {
                return; // a source stopped: the agent is shutting down
            }
            let merged = merge(&files.borrow_and_update(), &api.borrow_and_update());
            tx.send_replace(merged);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Objects;

    fn catalog(yaml: &str) -> Arc<Catalog> {
        Arc::new(Objects::parse(yaml).unwrap().to_catalog().unwrap())
    }

    #[test]
    fn a_file_service_replaces_the_api_service_whole() {
        let api = catalog(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {ports: [{port: 5432}]}\n\
             ---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets: [{addresses: [{ip: 10.1.0.9}]}]\n",
        );
        let files = catalog("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 8080}]}\n");
        let merged = merge(&files, &api);
        assert_eq!(merged.services.len(), 2);
        let web = merged.services.values().find(|s| s.id.name == "web").unwrap();
        assert_eq!(web, files.services.values().next().unwrap(), "the file's service, not a blend");
        assert!(web.endpoint_sets.is_empty());
    }

    #[test]
    fn one_empty_side_shares_the_other() {
        let api = catalog("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n");
        let empty = Arc::new(Catalog::default());
        assert!(Arc::ptr_eq(&merge(&empty, &api), &api));
        assert!(Arc::ptr_eq(&merge(&api, &empty), &api));
    }
}
