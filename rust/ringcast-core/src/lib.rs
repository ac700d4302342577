//! ringcast-core: per-session byte rings in one shared-memory segment.
//!
//! A [`Segment`] is a file (normally under `/dev/shm`) mapped by every process that uses it.
//! It holds a registry of session slots keyed by (owner, conversation id), one ring per slot,
//! and a table of processes for cross-process wake-ups. One [`Writer`] per session appends;
//! any number of [`Reader`]s, in any process, copy from any absolute byte offset without
//! locks. See `docs/ARCHITECTURE.md` for the protocol.
//!
//! ```no_run
//! use ringcast_core::{Segment, SegmentConfig, SessionState};
//! let seg = Segment::create("/dev/shm/ringcast-doc", SegmentConfig::default()).unwrap();
//! let w = seg.create_or_replace("conv-1", "").unwrap();
//! w.write(b"data: hi\n\n").unwrap();
//! w.finalize(SessionState::Done).unwrap();
//! let mut r = seg.reader("conv-1", "", 0).unwrap();
//! let mut buf = [0u8; 64];
//! r.read_into(&mut buf, None).unwrap();
//! ```
//!
//! # Layers
//! Lowest first; a module uses only modules before it (`ci/check-core-layers.py` fails CI on
//! an upward use or a cycle):
//!
//! sync → backoff → sys → index → seqlock → layout → error → view → ring → notify → registry → stream → segment
//!
//! - `sync`: the only import of atomics (`std`, or `loom` under `--cfg loom`);
//!   `backoff`: bounded spin-then-yield waits.
//! - `sys`: the system calls (`sys/futex.rs` the only `SYS_futex` caller, `sys/mmap.rs` the
//!   only mapping, the robust mutex, datagram sockets, process identity).
//! - `index`: the session index's algorithm (open addressing, keyed hash), generic over its
//!   buckets (heap under loom and proptest, the view in production).
//! - `seqlock`: the lock-free read of one slot's session (generation first), generic over the
//!   slot's words so that loom checks it.
//! - `layout`: the `#[repr(C)]` shared structs and the validated `Geometry`; `error`.
//! - `view`: the typed view of the mapping, the only place that computes an address, with its
//!   safety argument.
//! - `ring`: the ring algorithm, generic over its memory (heap under loom, the view in
//!   production).
//! - `notify`: publishing changes and waiting for them (futex words, notifier sockets).
//! - `registry`: sessions in slots: allocation, install, end, recovery, lookups, reader counts.
//! - `stream`: `Writer` and `Reader`; `segment`: the public `Segment` facade.

pub mod index;
pub mod ring;
#[cfg_attr(loom, allow(dead_code))]
pub(crate) mod seqlock;
pub(crate) mod sync;

#[cfg(not(loom))]
mod backoff;
#[cfg(not(loom))]
mod error;
#[cfg(not(loom))]
pub mod layout;
#[cfg(not(loom))]
mod notify;
#[cfg(not(loom))]
mod registry;
#[cfg(not(loom))]
mod segment;
#[cfg(not(loom))]
mod stream;
#[cfg(not(loom))]
mod sys;
#[cfg(not(loom))]
mod view;

#[cfg(not(loom))]
pub use error::{EndReason, Error, Result, SegmentError};
#[cfg(not(loom))]
pub use layout::{arm_state, LAYOUT_VERSION, MAX_PROCESSES};
#[cfg(not(loom))]
pub use notify::Notifier;
#[cfg(not(loom))]
pub use registry::{Quota, SessionInfo, SessionState};
#[cfg(not(loom))]
pub use segment::{Segment, SegmentConfig, SegmentStats};
#[cfg(not(loom))]
pub use stream::{Poll, ProducerCheck, Reader, Wake, Writer};
#[cfg(not(loom))]
pub use sys::process::{unix_nanos, ProcessId};
