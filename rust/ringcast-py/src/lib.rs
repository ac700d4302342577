//! PyO3 bindings for ringcast-core: type and error translation only. Blocking waits and large
//! copies run with the GIL released and touch no Python object.

use std::sync::Arc;
use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple, PyType};

use ringcast_core as core;

/// Copies above this size release the GIL.
const DETACH_COPY_BYTES: u64 = 256 * 1024;

struct Exceptions {
    base: Py<PyType>,
    segment: Py<PyType>,
    not_found: Py<PyType>,
    ended: Py<PyType>,
    offset_lost: Py<PyType>,
    invalid: Py<PyType>,
    full: Py<PyType>,
}

static EXC: PyOnceLock<Exceptions> = PyOnceLock::new();

fn exceptions(py: Python<'_>) -> &Exceptions {
    EXC.get(py).expect("ringcast._core was not initialised")
}

fn make_exceptions<'py>(py: Python<'py>, m: &Bound<'py, PyModule>) -> PyResult<()> {
    let type_ = py.import("builtins")?.getattr("type")?;
    let mk = |name: &str, bases: Bound<'_, PyTuple>, doc: &str| -> PyResult<Py<PyType>> {
        let d = PyDict::new(py);
        d.set_item("__module__", "ringcast")?;
        d.set_item("__doc__", doc)?;
        let t = type_.call1((name, bases, d))?.cast_into::<PyType>()?;
        m.add(name, &t)?;
        Ok(t.unbind())
    };
    let exc = py.get_type::<pyo3::exceptions::PyException>();
    let key = py.get_type::<pyo3::exceptions::PyKeyError>();
    let value = py.get_type::<pyo3::exceptions::PyValueError>();
    let base = mk(
        "RingcastError",
        PyTuple::new(py, [exc])?,
        "Base class of every error raised by ringcast.",
    )?;
    let b = base.bind(py).clone();
    let t = |o: &Bound<'py, PyType>| PyTuple::new(py, [b.clone(), o.clone()]);
    let one = || PyTuple::new(py, [b.clone()]);
    let e = Exceptions {
        segment: mk(
            "SegmentError",
            one()?,
            "The segment is missing, not a ringcast segment, of another layout, or corrupt.",
        )?,
        not_found: mk(
            "SessionNotFound",
            t(&key)?,
            "No live session has this conversation id (for this owner).",
        )?,
        ended: mk(
            "SessionEnded",
            one()?,
            "The session is gone; `reason` is cancelled, replaced or evicted.",
        )?,
        offset_lost: mk(
            "OffsetLost",
            one()?,
            "The offset was dropped from the ring; see `first_available`.",
        )?,
        invalid: mk(
            "InvalidArgument",
            t(&value)?,
            "A bad argument (id too long, zero size, ...).",
        )?,
        full: mk(
            "RegistryFull",
            one()?,
            "Every session slot is in use; evict something first.",
        )?,
        base,
    };
    let _ = EXC.set(py, e);
    Ok(())
}

/// The one place core errors become Python exceptions.
fn to_py(py: Python<'_>, e: core::Error) -> PyErr {
    let x = exceptions(py);
    let msg = e.to_string();
    let build = |cls: &Py<PyType>, attrs: &[(&str, Py<PyAny>)]| -> PyErr {
        match cls.bind(py).call1((msg.clone(),)) {
            Ok(obj) => {
                for (k, v) in attrs {
                    if let Err(err) = obj.setattr(*k, v) {
                        return err;
                    }
                }
                PyErr::from_value(obj)
            }
            Err(err) => err,
        }
    };
    match e {
        core::Error::Segment(_) => build(&x.segment, &[]),
        core::Error::InvalidArgument(_) => build(&x.invalid, &[]),
        core::Error::NotFound { .. } => build(&x.not_found, &[]),
        core::Error::Ended(r) => build(
            &x.ended,
            &[(
                "reason",
                r.as_str().into_pyobject(py).unwrap().into_any().unbind(),
            )],
        ),
        core::Error::OffsetLost {
            requested,
            first_available,
        } => build(
            &x.offset_lost,
            &[
                (
                    "first_available",
                    first_available
                        .into_pyobject(py)
                        .unwrap()
                        .into_any()
                        .unbind(),
                ),
                (
                    "requested",
                    requested.into_pyobject(py).unwrap().into_any().unbind(),
                ),
            ],
        ),
        core::Error::RegistryFull { .. } => build(&x.full, &[]),
        core::Error::TooManyProcesses => build(&x.base, &[]),
    }
}

trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}
impl<T> IntoPy<T> for core::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

fn timeout_of(t: Option<f64>) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
        Some(s) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, got {s}"
        ))),
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
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

#[pyclass(module = "ringcast", frozen, get_all)]
struct SessionInfo {
    conversation_id: String,
    owner: String,
    state: &'static str,
    total_bytes: u64,
    first_available: u64,
    started_at: f64,
    completed_at: f64,
    last_write_at: f64,
    last_access_at: f64,
    producer_pid: u32,
    producer_alive: bool,
    readers: u32,
    generation: u64,
    slot: u32,
}

#[pymethods]
impl SessionInfo {
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

#[pyclass(module = "ringcast", frozen, get_all)]
struct SegmentStats {
    max_sessions: u32,
    session_bytes: u64,
    max_id_len: u32,
    epoch: u64,
    sessions_used: u32,
    bytes_buffered: u64,
    file_bytes: u64,
    resident_bytes: u64,
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

#[pyclass(module = "ringcast", frozen)]
struct Segment {
    seg: core::Segment,
}

fn config(max_sessions: u32, session_bytes: u64, max_id_len: u32) -> core::SegmentConfig {
    core::SegmentConfig {
        max_sessions,
        session_bytes,
        max_id_len,
    }
}

#[pymethods]
impl Segment {
    #[staticmethod]
    #[pyo3(signature = (path, *, max_sessions=1024, session_bytes=4*1024*1024, max_id_len=256))]
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

    #[staticmethod]
    fn open(py: Python<'_>, path: &str) -> PyResult<Segment> {
        Ok(Segment {
            seg: core::Segment::open(path).py_err(py)?,
        })
    }

    #[staticmethod]
    #[pyo3(signature = (path, *, max_sessions=1024, session_bytes=4*1024*1024, max_id_len=256))]
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

    fn stats(&self, py: Python<'_>) -> PyResult<SegmentStats> {
        self.seg.check_open().py_err(py)?;
        let s = py.detach(|| self.seg.stats());
        Ok(SegmentStats {
            max_sessions: s.max_sessions,
            session_bytes: s.session_bytes,
            max_id_len: s.max_id_len,
            epoch: s.epoch,
            sessions_used: s.sessions_used,
            bytes_buffered: s.bytes_buffered,
            file_bytes: s.file_bytes,
            resident_bytes: s.resident_bytes,
        })
    }

    #[pyo3(signature = (conversation_id, owner=""))]
    fn create_or_replace(
        &self,
        py: Python<'_>,
        conversation_id: &str,
        owner: &str,
    ) -> PyResult<Writer> {
        let w = py
            .detach(|| self.seg.create_or_replace(conversation_id, owner))
            .py_err(py)?;
        Ok(Writer { w })
    }

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
        Ok(Writer { w })
    }

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
        Ok(w.map(|w| Writer { w }))
    }

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

    #[pyo3(signature = (owner=None))]
    fn list(&self, py: Python<'_>, owner: Option<&str>) -> PyResult<Vec<SessionInfo>> {
        self.seg.check_open().py_err(py)?;
        Ok(py
            .detach(|| self.seg.list(owner))
            .into_iter()
            .map(Into::into)
            .collect())
    }

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

    #[pyo3(signature = (conversation_id, owner=""))]
    fn evict(&self, py: Python<'_>, conversation_id: &str, owner: &str) -> PyResult<bool> {
        py.detach(|| {
            self.seg
                .evict(conversation_id, owner, core::EndReason::Evicted)
        })
        .py_err(py)
    }

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
        Ok(Reader { r: Some(r) })
    }

    fn notifier(&self, py: Python<'_>) -> PyResult<Notifier> {
        Ok(Notifier {
            n: self.seg.notifier().py_err(py)?,
        })
    }

    /// Invalidates the segment for every handle made from it.
    fn close(&self) {
        self.seg.close()
    }

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

