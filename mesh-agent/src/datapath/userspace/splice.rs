//! Moving bytes between a client and its backend, both directions at once, each until EOF and then half-closed.
//!
//! A direction starts by copying through a small buffer and switches to splice(2) through a pipe once a read
//! fills that buffer (haproxy's splice-auto): small requests and responses cost one read and one write instead of
//! two splices plus a pipe, bulk transfers never enter userspace. Pipes come from a bounded pool, so a new
//! connection does not pay for pipe creation and sizing (DESIGN.md: fresh pipes per connection cost 20-30% of
//! haproxy's req/s and conn/s).
//!
//! Proxy CPU measured on loopback (wrk, iperf3, nginx backend) in the same run as haproxy with splice-auto: per
//! keep-alive request 10.5-10.9 µs (haproxy 10.2-10.7), per new connection 61-64 µs (57-61), per MB 215-231 µs
//! (232-570). Always splicing with fresh pipes took 12.3-12.9 µs and 76-81 µs.

use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::stats::{bump, Counters};

/// A read that fills this many bytes marks a bulk transfer and switches its direction to splice. Most HTTP
/// requests and small responses fit, so they never touch a pipe.
const COPY_BUF: usize = 16 * 1024;

/// Pipe capacity. A splice from a TCP socket fills at most one pipe slot per skb fragment, so the default 16 slots
/// (64 KiB) cap each call; through iperf3 here 1 MiB cost 15-25% less proxy CPU per byte than 64 KiB (256 KiB in
/// between). Pages are held only while data is in flight, so idle pooled pipes cost just their two descriptors.
const PIPE_SIZE: usize = 1024 * 1024;

/// Idle pipes kept for reuse: enough for 128 connections splicing both directions at once. Beyond that pipes are
/// created and closed per connection, as without a pool, so the bound only limits idle descriptors.
const POOL_MAX: usize = 256;

/// Splices `client` ⇄ `backend` until both directions reached EOF. An error in either stops both: the caller
/// resets the connections.
pub(super) async fn proxy(
    client: &TcpStream,
    backend: &TcpStream,
    pool: &PipePool,
    counters: &Counters,
) -> io::Result<()> {
    let ended = AtomicBool::new(false);
    tokio::try_join!(
        forward(client, backend, pool, &counters.bytes_in, &ended),
        forward(backend, client, pool, &counters.bytes_out, &ended),
    )?;
    Ok(())
}

/// Forwards `from` → `to` until EOF, then shuts down `to` for writing, so its peer sees the end of this direction
/// while the other direction keeps flowing (half-close). The direction that ends last skips that: the caller closes
/// both sockets right away, which sends the same FIN (nothing is left unread, so close does not turn it into a
/// RST), and a new connection saves a syscall.
async fn forward(
    from: &TcpStream,
    to: &TcpStream,
    pool: &PipePool,
    bytes: &AtomicU64,
    ended: &AtomicBool,
) -> io::Result<()> {
    if copy(from, to, bytes).await? == Copied::Bulk {
        splice(from, to, pool, bytes).await?;
    }
    if ended.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    SockRef::from(to).shutdown(Shutdown::Write)
}

#[derive(PartialEq)]
enum Copied {
    Eof,
    /// A read filled the buffer: the rest goes through a pipe.
    Bulk,
}

/// Copies with read/write until EOF or the first full read.
async fn copy(from: &TcpStream, to: &TcpStream, bytes: &AtomicU64) -> io::Result<Copied> {
    loop {
        // The peer's FIN had arrived when this readiness was reported, so every byte before it is queued: a short
        // read below takes the last of them.
        let last = from.ready(Interest::READABLE).await?.is_read_closed();
        // The buffer lives only inside this block, on the poll stack: it is not kept in every connection's future.
        // Only what the peer cannot take right now is copied out, to wait for writability.
        let (n, rest, ends) = {
            // Uninitialized: zeroing 16 KiB per message would cost more than the message. Only `got` bytes are read.
            let mut buf = [MaybeUninit::<u8>::uninit(); COPY_BUF];
            let mut got = 0;
            // A short read took everything there was, so it reports WouldBlock to have tokio clear the readiness
            // now, saving the read that would only return EAGAIN (one syscall per message, as haproxy does). Safe:
            // tokio clears only if no readiness event arrived since it checked readiness before the read, so data
            // arriving after the read still wakes us.
            let read = from.try_io(Interest::READABLE, || {
                got = recv(from.as_raw_fd(), &mut buf)?;
                if got > 0 && got < COPY_BUF {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(got)
            });
            match read {
                Ok(0) => return Ok(Copied::Eof),
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ if got == 0 => continue,
                _ => {}
            }
            // SAFETY: recv initialized the first `got` bytes.
            let buf = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), got) };
            let ends = last && got < COPY_BUF;
            let sent = match to.try_io(Interest::WRITABLE, || send(to, buf, ends)) {
                Ok(sent) => sent,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            (got, buf[sent..].to_vec(), ends)
        };
        write_all(to, &rest).await?;
        bump(bytes, n);
        if n == COPY_BUF {
            return Ok(Copied::Bulk);
        }
        if ends {
            // No read for the 0 that would follow.
            return Ok(Copied::Eof);
        }
    }
}

