//! A process-shared *robust* pthread mutex living in the segment.
//!
//! Robust means the kernel tracks the owner through its robust-futex list: if the owner dies
//! at any instruction while holding the lock, the next `lock` returns `EOWNERDEAD` instead of
//! blocking forever, and that caller repairs the protected state before marking it consistent.

use std::io;

/// Bytes reserved in the segment header for the mutex.
pub const MUTEX_BYTES: usize = 64;
const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= MUTEX_BYTES);

/// How a lock was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    /// Normal acquisition.
    Clean,
    /// The previous owner died holding it: the protected data may be half-updated.
    OwnerDied,
}

/// Initialises a mutex in place as process-shared and robust.
///
/// # Safety
/// - `m` points at `MUTEX_BYTES` writable bytes, suitably aligned for `pthread_mutex_t`.
/// - No other process uses the mutex yet (it is being created).
pub unsafe fn init(m: *mut libc::pthread_mutex_t) -> io::Result<()> {
    // SAFETY: the attribute object is initialised before use and destroyed after; `m` is valid
    // and unused by others per this function's contract.
    unsafe {
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        check(libc::pthread_mutexattr_init(&mut attr))?;
        let r = (|| {
            check(libc::pthread_mutexattr_setpshared(
                &mut attr,
                libc::PTHREAD_PROCESS_SHARED,
            ))?;
            check(libc::pthread_mutexattr_setrobust(
                &mut attr,
                libc::PTHREAD_MUTEX_ROBUST,
            ))?;
            check(libc::pthread_mutex_init(m, &attr))
        })();
        libc::pthread_mutexattr_destroy(&mut attr);
        r
    }
}

/// Locks the mutex.
///
/// # Safety
/// `m` points at a mutex initialised by [`init`] inside a live mapping.
pub unsafe fn lock(m: *mut libc::pthread_mutex_t) -> io::Result<Locked> {
    // SAFETY: per contract, `m` is an initialised process-shared mutex.
    let rc = unsafe { libc::pthread_mutex_lock(m) };
    match rc {
        0 => Ok(Locked::Clean),
        libc::EOWNERDEAD => Ok(Locked::OwnerDied),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Marks the state protected by a mutex obtained with [`Locked::OwnerDied`] as repaired.
///
/// # Safety
/// `m` is locked by the calling thread, obtained with `Locked::OwnerDied`.
pub unsafe fn make_consistent(m: *mut libc::pthread_mutex_t) -> io::Result<()> {
    // SAFETY: per contract.
    check(unsafe { libc::pthread_mutex_consistent(m) })
}

/// Unlocks the mutex.
///
/// # Safety
/// `m` is locked by the calling thread.
pub unsafe fn unlock(m: *mut libc::pthread_mutex_t) {
    // SAFETY: per contract.
    unsafe { libc::pthread_mutex_unlock(m) };
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}
