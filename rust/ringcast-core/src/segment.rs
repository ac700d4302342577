//! The segment: mapping, header validation, the session registry and per-process state.
//!
//! Registry changes (create, replace, adopt, evict) take the robust registry lock; reads never
//! lock. Lock-free lookups read a slot's metadata between two loads of its `state` and
//! `generation`, and only trust what did not change in between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{EndReason, Error, Result, SegmentError};
use crate::layout::{
    end_reason, state, Geometry, HeaderConsts, ProcEntry, SlotMeta, ENDED_BIT, GENERATION_OFFSET,
    HINT_OFFSET, LAYOUT_VERSION, LOCK_OFFSET, MAGIC, MAX_ID_LEN, MAX_OWNER_LEN, MAX_PROCESSES,
    MAX_SESSIONS, MIN_ID_LEN,
};
use crate::notify::{self, Notifier};
use crate::ring::{self, Cursors, RingBytes};
use crate::stream::{Reader, Writer};
use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};
use crate::sys::mmap::{self, Mapping};
use crate::sys::process::{self, ProcessId};
use crate::sys::robust_mutex::{self, Locked};

/// Parameters of a new segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentConfig {
    pub max_sessions: u32,
    pub session_bytes: u64,
    pub max_id_len: u32,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            max_sessions: 1024,
            session_bytes: 4 << 20,
            max_id_len: 256,
        }
    }
}

/// Public state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Running,
    Done,
    Cancelled,
    Failed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Done => "done",
            SessionState::Cancelled => "cancelled",
            SessionState::Failed => "failed",
        }
    }
    pub(crate) fn from_raw(s: u32) -> Option<SessionState> {
        match s {
            state::RUNNING => Some(SessionState::Running),
            state::DONE => Some(SessionState::Done),
            state::CANCELLED => Some(SessionState::Cancelled),
            state::FAILED => Some(SessionState::Failed),
            _ => None,
        }
    }
    pub(crate) fn raw(self) -> u32 {
        match self {
            SessionState::Running => state::RUNNING,
            SessionState::Done => state::DONE,
            SessionState::Cancelled => state::CANCELLED,
            SessionState::Failed => state::FAILED,
        }
    }
}

/// A consistent snapshot of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub conversation_id: String,
    pub owner: String,
    pub state: SessionState,
    pub total_bytes: u64,
    pub first_available: u64,
    pub started_at_ns: u64,
    pub completed_at_ns: u64,
    pub last_write_ns: u64,
    pub last_access_ns: u64,
    pub producer: ProcessId,
    pub producer_alive: bool,
    pub readers: u32,
    pub generation: u64,
    pub slot: u32,
}

/// Whole-segment figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentStats {
    pub max_sessions: u32,
    pub session_bytes: u64,
    pub max_id_len: u32,
    pub epoch: u64,
    pub sessions_used: u32,
    pub bytes_buffered: u64,
    pub file_bytes: u64,
    pub resident_bytes: u64,
}

/// Why one attempt to open a segment failed.
enum Opening {
    /// Empty file or header not written yet: maybe being created right now.
    Unfinished(&'static str),
    Failed(Error),
}

/// A handle on a mapped segment. Cheap to clone; the mapping lives while any handle,
/// reader or writer does.
#[derive(Clone)]
pub struct Segment {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) map: Arc<Mapping>,
    pub(crate) geo: Geometry,
    pub(crate) path: String,
    pub(crate) epoch: u64,
    /// Set by `close`: every handle of this mapping refuses further use.
    closed: std::sync::atomic::AtomicBool,
    local: Mutex<Local>,
}

/// This process's private bookkeeping for the segment.
#[derive(Default)]
struct Local {
    pid: u32,
    proc_index: Option<usize>,
    /// Readers this process holds, per (slot, generation); mirrored into its counts row.
    readers: HashMap<(u32, u64), u32>,
    notifier: Option<Arc<Notifier>>,
}

/// A view of one slot's ring bytes inside the mapping.
pub(crate) struct MappedRing<'a> {
    base: *mut u8,
    cap: u64,
    _seg: &'a Inner,
}

impl RingBytes for MappedRing<'_> {
    fn capacity(&self) -> u64 {
        self.cap
    }
    fn store(&self, pos: usize, src: &[u8]) {
        assert!(pos as u64 + src.len() as u64 <= self.cap);
        // SAFETY: the range lies inside this slot's ring (asserted above; the ring region was
        // bounds-checked against the mapping at open). Readers tolerate concurrent stores.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(pos), src.len()) }
    }
    fn load(&self, pos: usize, dst: &mut [u8]) {
        assert!(pos as u64 + dst.len() as u64 <= self.cap);
        // SAFETY: as in `store`; a torn copy is detected and discarded by `ring::read`.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(pos), dst.as_mut_ptr(), dst.len()) }
    }
}

/// FNV-1a over owner, a separator, and id: a cheap filter before comparing bytes.
pub(crate) fn id_hash(owner: &[u8], id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.iter().chain(&[0xffu8]).chain(id) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1 // never 0, so a zeroed slot never matches
}

fn seg_err(path: &str, op: &'static str, e: std::io::Error) -> Error {
    Error::Segment(SegmentError::Io {
        path: path.to_string(),
        op,
        source: e,
    })
}

fn invalid(path: &str, why: impl Into<String>) -> Error {
    Error::Segment(SegmentError::Invalid {
        path: path.to_string(),
        why: why.into(),
    })
}

