//! Wake-up datagrams: non-blocking `AF_UNIX` `SOCK_DGRAM` sockets bound to file names in a
//! private (0700) directory, one per notifier, and on the sending side one socket per
//! receiver, connected to it on first use ([`Senders`]). Also the one `getrandom` call (the
//! notifiers' nonces).
//!
//! Why files in a private directory and not abstract names: every abstract name is listed in
//! `/proc/net/unix` and any local user may send to it, so any user could keep a process's event
//! loop busy draining datagrams. Sending to a file name takes search permission on its
//! directory, which only its owner (and root) has. A socket is named through a descriptor of
//! its directory (`/proc/self/fd/<fd>/<index>`, [`SocketDir`]), so the directory's own path may
//! be of any length.

use std::ffi::CString;
use std::io;
use std::os::unix::io::RawFd;

use crate::sync::{AtomicI32, Ordering};

/// A socket file's address.
struct SocketAddr {
    addr: libc::sockaddr_un,
    len: libc::socklen_t,
}

impl SocketAddr {
    /// `None` if `path` (with its terminating NUL) does not fit `sun_path` or holds a NUL.
    fn new(path: &[u8]) -> Option<SocketAddr> {
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        if path.is_empty() || path.len() >= addr.sun_path.len() || path.contains(&0) {
            return None;
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (dst, src) in addr.sun_path.iter_mut().zip(path) {
            *dst = *src as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
        Some(SocketAddr {
            addr,
            len: len as libc::socklen_t,
        })
    }

    fn as_ptr(&self) -> *const libc::sockaddr {
        &self.addr as *const libc::sockaddr_un as *const libc::sockaddr
    }
}

fn c_string(path: &[u8]) -> io::Result<CString> {
    CString::new(path)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// A private directory of socket files, held open (`O_PATH`). Its sockets are bound and
/// reached through `/proc/self/fd/<fd>/<index>`: a socket address holds at most 107 bytes, and
/// that path is under 40 whatever the directory's own path is. The kernel follows the
/// descriptor's link to the directory and then checks search permission on it as on any path,
/// so only those who may enter the directory reach its sockets, as with the plain path.
#[derive(Debug)]
pub struct SocketDir {
    fd: RawFd,
}

impl SocketDir {
    /// Opens `dir` (first making it, mode 0700, if `create`) and makes sure it is a directory
    /// only this user can enter: a real directory (not a link), owned by this user, with no
    /// permission for anyone else. Anything else is refused: a directory another user planted
    /// or can enter would let them send to (or replace) the sockets in it. The checks are made
    /// on the opened descriptor, so the directory used is the one checked.
    pub fn open(dir: &[u8], create: bool) -> io::Result<SocketDir> {
        let c = c_string(dir)?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        if create && unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        // O_NOFOLLOW with O_PATH opens a link itself (then refused below as not a directory).
        // SAFETY: `c` is a valid NUL-terminated string; open has no other pointer argument.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let d = SocketDir { fd }; // closed on every return below but the last
                                  // SAFETY: `st` is a plain-old-data out parameter fully written by a successful fstat;
                                  // `d.fd` is an open descriptor (fstat accepts O_PATH descriptors).
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(d.fd, &mut st) != 0 {
                return Err(io::Error::last_os_error());
            }
            st
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let why = if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            "exists and is not a directory (a link or a file)".to_string()
        } else if st.st_uid != me {
            format!("belongs to uid {}, not to this user (uid {me})", st.st_uid)
        } else if st.st_mode & 0o077 != 0 {
            format!(
                "has mode {:04o}: other users may enter it; it must be 0700",
                st.st_mode & 0o7777
            )
        } else {
            return Ok(d);
        };
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{why}; refusing it (remove it)"),
        ))
    }

    /// The address of socket `index` in this directory, through this process's descriptor.
    fn addr(&self, index: usize) -> io::Result<SocketAddr> {
        let path = format!("/proc/self/fd/{}/{index}", self.fd);
        SocketAddr::new(path.as_bytes()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path:?} is too long"))
        })
    }

    /// Binds a new socket to the name `index`, first removing a file left there (by a process
    /// that held the name and died: the caller owns the name now).
    pub fn bind_replacing(&self, index: usize) -> io::Result<Receiver> {
        let addr = self.addr(index)?;
        let fd = dgram_socket()?;
        self.remove(index);
        // SAFETY: `addr` points to a sockaddr_un valid for `len` bytes for the whole call.
        let rc = unsafe { libc::bind(fd, addr.as_ptr(), addr.len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            close(fd);
            return Err(e);
        }
        Ok(Receiver(fd))
    }

    /// Removes the socket file `index`; best effort, for cleaning up.
    pub fn remove(&self, index: usize) {
        if let Ok(name) = CString::new(index.to_string()) {
            // SAFETY: `name` is a valid NUL-terminated string; `self.fd` is an open directory
            // descriptor (O_PATH descriptors are valid `dirfd`s).
            unsafe { libc::unlinkat(self.fd, name.as_ptr(), 0) };
        }
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        close(self.fd);
    }
}

