//! The programs' aya-log records, forwarded to the agent's log. Records go through the `log` facade, which
//! tracing-subscriber bridges into tracing; their target is `mesh_ebpf`. The kernel side only formats records
//! at levels enabled when the programs load (`RUST_LOG=mesh_ebpf=debug` for one line per translation), so by
//! default the hot path logs nothing.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use aya::Ebpf;
use aya_log::{EbpfLogger, Level};

const TARGET: &str = "mesh_ebpf";

/// The most verbose level tracing lets through for the programs' target.
pub fn level() -> u8 {
    let level = if tracing::enabled!(target: TARGET, tracing::Level::TRACE) {
        Level::Trace
    } else if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        Level::Debug
    } else if tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        Level::Info
    } else if tracing::enabled!(target: TARGET, tracing::Level::WARN) {
        Level::Warn
    } else {
        Level::Error
    };
    level as u8
}

/// A thread draining the log ring buffer; it wakes on records, or twice a second to see if it should stop.
pub struct KernelLogs {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KernelLogs {
    pub fn start(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut logger = EbpfLogger::init(ebpf)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("ebpf-log".into()).spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let mut fd = libc::pollfd { fd: logger.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut fd, 1, 500) };
                logger.flush();
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for KernelLogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
