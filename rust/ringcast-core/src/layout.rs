//! The segment's on-file layout: `#[repr(C)]` structs that hold offsets and atomics, never
//! pointers, with compile-time size and alignment checks.
//!
//! ```text
//! 0                 header (constants, robust registry lock)          1 page
//! procs_offset      ProcEntry × MAX_PROCESSES (liveness, wake-ups)    128 B each
//! counts_offset     reader counts: AtomicU64 × MAX_PROCESSES × slots  row per process
//! slots_offset      SlotMeta + id bytes + owner bytes, × slots         slot_stride each
//! index_offset      session index: AtomicU64 × index_buckets           (see `index`)
//! rings_offset      ring bytes, × slots                                ring_stride each (pages)
//! ```
//! Only the header's constants are read without atomics, once, at open; they are copied into a
//! [`Geometry`] that is validated (every region inside the file, no overflow) before any other
//! offset is computed from it.

use crate::sync::{AtomicU32, AtomicU64};
use crate::sys::robust_mutex::MUTEX_BYTES;

pub const MAGIC: [u8; 8] = *b"RINGCAST";
/// Bumped on every incompatible change of anything in this file (4: the session index, free
/// stack and finished list; 5: owner lists and four index buckets per slot).
pub const LAYOUT_VERSION: u32 = 6;
/// Processes that may hold readers or a notifier at once (one bit each in a session's mask).
pub const MAX_PROCESSES: usize = 64;
/// Longest owner (tenant) tag, in bytes.
pub const MAX_OWNER_LEN: usize = 128;
/// Bounds accepted at creation.
pub const MIN_ID_LEN: u32 = 256;
pub const MAX_ID_LEN: u32 = 64 * 1024;
pub const MAX_SESSIONS: u32 = 1 << 20;

/// Which registry list holds a slot, as stored in `SlotMeta::list`.
pub mod list {
    /// On no list: a live running session, an INIT slot, or a slot never used.
    pub const NONE: u32 = 0;
    /// On the free stack (`RegistryHead::free_head`).
    pub const FREE: u32 = 1;
    /// On the list of finished sessions, least recently used first (`RegistryHead::lru_head`).
    pub const FINISHED: u32 = 2;
}

/// Session states as stored in `SlotMeta::state`.
pub mod state {
    pub const FREE: u32 = 0;
    /// Being set up under the registry lock; freed by recovery if its creator died.
    pub const INIT: u32 = 1;
    pub const RUNNING: u32 = 2;
    pub const DONE: u32 = 3;
    pub const CANCELLED: u32 = 4;
    pub const FAILED: u32 = 5;
}

/// Why a session left its slot, as stored in `SlotMeta::last_end` (low 8 bits).
pub mod end_reason {
    pub const CANCELLED: u8 = 1;
    pub const REPLACED: u8 = 2;
    pub const EVICTED: u8 = 3;
}

/// The fixed part of the header; the robust mutex follows at `LOCK_OFFSET`.
#[repr(C)]
pub struct HeaderConsts {
    pub magic: [u8; 8],
    pub layout_version: u32,
    pub max_sessions: u32,
    pub max_id_len: u32,
    pub page_size: u32,
    pub session_bytes: u64,
    pub slot_stride: u64,
    pub ring_stride: u64,
    pub procs_offset: u64,
    pub counts_offset: u64,
    pub slots_offset: u64,
    pub rings_offset: u64,
    pub file_bytes: u64,
    pub epoch: u64,
    pub created_at_ns: u64,
    /// Written last at creation: a segment whose creator died mid-way is never opened.
    pub ready: AtomicU32,
    pub _reserved: u32,
    // Added in layout 4, after the fields older tools poke at.
    pub index_offset: u64,
    pub index_buckets: u64,
    /// Key of the index's keyed hash (from `getrandom` at creation; never leaves the file).
    pub hash_key: [u64; 2],
}
const _: () = assert!(std::mem::size_of::<HeaderConsts>() <= LOCK_OFFSET);
pub const LOCK_OFFSET: usize = 256;
/// Source of generations (u64, bumped under the registry lock): a generation names one
/// session in the whole segment, not just within its slot.
pub const GENERATION_OFFSET: usize = LOCK_OFFSET + MUTEX_BYTES;
/// Set in a slot's `generation` once its session began to leave (see `seqlock`).
pub use crate::seqlock::ENDED_BIT;
/// Where the [`RegistryHead`] lives in the header page.
pub const REGISTRY_OFFSET: usize = 512;
pub const HEADER_BYTES: usize = 4096;
const _: () = assert!(GENERATION_OFFSET + 8 <= REGISTRY_OFFSET);
const _: () = assert!(REGISTRY_OFFSET + std::mem::size_of::<RegistryHead>() <= HEADER_BYTES);