/// Sends what it can of `buf`. With `ends`, the bytes wait in the socket (MSG_MORE) for the FIN that the caller's
/// shutdown or close sends next, and leave with it in one segment, as haproxy's do: a connection closed by its
/// backend then costs the client leg a segment and an ACK less (the bench's new connections: 15.2 segments each
/// through the proxy before, 13.3 now, haproxy 13.5).
fn send(to: &TcpStream, buf: &[u8], ends: bool) -> io::Result<usize> {
    let more = if ends { libc::MSG_MORE } else { 0 };
    SockRef::from(to).send_with_flags(buf, libc::MSG_NOSIGNAL | more)
}

fn recv(socket: RawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length for the duration of the call.
    let n = unsafe { libc::recv(socket, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn write_all(to: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let sent = to.async_io(Interest::WRITABLE, || to.try_write(buf)).await?;
        buf = &buf[sent..];
    }
    Ok(())
}

/// Splices until EOF: fill the pipe from `from`, drain it into `to`, repeat.
async fn splice(from: &TcpStream, to: &TcpStream, pool: &PipePool, bytes: &AtomicU64) -> io::Result<()> {
    let mut lease = pool.lease()?;
    let pipe = lease.pipe();
    loop {
        // The pipe is empty here, so EAGAIN can only mean "socket not readable" and try_io's readiness is right.
        if from.async_io(Interest::READABLE, || pipe.fill(from.as_raw_fd())).await? == 0 {
            return Ok(());
        }
        // The pipe holds data here, so EAGAIN can only mean "socket buffer full".
        while pipe.len > 0 {
            let n = to.async_io(Interest::WRITABLE, || pipe.drain(to.as_raw_fd())).await?;
            bump(bytes, n);
        }
    }
}

/// One pipe and how many bytes it holds now.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    len: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A failure (e.g. over fs.pipe-user-pages-soft when not root) leaves the default size, which still works.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Self { read, write, len: 0 })
    }

    fn fill(&mut self, socket: RawFd) -> io::Result<usize> {
        let n = splice_fds(socket, self.write.as_raw_fd(), PIPE_SIZE)?;
        self.len += n;
        Ok(n)
    }

    fn drain(&mut self, socket: RawFd) -> io::Result<usize> {
        let n = splice_fds(self.read.as_raw_fd(), socket, self.len)?;
        self.len -= n;
        Ok(n)
    }
}

fn splice_fds(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both descriptors are open for the duration of the call (borrowed from live owners); null offsets are
    // required for sockets and pipes.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Idle pipes, shared by every connection of the datapath.
#[derive(Debug, Default)]
pub(super) struct PipePool {
    free: Mutex<Vec<Pipe>>,
}

impl PipePool {
    fn lease(&self) -> io::Result<Lease<'_>> {
        let pooled = self.free.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let pipe = match pooled {
            Some(pipe) => pipe,
            None => Pipe::new()?,
        };
        Ok(Lease { pool: self, pipe: Some(pipe) })
    }

    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

/// A pipe on loan. It goes back to the pool only when empty: bytes left in it (the connection failed mid-transfer)
/// must never reach another connection, so such a pipe is closed instead.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
}

impl Lease<'_> {
    fn pipe(&mut self) -> &mut Pipe {
        self.pipe.as_mut().expect("a lease holds its pipe until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take().filter(|p| p.len == 0) else { return };
        let mut free = self.pool.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < POOL_MAX {
            free.push(pipe);
        }
    }
}
