//! `ringcast.Segment` and the snapshots it returns (`SessionInfo`, `SegmentStats`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use ringcast_core as core;

use crate::errors::IntoPyResult;
use crate::notifier::Notifier;
use crate::stream::{nanos_of, Reader, Writer};

/// A consistent snapshot of one session's registry entry.
#[pyclass(module = "ringcast", frozen, get_all)]
pub(crate) struct SessionInfo {
    conversation_id: String,
    owner: String,
    /// ``"running"``, ``"done"``, ``"cancelled"`` or ``"failed"``.
    state: &'static str,
    /// Every byte ever appended (dropped prefix plus buffered bytes).
    total_bytes: u64,
    /// Lowest readable offset: the size of the dropped prefix.
    first_available: u64,
    /// Unix time (seconds) the session was created.
    started_at: f64,
    /// Unix time the session was finalized; 0.0 while running.
    completed_at: f64,
    /// Unix time of the last append (or creation).
    last_write_at: f64,
    /// Unix time a reader last attached (used to evict least recently used sessions).
    last_access_at: f64,
    producer_pid: u32,
    /// Whether the producer process (pid plus start time) still exists.
    producer_alive: bool,
    /// Readers attached right now, across every live process.
    readers: u32,
    generation: u64,
    slot: u32,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[pymethods]
impl SessionInfo {
    /// True once the session is finalized (done, cancelled or failed).
    #[getter]
    fn is_done(&self) -> bool {
        self.state != "running"
    }
    fn __repr__(&self) -> String {
        format!(
            "SessionInfo(conversation_id={:?}, state={:?}, total_bytes={}, first_available={}, readers={})",
            self.conversation_id, self.state, self.total_bytes, self.first_available, self.readers
        )
    }
}

impl From<core::SessionInfo> for SessionInfo {
    fn from(i: core::SessionInfo) -> Self {
        SessionInfo {
            conversation_id: i.conversation_id,
            owner: i.owner,
            state: i.state.as_str(),
            total_bytes: i.total_bytes,
            first_available: i.first_available,
            started_at: secs(i.started_at_ns),
            completed_at: secs(i.completed_at_ns),
            last_write_at: secs(i.last_write_ns),
            last_access_at: secs(i.last_access_ns),
            producer_pid: i.producer.pid,
            producer_alive: i.producer_alive,
            readers: i.readers,
            generation: i.generation,
            slot: i.slot,
        }
    }
}

/// Whole-segment figures.
#[pyclass(module = "ringcast", frozen, get_all)]
pub(crate) struct SegmentStats {
    max_sessions: u32,
    session_bytes: u64,
    max_id_len: u32,
    epoch: u64,
    sessions_used: u32,
    /// Sum over live sessions of the bytes held in their rings.
    bytes_buffered: u64,
    /// Apparent size of the segment file (it is sparse).
    file_bytes: u64,
    /// Bytes the file really occupies in memory (allocated blocks).
    resident_bytes: u64,
    registry_rebuilds: u64,
    lru_evictions: u64,
}

#[pymethods]
impl SegmentStats {
    fn __repr__(&self) -> String {
        format!(
            "SegmentStats(sessions_used={}/{}, bytes_buffered={}, resident_bytes={})",
            self.sessions_used, self.max_sessions, self.bytes_buffered, self.resident_bytes
        )
    }
}

impl From<core::SegmentStats> for SegmentStats {
    fn from(s: core::SegmentStats) -> Self {
        SegmentStats {
            max_sessions: s.max_sessions,
            session_bytes: s.session_bytes,
            max_id_len: s.max_id_len,
            epoch: s.epoch,
            sessions_used: s.sessions_used,
            bytes_buffered: s.bytes_buffered,
            file_bytes: s.file_bytes,
            resident_bytes: s.resident_bytes,
            registry_rebuilds: s.registry_rebuilds,
            lru_evictions: s.lru_evictions,
        }
    }
}

fn config(max_sessions: u32, session_bytes: u64, max_id_len: u32) -> core::SegmentConfig {
    core::SegmentConfig {
        max_sessions,
        session_bytes,
        max_id_len,
    }
}

fn end_reason(reason: &str) -> PyResult<core::EndReason> {
    match reason {
        "evicted" => Ok(core::EndReason::Evicted),
        "cancelled" => Ok(core::EndReason::Cancelled),
        "replaced" => Ok(core::EndReason::Replaced),
        other => Err(PyValueError::new_err(format!(
            "reason must be \"evicted\", \"cancelled\" or \"replaced\", got {other:?}"
        ))),
    }
}

/// A mapped ringcast segment: session registry plus one ring per session.
///
/// Sessions are byte rings keyed by (owner, conversation id). One producer (``Writer``)
/// appends; any number of ``Reader``s, in any process, read from any absolute offset.
#[pyclass(module = "ringcast", frozen)]
pub(crate) struct Segment {
    seg: core::Segment,
}

#[pymethods]
impl Segment {
    /// Create a new segment file (``O_EXCL``, mode 0600). Fails if ``path`` exists.
    ///
    /// Limits: ``1 <= max_sessions <= 2**20``, ``1 <= session_bytes <= 2**40``,
    /// ``256 <= max_id_len <= 65536`` (bytes of UTF-8); ``InvalidArgument`` otherwise.
    /// Owner tags are at most 128 bytes.
    #[staticmethod]
    // session_bytes: 4 MiB, written out so that help() and the signature show the number
    #[pyo3(signature = (path, *, max_sessions=1024, session_bytes=4194304, max_id_len=256))]
    fn create(
        py: Python<'_>,
        path: &str,
        max_sessions: u32,
        session_bytes: u64,
        max_id_len: u32,
    ) -> PyResult<Segment> {
        let seg = core::Segment::create(path, config(max_sessions, session_bytes, max_id_len))
            .py_err(py)?;
        Ok(Segment { seg })
    }

