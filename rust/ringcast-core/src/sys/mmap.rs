//! The only place that maps memory: the segment file, created exclusively with mode 0600,
//! sized once (sparse), mapped `MAP_SHARED`, and given back page by page with hole punching.
//! The file is never reached through a symbolic link (`O_NOFOLLOW` on create and open), must
//! be a regular file, and is removed only while the path still names it. Pages can be backed
//! ahead of use ([`Mapping::allocate`]): on a full filesystem that is an error to report,
//! where a first write to an unbacked page of the mapping is a `SIGBUS`.

use std::ffi::CString;
use std::io;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;

/// A shared, read-write mapping of a whole file. Unmapped and closed on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: RawFd,
    /// Device and inode of the file, to remove it only while the path still names it.
    identity: (u64, u64),
}

// SAFETY: the mapping is plain shared memory; all concurrent access to it goes through
// atomics or the seqlock-validated byte copies of `ring`, which tolerate concurrent writers.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out raw pointers, never `&mut` into the mapping.
unsafe impl Sync for Mapping {}

fn cpath(path: &str) -> io::Result<CString> {
    CString::new(path)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

impl Mapping {
    /// Creates `path` (failing if it exists), sizes it to `len` bytes without allocating them,
    /// and maps it.
    pub fn create(path: &str, len: usize) -> io::Result<Mapping> {
        let c = cpath(path)?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                // O_EXCL already refuses an existing link; O_NOFOLLOW says so for the reader.
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // The umask may have narrowed the mode; it can never widen it, but be explicit.
        // SAFETY: `fd` is the descriptor just opened.
        let rc = unsafe { libc::fchmod(fd, 0o600) };
        let rc2 = if rc == 0 {
            // SAFETY: `fd` is ours; ftruncate only changes the file length (sparse on tmpfs).
            unsafe { libc::ftruncate(fd, len as libc::off_t) }
        } else {
            rc
        };
        if rc2 != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: close the descriptor we own and remove the half-made file.
            unsafe {
                libc::close(fd);
                libc::unlink(c.as_ptr());
            }
            return Err(e);
        }
        Self::map(fd, len).inspect_err(|_| {
            // SAFETY: the file is ours, just created; remove it again.
            unsafe { libc::unlink(c.as_ptr()) };
        })
    }

    /// Opens and maps an existing, non-empty regular file that is this user's alone (mode
    /// 0600); the mapping spans the whole file. A symbolic link at `path` fails with `ELOOP`
    /// (`O_NOFOLLOW`). An empty file is `InvalidData` (a segment being created right now is
    /// empty for a moment). The caller validates the contents.
    pub fn open(path: &str) -> io::Result<Mapping> {
        let c = cpath(path)?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call. O_NONBLOCK: a
        // FIFO planted at the path must not block the open (it is refused just below).
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = match file_stat(fd).and_then(|st| private(&st).map(|()| st.len)) {
            Ok(l) => l,
            Err(e) => {
                // SAFETY: closing the descriptor we own.
                unsafe { libc::close(fd) };
                return Err(e);
            }
        };
        if len == 0 {
            // SAFETY: closing the descriptor we own.
            unsafe { libc::close(fd) };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file is empty",
            ));
        }
        Self::map(fd, len)
    }

    fn map(fd: RawFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of a file we hold open; the kernel picks
        // the address. The result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: closing the descriptor we own.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let ptr = NonNull::new(p as *mut u8).expect("mmap returned null without MAP_FAILED");
        let identity = match file_stat(fd) {
            Ok(st) => st.identity,
            Err(e) => {
                // SAFETY: unmapping what we just mapped and closing the descriptor we own.
                unsafe {
                    libc::munmap(p, len);
                    libc::close(fd);
                }
                return Err(e);
            }
        };
        Ok(Mapping {
            ptr,
            len,
            fd,
            identity,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Current size of the file (another process may have truncated it).
    pub fn file_len(&self) -> io::Result<usize> {
        file_stat(self.fd).map(|st| st.len)
    }

    /// Bytes of the file really backed by memory (allocated blocks).
    pub fn resident_bytes(&self) -> u64 {
        // SAFETY: `st` is a plain-old-data out parameter fully written by a successful fstat.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(self.fd, &mut st) == 0 {
                st.st_blocks as u64 * 512
            } else {
                0
            }
        }
    }

    /// Backs `[offset, offset + len)` of the file with memory now (`fallocate`, keeping the
    /// file's size), so that writing those pages through the mapping cannot fault for want of
    /// space. `ENOSPC` when the filesystem is full; `Unsupported` when it cannot allocate ahead
    /// (then writes back pages as they happen, as without this call).
    pub fn allocate(&self, offset: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range past the end of the mapping",
            ));
        }
        loop {
            // SAFETY: allocating blocks of a file we hold open changes no byte of it and no
            // mapping; the range lies inside the file as mapped (checked above).
            let rc = unsafe {
                libc::fallocate(
                    self.fd,
                    libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, e.to_string()))
                }
                _ => return Err(e),
            }
        }
    }

    /// Bytes an unprivileged user may still allocate in the file's filesystem.
    pub fn fs_free_bytes(&self) -> io::Result<u64> {
        // SAFETY: `st` is a plain-old-data out parameter fully written by a successful
        // fstatvfs of a descriptor we own.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::fstatvfs(self.fd, &mut st) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(st.f_bavail as u64 * st.f_frsize as u64)
        }
    }

    /// Gives the pages of `[offset, offset + len)` back to the OS; they read as zeros after.
    /// Best effort: a file system without hole punching just keeps the pages.
    pub fn punch_hole(&self, offset: usize, len: usize) {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > self.len) {
            return;
        }
        // SAFETY: the range lies inside the file (checked above); punching only drops pages,
        // other processes' mappings then see zeros, which the ring's validation tolerates.
        unsafe {
            libc::fallocate(
                self.fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
    }
}