fn new_epoch() -> u64 {
    let mut buf = [0u8; 8];
    if let Ok(bytes) = std::fs::read("/proc/sys/kernel/random/uuid") {
        for (i, b) in bytes.iter().enumerate() {
            buf[i % 8] ^= b.wrapping_mul(i as u8 | 1);
        }
    }
    let t = process::unix_nanos();
    (u64::from_le_bytes(buf) ^ t ^ ((std::process::id() as u64) << 32)) & (u64::MAX >> 11) | 1
}

impl Segment {
    /// Creates a new segment file (fails if `path` exists).
    pub fn create(path: &str, cfg: SegmentConfig) -> Result<Segment> {
        if cfg.max_sessions == 0 || cfg.max_sessions > MAX_SESSIONS {
            return Err(Error::InvalidArgument(format!(
                "max_sessions must be between 1 and {MAX_SESSIONS}, got {}",
                cfg.max_sessions
            )));
        }
        if cfg.session_bytes == 0 || cfg.session_bytes > 1 << 40 {
            return Err(Error::InvalidArgument(format!(
                "session_bytes must be between 1 and 2^40, got {}",
                cfg.session_bytes
            )));
        }
        if !(MIN_ID_LEN..=MAX_ID_LEN).contains(&cfg.max_id_len) {
            return Err(Error::InvalidArgument(format!(
                "max_id_len must be between {MIN_ID_LEN} and {MAX_ID_LEN}, got {}",
                cfg.max_id_len
            )));
        }
        let page = mmap::page_size() as u32;
        let geo = Geometry::compute(cfg.max_sessions, cfg.session_bytes, cfg.max_id_len, page)
            .ok_or_else(|| {
                Error::InvalidArgument("max_sessions × session_bytes is too large".into())
            })?;
        let map = Mapping::create(path, geo.file_bytes as usize)
            .map_err(|e| seg_err(path, "create", e))?;
        let epoch = new_epoch();
        // SAFETY: the mapping is at least HEADER_BYTES long (Geometry puts the procs after it),
        // page aligned, and nobody else can have opened it yet: `ready` is still 0.
        unsafe {
            let h = map.as_ptr() as *mut HeaderConsts;
            std::ptr::write(
                h,
                HeaderConsts {
                    magic: MAGIC,
                    layout_version: LAYOUT_VERSION,
                    max_sessions: geo.max_sessions,
                    max_id_len: geo.max_id_len,
                    page_size: geo.page_size,
                    session_bytes: geo.session_bytes,
                    slot_stride: geo.slot_stride,
                    ring_stride: geo.ring_stride,
                    procs_offset: geo.procs_offset,
                    counts_offset: geo.counts_offset,
                    slots_offset: geo.slots_offset,
                    rings_offset: geo.rings_offset,
                    file_bytes: geo.file_bytes,
                    epoch,
                    created_at_ns: process::unix_nanos(),
                    ready: AtomicU32::new(0),
                    _reserved: 0,
                },
            );
            robust_mutex::init(map.as_ptr().add(LOCK_OFFSET) as *mut libc::pthread_mutex_t)
                .map_err(|e| seg_err(path, "initialise the lock of", e))?;
            // Release: openers that see `ready == 1` (Acquire) see the whole header.
            (*h).ready.store(1, Ordering::Release);
        }
        Ok(Segment::from_parts(map, geo, path, epoch))
    }

    /// Opens an existing segment, validating everything in its header.
    pub fn open(path: &str) -> Result<Segment> {
        // A segment that another process is creating right now is empty, or has no header yet,
        // for a moment: wait for it rather than calling it foreign.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match Segment::open_once(path) {
                Ok(seg) => return Ok(seg),
                Err(Opening::Failed(e)) => return Err(e),
                Err(Opening::Unfinished(why)) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(invalid(path, why));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    fn open_once(path: &str) -> std::result::Result<Segment, Opening> {
        let unfinished = "segment creation never finished (its creator died?); remove the file";
        let blank = "the file is empty or its header is blank: not a ringcast segment, or one \
                     whose creator died before writing it; remove the file";
        let map = match Mapping::open(path) {
            Ok(map) => map,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(Opening::Unfinished(blank))
            }
            Err(e) => return Err(Opening::Failed(seg_err(path, "open", e))),
        };
        if map.len() < crate::layout::HEADER_BYTES {
            return Err(Opening::Failed(invalid(
                path,
                format!("file is {} bytes, too small for a header", map.len()),
            )));
        }
        // SAFETY: the mapping holds at least HEADER_BYTES (checked), which covers HeaderConsts;
        // the struct is plain data plus one atomic, valid for any bit pattern.
        let h = unsafe { &*(map.as_ptr() as *const HeaderConsts) };
        let ready = h.ready.load(Ordering::Acquire) == 1;
        if !ready && h.magic == MAGIC {
            return Err(Opening::Unfinished(unfinished));
        }
        if !ready && h.magic == [0u8; 8] {
            return Err(Opening::Unfinished(blank));
        }
        let geo = Geometry::from_header(h, map.len() as u64)
            .map_err(|why| Opening::Failed(invalid(path, why)))?;
        let epoch = h.epoch;
        Ok(Segment::from_parts(map, geo, path, epoch))
    }

