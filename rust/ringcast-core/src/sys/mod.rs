//! Thin, audited wrappers over the Linux system calls the core needs. Everything `libc` is
//! called from here and nowhere else.

pub(crate) mod dgram;
pub(crate) mod futex;
pub(crate) mod mmap;
pub(crate) mod process;
pub(crate) mod robust_mutex;
