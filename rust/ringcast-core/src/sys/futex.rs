//! The only place that calls `SYS_futex`.
//!
//! The words live in a `MAP_SHARED` file mapping, so the *shared* (not `FUTEX_PRIVATE_FLAG`)
//! operations are used: the kernel keys them by inode and offset, and a waiter in one process
//! is woken by a waker in another.

use crate::sync::AtomicU32;
use std::time::Duration;

/// Outcome of [`wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Woken (or the value already differed, or a signal arrived): re-check the condition.
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// Sleeps while `*word == expected`, at most `timeout` (`None` = no limit).
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> WaitOutcome {
    let ts;
    let ts_ptr = match timeout {
        Some(d) => {
            ts = libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            };
            &ts as *const libc::timespec
        }
        None => std::ptr::null(),
    };
    // SAFETY: `word` is a live reference to a 4-byte aligned u32 (AtomicU32 guarantees both),
    // so the kernel reads a valid address; `ts_ptr` is null or points at `ts`, which outlives
    // the call. FUTEX_WAIT does not write through either pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT) {
        WaitOutcome::TimedOut
    } else {
        // EAGAIN (value changed), EINTR and real wakes all mean "look again".
        WaitOutcome::Woken
    }
}

/// Wakes up to `count` waiters sleeping on `word`; returns how many were woken.
pub fn wake(word: &AtomicU32, count: u32) -> usize {
    let n = count.min(i32::MAX as u32);
    // SAFETY: as in `wait`, `word` is a valid aligned u32; FUTEX_WAKE only uses the address as
    // a key and never dereferences the remaining (null) arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    rc.max(0) as usize
}