/// Removes `dir` if it is empty; best effort (another notifier may still have its socket in it).
pub fn remove_dir_if_empty(dir: &[u8]) {
    if let Ok(c) = c_string(dir) {
        // SAFETY: `c` is a valid NUL-terminated string.
        unsafe { libc::rmdir(c.as_ptr()) };
    }
}

/// Removes the socket files named by `rows` (decimal row numbers) from `dir`, then `dir`
/// itself if that emptied it; best effort, for cleaning up. Nothing else is touched: `dir` is
/// opened without following a link (a link planted in its place is left alone), and an entry
/// goes only if it is a socket (a link, file or directory of that name stays).
pub fn remove_sockets_in(dir: &[u8], rows: impl IntoIterator<Item = usize>) {
    let Ok(c) = c_string(dir) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; nothing is created.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return;
    }
    for row in rows {
        let Ok(name) = CString::new(row.to_string()) else {
            continue;
        };
        // SAFETY: `fd` is the directory opened above; `name` is NUL-terminated; `st` is a
        // plain-old-data out parameter, read only after a successful fstatat wrote it.
        let is_socket = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstatat(fd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
        };
        if is_socket {
            // SAFETY: as above; flags 0 removes a non-directory entry of `fd` (never follows).
            unsafe { libc::unlinkat(fd, name.as_ptr(), 0) };
        }
    }
    close(fd);
    remove_dir_if_empty(dir);
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

/// A bound, non-blocking datagram socket: the descriptor an event loop watches. Dropping it
/// closes the socket but leaves its file (a forked child's copy must not remove its parent's).
#[derive(Debug)]
pub struct Receiver(RawFd);

impl Receiver {
    pub fn fd(&self) -> RawFd {
        self.0
    }

    /// Reads and discards one pending datagram, if there is one; true if there was. One
    /// system call where [`drain`](Self::drain) needs two (the last one finds the socket
    /// empty): a caller woken by readiness takes the datagram that woke it, and a level-
    /// triggered event loop calls it back while more wait.
    pub fn take_one(&self) -> bool {
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
            if rc >= 0 {
                return true;
            }
            // EAGAIN: empty. Anything else (cannot happen on a bound dgram socket) also ends
            // it: never spin.
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return false;
            }
        }
    }

    /// Reads and discards every pending datagram; returns how many there were.
    pub fn drain(&self) -> usize {
        let mut n = 0;
        while self.take_one() {
            n += 1;
        }
        n
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
    /// Nobody is bound to that name (the process is gone), or it is not ours to reach.
    NoReceiver,
    /// Anything else (no socket, out of memory): the caller may want to retry later.
    Failed,
}

/// Sending sockets, one per receiver (process-table row), each connected to its receiver's
/// name on first use and again whenever that receiver has gone (a new process may hold the
/// name now). Connected, a send looks nothing up: measured, `sendto` a file name cost ~3.5 µs
/// more per datagram than `sendto` an abstract name, and a connected `send` no more than the
/// latter (bench/RESULTS.md). The permission to reach the name is checked once, at connect.
///
/// A socket, once made, stays in its cell until the table is dropped (it is only ever
/// re-connected, never closed and replaced, so a sender holding its number cannot race a
/// close). A forked child shares them with its parent: both only ever connect a cell to the
/// same name. Datagrams waiting in a receiver's queue are charged to the sending socket's
/// buffer until read; at most one per armed receiver is queued, so a send buffer never fills.
#[derive(Debug)]
pub struct Senders {
    fds: Vec<AtomicI32>,
}

impl Senders {
    pub fn new(receivers: usize) -> Senders {
        Senders {
            fds: (0..receivers).map(|_| AtomicI32::new(-1)).collect(),
        }
    }

