//! `cargo xtask run`: builds the agent and runs it on `examples/demo-catalog.yaml`, with the catalog's two
//! backends served from inside this process, until Ctrl-C or SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{cmd, setup};

const BACKENDS: [(u16, &str); 2] = [(18081, "hello from demo-1\n"), (18082, "hello from demo-2\n")];
const DEMO_CGROUP: &str = "mesh-agent-demo";

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "mesh-agent"]))?;

    let backends = BACKENDS.iter().map(|&(port, body)| DemoBackend::start(port, body)).collect::<Result<Vec<_>>>()?;
    let mut agent = Command::new(cmd::target_dir().join("release/mesh-agent"));
    agent.current_dir(cmd::root()).arg("run");
    let cgroup = if args.iter().any(|a| a == "--config" || a.starts_with("--config=")) {
        None
    } else {
        let (config, cgroup) = demo_config()?;
        agent.arg("--config").arg(config);
        Some(cgroup)
    };
    agent.args(["--catalog", "examples/demo-catalog.yaml"]).args(args);
    print_hints(cgroup.as_deref());

    let status = supervise(agent);
    for backend in backends {
        backend.stop();
    }
    if let Some(cgroup) = cgroup {
        // Fails harmlessly while a shell the user moved in is still alive.
        let _ = std::fs::remove_dir(cgroup);
    }
    let status = status?;
    match status.code() {
        Some(0) => Ok(()),
        code => Err(cmd::Failed { command: "mesh-agent run".into(), code }.into()),
    }
}

/// The demo keeps its state under target/ and attaches BPF to a child cgroup made for it: a developer's
/// `cargo xtask run` must not steer every connection on the machine (the default cgroup is the root).
fn demo_config() -> Result<(PathBuf, PathBuf)> {
    let dir = cmd::target_dir().join("demo");
    let cgroup = cmd::cgroup2_root()?.join(DEMO_CGROUP);
    std::fs::create_dir_all(dir.join("state")).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::create_dir_all(&cgroup).with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
    let config = dir.join("config.yaml");
    let text = format!(
        "# Written by `cargo xtask run`; see examples/config.yaml for every field.\n\
         stateDir: {}\n\
         catalog:\n  files: []  # the demo catalog comes from --catalog\n\
         dataplane:\n  mode: auto\n  cgroupPath: {}\n",
        dir.join("state").display(),
        cgroup.display()
    );
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    Ok((config, cgroup))
}

fn print_hints(cgroup: Option<&Path>) {
    println!("run: demo service default/demo at 10.250.0.10:80 -> 127.0.0.1:18081, 127.0.0.1:18082");
    if let Some(cgroup) = cgroup {
        // Where the kernel has the socket hooks, auto mode serves the VIP with eBPF alone, and only for processes
        // in the demo cgroup.
        let procs = cgroup.join("cgroup.procs");
        println!("run:   the data path serves processes in {}; a shell there:", cgroup.display());
        println!("run:     sh -c 'echo $$ > {}; exec bash'", procs.display());
        println!("run:   then: curl http://10.250.0.10/   (every process: a --config with dataplane.mode: userspace)");
    } else {
        println!("run:   curl http://10.250.0.10/");
    }
    println!("run:   DNS: dig @169.254.96.16 demo.default.svc.cluster.local");
    println!("run: Ctrl-C stops the agent and the backends");
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// Runs the agent until it exits, passing SIGINT/SIGTERM on to it so it shuts down cleanly while we live on to
/// stop the backends.
fn supervise(mut agent: Command) -> Result<ExitStatus> {
    // Its own process group: a terminal's Ctrl-C reaches the agent once, through us, not twice.
    agent.process_group(0);
    // SAFETY: prctl is async-signal-safe. If xtask itself is killed outright, the agent goes too.
    unsafe {
        agent.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("+ {}", cmd::display(&agent));
    let mut child = agent.spawn().context("cannot start target/release/mesh-agent")?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let signal = SIGNAL.swap(0, Ordering::SeqCst);
        if signal != 0 {
            println!("run: passing signal {signal} to the agent (pid {})", child.id());
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal keep-alive HTTP/1.1 server answering every request with a fixed body.
struct DemoBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl DemoBackend {
    fn start(port: u16, body: &'static str) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("demo backend: cannot bind 127.0.0.1:{port}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    thread::spawn(move || serve(stream, body));
                }
            }
        });
        println!("run: demo backend on {addr}");
        Ok(Self { addr, stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the loop sees the flag.
        let _ = TcpStream::connect(self.addr);
        let _ = self.thread.join();
        println!("run: demo backend on {} stopped", self.addr);
    }
}

fn serve(stream: TcpStream, body: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        // The demo's clients send no request bodies; the head ends at the first empty line.
        let mut close = false;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            close |= lower.starts_with("connection:") && lower.contains("close");
        }
        let connection = if close { "Connection: close\r\n" } else { "" };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
            body.len()
        )?;
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn demo_backend_answers_keep_alive_and_close() {
        let backend = DemoBackend::start(0, "hello from test\n").unwrap();
        let mut conn = TcpStream::connect(backend.addr).unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        for _ in 0..2 {
            conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut head = String::new();
            while reader.read_line(&mut head).unwrap() > 2 {}
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            let mut body = [0u8; 16];
            reader.read_exact(&mut body).unwrap();
            assert_eq!(&body, b"hello from test\n");
        }
        conn.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(rest.ends_with("\r\n\r\nhello from test\n"), "{rest}");
        backend.stop();
    }
}
