//! Wake-up datagrams: non-blocking `AF_UNIX` `SOCK_DGRAM` sockets bound to abstract names (no
//! file, gone with the last descriptor), one per notifier, plus one unbound process-wide sender.
//! Also the one `getrandom` call (the names' nonces).

use std::io;
use std::os::unix::io::RawFd;
use std::sync::OnceLock;

/// Longest abstract name we build (without the leading NUL); `sun_path` holds 108 bytes.
const MAX_NAME: usize = 100;

/// An abstract socket address: `sun_path` = NUL + `name`.
pub struct AbstractAddr {
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl AbstractAddr {
    /// `None` if `name` is too long.
    pub fn new(name: &[u8]) -> Option<AbstractAddr> {
        if name.len() > MAX_NAME {
            return None;
        }
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        // sun_path[0] stays 0: the abstract namespace.
        for (dst, src) in addr.sun_path[1..].iter_mut().zip(name) {
            *dst = *src as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
        Some(AbstractAddr {
            addr,
            len: len as libc::socklen_t,
        })
    }

    fn as_ptr(&self) -> *const libc::sockaddr {
        &self.addr as *const libc::sockaddr_un as *const libc::sockaddr
    }
}

fn dgram_socket() -> io::Result<RawFd> {
    // SAFETY: socket has no pointer arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

fn close(fd: RawFd) {
    // SAFETY: callers pass a descriptor they own and never use again.
    unsafe { libc::close(fd) };
}

/// A bound, non-blocking datagram socket: the descriptor an event loop watches.
#[derive(Debug)]
pub struct Receiver(RawFd);

impl Receiver {
    /// Binds a new socket to `addr`; `AddrInUse` if the name is taken.
    pub fn bind(addr: &AbstractAddr) -> io::Result<Receiver> {
        let fd = dgram_socket()?;
        // SAFETY: `addr` points to a sockaddr_un valid for `len` bytes for the whole call.
        let rc = unsafe { libc::bind(fd, addr.as_ptr(), addr.len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            close(fd);
            return Err(e);
        }
        Ok(Receiver(fd))
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }

    /// Reads and discards every pending datagram; returns how many there were.
    pub fn drain(&self) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 16];
        loop {
            // SAFETY: receives at most `buf.len()` bytes into `buf`, which lives across the
            // call; the socket is non-blocking and MSG_DONTWAIT makes sure of it.
            let rc = unsafe {
                libc::recv(
                    self.0,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // EAGAIN: empty. Anything else (cannot happen on a bound dgram socket) also
                // ends the loop: never spin.
                return n;
            }
            n += 1;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        close(self.0);
    }
}

/// What became of one wake-up datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Queued (or the receiver's queue is full: a datagram is already pending).
    Delivered,
    /// Nobody is bound to that name (the process is gone).
    NoReceiver,
    /// Anything else (no sender socket, out of memory): the caller may want to retry later.
    Failed,
}

/// The process-wide unbound sender, created on first use (a failed creation is retried by the
/// next send). A child inherits it across fork and shares it with its parent, which is fine
/// for an unbound socket that only calls `sendto`.
///
/// Datagrams waiting in a receiver's queue are charged to this socket's send buffer until read.
/// A full send buffer would also return `EAGAIN` (taken for "already pending"), but at most one
/// datagram per armed process row is ever queued (64 per segment, ~1 KiB each in kernel memory
/// against a default send buffer of ~200 KiB), so that cannot happen.
static SENDER: OnceLock<RawFd> = OnceLock::new();

fn sender() -> Option<RawFd> {
    if let Some(fd) = SENDER.get() {
        return Some(*fd);
    }
    let new = dgram_socket().ok()?;
    match SENDER.set(new) {
        Ok(()) => Some(new),
        Err(_) => {
            close(new); // another thread won the race
            SENDER.get().copied()
        }
    }
}

/// Sends one byte to `addr` without ever blocking; never raises SIGPIPE.
pub fn send_wake(addr: &AbstractAddr) -> Sent {
    let Some(fd) = sender() else {
        return Sent::Failed;
    };
    let byte = 1u8;
    loop {
        // SAFETY: sends the one byte of `byte` to the address `addr` holds; both live across
        // the call.
        let rc = unsafe {
            libc::sendto(
                fd,
                &byte as *const u8 as *const libc::c_void,
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                addr.as_ptr(),
                addr.len,
            )
        };
        if rc >= 0 {
            return Sent::Delivered;
        }
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => Sent::Delivered,
            Some(libc::ECONNREFUSED | libc::ENOENT) => Sent::NoReceiver,
            _ => Sent::Failed,
        };
    }
}

/// 64 random bits from the kernel (`getrandom`); falls back to mixing time and pid if the
/// call is unavailable (only uniqueness matters, not secrecy).
pub fn random_u64() -> u64 {
    let mut v = 0u64;
    // SAFETY: writes at most 8 bytes into `v`, which lives across the call.
    let rc = unsafe { libc::getrandom(&mut v as *mut u64 as *mut libc::c_void, 8, 0) };
    if rc == 8 {
        return v;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (std::process::id() as u64) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_the_bound_name_and_a_gone_name_is_refused() {
        let name = format!("ringcast-test-{:016x}", random_u64());
        let addr = AbstractAddr::new(name.as_bytes()).unwrap();
        let rx = Receiver::bind(&addr).unwrap();
        assert_eq!(
            Receiver::bind(&addr).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        assert_eq!(rx.drain(), 0);
        assert_eq!(send_wake(&addr), Sent::Delivered);
        assert_eq!(send_wake(&addr), Sent::Delivered);
        assert_eq!(rx.drain(), 2);
        assert_eq!(rx.drain(), 0);
        // A full queue never blocks the sender.
        for _ in 0..10_000 {
            assert_eq!(send_wake(&addr), Sent::Delivered);
        }
        assert!(rx.drain() > 0);
        drop(rx);
        assert_eq!(send_wake(&addr), Sent::NoReceiver);
        assert!(AbstractAddr::new(&[b'x'; 101]).is_none());
    }
}