#[pyclass(module = "ringcast", frozen)]
struct Writer {
    w: core::Writer,
}

#[pymethods]
impl Writer {
    #[getter]
    fn conversation_id(&self) -> &str {
        self.w.conversation_id()
    }
    #[getter]
    fn owner(&self) -> &str {
        self.w.owner()
    }
    #[getter]
    fn slot(&self) -> u32 {
        self.w.slot()
    }
    #[getter]
    fn generation(&self) -> u64 {
        self.w.generation()
    }
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.w.total_bytes()
    }
    #[getter]
    fn cancelled(&self) -> bool {
        self.w.cancelled()
    }

    #[pyo3(signature = (data, progress=true))]
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>, progress: bool) -> PyResult<bool> {
        let w = &self.w;
        let append = |bytes: &[u8]| {
            if progress {
                w.write(bytes)
            } else {
                w.write_keepalive(bytes)
            }
        };
        if let Ok(b) = data.cast::<PyBytes>() {
            let bytes = b.as_bytes();
            if (bytes.len() as u64) < DETACH_COPY_BYTES {
                return append(bytes).py_err(py);
            }
            return py.detach(|| append(bytes)).py_err(py);
        }
        let buf = byte_buffer(data)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "write needs a C-contiguous buffer of bytes",
            ));
        }
        let len = buf.len_bytes();
        let ptr = buf.buf_ptr() as usize;
        // SAFETY: the PyBuffer export keeps the memory alive and its size fixed until `buf` is
        // dropped (after this call); the buffer is contiguous and `len` bytes long. Its bytes
        // are not changed meanwhile: that is the documented contract of `write` (`_core.pyi`),
        // since the copy runs without the GIL and Python cannot enforce it.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        py.detach(|| append(bytes)).py_err(py)
    }

    #[pyo3(signature = (state="done"))]
    fn finalize(&self, py: Python<'_>, state: &str) -> PyResult<bool> {
        let s = match state {
            "done" => core::SessionState::Done,
            "failed" => core::SessionState::Failed,
            "cancelled" => core::SessionState::Cancelled,
            other => {
                return Err(PyValueError::new_err(format!(
                    "state must be \"done\", \"failed\" or \"cancelled\", got {other:?}"
                )))
            }
        };
        self.w.finalize(s).py_err(py)
    }

    #[pyo3(signature = (timeout=None))]
    fn wait_cancelled(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = timeout_of(timeout)?;
        Ok(py.detach(|| self.w.wait_cancelled(t)))
    }

    fn __repr__(&self) -> String {
        format!(
            "Writer(conversation_id={:?}, total_bytes={})",
            self.w.conversation_id(),
            self.w.total_bytes()
        )
    }
}

#[pyclass(module = "ringcast")]
struct Reader {
    r: Option<core::Reader>,
}

fn reader_closed(py: Python<'_>) -> PyErr {
    PyErr::from_type(
        exceptions(py).base.bind(py).clone(),
        "the reader was closed",
    )
}

impl Reader {
    fn get(&mut self, py: Python<'_>) -> PyResult<&mut core::Reader> {
        self.r.as_mut().ok_or_else(|| reader_closed(py))
    }
    fn get_ref(&self, py: Python<'_>) -> PyResult<&core::Reader> {
        self.r.as_ref().ok_or_else(|| reader_closed(py))
    }
}

/// A byte view of any buffer object: typed buffers (`array('i')`, numpy) are viewed as their
/// raw bytes, as `os.write` would.
fn byte_buffer(obj: &Bound<'_, PyAny>) -> PyResult<PyBuffer<u8>> {
    match PyBuffer::<u8>::get(obj) {
        Ok(b) => Ok(b),
        Err(e) => {
            let Ok(view) = obj
                .py()
                .import("builtins")?
                .getattr("memoryview")?
                .call1((obj,))
            else {
                return Err(e);
            };
            match view.call_method1("cast", ("B",)) {
                Ok(bytes_view) => PyBuffer::<u8>::get(&bytes_view),
                Err(_) => Err(e),
            }
        }
    }
}