    /// Opens `path` if it is a segment with exactly this configuration, else creates it.
    pub fn open_or_create(path: &str, cfg: SegmentConfig) -> Result<Segment> {
        match Segment::open(path) {
            Ok(seg) => {
                let g = seg.inner.geo;
                if g.max_sessions != cfg.max_sessions
                    || g.session_bytes != cfg.session_bytes
                    || g.max_id_len != cfg.max_id_len
                {
                    return Err(invalid(
                        path,
                        format!(
                            "exists with max_sessions={} session_bytes={} max_id_len={}, not the requested \
                             {} / {} / {}; remove it or ask for the same sizes",
                            g.max_sessions, g.session_bytes, g.max_id_len,
                            cfg.max_sessions, cfg.session_bytes, cfg.max_id_len
                        ),
                    ));
                }
                Ok(seg)
            }
            Err(Error::Segment(SegmentError::Io { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                match Segment::create(path, cfg) {
                    // Another process created it between our open and create: use theirs.
                    Err(Error::Segment(SegmentError::Io { source, .. }))
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Segment::open_or_create(path, cfg)
                    }
                    other => other,
                }
            }
            Err(e) => Err(e),
        }
    }

    fn from_parts(map: Mapping, geo: Geometry, path: &str, epoch: u64) -> Segment {
        Segment {
            inner: Arc::new(Inner {
                map: Arc::new(map),
                geo,
                path: path.to_string(),
                epoch,
                closed: std::sync::atomic::AtomicBool::new(false),
                local: Mutex::new(Local::default()),
            }),
        }
    }

    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// Invalidates this mapping for every handle made from it: later calls fail with
    /// `SegmentError::Closed`. The memory is unmapped when the last handle is dropped.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let mut local = self.inner.local.lock().unwrap_or_else(|p| p.into_inner());
        local.notifier = None;
    }

