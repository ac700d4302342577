//! The segment facade: creating, opening and validating a segment file, and the public
//! [`Segment`] handle, whose operations hand out [`Writer`]s and [`Reader`]s on top of the
//! registry. Nothing here touches the mapping directly: the view, the registry and the
//! stream handles do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{EndReason, Error, Result, SegmentError};
use crate::layout::{Geometry, MAGIC, MAX_ID_LEN, MAX_PROCESSES, MAX_SESSIONS, MIN_ID_LEN};
use crate::notify::Notifier;
use crate::registry::{Quota, Registry, SessionInfo, SessionState};
use crate::stream::{Reader, Writer};
use crate::sync::Ordering;
use crate::sys::dgram::random_u64;
use crate::sys::mmap::{self, Mapping};
use crate::sys::process;
use crate::view::{self, SegmentView};

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
    /// Times the registry was rebuilt from its slots: after a process died holding its lock,
    /// or when its structures were found damaged.
    pub registry_rebuilds: u64,
    /// Finished sessions evicted (least recently used first) by creates that found every
    /// slot taken, since the segment was created.
    pub lru_evictions: u64,
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
    reg: Arc<Registry>,
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

/// The error for a failed `op` on the file at `path`; a symbolic link there gets its own
/// message (`O_NOFOLLOW` reports it as `ELOOP` on open, `O_EXCL` as `EEXIST` on create).
fn file_error(path: &str, op: &'static str, e: std::io::Error) -> Error {
    let link = matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EEXIST))
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !link {
        return Error::io(path, op, e);
    }
    let target = std::fs::read_link(path)
        .map(|t| format!(" (to {t:?})"))
        .unwrap_or_default();
    Error::invalid_segment(
        path,
        format!(
            "is a symbolic link{target}: a segment is never reached through a link (one planted \
             at a predictable path could point anywhere); remove the link or give the real \
             file's path"
        ),
    )
}

/// The bytes of the tables backed when a segment is created or opened: the header and the
/// process table, which every process touches, and the index, whose buckets lookups read at
/// random. (A slot's metadata and reader counts are backed when the slot is first used:
/// `SegmentView::back_new_slot`.)
fn eager_table_bytes(geo: &Geometry) -> u64 {
    geo.counts_offset + (geo.rings_offset - geo.index_offset)
}

/// Backs the tables of `eager_table_bytes` with memory: on a full filesystem a page of them
/// left unbacked would be a `SIGBUS` in whichever process touched it first, a read as much as
/// a write. Already backed (a segment opened again), this allocates nothing.
fn back_tables(map: &Mapping, path: &str, geo: &Geometry) -> Result<()> {
    let done = map.allocate(0, geo.counts_offset as usize).and_then(|()| {
        map.allocate(
            geo.index_offset as usize,
            (geo.rings_offset - geo.index_offset) as usize,
        )
    });
    match done {
        Ok(()) => Ok(()),
        // Cannot allocate ahead on this filesystem: pages are backed as they are touched.
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(Error::invalid_segment(
            path,
            format!(
                "its filesystem has no room for the segment's tables ({} bytes; {}): free memory \
                 there or give it more room (Docker: --shm-size), or lower max_sessions",
                eager_table_bytes(geo),
                free_text(map)
            ),
        )),
        Err(e) => Err(Error::io(path, "back the tables of", e)),
    }
}

/// "N bytes free", as far as `statvfs` says.
fn free_text(map: &Mapping) -> String {
    match map.fs_free_bytes() {
        Ok(n) => format!("{n} bytes free"),
        Err(e) => format!("free space unknown: {e}"),
    }
}

