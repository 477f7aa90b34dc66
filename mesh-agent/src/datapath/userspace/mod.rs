//! The userspace data path: a proxy listening on every VIP:port. TCP connections are spliced to a backend
//! ([`tcp`], [`splice`]); UDP datagrams travel through per-client flows ([`udp`]). Used where the eBPF path is
//! unavailable, and the reference the eBPF path's behaviour is compared with.
//!
//! A TCP frontend without backends has no listener at all, so clients get ECONNREFUSED from the kernel at once (a
//! RST to their SYN) and the proxy spends nothing on them; a UDP frontend keeps its socket and counts the
//! datagrams it drops, since UDP clients have no refusal to observe besides an ICMP error.

mod splice;
mod stats;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;
mod workers;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use super::{
    ApplyError, Change, Datapath, DatapathStatus, FailureSink, FeatureStatus, Frontend, FrontendSpec, Sources,
};
use crate::catalog::{Protocol, ServiceId};
use crate::lb::Balancer;
use splice::PipePool;
use stats::{Counters, Selections};
use workers::Workers;

pub use stats::{BackendStats, FrontendStats};

/// The proxy's registry of frontends: one listener (TCP) or socket (UDP) per VIP:port, plus what its tasks share.
pub struct UserspaceDatapath {
    spawner: Spawner,
    frontends: BTreeMap<Frontend, Entry>,
    /// Told about every backend connect that failed (passive health).
    failures: Option<FailureSink>,
    /// Clients allowed to use the VIPs; `None` allows all (tests of the proxy alone).
    sources: Option<Sources>,
    counters: Arc<ProxyCounters>,
}

/// The proxy's per-frontend counters as readers see them: every frontend as of the last change, read when asked
/// (a scrape, the admin API) rather than copied out on a timer, which cost ~10 ms of CPU a second at 10,000 services.
#[derive(Default)]
pub struct ProxyCounters(ArcSwap<Vec<(Frontend, Arc<FrontendState>, bool)>>);

impl ProxyCounters {
    /// Counters of every frontend, in frontend order.
    pub fn read(&self) -> Vec<(Frontend, FrontendStats)> {
        self.0.load().iter().map(|(frontend, state, serving)| (*frontend, state.stats(*serving))).collect()
    }
}

impl UserspaceDatapath {
    /// Must be called inside a tokio runtime: UDP sockets and their tasks live on it, TCP on `threads` threads of
    /// the proxy's own ([`Workers`]; 0: one per CPU), started with the first TCP frontend.
    pub fn new(threads: u16) -> Self {
        Self::with_udp_idle_timeout(threads, udp::IDLE_TIMEOUT)
    }

    fn with_udp_idle_timeout(threads: u16, udp_idle: Duration) -> Self {
        let spawner = Spawner {
            runtime: Handle::current(),
            workers: Workers::new(threads),
            listeners: Arc::default(),
            next_worker: 0,
            pipes: Arc::default(),
            udp_idle,
        };
        Self { spawner, frontends: BTreeMap::new(), failures: None, sources: None, counters: Arc::default() }
    }

    /// Serves only clients in `sources`: others are reset (TCP) or dropped (UDP), and counted as rejected.
    pub fn with_sources(mut self, sources: Sources) -> Self {
        self.sources = Some(sources);
        self
    }

    /// Reports every failed backend connect to `sink`.
    pub fn with_failure_sink(mut self, sink: FailureSink) -> Self {
        self.failures = Some(sink);
        self
    }

    /// Counters of every frontend, in frontend order.
    pub fn stats(&self) -> Vec<(Frontend, FrontendStats)> {
        self.counters.read()
    }

    /// Where readers outside the data path find its counters.
    pub fn counters(&self) -> Arc<ProxyCounters> {
        Arc::clone(&self.counters)
    }

    /// Shows readers the frontends as they are now.
    fn publish(&self) {
        let frontends = self.frontends.iter().map(|(f, e)| (*f, Arc::clone(&e.state), e.server.is_some())).collect();
        self.counters.0.store(Arc::new(frontends));
    }

