//! The proxy's threads (by default one per CPU), each running a single-threaded runtime with an epoll of its own, as
//! haproxy's threads and nginx's workers do. A TCP frontend has one listener per thread (SO_REUSEPORT: the kernel
//! spreads new connections over them; past a budget of listeners, one on a single thread), and a connection lives on
//! the thread that accepted it.
//!
//! Why not the agent's multi-threaded runtime: there one worker waits in epoll while the others sleep on a
//! condition variable until it hands them tasks, so a CPU sits idle during every hand-off. Under the bench's load
//! (client, proxy and backend sharing two CPUs) the machine was 13-16% idle with the proxy on that runtime, 4-7%
//! with haproxy.

use std::io;
use std::thread;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The threads, as handles to spawn on. Dropping this stops them: their runtimes drop every task, so connections
/// still open are reset.
pub(super) struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its thread's runtime.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// `configured` threads, or with 0 one per CPU this process may run on.
    pub fn new(configured: u16) -> io::Result<Self> {
        let count = match configured {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.into(),
        };
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            // The runtime is dropped on its own thread, where blocking is allowed (dropping it in the agent's async
            // code would panic).
            thread::Builder::new().name(format!("proxy-{i}")).spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                })
            })?;
        }
        Ok(Self { handles, _stops: stops })
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}