    /// Fails if the segment was closed.
    pub fn check_open(&self) -> Result<()> {
        self.inner.check_open()
    }
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }
    pub fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    /// Removes the segment file; mapped processes keep their mapping.
    pub fn unlink(&self) -> Result<()> {
        mmap::unlink(&self.inner.path).map_err(|e| seg_err(&self.inner.path, "remove", e))
    }

    pub fn stats(&self) -> SegmentStats {
        let g = &self.inner.geo;
        let mut used = 0;
        let mut buffered = 0;
        for i in 0..g.max_sessions {
            let m = self.inner.slot(i);
            if SessionState::from_raw(m.state.load(Ordering::Acquire)).is_some() {
                used += 1;
                buffered += m.cursor.load(Ordering::Acquire).min(g.session_bytes);
            }
        }
        SegmentStats {
            max_sessions: g.max_sessions,
            session_bytes: g.session_bytes,
            max_id_len: g.max_id_len,
            epoch: self.inner.epoch,
            sessions_used: used,
            bytes_buffered: buffered,
            file_bytes: self.inner.map.file_len().unwrap_or(0) as u64,
            resident_bytes: self.inner.map.resident_bytes(),
        }
    }

    /// Installs a new running session for (owner, id), replacing a live one.
    pub fn create_or_replace(&self, id: &str, owner: &str) -> Result<Writer> {
        self.inner.check_key(id, owner)?;
        let me = ProcessId::current();
        let reg = self.inner.lock()?;
        let mut existing = self.inner.find(id, owner);
        let slot = match reg.alloc() {
            Ok(slot) => slot,
            Err(Error::RegistryFull { .. }) if existing.is_some() => {
                // Full, but the session being replaced frees a slot: end it first. (A crash
                // right here loses the old session, which the caller was replacing anyway.)
                let (old, old_gen) = existing.take().expect("checked above");
                reg.end(old, old_gen, end_reason::REPLACED);
                reg.alloc_waiting()?
            }
            Err(e) => return Err(e),
        };
        let gen = self.inner.install(slot, id, owner, me);
        if let Some((old, old_gen)) = existing {
            reg.end(old, old_gen, end_reason::REPLACED);
        }
        // Release: a lookup that sees RUNNING (Acquire) sees every field written by `install`.
        let writer = Writer::new(self.inner.clone(), slot, gen, me, id, owner);
        self.inner
            .slot(slot)
            .state
            .store(state::RUNNING, Ordering::Release);
        drop(reg);
        Ok(writer)
    }

    /// Becomes the producer of a running session created by another process.
    pub fn adopt(&self, id: &str, owner: &str, generation: u64) -> Result<Writer> {
        self.inner.check_key(id, owner)?;
        let me = ProcessId::current();
        let _reg = self.inner.lock()?;
        let (slot, gen) = match self.inner.find(id, owner) {
            Some(found) => found,
            None => return Err(self.inner.ended_or_missing(id, generation)),
        };
        if gen != generation {
            return Err(Error::Ended(EndReason::Replaced));
        }
        let m = self.inner.slot(slot);
        if m.state.load(Ordering::Acquire) != state::RUNNING {
            return Err(Error::InvalidArgument(format!(
                "session {id:?} is already finished; only a running session can be adopted"
            )));
        }
        m.producer_pid.store(me.pid, Ordering::Release);
        m.producer_start.store(me.start_time, Ordering::Release);
        Ok(Writer::new(self.inner.clone(), slot, gen, me, id, owner))
    }

    /// If the session's producer is dead, becomes its producer (dropping a torn append).
    pub fn take_over_dead(&self, id: &str, owner: &str) -> Result<Option<Writer>> {
        self.inner.check_key(id, owner)?;
        let me = ProcessId::current();
        let _reg = self.inner.lock()?;
        let Some((slot, gen)) = self.inner.find(id, owner) else {
            return Err(Error::NotFound {
                conversation_id: id.to_string(),
            });
        };
        let m = self.inner.slot(slot);
        let producer = ProcessId {
            pid: m.producer_pid.load(Ordering::Acquire),
            start_time: m.producer_start.load(Ordering::Acquire),
        };
        if producer.is_alive() {
            return Ok(None);
        }
        let busy = m.busy.load(Ordering::SeqCst);
        if busy != 0 && !busy_holder_alive(busy) {
            // The dead producer was mid-append. Its torn bytes past `cursor` were never
            // published; `head` keeps counting the range they overwrote as lost.
            m.busy.store(0, Ordering::SeqCst);
        } else if busy != 0 {
            return Ok(None);
        }
        m.producer_pid.store(me.pid, Ordering::Release);
        m.producer_start.store(me.start_time, Ordering::Release);
        Ok(Some(Writer::new(
            self.inner.clone(),
            slot,
            gen,
            me,
            id,
            owner,
        )))
    }

    pub fn get(&self, id: &str, owner: &str) -> Option<SessionInfo> {
        let (slot, gen) = self.inner.find(id, owner)?;
        let alive = self.inner.alive_procs();
        self.inner.snapshot(slot, gen, &alive, &mut HashMap::new())
    }

    /// Every live session, or only `owner`'s.
    pub fn list(&self, owner: Option<&str>) -> Vec<SessionInfo> {
        let alive = self.inner.alive_procs();
        let mut cache = HashMap::new();
        let mut out = Vec::new();
        for slot in 0..self.inner.geo.max_sessions {
            let m = self.inner.slot(slot);
            if SessionState::from_raw(m.state.load(Ordering::Acquire)).is_none() {
                continue;
            }
            let gen = m.generation.load(Ordering::Acquire);
            if let Some(info) = self.inner.snapshot(slot, gen, &alive, &mut cache) {
                if owner.is_none_or(|o| o == info.owner) {
                    out.push(info);
                }
            }
        }
        out.sort_by_key(|i| (i.started_at_ns, i.slot));
        out
    }

    /// The session with exactly `id` plus every one whose id starts with `id + "::"`.
    pub fn lookup_prefix(&self, id: &str, owner: &str) -> Vec<SessionInfo> {
        let prefix = format!("{id}::");
        self.list(Some(owner))
            .into_iter()
            .filter(|i| i.conversation_id == id || i.conversation_id.starts_with(&prefix))
            .collect()
    }

    /// Removes the session; its readers end with `reason`. True if it existed.
    pub fn evict(&self, id: &str, owner: &str, reason: EndReason) -> Result<bool> {
        self.inner.check_key(id, owner)?;
        let reg = self.inner.lock()?;
        Ok(match self.inner.find(id, owner) {
            Some((slot, gen)) => reg.end(slot, gen, reason_code(reason)),
            None => false,
        })
    }

    /// Removes exactly this session if it still has that generation.
    pub fn evict_slot(&self, slot: u32, generation: u64, reason: EndReason) -> Result<bool> {
        if slot >= self.inner.geo.max_sessions {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is out of range (the segment has {} slots)",
                self.inner.geo.max_sessions
            )));
        }
        let reg = self.inner.lock()?;
        Ok(reg.end(slot, generation, reason_code(reason)))
    }

    /// Attaches a reader at an absolute byte offset.
    pub fn reader(&self, id: &str, owner: &str, offset: u64) -> Result<Reader> {
        self.reader_counted(id, owner, offset, true)
    }

    /// `reader`, optionally left out of `SessionInfo::readers`: for a reader that serves other
    /// counted readers (an HTTP process's fan-out pump), which is not a client of its own.
    pub fn reader_counted(
        &self,
        id: &str,
        owner: &str,
        offset: u64,
        counted: bool,
    ) -> Result<Reader> {
        self.inner.check_key(id, owner)?;
        let Some((slot, gen)) = self.inner.find(id, owner) else {
            return Err(Error::NotFound {
                conversation_id: id.to_string(),
            });
        };
        let m = self.inner.slot(slot);
        let first = ring::first_available(&self.inner.cursors(slot), self.inner.geo.session_bytes);
        if offset < first {
            return Err(Error::OffsetLost {
                requested: offset,
                first_available: first,
            });
        }
        m.last_access_ns
            .store(process::unix_nanos(), Ordering::Relaxed);
        if counted {
            self.inner.count_reader(slot, gen, true)?;
        }
        let reader = Reader::new(self.inner.clone(), slot, gen, offset, id, counted);
        // Validate after counting: a session replaced in between is reported as ended.
        if m.generation.load(Ordering::Acquire) != gen {
            return Err(Error::Ended(self.inner.end_reason(slot, gen)));
        }
        Ok(reader)
    }

    /// This handle's notifier (created on first use; one socket per handle, no thread).
    pub fn notifier(&self) -> Result<Arc<Notifier>> {
        self.inner.check_open()?;
        let mut local = self.inner.local()?;
        if let Some(n) = &local.notifier {
            return Ok(n.clone());
        }
        let index = self.inner.proc_index(&mut local)?;
        let n = Arc::new(notify::Notifier::start(
            self.inner.map.clone(),
            self.inner.geo,
            self.inner.epoch,
            index,
        )?);
        local.notifier = Some(n.clone());
        Ok(n)
    }
}