    /// Map an existing segment; ``SegmentError`` if it is not a segment of this layout.
    #[staticmethod]
    fn open(py: Python<'_>, path: &str) -> PyResult<Segment> {
        Ok(Segment {
            seg: core::Segment::open(path).py_err(py)?,
        })
    }

    /// Open ``path`` if it is a segment with exactly these sizes, else create it.
    ///
    /// A file that exists but is not a compatible segment raises ``SegmentError``; it is
    /// never silently replaced.
    #[staticmethod]
    // session_bytes: 4 MiB, written out so that help() and the signature show the number
    #[pyo3(signature = (path, *, max_sessions=1024, session_bytes=4194304, max_id_len=256))]
    fn open_or_create(
        py: Python<'_>,
        path: &str,
        max_sessions: u32,
        session_bytes: u64,
        max_id_len: u32,
    ) -> PyResult<Segment> {
        let seg =
            core::Segment::open_or_create(path, config(max_sessions, session_bytes, max_id_len))
                .py_err(py)?;
        Ok(Segment { seg })
    }

    #[getter]
    fn path(&self) -> &str {
        self.seg.path()
    }
    /// Random identity chosen when the segment was created.
    #[getter]
    fn epoch(&self) -> u64 {
        self.seg.epoch()
    }
    #[getter]
    fn max_sessions(&self) -> u32 {
        self.seg.geometry().max_sessions
    }
    #[getter]
    fn session_bytes(&self) -> u64 {
        self.seg.geometry().session_bytes
    }
    #[getter]
    fn max_id_len(&self) -> u32 {
        self.seg.geometry().max_id_len
    }

    /// Whole-segment figures: sessions in use, bytes buffered, file and resident size.
    fn stats(&self, py: Python<'_>) -> PyResult<SegmentStats> {
        self.seg.check_open().py_err(py)?;
        Ok(py.detach(|| self.seg.stats()).into())
    }

    /// Install a new running session; a live session with the same (owner, id) is
    /// cancelled with reason ``"replaced"`` and its readers end. The caller becomes producer.
    ///
    /// With ``max_running``, only if the running sessions of the ``counted`` groups
    /// ((owner, id prefix) pairs; default ``[(owner, "")]``) would then number at most
    /// ``max_running``, counted under the registry lock (exact across processes); a replaced
    /// running session that counts makes room for its replacement.
    ///
    /// Raises ``InvalidArgument`` for an empty or over-long id, ``RegistryFull``,
    /// ``QuotaExceeded``.
    #[pyo3(signature = (conversation_id, owner="", *, max_running=None, counted=None))]
    fn create_or_replace(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
        max_running: Option<u32>,
        counted: Option<Vec<(String, String)>>,
    ) -> PyResult<Writer> {
        let w = match max_running {
            None => py.detach(|| self.seg.create_or_replace(conversation_id, owner)),
            Some(max_running) => {
                let counted = counted.unwrap_or_else(|| vec![(owner.to_string(), String::new())]);
                let groups: Vec<(&str, &str)> = counted
                    .iter()
                    .map(|(o, p)| (o.as_str(), p.as_str()))
                    .collect();
                let quota = core::Quota {
                    max_running,
                    groups: &groups,
                };
                py.detach(|| {
                    self.seg
                        .create_or_replace_within(conversation_id, owner, &quota)
                })
            }
        }
        .py_err(py)?;
        Ok(Writer::from(w))
    }

