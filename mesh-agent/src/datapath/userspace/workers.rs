//! The proxy's threads (by default one per CPU), each running a single-threaded runtime with an epoll of its own, as
//! haproxy's threads and nginx's workers do. A TCP frontend has one listener per thread (SO_REUSEPORT: the kernel
//! spreads new connections over them; past a budget of listeners, one on a single thread), and a connection lives on
//! the thread that accepted it. The threads start with the first TCP frontend the proxy serves: on a node whose
//! TCP services are all in the kernel there are none.
//!
//! Why not the agent's multi-threaded runtime: there one worker waits in epoll while the others sleep on a
//! condition variable until it hands them tasks, so a CPU sits idle during every hand-off. Under the bench's load
//! (client, proxy and backend sharing two CPUs) the machine was 13-16% idle with the proxy on that runtime, 4-7%
//! with haproxy.

use std::io;
use std::thread;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The threads, once started, as handles to spawn on. Dropping this stops them: their runtimes drop every task, so
/// connections still open are reset.
pub(super) struct Workers {
    count: usize,
    handles: Vec<Handle>,
    /// Dropping a sender ends its thread's runtime.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// `configured` threads, or with 0 one per CPU this process may run on; none started yet.
    pub fn new(configured: u16) -> Self {
        let count = match configured {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.into(),
        };
        Self { count, handles: Vec::new(), _stops: Vec::new() }
    }

    /// How many threads there are, or will be once started.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn started(&self) -> bool {
        !self.handles.is_empty()
    }

    /// The threads' runtimes, starting the threads on the first call (all of them or, on an error, none).
    pub fn handles(&mut self) -> io::Result<&[Handle]> {
        if self.handles.is_empty() {
            let (handles, stops) = (0..self.count).map(start).collect::<io::Result<(Vec<_>, Vec<_>)>>()?;
            (self.handles, self._stops) = (handles, stops);
        }
        Ok(&self.handles)
    }
}

/// Starts thread `i`; dropping the sender stops it.
fn start(i: usize) -> io::Result<(Handle, oneshot::Sender<()>)> {
    let runtime = Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    // The runtime is dropped on its own thread, where blocking is allowed (dropping it in the agent's async code
    // would panic).
    thread::Builder::new().name(format!("proxy-{i}")).spawn(move || {
        runtime.block_on(async {
            let _ = stopped.await;
        })
    })?;
    Ok((handle, stop))
}