    fn upsert(&mut self, frontend: Frontend, spec: &FrontendSpec) -> io::Result<()> {
        let listen = frontend.protocol == Protocol::Udp || !spec.backends.is_empty();
        if let Some(entry) = self.frontends.get_mut(&frontend) {
            let route = Route::new(spec, Some(&entry.state.route.load()), self.failures.clone());
            entry.state.route.store(Arc::new(route));
            if !listen {
                entry.server = None;
            } else if entry.server.is_none() {
                entry.server = Some(self.spawner.start(frontend, &entry.state)?);
            }
            return Ok(());
        }
        let route = ArcSwap::from_pointee(Route::new(spec, None, self.failures.clone()));
        let state = Arc::new(FrontendState {
            service: spec.service.clone(),
            route,
            counters: Counters::default(),
            sources: self.sources.clone(),
        });
        // A new frontend that cannot bind is left out, so the next upsert of it starts afresh.
        let server = if listen { Some(self.spawner.start(frontend, &state)?) } else { None };
        self.frontends.insert(frontend, Entry { state, server });
        Ok(())
    }
}

impl Datapath for UserspaceDatapath {
    fn apply(&mut self, changes: &[Change]) -> Result<(), ApplyError> {
        // Sockets register with the runtime's reactor, and apply may be called from outside it.
        let _runtime = self.spawner.runtime.enter();
        let mut errors = ApplyError::default();
        for change in changes {
            match change {
                Change::Upsert(frontend, spec) => {
                    if let Err(e) = self.upsert(*frontend, spec) {
                        errors.failed.push((*frontend, format!("{} could not be bound: {e}", spec.service)));
                    }
                }
                Change::Remove(frontend) => {
                    self.frontends.remove(frontend);
                }
            }
        }
        self.publish();
        errors.check()
    }

    fn status(&self) -> DatapathStatus {
        let feature = |feature: &str, why: &str| FeatureStatus {
            feature: feature.into(),
            implementation: "userspace".into(),
            why: why.into(),
        };
        let workers = &self.spawner.workers;
        let when = if workers.started() { "" } else { " from its first TCP frontend" };
        let tcp_why = format!("splice(2) proxy on {} thread(s){when}, backend chosen per connection", workers.count());
        DatapathStatus {
            mode: "userspace".into(),
            why: "proxy listening on every VIP:port".into(),
            features: vec![feature("tcp", &tcp_why), feature("udp", "per-client flows, backend chosen per flow")],
            programs: Vec::new(),
            maps: BTreeMap::new(),
            frontends: self.frontends.len(),
            active_connections: self.frontends.values().map(|e| e.state.counters.active()).sum(),
        }
    }

    fn stop_accepting(&mut self) {
        for entry in self.frontends.values_mut() {
            entry.server = None;
        }
        self.publish();
    }
}

/// TCP listener sockets, over all frontends, up to which a frontend listens on every proxy thread; past it, a new
/// frontend listens on one thread (each in turn). Listeners cost a descriptor and about 3.5 KiB of kernel memory
/// each: 10,000 frontends take 10,000 plus this many, not 10,000 times the threads, while a few hundred services
/// (and the bench's one) have every thread accepting.
const SPREAD_LISTENERS: usize = 4096;

/// What spawning a frontend's server needs; apart from the frontend map so both can be borrowed at once.
struct Spawner {
    runtime: Handle,
    workers: Workers,
    /// Open TCP listener sockets, kept by the [`Server`]s that own them.
    listeners: Arc<AtomicUsize>,
    /// The thread the next single-listener frontend goes to.
    next_worker: usize,
    pipes: Arc<PipePool>,
    udp_idle: Duration,
}

impl Spawner {
    fn start(&mut self, frontend: Frontend, state: &Arc<FrontendState>) -> io::Result<Server> {
        let addr = SocketAddr::new(frontend.vip, frontend.port);
        let state = Arc::clone(state);
        Ok(match frontend.protocol {
            Protocol::Tcp => {
                let mut server = Server::new(&self.listeners);
                let all = self.workers.handles()?;
                let workers = if self.listeners.load(Ordering::Relaxed) + all.len() <= SPREAD_LISTENERS {
                    all
                } else {
                    self.next_worker = (self.next_worker + 1) % all.len();
                    std::slice::from_ref(&all[self.next_worker])
                };
                for worker in workers {
                    // The listener registers with the epoll of the thread that accepts on it.
                    let listener = {
                        let _worker = worker.enter();
                        Arc::new(tcp::Listener::bind(addr)?)
                    };
                    let serve = tcp::serve(Arc::clone(&listener), Arc::clone(&state), Arc::clone(&self.pipes));
                    server.add_listener(listener, worker.spawn(serve).abort_handle());
                }
                server
            }
            Protocol::Udp => {
                let mut server = Server::new(&self.listeners);
                server
                    .tasks
                    .push(self.runtime.spawn(udp::serve(udp::bind(addr)?, state, self.udp_idle)).abort_handle());
                server
            }
        })
    }
}