/// Copies what is available now (at most `max`) into a new bytes object; `None` if pending.
fn take_now(py: Python<'_>, r: &mut core::Reader, max: u64) -> PyResult<Option<Py<PyBytes>>> {
    let avail = r.available().min(max);
    if avail > 0 && avail < DETACH_COPY_BYTES {
        let mut got = core::Poll::Pending;
        let mut err = None;
        let b = PyBytes::new_with(py, avail as usize, |buf| {
            match r.poll_into(buf) {
                Ok(p) => got = p,
                Err(e) => err = Some(e),
            }
            Ok(())
        })?;
        if let Some(e) = err {
            return Err(to_py(py, e));
        }
        if got == core::Poll::Data(avail as usize) {
            return Ok(Some(b.unbind()));
        }
        // The session moved under us (cannot shrink, so this is an end): report it below.
    }
    let mut buf = vec![0u8; avail.max(1) as usize];
    let polled = if avail >= DETACH_COPY_BYTES {
        py.detach(|| r.poll_into(&mut buf))
    } else {
        r.poll_into(&mut buf)
    };
    match polled.py_err(py)? {
        core::Poll::Data(n) => Ok(Some(PyBytes::new(py, &buf[..n]).unbind())),
        core::Poll::End => Ok(Some(PyBytes::new(py, b"").unbind())),
        core::Poll::Pending => Ok(None),
    }
}

#[pymethods]
impl Reader {
    #[getter]
    fn conversation_id(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.get_ref(py)?.conversation_id().to_string())
    }
    #[getter]
    fn offset(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.get_ref(py)?.offset())
    }
    #[getter]
    fn slot(&self, py: Python<'_>) -> PyResult<u32> {
        Ok(self.get_ref(py)?.slot())
    }
    #[getter]
    fn generation(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.get_ref(py)?.generation())
    }
    #[getter]
    fn epoch(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.get_ref(py)?.epoch())
    }
    #[getter]
    fn at_end(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.get_ref(py)?.at_end())
    }

    fn ready(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.get_ref(py)?.ready())
    }

    fn state(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(match self.get_ref(py)?.state() {
            Ok(s) => s.as_str(),
            Err(r) => r.as_str(),
        })
    }

    #[pyo3(signature = (max_bytes=1<<20))]
    fn read_nowait(&mut self, py: Python<'_>, max_bytes: u64) -> PyResult<Option<Py<PyBytes>>> {
        if max_bytes == 0 {
            return Err(PyValueError::new_err("max_bytes must be at least 1"));
        }
        take_now(py, self.get(py)?, max_bytes)
    }

    #[pyo3(signature = (max_bytes=1<<20, timeout=None))]
    fn read(
        &mut self,
        py: Python<'_>,
        max_bytes: u64,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyBytes>> {
        if max_bytes == 0 {
            return Err(PyValueError::new_err("max_bytes must be at least 1"));
        }
        let t = timeout_of(timeout)?;
        let r = self.get(py)?;
        if let Some(b) = take_now(py, r, max_bytes)? {
            return Ok(b);
        }
        // Wait with the GIL released and no buffer (allocating `max_bytes` per wait, e.g.
        // 1 MiB, cost every wake-up a zeroed megabyte), then copy exactly what is there into
        // the bytes object. The wait is interrupted now and then so that Ctrl-C reaches Python.
        let deadline = t.map(|t| std::time::Instant::now() + t);
        loop {
            let slice = Duration::from_millis(200);
            let step = match deadline {
                Some(d) => d
                    .saturating_duration_since(std::time::Instant::now())
                    .min(slice),
                None => slice,
            };
            let reader = &*r;
            if py.detach(|| reader.wait_ready(Some(step))) {
                if let Some(b) = take_now(py, r, max_bytes)? {
                    return Ok(b);
                }
                // Ready yet nothing to take can only come from a segment scribbled under us:
                // go on, but still bounded by the timeout and interruptible.
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(PyBytes::new(py, b"").unbind());
            }
        }
    }

    #[pyo3(signature = (buffer, timeout=None))]
    fn read_into(
        &mut self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let t = timeout_of(timeout)?;
        let buf = byte_buffer(buffer)?;
        if buf.readonly() || !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "read_into needs a writable, C-contiguous buffer",
            ));
        }
        let len = buf.len_bytes();
        if len == 0 {
            return Err(PyValueError::new_err("read_into needs a non-empty buffer"));
        }
        let ptr = buf.buf_ptr() as usize;
        let r = self.get(py)?;
        let polled = py.detach(|| {
            // SAFETY: the buffer export (`buf`, alive until after this closure) pins the
            // writable, contiguous memory of `len` bytes; nothing else touches it meanwhile:
            // the caller handed it to us for this call, and `read_into`'s documented contract
            // (`_core.pyi`) is that no other thread uses it until the call returns.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
            r.read_into(dst, t)
        });
        match polled.py_err(py)? {
            core::Poll::Data(n) => Ok(n),
            core::Poll::End | core::Poll::Pending => Ok(0),
        }
    }

    #[pyo3(signature = (max_bytes=1<<20))]
    fn aread<'py>(slf: Bound<'py, Self>, max_bytes: u64) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        if max_bytes == 0 {
            return Err(PyValueError::new_err("max_bytes must be at least 1"));
        }
        let n = {
            let me = slf.borrow();
            me.get_ref(py)?.notifier().py_err(py)?
        };
        let notifier = Notifier { n };
        py.import("ringcast._aio")?
            .getattr("aread")?
            .call1((slf, notifier, max_bytes))
    }

    fn close(&mut self) {
        if let Some(mut r) = self.r.take() {
            r.close();
        }
    }

    fn __repr__(&self) -> String {
        match &self.r {
            Some(r) => format!(
                "Reader(conversation_id={:?}, offset={})",
                r.conversation_id(),
                r.offset()
            ),
            None => "Reader(closed)".into(),
        }
    }
}