fn reason_code(r: EndReason) -> u8 {
    match r {
        EndReason::Cancelled => end_reason::CANCELLED,
        EndReason::Replaced => end_reason::REPLACED,
        EndReason::Evicted => end_reason::EVICTED,
    }
}

/// Whether the process encoded in a `busy` word (`pid | start_low32 << 32`) still runs.
pub(crate) fn busy_holder_alive(busy: u64) -> bool {
    process::alive_with_start_low32(busy as u32, (busy >> 32) as u32)
}

/// The registry lock, held for the guard's lifetime.
pub(crate) struct Registry<'a> {
    inner: &'a Inner,
}

impl Drop for Registry<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard exists only while this thread holds the lock (see `Inner::lock`).
        unsafe { robust_mutex::unlock(self.inner.lock_ptr()) }
    }
}

impl Registry<'_> {
    /// Picks a free slot nobody is still appending to and marks it INIT.
    fn alloc(&self) -> Result<u32> {
        let inner = self.inner;
        let n = inner.geo.max_sessions;
        let hint = inner.hint().load(Ordering::Relaxed) % n;
        for k in 0..n {
            let slot = (hint + k) % n;
            let m = inner.slot(slot);
            if m.state.load(Ordering::Acquire) != state::FREE {
                continue;
            }
            // SeqCst pairs with the producer's SeqCst CAS of `busy` followed by its load of
            // `generation`: either we see it busy, or it sees the generation bump of the free.
            let busy = m.busy.load(Ordering::SeqCst);
            if busy != 0 {
                if busy_holder_alive(busy) {
                    continue;
                }
                m.busy.store(0, Ordering::SeqCst);
            }
            m.state.store(state::INIT, Ordering::SeqCst);
            inner.hint().store(slot + 1, Ordering::Relaxed);
            return Ok(slot);
        }
        Err(Error::RegistryFull { max_sessions: n })
    }

    /// Like `alloc`, but waits (briefly) for an append still in flight on a freed slot.
    fn alloc_waiting(&self) -> Result<u32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match self.alloc() {
                Err(Error::RegistryFull { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now()
                }
                other => return other,
            }
        }
    }

    /// Ends the session in `slot` if it is still `gen`: readers and the producer see it gone.
    fn end(&self, slot: u32, gen: u64, reason: u8) -> bool {
        let inner = self.inner;
        let m = inner.slot(slot);
        let s = m.state.load(Ordering::Acquire);
        if SessionState::from_raw(s).is_none() || m.generation.load(Ordering::Acquire) != gen {
            return false;
        }
        if reason == end_reason::CANCELLED || reason == end_reason::REPLACED {
            m.cancel.store(1, Ordering::SeqCst);
        }
        m.last_end.store(gen << 8 | reason as u64, Ordering::SeqCst);
        m.generation.store(gen | ENDED_BIT, Ordering::SeqCst);
        self.free_ended(slot);
        true
    }

    /// The last steps of `end`, once the generation is marked ended: free the slot, tell its
    /// readers (their wait ends) and give its pages back. Recovery repeats them for an `end`
    /// cut short.
    fn free_ended(&self, slot: u32) {
        let inner = self.inner;
        let m = inner.slot(slot);
        m.state.store(state::FREE, Ordering::SeqCst);
        notify::publish(inner.map.as_ptr(), &inner.geo, inner.epoch, m);
        inner.release_pages(slot);
    }

    /// After a lock holder died: undo what it can have left half done.
    fn recover(&self) {
        let inner = self.inner;
        for slot in 0..inner.geo.max_sessions {
            let m = inner.slot(slot);
            match m.state.load(Ordering::Acquire) {
                state::INIT => {
                    let gen = m.generation.load(Ordering::Acquire);
                    m.last_end
                        .store(gen << 8 | end_reason::EVICTED as u64, Ordering::SeqCst);
                    m.generation.store(gen | ENDED_BIT, Ordering::SeqCst);
                    m.state.store(state::FREE, Ordering::SeqCst);
                    inner.release_pages(slot);
                }
                state::FREE => inner.release_pages(slot),
                _ if m.generation.load(Ordering::Acquire) & ENDED_BIT != 0 => {
                    // Died inside `end`, between marking the generation ended and freeing the
                    // slot: finish the job, so the session is not listed as live.
                    self.free_ended(slot);
                }
                _ => {}
            }
        }
    }
}

impl Inner {
    fn lock_ptr(&self) -> *mut libc::pthread_mutex_t {
        // SAFETY: LOCK_OFFSET + MUTEX_BYTES lies inside the header page, inside the mapping.
        unsafe { self.map.as_ptr().add(LOCK_OFFSET) as *mut libc::pthread_mutex_t }
    }

    fn hint(&self) -> &AtomicU32 {
        // SAFETY: HINT_OFFSET is inside the header page, 4-byte aligned; an AtomicU32 is valid
        // for any bit pattern.
        unsafe { &*(self.map.as_ptr().add(HINT_OFFSET) as *const AtomicU32) }
    }

    fn generation_counter(&self) -> &AtomicU64 {
        // SAFETY: GENERATION_OFFSET is inside the header page and 8-byte aligned; an AtomicU64
        // is valid for any bit pattern.
        unsafe { &*(self.map.as_ptr().add(GENERATION_OFFSET) as *const AtomicU64) }
    }

