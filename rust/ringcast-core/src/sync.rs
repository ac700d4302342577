//! The only place atomics are imported from: `std` normally, `loom` under `--cfg loom`, so the
//! ring and index protocols can be model-checked with the very code that runs in production.
//! Process-local flags and counters (`AtomicBool`, a static token counter) come from here too:
//! no other module names `std::sync::atomic`.

// Under loom only the ring, the index and the slot seqlock are compiled, which need no
// AtomicBool.
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering,
};

/// Lets other threads run (a reader retrying behind a writer); loom's, under loom.
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;