/// The registry's own state, beside the index: written under the registry lock, rebuilt from
/// the slots by a locker that finds it torn (its previous holder died) or damaged. Slot numbers
/// are stored `+ 1`, so 0 means none.
#[repr(C, align(128))]
pub struct RegistryHead {
    /// The index's seqlock word (odd while a removal moves entries; see `index`).
    pub index_version: AtomicU64,
    /// Slots `[0, high_water)` have held a session at some point; the rest were never touched
    /// (allocation takes the free stack first, so the used part stays dense and small).
    pub high_water: AtomicU32,
    /// Top of the stack of free slots (linked through `SlotMeta::next`).
    pub free_head: AtomicU32,
    /// Least and most recently used finished sessions (linked through `prev` / `next`).
    pub lru_head: AtomicU32,
    pub lru_tail: AtomicU32,
    /// Sessions installed (running or finished), and how many of them are finished.
    pub live: AtomicU32,
    pub finished: AtomicU32,
    /// Times the registry was rebuilt from its slots (a dead lock holder or damage found).
    pub rebuilds: AtomicU64,
    /// Finished sessions evicted by creates that found the table full.
    pub lru_evictions: AtomicU64,
    /// Set by a lock-free reader that saw the index disagree with a slot: the next locker
    /// rebuilds.
    pub damaged: AtomicU32,
    /// A second copy of `high_water`: the larger of the two counts, so one scribbled word
    /// cannot hide sessions from a rebuild (which scans only the slots ever used).
    pub high_water_copy: AtomicU32,
}
const _: () = assert!(std::mem::size_of::<RegistryHead>() == 128);

/// One process's row (one per segment handle): who owns it, and how to wake its event loop
/// (see `notify`). Written by its owner, except `armed`, which producers move to SENDING and IDLE.
#[repr(C, align(128))]
pub struct ProcEntry {
    /// Owner pid; 0 = free.
    pub pid: AtomicU32,
    /// The owner's notifier state (`arm_state`): ARMED = it must be sent a datagram to notice
    /// the next change; a producer that moves it ARMED -> SENDING sends one, then moves it
    /// SENDING -> IDLE. IDLE = a datagram was sent since the last arm (or there is no notifier).
    pub armed: AtomicU32,
    pub start_time: AtomicU64,
    /// Random part of the owner's notifier socket name (untrusted, like all segment data):
    /// `"\0ringcast-<epoch:016x>-<row>-<nonce:016x>"`. Stored before `armed` is first set.
    pub wake_nonce: AtomicU64,
}
const _: () = assert!(std::mem::size_of::<ProcEntry>() == 128);

/// Values of `ProcEntry::armed`.
pub mod arm_state {
    /// A datagram was sent since the owner last armed (or the row has no notifier).
    pub const IDLE: u32 = 0;
    /// The next change must be signalled with a datagram.
    pub const ARMED: u32 = 1;
    /// A producer took the arm and its datagram is on the way (or it died sending).
    pub const SENDING: u32 = 2;
}

/// One session slot's metadata. Three 128-byte lines: what the producer writes on every append,
/// what readers write, and what the registry writes under its lock. The id and owner bytes
/// follow the struct inside the slot's stride.
#[repr(C, align(128))]
pub struct SlotMeta {
    // --- line 0: producer-hot ---
    /// Published end of the stream (every byte ever appended and complete).
    pub cursor: AtomicU64,
    /// End of the bytes being written; see `ring`.
    pub head: AtomicU64,
    pub last_write_ns: AtomicU64,
    /// Producer lock of a single append: `pid | start_time_low32 << 32`, 0 = idle.
    pub busy: AtomicU64,
    /// Futex word: bumped after every publish and state change.
    pub seq: AtomicU32,
    pub _pad0: [u32; 23],
    // --- line 1: reader-written ---
    /// Bit `i`: a thread of process entry `i` is blocked (or about to block) in `futex_wait`
    /// on `seq`. A bit, not a count, so that a process killed while waiting leaves a mark
    /// that is its own: the next process to claim its entry clears it (`Registry::proc_index`).
    pub waiting: AtomicU64,
    /// Bit `i`: process entry `i` has a notifier subscription to this slot.
    pub subscribers: AtomicU64,
    pub last_access_ns: AtomicU64,
    pub _pad1b: [u64; 13],
    // --- line 2: registry, written under the lock ---
    pub state: AtomicU32,
    pub cancel: AtomicU32,
    /// The installed session's segment-wide generation; `| ENDED_BIT` once it left.
    pub generation: AtomicU64,
    /// `generation << 8 | reason` of the last session that left this slot.
    pub last_end: AtomicU64,
    pub id_hash: AtomicU64,
    pub id_len: AtomicU32,
    pub owner_len: AtomicU32,
    pub producer_pid: AtomicU32,
    pub _pad2: u32,
    pub producer_start: AtomicU64,
    pub started_at_ns: AtomicU64,
    pub completed_at_ns: AtomicU64,
    /// Identity of the one Writer handle allowed to append (set at create, adopt, take-over).
    pub producer_token: AtomicU64,
    /// The index bucket holding this live session's entry.
    pub index_pos: AtomicU32,
    /// Which registry list the slot is on (`list::*`), and its neighbours there (slot + 1).
    pub list: AtomicU32,
    pub prev: AtomicU32,
    pub next: AtomicU32,
    /// When the slot joined the finished list's tail: a reader attaching later
    /// (`last_access_ns` newer) earns it a second chance before LRU eviction.
    pub queued_at_ns: AtomicU64,
    /// Neighbours (slot + 1) on the list of this owner's live sessions, newest first; the
    /// head's is named by the owner's index entry, at bucket `owner_pos`.
    pub owner_prev: AtomicU32,
    pub owner_next: AtomicU32,
    pub owner_pos: AtomicU32,
    pub _pad2b: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<SlotMeta>() == 384);
