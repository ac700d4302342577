//! A non-blocking eventfd: the one readable descriptor an event loop watches per process.

use std::io;
use std::os::unix::io::RawFd;

#[derive(Debug)]
pub struct EventFd(RawFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no pointer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(EventFd(fd))
        }
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }

    /// Makes the descriptor readable (adds 1 to its counter).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one`, which lives across the call. A full counter
        // (EAGAIN) already means "readable", so the result needs no handling.
        unsafe { libc::write(self.0, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Resets the counter so the descriptor is no longer readable.
    pub fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.0, &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}