    /// Become the producer of a running session created elsewhere (e.g. by the HTTP
    /// process that accepted the request). ``generation`` must match, so a handle never
    /// adopts a newer session with the same id. Raises ``SessionNotFound`` or
    /// ``SessionEnded``.
    fn adopt(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
        generation: u64,
    ) -> PyResult<Writer> {
        let w = py
            .detach(|| self.seg.adopt(conversation_id, owner, generation))
            .py_err(py)?;
        Ok(Writer::from(w))
    }

    /// If the session's producer process is dead, become its producer (bytes of an
    /// append that was cut short are discarded) and return a Writer; else ``None``.
    #[pyo3(signature = (conversation_id, owner=""))]
    fn take_over_dead(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
    ) -> PyResult<Option<Writer>> {
        let w = py
            .detach(|| self.seg.take_over_dead(conversation_id, owner))
            .py_err(py)?;
        Ok(w.map(Writer::from))
    }

    /// The session's snapshot, or ``None`` if no live session has this id (for this owner).
    #[pyo3(signature = (conversation_id, owner=""))]
    fn get(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
    ) -> PyResult<Option<SessionInfo>> {
        self.seg.check_open().py_err(py)?;
        Ok(py
            .detach(|| self.seg.get(conversation_id, owner))
            .map(Into::into))
    }

    /// Every live session, oldest first, or only ``owner``'s; with ``shard=(index, count)``
    /// (and no ``owner``) only the sessions whose slot is ``index`` modulo ``count``: one of
    /// ``count`` processes that split the sessions (a session keeps its slot for life); with
    /// ``owner_prefix`` (alone) only those whose owner starts with it (one scan of the slots,
    /// objects made only of those).
    #[pyo3(signature = (owner=None, *, shard=None, owner_prefix=None))]
    fn list(
        &self,
        py: Python<'_>,
        owner: Option<&str>,
        shard: Option<(u32, u32)>,
        owner_prefix: Option<&str>,
    ) -> PyResult<Vec<SessionInfo>> {
        self.seg.check_open().py_err(py)?;
        if let Some(prefix) = owner_prefix {
            if owner.is_some() || shard.is_some() {
                return Err(PyValueError::new_err(
                    "list: give owner_prefix alone, without owner or shard",
                ));
            }
            let found = py.detach(|| self.seg.list_owner_prefix(prefix));
            return Ok(found.into_iter().map(Into::into).collect());
        }
        let found = match shard {
            None => py.detach(|| self.seg.list(owner)),
            Some(_) if owner.is_some() => {
                return Err(PyValueError::new_err("list: give owner or shard, not both"));
            }
            Some((index, count)) if index >= count => {
                return Err(PyValueError::new_err(format!(
                    "list: shard ({index}, {count}): the index must be below the count"
                )));
            }
            Some((index, count)) => py.detach(|| self.seg.list_shard(index, count)),
        };
        Ok(found.into_iter().map(Into::into).collect())
    }

    /// What the manager's dead-producer sweep looks at, out of every live session: the
    /// running ones whose producer is dead, and all of ``anon_owner``'s; none of an owner
    /// that starts with ``skip_prefix`` (those have no producer process). The same
    /// ``SessionInfo`` as ``list`` gives, but only these are made into Python objects: a
    /// sweep several times a second costs a scan of the slots in Rust (a few loads each),
    /// not a snapshot, let alone a Python object, per session.
    fn sweep_candidates(
        &self,
        py: Python<'_>,
        anon_owner: &str,
        skip_prefix: &str,
    ) -> PyResult<Vec<SessionInfo>> {
        self.seg.check_open().py_err(py)?;
        let found = py.detach(|| self.seg.sweep_candidates(anon_owner, skip_prefix));
        Ok(found.into_iter().map(Into::into).collect())
    }

    /// What the manager's expiry looks at: the finished sessions that completed ``ttl``
    /// seconds ago or longer, and (with ``idle_timeout`` above 0) the running ones with no
    /// write for ``idle_timeout`` seconds; none of an owner that starts with ``skip_prefix``.
    /// Oldest first. One scan of the slots in Rust: objects are made of these only.
    #[pyo3(signature = (ttl, idle_timeout, skip_prefix=""))]
    fn expiry_candidates(
        &self,
        py: Python<'_>,
        ttl: f64,
        idle_timeout: f64,
        skip_prefix: &str,
    ) -> PyResult<Vec<SessionInfo>> {
        self.seg.check_open().py_err(py)?;
        let ttl_ns = nanos_of("expiry_candidates: ttl", ttl)?;
        // Any idle timeout above 0 is one (of at least a nanosecond): 0 alone means none.
        let idle_ns = match nanos_of("expiry_candidates: idle_timeout", idle_timeout)? {
            0 if idle_timeout > 0.0 => 1,
            n => n,
        };
        let now = core::unix_nanos();
        let found = py.detach(|| {
            self.seg
                .expiry_candidates(now, ttl_ns, idle_ns, skip_prefix)
        });
        Ok(found.into_iter().map(Into::into).collect())
    }

