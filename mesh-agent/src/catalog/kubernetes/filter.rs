//! Which API objects the node keeps, and what of them: EdgeMesh's service filter, and trimming of the fields the
//! catalog never reads, so memory follows what the node serves.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::config::ServiceFilterMode;

/// EdgeMesh's label for services another proxy handles.
pub const PROXY_NAME_LABEL: &str = "service.edgemesh.kubeedge.io/service-proxy-name";

#[derive(Debug, Clone, Copy)]
pub struct Filter {
    pub mode: ServiceFilterMode,
}

impl Filter {
    /// The label selector asked of the API server, so filtered objects are not even sent. EndpointSlices carry their
    /// service's labels (the EndpointSlice controller copies them), so one selector serves both, as in kube-proxy.
    pub fn label_selector(&self) -> String {
        match self.mode {
            ServiceFilterMode::FilterIfLabelExists => format!("!{PROXY_NAME_LABEL}"),
            ServiceFilterMode::FilterIfLabelDoesNotExist => PROXY_NAME_LABEL.to_owned(),
        }
    }

    /// The same rule applied here too, for servers that ignore label selectors and for objects read from the cache.
    /// `default/kubernetes` is skipped: it names the cloud's API server, which apps on an edge node do not use.
    pub fn admits_service(&self, svc: &Service) -> bool {
        let meta = &svc.metadata;
        let default_kubernetes =
            meta.name.as_deref() == Some("kubernetes") && matches!(meta.namespace.as_deref(), None | Some("default"));
        !default_kubernetes && self.admits(meta)
    }

    pub fn admits_slice(&self, slice: &EndpointSlice) -> bool {
        self.admits(&slice.metadata)
    }

    fn admits(&self, meta: &ObjectMeta) -> bool {
        let labelled = meta.labels.as_ref().is_some_and(|l| l.contains_key(PROXY_NAME_LABEL));
        match self.mode {
            ServiceFilterMode::FilterIfLabelExists => !labelled,
            ServiceFilterMode::FilterIfLabelDoesNotExist => labelled,
        }
    }
}

/// Drops what the catalog never reads; `managedFields` and the last-applied annotation are often most of an object.
fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
}

pub fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata);
    svc.status = None;
}

pub fn trim_slice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata);
    for e in &mut slice.endpoints {
        e.target_ref = None;
        e.hints = None;
        e.deprecated_topology = None;
        e.zone = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: &str, name: &str, labelled: bool) -> Service {
        let mut svc = Service::default();
        svc.metadata.namespace = Some(namespace.into());
        svc.metadata.name = Some(name.into());
        if labelled {
            svc.metadata.labels = Some([(PROXY_NAME_LABEL.to_owned(), "other".to_owned())].into());
        }
        svc
    }

    #[test]
    fn filter_modes_follow_edgemesh() {
        let exists = Filter { mode: ServiceFilterMode::FilterIfLabelExists };
        let not_exists = Filter { mode: ServiceFilterMode::FilterIfLabelDoesNotExist };
        assert!(exists.admits_service(&service("shop", "web", false)));
        assert!(!exists.admits_service(&service("shop", "web", true)));
        assert!(!not_exists.admits_service(&service("shop", "web", false)));
        assert!(not_exists.admits_service(&service("shop", "web", true)));
        assert_eq!(exists.label_selector(), "!service.edgemesh.kubeedge.io/service-proxy-name");
        assert_eq!(not_exists.label_selector(), "service.edgemesh.kubeedge.io/service-proxy-name");
    }

    #[test]
    fn default_kubernetes_service_is_skipped() {
        let filter = Filter { mode: ServiceFilterMode::FilterIfLabelExists };
        assert!(!filter.admits_service(&service("default", "kubernetes", false)));
        assert!(filter.admits_service(&service("shop", "kubernetes", false)));
    }
}
