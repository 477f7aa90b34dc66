//! Booting one guest under QEMU/TCG and reading what it reports. The console (first serial port) is streamed
//! here line by line and kept in a log; the guest's init writes "@@vm ..." result lines to the second serial
//! port, a file that holds nothing else (no kernel messages), which is parsed once QEMU exits. A guest still
//! running at its deadline is killed and reported as failed, with whatever it reported until then.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

pub struct Boot<'a> {
    /// Prefix of the streamed console lines, e.g. `5.10`.
    pub name: &'a str,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    /// The console log and the result lines are written here.
    pub dir: &'a Path,
    pub deadline: Duration,
    pub cpus: usize,
    pub memory_mib: usize,
}

/// One test binary's run in a guest.
#[derive(Default)]
pub struct TestRun {
    pub label: String,
    /// Exit code; `None` when the guest never reported the end (hung, killed).
    pub exit: Option<i32>,
    pub seconds: Option<u64>,
    /// libtest's "test result: ..." lines.
    pub results: Vec<String>,
    pub failed: Vec<String>,
}

impl TestRun {
    pub fn passed(&self) -> bool {
        self.exit == Some(0) && !self.results.is_empty()
    }
}

pub struct Outcome {
    pub release: Option<String>,
    /// Seconds from power-on to init, as the guest's /proc/uptime says.
    pub boot_seconds: Option<String>,
    pub modules: Vec<(String, String)>,
    /// The data path status (as `/api/v1/datapath` has it) of an agent in mode auto, or why there is none.
    pub probe: Result<Value, String>,
    pub tests: Vec<TestRun>,
    /// init reached its end.
    pub done: bool,
    pub timed_out: bool,
    /// The hang that ended this kernel's first boot, when this is the second.
    pub hung_before: Option<String>,
    pub wall: Duration,
    pub console: PathBuf,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.done
            && !self.timed_out
            && self.probe.is_ok()
            && self.modules.iter().all(|(_, state)| state == "loaded")
            && !self.tests.is_empty()
            && self.tests.iter().all(TestRun::passed)
    }
}

