//! The API objects the node serves, as the watchers report them, and the catalog built from them.
//!
//! A change rebuilds only the services it touches; the catalog is then one clone of the built services, so a
//! single endpoint change costs the same at 10 services as at 10,000 (plus that clone).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use tracing::{debug, warn};

use super::filter::{self, Filter};
use crate::catalog::{Catalog, Objects, Service, ServiceId};

/// The label that ties an EndpointSlice to its service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of an object; an unset namespace is `default`, as in the file source.
fn key(meta: &ObjectMeta) -> ServiceId {
    let namespace = meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    ServiceId { namespace, name: meta.name.clone().unwrap_or_default() }
}

fn slice_service(slice: &EndpointSlice) -> Option<ServiceId> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceId { namespace: key(&slice.metadata).namespace, name: name.clone() })
}

/// What one event changed: the object before and after.
type Changed<K> = Vec<(Option<Arc<K>>, Option<Arc<K>>)>;

/// The objects of one kind. A re-list (after 410 Gone) fills `relisting` and swaps it in whole at its end, so
/// objects deleted while the watch was down disappear and a half-done list is never served.
struct Table<K> {
    objects: HashMap<ServiceId, Arc<K>>,
    relisting: Option<HashMap<ServiceId, Arc<K>>>,
}

impl<K: kube::Resource + k8s_openapi::Resource + PartialEq> Table<K> {
    fn new() -> Self {
        Self { objects: HashMap::new(), relisting: None }
    }

    /// Applies `event`; `admit` trims an object and says whether the node keeps it.
    fn apply(&mut self, event: Event<K>, admit: impl Fn(&mut K) -> bool) -> Changed<K> {
        match event {
            Event::Init => {
                self.relisting = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(mut obj) => match &mut self.relisting {
                Some(list) => {
                    if admit(&mut obj) {
                        list.insert(key(obj.meta()), Arc::new(obj));
                    }
                    Vec::new()
                }
                None => self.upsert(obj, admit),
            },
            Event::InitDone => {
                let new = self.relisting.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.objects, new);
                let mut changed: Changed<K> = Vec::new();
                for (k, obj) in &self.objects {
                    match old.get(k) {
                        Some(before) if before == obj => {}
                        before => changed.push((before.cloned(), Some(Arc::clone(obj)))),
                    }
                }
                changed.extend(
                    old.into_iter().filter(|(k, _)| !self.objects.contains_key(k)).map(|(_, o)| (Some(o), None)),
                );
                debug!(kind = K::KIND, objects = self.objects.len(), changed = changed.len(), "listed");
                changed
            }
            Event::Apply(obj) => self.upsert(obj, admit),
            Event::Delete(obj) => {
                self.objects.remove(&key(obj.meta())).map(|old| (Some(old), None)).into_iter().collect()
            }
        }
    }

    /// An object that no longer passes the filter (its label changed) is removed.
    fn upsert(&mut self, mut obj: K, admit: impl Fn(&mut K) -> bool) -> Changed<K> {
        let k = key(obj.meta());
        if !admit(&mut obj) {
            return self.objects.remove(&k).map(|old| (Some(old), None)).into_iter().collect();
        }
        if self.objects.get(&k).is_some_and(|old| **old == obj) {
            return Vec::new(); // a resync or a change only to fields trimmed away
        }
        let obj = Arc::new(obj);
        let old = self.objects.insert(k, Arc::clone(&obj));
        vec![(old, Some(obj))]
    }
}

/// The objects of a [`Store`], for the cache.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub services: Vec<Arc<K8sService>>,
    pub slices: Vec<Arc<EndpointSlice>>,
}

pub struct Store {
    filter: Filter,
    services: Table<K8sService>,
    slices: Table<EndpointSlice>,
    /// Slices by the service they belong to.
    slices_of: HashMap<ServiceId, BTreeSet<ServiceId>>,
    built: BTreeMap<ServiceId, Service>,
    /// Services whose objects changed since the last build.
    dirty: HashSet<ServiceId>,
    /// Services whose newest objects do not convert, with the reason; their last good version stays.
    errors: BTreeMap<ServiceId, String>,
}