struct Entry {
    state: Arc<FrontendState>,
    /// `None` while a TCP frontend has no backends (or could not bind).
    server: Option<Server>,
}

/// A frontend's sockets (a TCP listener per proxy thread, or one UDP socket) and the tasks serving them. Dropping it
/// stops both; established TCP connections run on tasks of their own and finish, UDP flows belong to the serving
/// task and end with it.
struct Server {
    tasks: Vec<AbortHandle>,
    listeners: Vec<Arc<tcp::Listener>>,
    /// The spawner's count of open listeners.
    open: Arc<AtomicUsize>,
}

impl Server {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        Self { tasks: Vec::new(), listeners: Vec::new(), open: Arc::clone(open) }
    }

    /// A TCP listener and its accept task: counted as open until this server is dropped.
    fn add_listener(&mut self, listener: Arc<tcp::Listener>, task: AbortHandle) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.listeners.push(listener);
        self.tasks.push(task);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for listener in &self.listeners {
            listener.close();
        }
        self.open.fetch_sub(self.listeners.len(), Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What a frontend's serving tasks share with the registry. It lives as long as the frontend, across updates.
struct FrontendState {
    service: ServiceId,
    /// Swapped whole on update; the accept path only loads it, without a lock.
    route: ArcSwap<Route>,
    counters: Counters,
    sources: Option<Sources>,
}

impl FrontendState {
    fn stats(&self, serving: bool) -> FrontendStats {
        let route = self.route.load();
        let backends = route.selections.snapshot(route.backends());
        self.counters.snapshot(self.service.clone(), serving, backends)
    }

    /// Whether `client` may use this frontend; a refusal is counted.
    fn admits(&self, client: IpAddr) -> bool {
        let admitted = self.sources.as_ref().is_none_or(|s| s.load().allows(client));
        if !admitted {
            stats::bump(&self.counters.rejected, 1);
        }
        admitted
    }
}

/// A frontend's balancer and per-backend counters, for one backend set.
struct Route {
    balancer: Balancer,
    selections: Selections,
    failures: Option<FailureSink>,
}

impl Route {
    /// Built from `previous` when there is one, so the round-robin cursor, affinity entries and counters carry over.
    fn new(spec: &FrontendSpec, previous: Option<&Route>, failures: Option<FailureSink>) -> Self {
        let backends = Arc::clone(&spec.backends);
        let balancer = match previous {
            Some(previous) => previous.balancer.update(spec.policy, backends),
            None => Balancer::new(spec.policy, backends),
        };
        let selections = Selections::new(&spec.backends, previous.map(|p| &p.selections));
        Self { balancer, selections, failures }
    }

    fn backends(&self) -> &[SocketAddr] {
        self.balancer.backends()
    }

    fn pick(&self, client: IpAddr) -> Option<SocketAddr> {
        let backend = self.balancer.pick(client)?;
        self.selections.selected(backend);
        Some(backend)
    }

    fn next_after(&self, client: IpAddr, failed: SocketAddr) -> Option<SocketAddr> {
        let backend = self.balancer.next_after(client, failed)?;
        self.selections.selected(backend);
        Some(backend)
    }

    fn connect_failed(&self, backend: SocketAddr) {
        self.selections.connect_failed(backend);
        if let Some(report) = &self.failures {
            report(backend);
        }
    }
}

/// A non-blocking socket for `addr`, to be bound there. IP_FREEBIND: the VIP may land on edge0 only a moment after
/// the frontend is applied. SO_REUSEADDR: a restarted agent must rebind despite connections of its predecessor in
/// TIME_WAIT.
fn socket(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}