    /// The session with exactly this id plus every session whose id starts with
    /// ``conversation_id + "::"`` (llama-server's lookup rule).
    #[pyo3(signature = (conversation_id, owner=""))]
    fn lookup_prefix(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
    ) -> PyResult<Vec<SessionInfo>> {
        self.seg.check_open().py_err(py)?;
        let found = py.detach(|| self.seg.lookup_prefix(conversation_id, owner));
        Ok(found.into_iter().map(Into::into).collect())
    }

    /// Remove the session (its readers end with reason ``"evicted"``). True if it existed.
    #[pyo3(signature = (conversation_id, owner=""))]
    fn evict(&self, py: Python<'_>, conversation_id: &str, owner: &str) -> PyResult<bool> {
        py.detach(|| {
            self.seg
                .evict(conversation_id, owner, core::EndReason::Evicted)
        })
        .py_err(py)
    }

    /// Cancel the producer and remove the session (readers end with ``"cancelled"``).
    #[pyo3(signature = (conversation_id, owner=""))]
    fn evict_and_cancel(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
    ) -> PyResult<bool> {
        py.detach(|| {
            self.seg
                .evict(conversation_id, owner, core::EndReason::Cancelled)
        })
        .py_err(py)
    }

    /// Remove exactly this session if it is still that generation (manager GC).
    #[pyo3(signature = (slot, generation, reason="evicted"))]
    fn evict_slot(
        &self,
        py: Python<'_>,
        slot: u32,
        generation: u64,
        reason: &str,
    ) -> PyResult<bool> {
        let r = end_reason(reason)?;
        py.detach(|| self.seg.evict_slot(slot, generation, r))
            .py_err(py)
    }

    /// Attach a reader at an absolute byte offset.
    ///
    /// Raises ``SessionNotFound``, or ``OffsetLost`` when ``offset`` was already dropped.
    /// An offset beyond the current end is allowed: the reader waits until it is reached.
    /// ``counted=False`` leaves it out of ``SessionInfo.readers``: for a reader that only
    /// serves other, counted readers (as the HTTP server's fan-out pump does).
    #[pyo3(signature = (conversation_id, offset=0, owner="", counted=true))]
    fn reader(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        offset: u64,
        owner: &str,
        counted: bool,
    ) -> PyResult<Reader> {
        let r = py
            .detach(|| {
                self.seg
                    .reader_counted(conversation_id, owner, offset, counted)
            })
            .py_err(py)?;
        Ok(Reader::from(r))
    }

    /// Tell the event loops of other processes about the appends made with
    /// ``Writer.write(..., defer_wake=True)`` through this handle since the last call: one
    /// datagram per subscribed, waiting process for the whole batch. Returns how many were
    /// delivered.
    ///
    /// ``skip_own=True``: none to this process's own notifier, for a producer whose readers
    /// share its event loop: it must then wake them itself (``ringcast._aio.poke`` with the
    /// slots it appended to), or they wait for the next rescan.
    #[pyo3(signature = (skip_own=false))]
    fn flush_wakes(&self, skip_own: bool) -> usize {
        if skip_own {
            self.seg.flush_wakes_except_own()
        } else {
            self.seg.flush_wakes()
        }
    }

    /// This segment handle's notifier (one per handle, normally one per process; created on
    /// first use).
    fn notifier(&self, py: Python<'_>) -> PyResult<Notifier> {
        Ok(Notifier::from(self.seg.notifier().py_err(py)?))
    }

    /// Invalidate the segment: this handle, and the Writers and Readers made from it, raise
    /// ``SegmentError`` on their next read, write or registry call. The memory is unmapped
    /// once the last of them is garbage-collected.
    fn close(&self) {
        self.seg.close()
    }

    /// Remove the segment file (mapped processes keep their mapping).
    fn unlink(&self, py: Python<'_>) -> PyResult<()> {
        self.seg.unlink().py_err(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "Segment(path={:?}, epoch={})",
            self.seg.path(),
            self.seg.epoch()
        )
    }
}