/// What `fstat` says of an open file.
struct FileStat {
    len: usize,
    uid: u32,
    /// Permission bits.
    mode: u32,
    regular: bool,
    /// (device, inode).
    identity: (u64, u64),
}

fn file_stat(fd: RawFd) -> io::Result<FileStat> {
    // SAFETY: `st` is a plain-old-data out parameter fully written by a successful fstat.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    Ok(FileStat {
        len: st.st_size as usize,
        uid: st.st_uid,
        mode: st.st_mode & 0o7777,
        regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        identity: (st.st_dev, st.st_ino),
    })
}

/// A segment is a regular file and this user's alone, as `create` makes it (mode 0600):
/// another user's file, or one that others may read or write (say, planted at a predictable
/// path in `/dev/shm` with mode 0666), would let them read every stream or scribble into it.
fn private(st: &FileStat) -> io::Result<()> {
    let (uid, mode) = (st.uid, st.mode);
    if !st.regular {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file (a directory, device, FIFO or socket); refusing it",
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the file belongs to uid {uid}, not to this user (uid {me}); refusing it"),
        ));
    }
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the file has mode {mode:04o}: other users may read or write it; a segment \
                 must be mode 0600 (as ringcast creates it), refusing it"
            ),
        ));
    }
    Ok(())
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped once, here; `fd` is ours.
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
            libc::close(self.fd);
        }
    }
}

impl Mapping {
    /// Removes `path` if it still names this mapping's file; a path that now names something
    /// else (replaced since it was opened) is left alone, with an error saying so.
    /// (Between the check and the removal only this user or root can swap the name in a
    /// sticky directory such as `/dev/shm`.)
    pub fn unlink(&self, path: &str) -> io::Result<()> {
        let c = cpath(path)?;
        // SAFETY: `st` is a plain-old-data out parameter fully written by a successful lstat;
        // `c` is a valid NUL-terminated string.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::lstat(c.as_ptr(), &mut st) != 0 {
                return Err(io::Error::last_os_error());
            }
            st
        };
        if (st.st_dev, st.st_ino) != self.identity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path no longer names the file this segment was opened from (it was \
                 replaced); leaving it",
            ));
        }
        // SAFETY: `c` is a valid NUL-terminated string.
        if unsafe { libc::unlink(c.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Page size of this machine.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}