impl Store {
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            services: Table::new(),
            slices: Table::new(),
            slices_of: HashMap::new(),
            built: BTreeMap::new(),
            dirty: HashSet::new(),
            errors: BTreeMap::new(),
        }
    }

    /// Objects from the cache, as if listed.
    pub fn load(&mut self, snapshot: Snapshot) {
        self.service_event(Event::Init);
        for svc in snapshot.services {
            self.service_event(Event::InitApply(Arc::unwrap_or_clone(svc)));
        }
        self.service_event(Event::InitDone);
        self.slice_event(Event::Init);
        for slice in snapshot.slices {
            self.slice_event(Event::InitApply(Arc::unwrap_or_clone(slice)));
        }
        self.slice_event(Event::InitDone);
    }

    pub fn service_event(&mut self, event: Event<K8sService>) {
        let filter = self.filter;
        let admit = |svc: &mut K8sService| {
            filter::trim_service(svc);
            filter.admits_service(svc)
        };
        for (old, new) in self.services.apply(event, admit) {
            self.dirty.extend(old.iter().chain(&new).map(|s| key(&s.metadata)));
        }
    }

    pub fn slice_event(&mut self, event: Event<EndpointSlice>) {
        let filter = self.filter;
        let admit = |slice: &mut EndpointSlice| {
            filter::trim_slice(slice);
            filter.admits_slice(slice)
        };
        for (old, new) in self.slices.apply(event, admit) {
            if let Some(old) = old {
                if let Some(service) = slice_service(&old) {
                    if let Some(set) = self.slices_of.get_mut(&service) {
                        set.remove(&key(&old.metadata));
                        if set.is_empty() {
                            self.slices_of.remove(&service);
                        }
                    }
                    self.dirty.insert(service);
                }
            }
            if let Some(new) = new {
                if let Some(service) = slice_service(&new) {
                    self.slices_of.entry(service.clone()).or_default().insert(key(&new.metadata));
                    self.dirty.insert(service);
                }
            }
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Rebuilds the changed services and returns the whole catalog.
    pub fn build(&mut self) -> Catalog {
        for id in std::mem::take(&mut self.dirty) {
            let Some(svc) = self.services.objects.get(&id) else {
                self.built.remove(&id);
                self.errors.remove(&id);
                continue;
            };
            let slices = self.slices_of.get(&id).into_iter().flatten();
            let objects = Objects {
                services: vec![K8sService::clone(svc)],
                slices: slices.filter_map(|k| self.slices.objects.get(k)).map(|s| EndpointSlice::clone(s)).collect(),
                endpoints: Vec::new(),
            };
            match objects.to_catalog() {
                Ok(mut catalog) => {
                    self.errors.remove(&id);
                    if let Some(service) = catalog.services.remove(&id) {
                        self.built.insert(id, service);
                    }
                }
                Err(e) => {
                    let keeping = if self.built.contains_key(&id) { "its last good version" } else { "it out" };
                    let error = format!("{e:#}; keeping {keeping}");
                    if self.errors.get(&id) != Some(&error) {
                        warn!("Kubernetes object rejected: {error}");
                    }
                    self.errors.insert(id, error);
                }
            }
        }
        Catalog { services: self.built.clone() }
    }

    /// Why some services are not at their newest version, if any is not.
    pub fn errors(&self) -> impl Iterator<Item = &String> {
        self.errors.values()
    }

    /// (services, EndpointSlices) held.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.objects.len(), self.slices.objects.len())
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.objects.values().cloned().collect(),
            slices: self.slices.objects.values().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ClusterIp;
    use crate::config::ServiceFilterMode;

    fn service(name: &str, cluster_ip: &str) -> K8sService {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1",
                         "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))
        .unwrap()
    }

    fn slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "nodeName": "edge-1",
                           "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}}],
        }))
        .unwrap()
    }

    fn store() -> Store {
        Store::new(Filter { mode: ServiceFilterMode::FilterIfLabelExists })
    }

    fn id(name: &str) -> ServiceId {
        ServiceId { namespace: "shop".into(), name: name.into() }
    }

    fn backends(catalog: &Catalog, name: &str) -> Vec<String> {
        let svc = &catalog.services[&id(name)];
        svc.backends(&svc.ports[0]).iter().map(|b| format!("{}:{}", b.ip, b.port)).collect()
    }

    #[test]
    fn joins_named_ports_and_trims() {
        let mut store = store();
        store.service_event(Event::Apply(service("web", "10.96.0.10")));
        store.slice_event(Event::Apply(slice("web-a", "web", "10.1.0.2")));
        let catalog = store.build();
        assert_eq!(catalog.services[&id("web")].cluster_ip, ClusterIp::Fixed("10.96.0.10".parse().unwrap()));
        assert_eq!(backends(&catalog, "web"), ["10.1.0.2:8080"]);
        let snapshot = store.snapshot();
        assert!(snapshot.services[0].metadata.managed_fields.is_none());
        assert!(snapshot.slices[0].endpoints[0].target_ref.is_none());
        assert!(!store.is_dirty());
    }

    #[test]
    fn relist_drops_what_was_deleted_meanwhile() {
        let mut store = store();
        store.service_event(Event::Apply(service("web", "10.96.0.10")));
        store.service_event(Event::Apply(service("old", "10.96.0.11")));
        store.slice_event(Event::Apply(slice("web-a", "web", "10.1.0.2")));
        store.build();
        store.service_event(Event::Init);
        store.service_event(Event::InitApply(service("web", "10.96.0.10")));
        assert!(!store.is_dirty(), "a half-done re-list changes nothing");
        store.service_event(Event::InitDone);
        let catalog = store.build();
        assert_eq!(catalog.services.keys().cloned().collect::<Vec<_>>(), [id("web")]);
        assert_eq!(backends(&catalog, "web"), ["10.1.0.2:8080"]);
    }

    #[test]
    fn only_touched_services_rebuild_and_deletes_remove() {
        let mut store = store();
        store.service_event(Event::Apply(service("web", "10.96.0.10")));
        store.slice_event(Event::Apply(slice("web-a", "web", "10.1.0.2")));
        store.build();
        store.slice_event(Event::Apply(slice("web-a", "web", "10.1.0.2")));
        assert!(!store.is_dirty(), "an unchanged object is no change");
        store.slice_event(Event::Apply(slice("web-b", "web", "10.1.0.3")));
        assert_eq!(backends(&store.build(), "web"), ["10.1.0.2:8080", "10.1.0.3:8080"]);
        store.slice_event(Event::Delete(slice("web-a", "web", "10.1.0.2")));
        assert_eq!(backends(&store.build(), "web"), ["10.1.0.3:8080"]);
        store.service_event(Event::Delete(service("web", "")));
        assert!(store.build().services.is_empty());
    }

    #[test]
    fn a_bad_object_keeps_the_last_good_version() {
        let mut store = store();
        store.service_event(Event::Apply(service("web", "10.96.0.10")));
        store.build();
        store.service_event(Event::Apply(service("web", "10.96.0.300")));
        let catalog = store.build();
        assert_eq!(catalog.services[&id("web")].cluster_ip, ClusterIp::Fixed("10.96.0.10".parse().unwrap()));
        let error = store.errors().next().expect("an error");
        assert!(error.contains("shop/web") && error.contains("clusterIP"), "{error}");
    }

    #[test]
    fn a_label_change_filters_the_service_out() {
        let mut store = store();
        store.service_event(Event::Apply(service("web", "10.96.0.10")));
        store.build();
        let mut labelled = service("web", "10.96.0.10");
        labelled.metadata.labels = Some([(filter::PROXY_NAME_LABEL.to_owned(), "x".to_owned())].into());
        store.service_event(Event::Apply(labelled));
        assert!(store.build().services.is_empty());
    }
}