const _: () = assert!(std::mem::align_of::<SlotMeta>() == 128);

/// Validated sizes and offsets of one segment, copied out of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub max_sessions: u32,
    pub max_id_len: u32,
    pub page_size: u32,
    pub session_bytes: u64,
    pub slot_stride: u64,
    pub ring_stride: u64,
    pub procs_offset: u64,
    pub counts_offset: u64,
    pub slots_offset: u64,
    pub index_offset: u64,
    pub index_buckets: u64,
    pub rings_offset: u64,
    pub file_bytes: u64,
}

fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl Geometry {
    /// Computes the layout for new parameters; `None` on overflow.
    pub fn compute(
        max_sessions: u32,
        session_bytes: u64,
        max_id_len: u32,
        page: u32,
    ) -> Option<Geometry> {
        let page64 = page as u64;
        let n = max_sessions as u64;
        let procs_offset = HEADER_BYTES as u64;
        let counts_offset = procs_offset + (MAX_PROCESSES * 128) as u64;
        let counts_bytes = n.checked_mul(MAX_PROCESSES as u64 * 8)?;
        let slots_offset = round_up(counts_offset.checked_add(counts_bytes)?, 128)?;
        let slot_stride = round_up(
            std::mem::size_of::<SlotMeta>() as u64 + max_id_len as u64 + MAX_OWNER_LEN as u64,
            128,
        )?;
        let index_offset = round_up(
            slots_offset.checked_add(slot_stride.checked_mul(n)?)?,
            page64,
        )?;
        let index_buckets = crate::index::buckets_for(max_sessions);
        let rings_offset = round_up(index_offset.checked_add(index_buckets * 8)?, page64)?;
        let ring_stride = round_up(session_bytes, page64)?;
        let file_bytes = rings_offset.checked_add(ring_stride.checked_mul(n)?)?;
        if file_bytes > isize::MAX as u64 {
            return None;
        }
        Some(Geometry {
            max_sessions,
            max_id_len,
            page_size: page,
            session_bytes,
            slot_stride,
            ring_stride,
            procs_offset,
            counts_offset,
            slots_offset,
            index_offset,
            index_buckets,
            rings_offset,
            file_bytes,
        })
    }

    /// Reads and validates the header constants; the error says what is wrong.
    pub fn from_header(h: &HeaderConsts, file_len: u64) -> Result<Geometry, String> {
        if h.magic != MAGIC {
            return Err("not a ringcast segment (bad magic)".into());
        }
        if h.layout_version != LAYOUT_VERSION {
            return Err(format!(
                "segment layout version {} but this build reads version {LAYOUT_VERSION}; \
                 stop the processes using it and create a new segment",
                h.layout_version
            ));
        }
        if !(MIN_ID_LEN..=MAX_ID_LEN).contains(&h.max_id_len)
            || h.max_sessions == 0
            || h.max_sessions > MAX_SESSIONS
            || h.session_bytes == 0
            || !h.page_size.is_power_of_two()
            || h.page_size < 4096
        {
            return Err("segment header holds impossible sizes (corrupt?)".into());
        }
        let g = Geometry::compute(h.max_sessions, h.session_bytes, h.max_id_len, h.page_size)
            .ok_or("segment header sizes overflow (corrupt?)")?;
        let stored = Geometry {
            slot_stride: h.slot_stride,
            ring_stride: h.ring_stride,
            procs_offset: h.procs_offset,
            counts_offset: h.counts_offset,
            slots_offset: h.slots_offset,
            index_offset: h.index_offset,
            index_buckets: h.index_buckets,
            rings_offset: h.rings_offset,
            file_bytes: h.file_bytes,
            ..g
        };
        if stored != g {
            return Err("segment header offsets disagree with its sizes (corrupt?)".into());
        }
        if file_len < g.file_bytes {
            return Err(format!(
                "segment file is {file_len} bytes but its header needs {} (truncated?)",
                g.file_bytes
            ));
        }
        Ok(g)
    }
}