    pub(crate) fn lock(&self) -> Result<Registry<'_>> {
        self.check_open()?;
        // SAFETY: the mutex was initialised at creation (`ready` was 1 when we opened).
        let how = unsafe { robust_mutex::lock(self.lock_ptr()) }
            .map_err(|e| seg_err(&self.path, "lock the registry of", e))?;
        let reg = Registry { inner: self };
        if how == Locked::OwnerDied {
            reg.recover();
            // SAFETY: we hold the lock, obtained with EOWNERDEAD, and repaired the registry.
            unsafe { robust_mutex::make_consistent(self.lock_ptr()) }
                .map_err(|e| seg_err(&self.path, "repair the registry of", e))?;
        }
        Ok(reg)
    }

    /// Slot metadata; panics on an out-of-range index (a bug of ours, never segment data).
    pub(crate) fn slot(&self, slot: u32) -> &SlotMeta {
        assert!(slot < self.geo.max_sessions, "slot index out of range");
        let off = self.geo.slots_offset + slot as u64 * self.geo.slot_stride;
        // SAFETY: `off + slot_stride <= rings_offset <= file_bytes <= mapping length` by the
        // validated geometry; slots_offset and slot_stride are multiples of 128, the struct's
        // alignment; every field is an atomic or padding, valid for any bit pattern.
        unsafe { &*(self.map.as_ptr().add(off as usize) as *const SlotMeta) }
    }

    pub(crate) fn proc_entry(&self, index: usize) -> &ProcEntry {
        proc_entry(self.map.as_ptr(), &self.geo, index)
    }

    fn count_cell(&self, proc_index: usize, slot: u32) -> &AtomicU64 {
        assert!(proc_index < MAX_PROCESSES && slot < self.geo.max_sessions);
        let off = self.geo.counts_offset
            + (proc_index as u64 * self.geo.max_sessions as u64 + slot as u64) * 8;
        // SAFETY: inside the counts region (indices asserted), 8-byte aligned (counts_offset is
        // 128-aligned); AtomicU64 is valid for any bit pattern.
        unsafe { &*(self.map.as_ptr().add(off as usize) as *const AtomicU64) }
    }

    pub(crate) fn ring(&self, slot: u32) -> MappedRing<'_> {
        assert!(slot < self.geo.max_sessions);
        let off = self.geo.rings_offset + slot as u64 * self.geo.ring_stride;
        // SAFETY: the ring region of `slot` lies within the validated file length.
        let base = unsafe { self.map.as_ptr().add(off as usize) };
        MappedRing {
            base,
            cap: self.geo.session_bytes,
            _seg: self,
        }
    }

    pub(crate) fn cursors(&self, slot: u32) -> Cursors<'_> {
        let m = self.slot(slot);
        Cursors {
            cursor: &m.cursor,
            head: &m.head,
        }
    }

    fn release_pages(&self, slot: u32) {
        let off = self.geo.rings_offset + slot as u64 * self.geo.ring_stride;
        self.map
            .punch_hole(off as usize, self.geo.ring_stride as usize);
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Segment(SegmentError::Closed));
        }
        Ok(())
    }

    fn check_key(&self, id: &str, owner: &str) -> Result<()> {
        self.check_open()?;
        if id.is_empty() {
            return Err(Error::InvalidArgument(
                "conversation id must not be empty".into(),
            ));
        }
        if id.len() > self.geo.max_id_len as usize {
            return Err(Error::InvalidArgument(format!(
                "conversation id is {} bytes; this segment allows at most {}",
                id.len(),
                self.geo.max_id_len
            )));
        }
        if owner.len() > MAX_OWNER_LEN {
            return Err(Error::InvalidArgument(format!(
                "owner tag is {} bytes; at most {MAX_OWNER_LEN} are allowed",
                owner.len()
            )));
        }
        Ok(())
    }

    /// Copies the id and owner of `slot`, bounds-checking the stored lengths.
    fn read_key(&self, slot: u32) -> Option<(Vec<u8>, Vec<u8>)> {
        let m = self.slot(slot);
        let id_len = m.id_len.load(Ordering::Acquire) as usize;
        let owner_len = m.owner_len.load(Ordering::Acquire) as usize;
        if id_len > self.geo.max_id_len as usize || owner_len > MAX_OWNER_LEN {
            return None;
        }
        let base = m as *const SlotMeta as *const u8;
        let mut id = vec![0u8; id_len];
        let mut owner = vec![0u8; owner_len];
        // SAFETY: the id and owner areas follow SlotMeta inside this slot's stride
        // (`slot_stride >= size_of::<SlotMeta>() + max_id_len + MAX_OWNER_LEN`), and both
        // lengths were bounds-checked above. Torn copies are caught by the caller's recheck.
        unsafe {
            let id_at = base.add(std::mem::size_of::<SlotMeta>());
            std::ptr::copy_nonoverlapping(id_at, id.as_mut_ptr(), id_len);
            let owner_at = id_at.add(self.geo.max_id_len as usize);
            std::ptr::copy_nonoverlapping(owner_at, owner.as_mut_ptr(), owner_len);
        }
        Some((id, owner))
    }

    /// Writes a new session's metadata into an INIT slot; returns its generation.
    fn install(&self, slot: u32, id: &str, owner: &str, me: ProcessId) -> u64 {
        let m = self.slot(slot);
        // Under the registry lock, so a plain load/store pair is a unique increment.
        let counter = self.generation_counter();
        let gen = (counter.load(Ordering::Acquire) + 1) & !ENDED_BIT;
        counter.store(gen, Ordering::Release);
        m.generation.store(gen, Ordering::SeqCst);
        // Pairs with the acquire loads of readers: anyone who sees the reset cursors below
        // also sees the new generation and discards what it copied.
        fence(Ordering::Release);
        m.cursor.store(0, Ordering::Release);
        m.head.store(0, Ordering::Release);
        m.cancel.store(0, Ordering::Release);
        let now = process::unix_nanos();
        m.started_at_ns.store(now, Ordering::Relaxed);
        m.completed_at_ns.store(0, Ordering::Relaxed);
        m.last_write_ns.store(now, Ordering::Relaxed);
        m.last_access_ns.store(now, Ordering::Relaxed);
        m.producer_pid.store(me.pid, Ordering::Relaxed);
        m.producer_start.store(me.start_time, Ordering::Relaxed);
        let base = m as *const SlotMeta as *mut u8;
        // SAFETY: bounds as in `read_key`; lengths were checked by `check_key`. The slot is
        // INIT, so lock-free lookups skip it while these bytes change.
        unsafe {
            let id_at = base.add(std::mem::size_of::<SlotMeta>());
            std::ptr::copy_nonoverlapping(id.as_ptr(), id_at, id.len());
            let owner_at = id_at.add(self.geo.max_id_len as usize);
            std::ptr::copy_nonoverlapping(owner.as_ptr(), owner_at, owner.len());
        }
        m.id_len.store(id.len() as u32, Ordering::Relaxed);
        m.owner_len.store(owner.len() as u32, Ordering::Relaxed);
        m.id_hash
            .store(id_hash(owner.as_bytes(), id.as_bytes()), Ordering::Release);
        gen
    }

    /// Finds the live session of (owner, id) without locking.
    pub(crate) fn find(&self, id: &str, owner: &str) -> Option<(u32, u64)> {
        let h = id_hash(owner.as_bytes(), id.as_bytes());
        for slot in 0..self.geo.max_sessions {
            let m = self.slot(slot);
            if m.id_hash.load(Ordering::Relaxed) != h {
                continue;
            }
            let s1 = m.state.load(Ordering::Acquire);
            if SessionState::from_raw(s1).is_none() {
                continue;
            }
            let g1 = m.generation.load(Ordering::Acquire);
            let key = self.read_key(slot);
            fence(Ordering::Acquire);
            let g2 = m.generation.load(Ordering::Acquire);
            let s2 = m.state.load(Ordering::Acquire);
            if g1 != g2 || SessionState::from_raw(s2).is_none() {
                continue;
            }
            if let Some((kid, kowner)) = key {
                if kid == id.as_bytes() && kowner == owner.as_bytes() {
                    return Some((slot, g1));
                }
            }
        }
        None
    }

    fn ended_or_missing(&self, id: &str, _generation: u64) -> Error {
        Error::NotFound {
            conversation_id: id.to_string(),
        }
    }

    /// Why the session `gen` left `slot` (evicted if the slot moved on since).
    pub(crate) fn end_reason(&self, slot: u32, gen: u64) -> EndReason {
        let last = self.slot(slot).last_end.load(Ordering::Acquire);
        if last >> 8 != gen & (u64::MAX >> 8) {
            return EndReason::Evicted;
        }
        match last as u8 {
            end_reason::CANCELLED => EndReason::Cancelled,
            end_reason::REPLACED => EndReason::Replaced,
            _ => EndReason::Evicted,
        }
    }

    /// Entries of the process table whose owners run, as a bit mask.
    fn alive_procs(&self) -> u64 {
        let mut mask = 0u64;
        for i in 0..MAX_PROCESSES {
            let e = self.proc_entry(i);
            let pid = e.pid.load(Ordering::Acquire);
            if pid != 0
                && (ProcessId {
                    pid,
                    start_time: e.start_time.load(Ordering::Acquire),
                })
                .is_alive()
            {
                mask |= 1 << i;
            }
        }
        mask
    }

    fn snapshot(
        &self,
        slot: u32,
        gen: u64,
        alive: &u64,
        cache: &mut HashMap<(u32, u64), bool>,
    ) -> Option<SessionInfo> {
        let m = self.slot(slot);
        let s = m.state.load(Ordering::Acquire);
        let st = SessionState::from_raw(s)?;
        if m.generation.load(Ordering::Acquire) != gen {
            return None;
        }
        let (id, owner) = self.read_key(slot)?;
        let total = m.cursor.load(Ordering::Acquire);
        let producer = ProcessId {
            pid: m.producer_pid.load(Ordering::Acquire),
            start_time: m.producer_start.load(Ordering::Acquire),
        };
        let mut readers = 0u32;
        for i in 0..MAX_PROCESSES {
            if alive & (1 << i) != 0 {
                let cell = self.count_cell(i, slot).load(Ordering::Acquire);
                if cell >> 32 == gen & 0xffff_ffff {
                    readers = readers.saturating_add(cell as u32);
                }
            }
        }
        let info = SessionInfo {
            conversation_id: String::from_utf8_lossy(&id).into_owned(),
            owner: String::from_utf8_lossy(&owner).into_owned(),
            state: st,
            total_bytes: total,
            first_available: crate::ring::first_available(
                &self.cursors(slot),
                self.geo.session_bytes,
            ),
            started_at_ns: m.started_at_ns.load(Ordering::Relaxed),
            completed_at_ns: m.completed_at_ns.load(Ordering::Relaxed),
            last_write_ns: m.last_write_ns.load(Ordering::Relaxed),
            last_access_ns: m.last_access_ns.load(Ordering::Relaxed),
            producer,
            producer_alive: *cache
                .entry((producer.pid, producer.start_time))
                .or_insert_with(|| producer.is_alive()),
            readers,
            generation: gen,
            slot,
        };
        fence(Ordering::Acquire);
        if m.generation.load(Ordering::Acquire) != gen {
            return None;
        }
        Some(info)
    }

    fn local(&self) -> Result<MutexGuard<'_, Local>> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let pid = std::process::id();
        if local.pid != pid {
            // First use, or we are a forked child: the parent's entry and notifier are not
            // ours. Dropping the notifier here only closes the child's copy of its socket (a
            // notifier touches shared state only in the process that made it).
            *local = Local {
                pid,
                ..Local::default()
            };
        }
        Ok(local)
    }

    /// This handle's process-table index, claiming an entry on first use.
    fn proc_index(&self, local: &mut Local) -> Result<usize> {
        if let Some(i) = local.proc_index {
            return Ok(i);
        }
        let me = ProcessId::current();
        let _reg = self.lock()?;
        for i in 0..MAX_PROCESSES {
            let e = self.proc_entry(i);
            let pid = e.pid.load(Ordering::Acquire);
            let taken = pid != 0
                && (ProcessId {
                    pid,
                    start_time: e.start_time.load(Ordering::Acquire),
                })
                .is_alive();
            if taken {
                continue;
            }
            e.pid.store(me.pid, Ordering::SeqCst);
            e.start_time.store(me.start_time, Ordering::SeqCst);
            // Not armed until this handle starts a notifier, which draws a fresh nonce.
            e.armed.store(0, Ordering::SeqCst);
            e.wake_nonce.store(0, Ordering::SeqCst);
            let bit = !(1u64 << i);
            for slot in 0..self.geo.max_sessions {
                self.count_cell(i, slot).store(0, Ordering::Relaxed);
                self.slot(slot).subscribers.fetch_and(bit, Ordering::SeqCst);
            }
            local.proc_index = Some(i);
            return Ok(i);
        }
        Err(Error::TooManyProcesses)
    }

    /// Adds or removes one of this process's readers of (slot, gen) in the shared counts.
    pub(crate) fn count_reader(&self, slot: u32, gen: u64, add: bool) -> Result<()> {
        let mut local = self.local()?;
        let index = self.proc_index(&mut local)?;
        let n = {
            let c = local.readers.entry((slot, gen)).or_insert(0);
            if add {
                *c += 1;
            } else {
                *c = c.saturating_sub(1);
            }
            *c
        };
        if n == 0 {
            local.readers.remove(&(slot, gen));
        }
        // Only this process writes its row, so a plain store publishes the new count.
        let cell = self.count_cell(index, slot);
        if n > 0 || cell.load(Ordering::Relaxed) >> 32 == gen & 0xffff_ffff {
            cell.store((gen & 0xffff_ffff) << 32 | n as u64, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let local = self.local.get_mut().unwrap_or_else(|p| p.into_inner());
        if local.pid != std::process::id() {
            return;
        }
        local.notifier = None; // disarms the row and clears its subscriptions first
        if let Some(i) = local.proc_index {
            let e = proc_entry(self.map.as_ptr(), &self.geo, i);
            e.pid.store(0, Ordering::SeqCst);
        }
    }
}

pub(crate) fn proc_entry<'a>(base: *mut u8, geo: &Geometry, index: usize) -> &'a ProcEntry {
    assert!(index < MAX_PROCESSES);
    let off = geo.procs_offset as usize + index * std::mem::size_of::<ProcEntry>();
    // SAFETY: the process table lies between the header and the counts region of a validated
    // geometry, 128-aligned; `ProcEntry` holds only atomics and padding. The mapping outlives
    // the reference: callers hold an `Arc<Mapping>` or the segment.
    unsafe { &*(base.add(off) as *const ProcEntry) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder of the registry lock killed inside `end` (generation marked ended, slot not
    /// yet free) leaves a session that looks live; the next locker's recovery frees it.
    #[test]
    fn recovery_finishes_an_end_cut_short() {
        let path = format!(
            "/dev/shm/ringcast-unit-{}-{:x}",
            std::process::id(),
            process::unix_nanos()
        );
        let seg = Segment::create(&path, SegmentConfig::default()).expect("create");
        let w = seg.create_or_replace("torn", "").expect("session");
        let m = seg.inner.slot(w.slot());
        // The state `end` leaves if killed right after its generation store.
        m.generation
            .store(w.generation() | ENDED_BIT, Ordering::SeqCst);
        assert_eq!(m.state.load(Ordering::Acquire), state::RUNNING);
        // A child takes the registry lock and dies holding it.
        // SAFETY: the child only locks the robust mutex and exits at once, without running
        // destructors or touching anything another test thread could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            std::mem::forget(seg.inner.lock());
            // SAFETY: leaving the child immediately, holding the lock on purpose.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child we just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        drop(seg.inner.lock().expect("the lock is recovered"));
        assert_eq!(m.state.load(Ordering::Acquire), state::FREE);
        assert!(seg.get("torn", "").is_none());
        assert!(seg.list(None).is_empty());
        assert_eq!(seg.stats().sessions_used, 0);
        let _ = std::fs::remove_file(&path);
    }
}