    /// Sends one byte to receiver `index`, the socket file `index` in the private directory
    /// `dir`, without ever blocking; never raises SIGPIPE. Only a (re)connect opens `dir` (and
    /// checks it as [`SocketDir::open`] does); a send on a connected socket looks nothing up.
    pub fn send(&self, index: usize, dir: &[u8]) -> Sent {
        let Some(cell) = self.fds.get(index) else {
            return Sent::Failed;
        };
        let mut fd = cell.load(Ordering::Acquire);
        if fd < 0 {
            let Ok(new) = dgram_socket() else {
                return Sent::Failed;
            };
            // Relaxed/Acquire: the number is all that is shared; the socket is the kernel's.
            match cell.compare_exchange(-1, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => fd = new,
                Err(theirs) => {
                    close(new); // never shared: another thread installed its socket first
                    fd = theirs;
                }
            }
        }
        match send_byte(fd) {
            // Never connected, or its receiver has gone: (re)connect to whoever holds the name
            // now, and try once more.
            Err(libc::ENOTCONN | libc::ECONNREFUSED | libc::ECONNRESET) => {
                match connect(fd, dir, index) {
                    Ok(()) => classify(send_byte(fd)),
                    Err(e) => classify(Err(e)),
                }
            }
            other => classify(other),
        }
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        for cell in &self.fds {
            let fd = cell.load(Ordering::Acquire);
            if fd >= 0 {
                close(fd);
            }
        }
    }
}

/// Connects `fd` to the socket file `index` in the private directory `dir`, opened for just
/// this (a descriptor kept open would go stale when the last notifier removes the directory
/// and the next one makes it again); the errno on failure (EACCES if `dir` is not private).
fn connect(fd: RawFd, dir: &[u8], index: usize) -> Result<(), i32> {
    let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EACCES);
    let dir = SocketDir::open(dir, false).map_err(errno)?;
    let addr = dir.addr(index).map_err(errno)?;
    loop {
        // SAFETY: `addr` points to a sockaddr_un valid for `len` bytes for the whole call.
        if unsafe { libc::connect(fd, addr.as_ptr(), addr.len) } == 0 {
            return Ok(());
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            e => return Err(e.unwrap_or(libc::EIO)),
        }
    }
}