pub fn boot(b: &Boot) -> Result<Outcome> {
    let results = b.dir.join(format!("{}-results.txt", b.name));
    let console = b.dir.join(format!("{}-console.log", b.name));
    let mut qemu = Command::new("qemu-system-x86_64");
    // KVM is not usable on this machine kind (it stops with an internal error), so TCG; `-cpu max` gives the
    // guest RDRAND, which seeds its entropy pool at once. One host thread runs both vCPUs: with a thread each,
    // a vCPU could go on running a stale translation of kernel text another vCPU had just patched (attaching a
    // cgroup program flips a static key), and twice the guest hung with both CPUs looping on the int3 of a
    // finished patch; this costs the matrix about a minute per kernel. No network device: the guest's only links
    // are the ones its tests make.
    qemu.args([
        "-accel",
        "tcg,thread=single",
        "-cpu",
        "max",
        "-smp",
        &b.cpus.to_string(),
        "-m",
        &b.memory_mib.to_string(),
    ])
    .args(["-display", "none", "-vga", "none", "-monitor", "none", "-nic", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(b.vmlinuz)
    .arg("-initrd")
    .arg(b.initramfs)
    // A kernel that hangs (soft lockup) panics, and with -no-reboot QEMU exits, instead of the guest spinning until
    // the deadline; loglevel 5 lets the lockup's backtraces (KERN_WARNING) reach the console log.
    .args([
        "-append",
        "console=ttyS0 loglevel=5 panic=-1 softlockup_panic=1 softlockup_all_cpu_backtrace=1 rdinit=/init",
    ])
    .args(["-serial", "stdio", "-serial"])
    .arg(format!("file:{}", results.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    println!("+ {}", crate::cmd::display(&qemu));
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let prefix = format!("[{}] ", b.name);
    let mut log = File::create(&console)?;
    let streamer = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = log.write_all(&line);
            println!("{prefix}{}", printable(&line));
            line.clear();
        }
    });
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() >= b.deadline {
            println!("test-vm: {}: guest still running after {:?}: killing it", b.name, b.deadline);
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = streamer.join();
    let mut outcome = parse(&std::fs::read_to_string(&results).unwrap_or_default());
    outcome.timed_out = timed_out;
    outcome.wall = started.elapsed();
    outcome.console = console;
    Ok(outcome)
}

impl Outcome {
    /// The first console line saying the guest's kernel hung (a soft lockup or an RCU stall), if it did.
    pub fn kernel_hang(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.console).ok()?;
        let line = log.lines().find(|l| l.contains("soft lockup") || l.contains("self-detected stall"))?;
        Some(line.trim().to_owned())
    }
}

/// A console line without its line end and terminal control sequences (the firmware clears the screen).
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI (ESC [ parameters final-byte), or ESC and one character.
                if chars.next() == Some('[') {
                    while chars.next().is_some_and(|c| !c.is_ascii_alphabetic()) {}
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn parse(text: &str) -> Outcome {
    let mut o = Outcome {
        release: None,
        boot_seconds: None,
        modules: Vec::new(),
        probe: Err("the guest never reported the agent's data path".into()),
        tests: Vec::new(),
        done: false,
        timed_out: false,
        hung_before: None,
        wall: Duration::ZERO,
        console: PathBuf::new(),
    };
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        let Some(rest) = line.strip_prefix("@@vm ") else { continue };
        let (event, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut words = rest.splitn(2, ' ');
        let (first, tail) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        match event {
            "kernel" => o.release = Some(rest.to_owned()),
            "boot" => o.boot_seconds = Some(rest.to_owned()),
            "module" => o.modules.push((first.to_owned(), tail.to_owned())),
            "probe" => {
                o.probe = serde_json::from_str::<Value>(rest)
                    .map_err(|e| format!("unreadable status ({e}): {rest}"))
                    .and_then(|s| match &s["datapath"] {
                        Value::Null => Err(format!("no data path in the agent's status: {rest}")),
                        datapath => Ok(datapath.clone()),
                    })
            }
            "probe-failed" => o.probe = Err(rest.to_owned()),
            "test" if tail == "begin" => o.tests.push(TestRun { label: first.to_owned(), ..TestRun::default() }),
            "test" => {
                let mut end = tail.split_whitespace().skip(1);
                if let Some(run) = o.tests.iter_mut().rev().find(|t| t.label == first) {
                    run.exit = end.next().and_then(|c| c.parse().ok());
                    run.seconds = end.next().and_then(|s| s.parse().ok());
                }
            }
            "result" | "failed" => {
                if let Some(run) = o.tests.iter_mut().rev().find(|t| t.label == first) {
                    let list = if event == "result" { &mut run.results } else { &mut run.failed };
                    list.push(tail.to_owned());
                }
            }
            "done" => o.done = true,
            _ => {}
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guests_report() {
        let text = "@@vm kernel 5.10.0-32-cloud-amd64\r\n@@vm boot 1.93\n@@vm module veth loaded\n\
                    @@vm probe {\"ready\": true, \"datapath\": {\"mode\": \"ebpf\"}}\n@@vm test ebpf begin\n\
                    @@vm result ebpf test result: FAILED. 11 passed; 1 failed; 0 ignored\n\
                    @@vm failed ebpf getpeername_returns_the_vip\n@@vm test ebpf end 101 250\n\
                    @@vm test lib begin\n";
        let o = parse(text);
        assert_eq!(o.release.as_deref(), Some("5.10.0-32-cloud-amd64"));
        assert_eq!(o.modules, vec![("veth".to_owned(), "loaded".to_owned())]);
        assert_eq!(o.probe.as_ref().unwrap()["mode"], "ebpf");
        assert_eq!(o.tests.len(), 2);
        assert_eq!((o.tests[0].exit, o.tests[0].seconds), (Some(101), Some(250)));
        assert_eq!(o.tests[0].failed, ["getpeername_returns_the_vip"]);
        assert_eq!(o.tests[0].results, ["test result: FAILED. 11 passed; 1 failed; 0 ignored"]);
        assert_eq!(o.tests[1].exit, None, "no end reported: hung");
        assert!(!o.done && !o.passed());
    }

    #[test]
    fn a_soft_lockup_on_the_console_is_a_kernel_hang() {
        let mut o = parse("");
        o.console = std::env::temp_dir().join(format!("vm-console-test-{}.log", std::process::id()));
        std::fs::write(&o.console, "[    2.1] veth: loaded\n").unwrap();
        assert_eq!(o.kernel_hang(), None);
        // As the 6.1 guest's console had it (2026-12-05).
        std::fs::write(
            &o.console,
            "[   71.08] rcu: INFO: rcu_preempt self-detected stall on CPU\n\
             [   96.50] watchdog: BUG: soft lockup - CPU#0 stuck for 44s! [tokio-rt-worker:2255]\n",
        )
        .unwrap();
        assert_eq!(o.kernel_hang().as_deref(), Some("[   71.08] rcu: INFO: rcu_preempt self-detected stall on CPU"));
        std::fs::remove_file(&o.console).unwrap();
    }

    #[test]
    fn printable_drops_terminal_sequences() {
        assert_eq!(printable(b"\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\n"), "SeaBIOS");
    }
}