/// A new segment must fit its tables and at least one full ring in its filesystem's free
/// space; less could never hold one whole stream. More than that may be promised (the file is
/// sparse, and most sessions never fill their ring): an append that finds the filesystem full
/// fails for its own stream (`SegmentError::NoSpace`), and the server says at start how many
/// full rings fit.
fn check_room(map: &Mapping, path: &str, geo: &Geometry) -> Result<()> {
    // One slot's metadata and a page of reader counts per process row come with the ring.
    let page = geo.page_size as u64;
    let one_slot = geo.slot_stride.div_ceil(page) * page + MAX_PROCESSES as u64 * page;
    let minimum = eager_table_bytes(geo) + one_slot + geo.ring_stride;
    if let Ok(free) = map.fs_free_bytes() {
        if free < minimum {
            return Err(Error::invalid_segment(
                path,
                format!(
                    "its filesystem has {free} bytes free, less than the segment's tables and one \
                     full ring ({minimum} bytes; {} when all {} rings are full): give it more \
                     room (Docker: --shm-size) or lower session_bytes",
                    geo.file_bytes, geo.max_sessions
                ),
            ));
        }
    }
    back_tables(map, path, geo)
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
            .map_err(|e| file_error(path, "create", e))?;
        if let Err(e) = check_room(&map, path, &geo) {
            let _ = map.unlink(path);
            return Err(e);
        }
        // The index's hash key: secret to clients, so they cannot aim ids at one bucket.
        let hash_key = [random_u64(), random_u64()];
        let view = SegmentView::create(map, geo, new_epoch(), hash_key)
            .map_err(|e| Error::io(path, "initialise the lock of", e))?;
        Ok(Segment::from_view(view, path))
    }

    /// Opens an existing segment, validating everything in its header.
    pub fn open(path: &str) -> Result<Segment> {
        // A segment that another process is creating right now is empty, or has no header yet,
        // for a moment: wait for it rather than calling it foreign.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match Segment::open_once(path) {
                Ok(seg) => return Ok(seg),
                Err(Opening::Failed(e)) => return Err(e),
                Err(Opening::Unfinished(why)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::invalid_segment(path, why));
                    }
                    std::thread::sleep(Duration::from_millis(1));
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
            Err(e) => return Err(Opening::Failed(file_error(path, "open", e))),
        };
        let Some(h) = view::header_of(&map) else {
            return Err(Opening::Failed(Error::invalid_segment(
                path,
                format!("file is {} bytes, too small for a header", map.len()),
            )));
        };
        let ready = h.ready.load(Ordering::Acquire) == 1;
        if !ready && h.magic == MAGIC {
            return Err(Opening::Unfinished(unfinished));
        }
        if !ready && h.magic == [0u8; 8] {
            return Err(Opening::Unfinished(blank));
        }
        let geo = Geometry::from_header(h, map.len() as u64)
            .map_err(|why| Opening::Failed(Error::invalid_segment(path, why)))?;
        back_tables(&map, path, &geo).map_err(Opening::Failed)?;
        let (epoch, hash_key) = (h.epoch, h.hash_key);
        Ok(Segment::from_view(
            SegmentView::open(map, geo, epoch, hash_key),
            path,
        ))
    }

    /// Opens `path` if it is a segment with exactly this configuration, else creates it.
    ///
    /// Another process may create or remove the file between our open and create; each race
    /// costs one more try, and a path that keeps flipping is an error, never a recursion (a
    /// dangling symbolic link, which open finds missing and create finds present, once sent
    /// this into unbounded recursion; links are now refused outright).
    pub fn open_or_create(path: &str, cfg: SegmentConfig) -> Result<Segment> {
        const ATTEMPTS: u32 = 8;
        for _ in 0..ATTEMPTS {
            match Segment::open(path) {
                Ok(seg) => return seg.with_config(cfg),
                Err(Error::Segment(SegmentError::Io { source, .. }))
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match Segment::create(path, cfg) {
                // Another process created it between our open and create: use theirs.
                Err(Error::Segment(SegmentError::Io { source, .. }))
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => return other,
            }
        }
        Err(Error::invalid_segment(
            path,
            format!(
                "the file appeared and vanished {ATTEMPTS} times while opening or creating it: \
                 another process keeps creating and removing it; stop it or use another path"
            ),
        ))
    }

    /// This segment if it has exactly the sizes `cfg` asks for.
    fn with_config(self, cfg: SegmentConfig) -> Result<Segment> {
        let g = self.geometry();
        if g.max_sessions != cfg.max_sessions
            || g.session_bytes != cfg.session_bytes
            || g.max_id_len != cfg.max_id_len
        {
            return Err(Error::invalid_segment(
                self.path(),
                format!(
                    "exists with max_sessions={} session_bytes={} max_id_len={}, not the requested \
                     {} / {} / {}; remove it or ask for the same sizes",
                    g.max_sessions, g.session_bytes, g.max_id_len,
                    cfg.max_sessions, cfg.session_bytes, cfg.max_id_len
                ),
            ));
        }
        Ok(self)
    }

    fn from_view(view: SegmentView, path: &str) -> Segment {
        Segment {
            reg: Arc::new(Registry::new(view, path)),
        }
    }

    pub fn path(&self) -> &str {
        self.reg.path()
    }

    /// Invalidates this mapping for every handle made from it: later calls fail with
    /// `SegmentError::Closed`. The memory is unmapped when the last handle is dropped.
    pub fn close(&self) {
        self.reg.close()
    }

    /// Fails if the segment was closed.
    pub fn check_open(&self) -> Result<()> {
        self.reg.check_open()
    }
    pub fn epoch(&self) -> u64 {
        self.reg.view().epoch()
    }
    pub fn geometry(&self) -> Geometry {
        *self.reg.view().geometry()
    }

    /// Removes the segment file if its path still names it; mapped processes keep their
    /// mapping. Its notifier directory goes too: the sockets of processes that have gone and
    /// this handle's own now, the directory once no running process has a socket left in it
    /// (each removes its own when it closes).
    pub fn unlink(&self) -> Result<()> {
        let path = self.path();
        self.reg
            .view()
            .mapping()
            .unlink(path)
            .map_err(|e| file_error(path, "remove", e))?;
        self.reg.remove_wake_sockets();
        Ok(())
    }

    /// The `waiting` word of the live session (owner, id): bit `i` set while a thread of
    /// process entry `i` waits on its futex. For tests and diagnostics.
    #[doc(hidden)]
    pub fn waiting_mask(&self, id: &str, owner: &str) -> Option<u64> {
        let (slot, _) = self.reg.find(id, owner)?;
        Some(self.reg.view().slot(slot).waiting.load(Ordering::SeqCst))
    }

    /// Checks the registry's internal structures (index, free stack, finished list) against
    /// the slots, after repairing what a dead lock holder left: the number of live sessions,
    /// or what is inconsistent. For tests and diagnostics; walks every slot under the lock.
    #[doc(hidden)]
    pub fn check_registry(&self) -> std::result::Result<u32, String> {
        self.reg.check()
    }

    pub fn stats(&self) -> SegmentStats {
        let view = self.reg.view();
        let g = view.geometry();
        let (sessions_used, bytes_buffered) = self.reg.usage();
        SegmentStats {
            max_sessions: g.max_sessions,
            session_bytes: g.session_bytes,
            max_id_len: g.max_id_len,
            epoch: view.epoch(),
            sessions_used,
            bytes_buffered,
            file_bytes: view.mapping().file_len().unwrap_or(0) as u64,
            resident_bytes: view.mapping().resident_bytes(),
            registry_rebuilds: view.registry_head().rebuilds.load(Ordering::Relaxed),
            lru_evictions: view.registry_head().lru_evictions.load(Ordering::Relaxed),
        }
    }

    /// Installs a new running session for (owner, id), replacing a live one.
    pub fn create_or_replace(&self, id: &str, owner: &str) -> Result<Writer> {
        let claim = self.reg.create_or_replace(id, owner, None)?;
        Ok(Writer::new(self.reg.clone(), claim, id, owner))
    }

    /// [`create_or_replace`](Self::create_or_replace), unless the running sessions `quota`
    /// counts would then number more than `quota.max_running` ([`Error::QuotaExceeded`]; a
    /// replaced running session that counts makes room for its replacement). Counted under
    /// the registry lock, so exact across processes.
    pub fn create_or_replace_within(
        &self,
        id: &str,
        owner: &str,
        quota: &Quota<'_>,
    ) -> Result<Writer> {
        let claim = self.reg.create_or_replace(id, owner, Some(quota))?;
        Ok(Writer::new(self.reg.clone(), claim, id, owner))
    }

    /// Becomes the producer of a running session created by another process.
    pub fn adopt(&self, id: &str, owner: &str, generation: u64) -> Result<Writer> {
        let claim = self.reg.adopt(id, owner, generation)?;
        Ok(Writer::new(self.reg.clone(), claim, id, owner))
    }

    /// If the session's producer is dead, becomes its producer (dropping a torn append).
    pub fn take_over_dead(&self, id: &str, owner: &str) -> Result<Option<Writer>> {
        let claim = self.reg.take_over_dead(id, owner)?;
        Ok(claim.map(|c| Writer::new(self.reg.clone(), c, id, owner)))
    }

    pub fn get(&self, id: &str, owner: &str) -> Option<SessionInfo> {
        self.reg.get(id, owner)
    }

    /// Every live session, or only `owner`'s.
    pub fn list(&self, owner: Option<&str>) -> Vec<SessionInfo> {
        self.reg.list(owner, None)
    }

    /// Every live session whose slot is `index` modulo `count` (a session keeps its slot for
    /// life): one of `count` processes that split the sessions between them, each paying for
    /// its share only. Empty if `index >= count`.
    pub fn list_shard(&self, index: u32, count: u32) -> Vec<SessionInfo> {
        if index >= count {
            return Vec::new();
        }
        self.reg.list(None, Some((index, count)))
    }

    /// Every live session whose owner starts with `prefix`, oldest first.
    pub fn list_owner_prefix(&self, prefix: &str) -> Vec<SessionInfo> {
        let prefix = prefix.as_bytes();
        self.reg.scan(|g| g.owner.starts_with(prefix))
    }

    /// What the manager's dead-producer sweep acts on: the running sessions whose producer
    /// is dead, and every session of `anon_owner`; none of an owner that starts with
    /// `skip_prefix` (unless it is empty). One scan of the slots; each distinct producer's
    /// liveness is read once.
    pub fn sweep_candidates(&self, anon_owner: &str, skip_prefix: &str) -> Vec<SessionInfo> {
        let (anon, skip) = (anon_owner.as_bytes(), skip_prefix.as_bytes());
        let mut alive: HashMap<(u32, u64), bool> = HashMap::new();
        self.reg.scan(|g| {
            if g.owner_under(skip) {
                return false;
            }
            g.owner == anon
                || (g.state == SessionState::Running
                    && !*alive
                        .entry((g.producer.pid, g.producer.start_time))
                        .or_insert_with(|| g.producer.is_alive()))
        })
    }

    /// What the manager's expiry acts on: the finished sessions that completed at least
    /// `ttl_ns` before `now_ns`, and (with `idle_ns` above 0) the running ones with no write
    /// for `idle_ns`; none of an owner that starts with `skip_prefix` (unless it is empty).
    pub fn expiry_candidates(
        &self,
        now_ns: u64,
        ttl_ns: u64,
        idle_ns: u64,
        skip_prefix: &str,
    ) -> Vec<SessionInfo> {
        let skip = skip_prefix.as_bytes();
        self.reg.scan(|g| {
            if g.owner_under(skip) {
                return false;
            }
            if g.state == SessionState::Running {
                idle_ns > 0 && now_ns.saturating_sub(g.last_write_ns) >= idle_ns
            } else {
                now_ns.saturating_sub(g.completed_at_ns) >= ttl_ns
            }
        })
    }

    /// The session with exactly `id` plus every one whose id starts with `id + "::"`.
    pub fn lookup_prefix(&self, id: &str, owner: &str) -> Vec<SessionInfo> {
        self.reg.lookup_prefix(id, owner)
    }

    /// Removes the session; its readers end with `reason`. True if it existed.
    pub fn evict(&self, id: &str, owner: &str, reason: EndReason) -> Result<bool> {
        self.reg.evict(id, owner, reason)
    }

    /// Removes exactly this session if it still has that generation.
    pub fn evict_slot(&self, slot: u32, generation: u64, reason: EndReason) -> Result<bool> {
        self.reg.evict_slot(slot, generation, reason)
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
        let (slot, gen) = self.reg.attach_reader(id, owner, offset, counted)?;
        Ok(Reader::new(
            self.reg.clone(),
            slot,
            gen,
            offset,
            id,
            counted,
        ))
    }

    /// Tells the event loops of other processes about the appends made through this handle's
    /// writers with `Wake::Deferred` since the last call: one datagram per subscribed, armed
    /// process, however many appends. Returns how many datagrams were delivered.
    pub fn flush_wakes(&self) -> usize {
        self.reg.flush_wakes(false)
    }

    /// [`Segment::flush_wakes`], except that this process's own notifier is sent nothing: for
    /// a producer that also reads its sessions in the same event loop and tells its own readers
    /// directly (a datagram to itself would cost a `sendto`, a loop wake-up and a `recv` per
    /// turn to say what it already knows). The caller must then wake every reader of this
    /// process waiting on a session it appended to.
    pub fn flush_wakes_except_own(&self) -> usize {
        self.reg.flush_wakes(true)
    }

    /// This handle's notifier (created on first use; one socket per handle, no thread).
    pub fn notifier(&self) -> Result<Arc<Notifier>> {
        self.reg.notifier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{state, ENDED_BIT};

    /// A holder of the registry lock killed inside `end` (generation marked ended, slot not
    /// yet free) leaves a slot in a session's state. No lock-free view shows it (a listing
    /// that did once named a session that no locked lookup could find), and the next
    /// locker's recovery frees it.
    #[test]
    fn recovery_finishes_an_end_cut_short() {
        let path = format!(
            "/dev/shm/ringcast-unit-{}-{:x}",
            std::process::id(),
            process::unix_nanos()
        );
        // Removed however the test ends (a failed assertion included).
        struct Removed<'a>(&'a str);
        impl Drop for Removed<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(self.0);
            }
        }
        let _removed = Removed(&path);
        let seg = Segment::create(&path, SegmentConfig::default()).expect("create");
        let w = seg.create_or_replace("torn", "").expect("session");
        let m = seg.reg.view().slot(w.slot());
        // The state `end` leaves if killed right after its generation store.
        m.generation
            .store(w.generation() | ENDED_BIT, Ordering::SeqCst);
        assert_eq!(m.state.load(Ordering::Acquire), state::RUNNING);
        // Before anyone locks: none of the lock-free views (these take no lock, so nothing
        // is repaired yet) shows the session.
        assert!(seg.get("torn", "").is_none());
        assert!(seg.list(None).is_empty());
        assert!(seg.list_owner_prefix("").is_empty());
        assert!(seg.sweep_candidates("", "").is_empty());
        assert!(seg.expiry_candidates(u64::MAX, 0, 1, "").is_empty());
        assert_eq!(seg.stats().sessions_used, 0);
        assert_eq!(m.state.load(Ordering::Acquire), state::RUNNING);
        // A child takes the registry lock and dies holding it.
        // SAFETY: the child only locks the robust mutex and exits at once, without running
        // destructors or touching anything another test thread could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            std::mem::forget(seg.reg.lock());
            // SAFETY: leaving the child immediately, holding the lock on purpose.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child we just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        drop(seg.reg.lock().expect("the lock is recovered"));
        assert_eq!(m.state.load(Ordering::Acquire), state::FREE);
        assert!(seg.get("torn", "").is_none());
        assert!(seg.list(None).is_empty());
        assert_eq!(seg.stats().sessions_used, 0);
    }
}