/// One byte on a connected socket; the errno on failure.
fn send_byte(fd: RawFd) -> Result<(), i32> {
    let byte = 1u8;
    loop {
        // SAFETY: sends the one byte of `byte`, which lives across the call.
        let rc = unsafe {
            libc::send(
                fd,
                &byte as *const u8 as *const libc::c_void,
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if rc >= 0 {
            return Ok(());
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            e => return Err(e.unwrap_or(libc::EIO)),
        }
    }
}

fn classify(r: Result<(), i32>) -> Sent {
    match r {
        // EAGAIN: the receiver's queue is full, so a datagram is already pending there.
        Ok(()) | Err(libc::EAGAIN) => Sent::Delivered,
        // No such file, nobody bound to it (its process died), or not ours to reach:
        // retrying would never succeed.
        Err(
            libc::ECONNREFUSED
            | libc::ECONNRESET
            | libc::ENOTCONN
            | libc::ENOENT
            | libc::ENOTDIR
            | libc::EACCES
            | libc::EPERM,
        ) => Sent::NoReceiver,
        Err(_) => Sent::Failed,
    }
}

/// 64 random bits from the kernel (`getrandom`); falls back to mixing time and pid if the
/// call is unavailable: unique, but guessable (enough for the notifier names; the index's hash
/// key then only spreads ordinary ids, not ids chosen to collide).
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

    /// A fresh directory path of about 200 bytes (its parents made; it is not): far past what
    /// a socket address holds. Remove the returned top directory when done.
    fn deep_dir() -> (String, String) {
        let top = format!("/dev/shm/ringcast-dgram-test-{:016x}", random_u64());
        let parent = format!("{top}/{}/{}", "p".repeat(60), "q".repeat(60));
        std::fs::create_dir_all(&parent).unwrap();
        let dir = format!("{parent}/{}.wake", "s".repeat(200 - parent.len() - 6));
        assert_eq!(dir.len(), 200);
        (top, dir)
    }

    #[test]
    fn datagrams_reach_the_bound_name_and_a_gone_name_is_refused() {
        let (top, dir) = deep_dir();
        let senders = Senders::new(4);
        let send_wake = || senders.send(3, dir.as_bytes());
        assert_eq!(send_wake(), Sent::NoReceiver, "no directory yet");
        let d = SocketDir::open(dir.as_bytes(), true).unwrap();
        SocketDir::open(dir.as_bytes(), true).expect("our own 0700 directory is accepted again");
        assert_eq!(send_wake(), Sent::NoReceiver, "no socket yet");
        let rx = d.bind_replacing(3).unwrap();
        assert!(std::path::Path::new(&format!("{dir}/3")).exists());
        assert_eq!(rx.drain(), 0);
        assert_eq!(send_wake(), Sent::Delivered);
        assert_eq!(send_wake(), Sent::Delivered);
        assert_eq!(rx.drain(), 2);
        assert_eq!(rx.drain(), 0);
        // A full queue never blocks the sender.
        for _ in 0..10_000 {
            assert_eq!(send_wake(), Sent::Delivered);
        }
        assert!(rx.drain() > 0);
        drop(rx);
        // The file stays, nobody is bound: refused. (Once a child forked meanwhile by another
        // test of this binary, which holds a copy of the socket until it exits, is gone.)
        assert!(
            (0..5000).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(1));
                send_wake() == Sent::NoReceiver
            }),
            "a closed socket's name is refused"
        );
        // A new owner of the name replaces the stale file.
        let rx = d.bind_replacing(3).unwrap();
        assert_eq!(send_wake(), Sent::Delivered);
        drop(rx);
        d.remove(3);
        assert_eq!(send_wake(), Sent::NoReceiver);
        // The directory removed and made again (the last notifier left, a new one came): the
        // sender reaches the new socket.
        drop(d);
        remove_dir_if_empty(dir.as_bytes());
        assert!(!std::path::Path::new(&dir).exists());
        let d = SocketDir::open(dir.as_bytes(), true).unwrap();
        let rx = d.bind_replacing(3).unwrap();
        assert_eq!(send_wake(), Sent::Delivered);
        assert_eq!(rx.drain(), 1);
        assert_eq!(
            senders.send(4, dir.as_bytes()),
            Sent::Failed,
            "no such receiver index"
        );
        // A directory others may enter is not sent into.
        drop(rx);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let rx = d.bind_replacing(2).unwrap();
        assert_eq!(senders.send(2, dir.as_bytes()), Sent::NoReceiver);
        assert_eq!(rx.drain(), 0);
        std::fs::remove_dir_all(&top).unwrap();
        assert!(SocketAddr::new(&[b'x'; 108]).is_none());
        assert!(SocketAddr::new(&[b'x'; 107]).is_some());
    }

    #[test]
    fn a_directory_others_can_enter_is_refused() {
        let dir = format!("/dev/shm/ringcast-dgram-test-{:016x}", random_u64());
        std::fs::create_dir(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = SocketDir::open(dir.as_bytes(), true).unwrap_err();
        assert!(e.to_string().contains("0755"), "{e}");
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/tmp", &dir).unwrap();
        let e = SocketDir::open(dir.as_bytes(), true).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn cleaning_up_removes_only_the_sockets_it_names_and_follows_no_link() {
        let base = format!("/dev/shm/ringcast-dgram-test-{:016x}", random_u64());
        let (dir, elsewhere) = (format!("{base}.wake"), format!("{base}.elsewhere"));
        let (d, e) = (
            SocketDir::open(dir.as_bytes(), true).unwrap(),
            SocketDir::open(elsewhere.as_bytes(), true).unwrap(),
        );
        let (_a, _b) = (d.bind_replacing(0).unwrap(), d.bind_replacing(5).unwrap());
        let _c = e.bind_replacing(1).unwrap();
        std::fs::write(format!("{dir}/2"), b"not a socket").unwrap();
        std::os::unix::fs::symlink(format!("{elsewhere}/1"), format!("{dir}/1")).unwrap();
        let exists = |p: String| std::fs::symlink_metadata(p).is_ok();
        // Row 5 is not named: it stays, and so does the directory.
        remove_sockets_in(dir.as_bytes(), 0..4);
        assert!(!exists(format!("{dir}/0")), "a named socket goes");
        assert!(
            exists(format!("{dir}/1")) && exists(format!("{elsewhere}/1")),
            "a link stays"
        );
        assert!(exists(format!("{dir}/2")) && exists(format!("{dir}/5")));
        std::fs::remove_file(format!("{dir}/1")).unwrap();
        std::fs::remove_file(format!("{dir}/2")).unwrap();
        remove_sockets_in(dir.as_bytes(), [5]);
        assert!(!exists(dir.clone()), "emptied, the directory goes");
        // A link in the directory's place is not followed.
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        remove_sockets_in(dir.as_bytes(), 0..4);
        assert!(exists(format!("{elsewhere}/1")) && exists(dir.clone()));
        std::fs::remove_file(&dir).unwrap();
        std::fs::remove_file(format!("{elsewhere}/1")).unwrap();
        std::fs::remove_dir(&elsewhere).unwrap();
    }
}