#[pyclass(module = "ringcast", frozen)]
struct Notifier {
    n: Arc<core::Notifier>,
}

#[pymethods]
impl Notifier {
    fn fileno(&self) -> i32 {
        self.n.fd()
    }
    fn subscribe(&self, py: Python<'_>, slot: u32, generation: u64) -> PyResult<()> {
        self.n.subscribe(slot, generation).py_err(py)
    }
    fn unsubscribe(&self, py: Python<'_>, slot: u32, generation: u64) -> PyResult<()> {
        self.n.unsubscribe(slot, generation).py_err(py)
    }
    fn drain(&self) -> Vec<u32> {
        self.n.drain()
    }
    #[pyo3(signature = (yield_first=false))]
    fn arm(&self, py: Python<'_>, yield_first: bool) -> bool {
        if yield_first {
            py.detach(|| self.n.arm(true))
        } else {
            self.n.arm(false)
        }
    }
    /// "armed", "sending" or "idle" (see `ringcast_core::layout::arm_state`).
    #[getter]
    fn arm_state(&self) -> &'static str {
        match self.n.arm_state() {
            core::arm_state::ARMED => "armed",
            core::arm_state::SENDING => "sending",
            core::arm_state::IDLE => "idle",
            _ => "invalid",
        }
    }
    fn owns_row(&self) -> bool {
        self.n.owns_row()
    }
}

#[pymodule]
fn _core(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    make_exceptions(py, m)?;
    m.add("LAYOUT_VERSION", core::LAYOUT_VERSION)?;
    m.add("MAX_PROCESSES", core::MAX_PROCESSES)?;
    m.add_class::<Segment>()?;
    m.add_class::<Writer>()?;
    m.add_class::<Reader>()?;
    m.add_class::<Notifier>()?;
    m.add_class::<SessionInfo>()?;
    m.add_class::<SegmentStats>()?;
    Ok(())
}
