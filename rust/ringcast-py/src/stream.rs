//! `ringcast.Writer` and `ringcast.Reader`: the session handles. Blocking waits and large copies
//! run with the GIL released and touch no Python object. `Reader.aread` is Python
//! (`ringcast._aio`, installed on this class by `ringcast/__init__.py`): it waits on the
//! `Notifier` that `Reader.notifier()` returns.

use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView};

use ringcast_core as core;

use crate::errors::{producer_died, reader_closed, to_py, IntoPyResult};
use crate::fanout::{SocketFanOut, THROUGH_APPENDED, THROUGH_REFUSED};
use crate::notifier::Notifier;

/// Copies above this size release the GIL.
const DETACH_COPY_BYTES: u64 = 256 * 1024;

fn timeout_of(t: Option<f64>) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
        Some(s) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, got {s}"
        ))),
    }
}

/// `seconds` as nanoseconds (saturating); `ValueError` naming `what` for a negative or
/// non-finite number.
pub(crate) fn nanos_of(what: &str, seconds: f64) -> PyResult<u64> {
    if seconds.is_finite() && seconds >= 0.0 {
        Ok((seconds * 1e9).min(u64::MAX as f64) as u64)
    } else {
        Err(PyValueError::new_err(format!(
            "{what} must be a finite number of seconds, 0 or more, got {seconds}"
        )))
    }
}

/// A byte view of any buffer object: typed buffers (`array('i')`, numpy) are viewed as their
/// raw bytes, as `os.write` would.
fn byte_buffer(obj: &Bound<'_, PyAny>) -> PyResult<PyBuffer<u8>> {
    match PyBuffer::<u8>::get(obj) {
        Ok(b) => Ok(b),
        Err(e) => {
            let Ok(view) = PyMemoryView::from(obj) else {
                return Err(e);
            };
            match view.call_method1("cast", ("B",)) {
                Ok(bytes_view) => PyBuffer::<u8>::get(&bytes_view),
                Err(_) => Err(e),
            }
        }
    }
}

/// Decimal digits of `n`.
fn digits(n: u64) -> u64 {
    n.checked_ilog10().unwrap_or(0) as u64 + 1
}

/// The `id:` line of an SSE event of `body_len` bytes appended at offset `start`, as
/// `ringcast.wire.sse.frame_event` makes it (the one definition of the rule; this is its
/// producer-side twin, checked against it by `tests/wire/test_sse.py`): `id: N\n` where N is
/// the offset just after the framed event, so N counts its own digits (a fixed point: at most
/// one correction, when adding the digits carries N into one more). Capacity for the body.
fn sse_id_line(start: u64, body_len: usize) -> Vec<u8> {
    let base = start.saturating_add(body_len as u64 + 5); // "id: " + "\n"
    let d = digits(base);
    let mut n = base + d;
    if digits(n) != d {
        n += 1;
    }
    let mut line = Vec::with_capacity(26 + body_len);
    line.extend_from_slice(b"id: ");
    line.extend_from_slice(n.to_string().as_bytes());
    line.push(b'\n');
    line
}

/// The producer handle of one session: the only one that appends.
#[pyclass(module = "ringcast", frozen)]
pub(crate) struct Writer {
    w: core::Writer,
}

impl From<core::Writer> for Writer {
    fn from(w: core::Writer) -> Self {
        Writer { w }
    }
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
    /// True once the session was cancelled, replaced or evicted (cheap atomic load).
    #[getter]
    fn cancelled(&self) -> bool {
        self.w.cancelled()
    }

    /// Append bytes (any buffer, viewed as raw bytes); False, with nothing written, once the
    /// session is finalized or gone, or once another handle became its producer (``adopt``).
    /// ``progress=False`` marks keep-alive bytes (an SSE ``: ping`` comment): appended like any
    /// others, but the session's ``last_write_at`` (what idle detection reads) stays.
    /// ``defer_wake=True``: event loops of other processes are told at the segment handle's
    /// next ``Segment.flush_wakes()`` (once per process for a whole batch of appends). A large
    /// buffer is copied without the GIL: no other thread may change it until this returns.
    #[pyo3(signature = (data, progress=true, defer_wake=false))]
    fn write(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        progress: bool,
        defer_wake: bool,
    ) -> PyResult<bool> {
        let w = &self.w;
        let wake = if defer_wake {
            core::Wake::Deferred
        } else {
            core::Wake::Now
        };
        let append = |bytes: &[u8]| w.append(bytes, progress, wake);
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

    /// Append one SSE event: ``id: <offset just after it>\n`` then ``event`` (``bytes``), the
    /// framing of ``ringcast.wire.sse.frame_event``, with the offset taken under the append
    /// lock. Returns and raises as ``write``; ``defer_wake`` as there.
    #[pyo3(signature = (event, defer_wake=false))]
    fn write_event(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyBytes>,
        defer_wake: bool,
    ) -> PyResult<bool> {
        let wake = if defer_wake {
            core::Wake::Deferred
        } else {
            core::Wake::Now
        };
        let bytes = event.as_bytes();
        let header = |start: u64| sse_id_line(start, bytes.len());
        if (bytes.len() as u64) < DETACH_COPY_BYTES {
            return self.w.append_headed(bytes, header, true, wake).py_err(py);
        }
        py.detach(|| self.w.append_headed(bytes, header, true, wake))
            .py_err(py)
    }

    /// ``write_event(event, defer_wake=True)``, then, if ``fanout`` lets writes through
    /// (``SocketFanOut.through``, which its pump sets only while it is all this process waits
    /// on the session with), one pass of ``fanout`` in the same call: the event goes to its
    /// clients' sockets at once, with no wake-up and no pump step. Returns 0 if the append
    /// was refused (``write_event``'s False); 1 if it was made and the session's readers are
    /// to be told as after a deferred ``write_event`` (nothing was passed, or the pump has to
    /// see the pass: it went wrong for a client, or left more to read); 2 if it was made,
    /// passed to every client of ``fanout``, and no other process awaits a wake-up from this
    /// segment handle: nobody needs telling. Raises as ``write``.
    fn write_event_through(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyBytes>,
        fanout: &Bound<'_, SocketFanOut>,
    ) -> PyResult<u8> {
        if !self.write_event(py, event, true)? {
            return Ok(THROUGH_REFUSED);
        }
        // Borrowed elsewhere: only by a pass of its own on this thread (cannot be), or by
        // another thread's call (its caller's business): the pump's pass finds the event.
        let Ok(mut fan) = fanout.try_borrow_mut() else {
            return Ok(THROUGH_APPENDED);
        };
        Ok(fan.pass_through(py, &self.w))
    }

    /// End the stream as ``"done"``, ``"failed"`` or ``"cancelled"``; idempotent. False if it
    /// had already ended. ``defer_wake`` as for ``write``.
    #[pyo3(signature = (state="done", defer_wake=false))]
    fn finalize(&self, py: Python<'_>, state: &str, defer_wake: bool) -> PyResult<bool> {
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
        let wake = if defer_wake {
            core::Wake::Deferred
        } else {
            core::Wake::Now
        };
        self.w.finalize_waking(s, wake).py_err(py)
    }

    /// The positions in ``writers`` of those whose session was cancelled, replaced or evicted
    /// (``cancelled``): one call for a process's whole set of producers, where a loop over
    /// the property costs a Python step per writer.
    #[staticmethod]
    fn cancelled_among(writers: Vec<PyRef<'_, Writer>>) -> Vec<usize> {
        writers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.w.cancelled())
            .map(|(i, _)| i)
            .collect()
    }

    /// The positions in ``writers`` of those whose session runs, is still theirs, and had no
    /// write that counts as progress (keep-alives do not) for ``seconds`` or longer: one call
    /// for a process's whole set of producers (its keep-alive check), as ``cancelled_among``.
    /// ``ValueError`` for a negative or non-finite number of seconds.
    #[staticmethod]
    fn silent_among(writers: Vec<PyRef<'_, Writer>>, seconds: f64) -> PyResult<Vec<usize>> {
        let ns = nanos_of("silent_among: seconds", seconds)?;
        let now = core::unix_nanos();
        Ok(writers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.w.silent_for(now, ns))
            .map(|(i, _)| i)
            .collect())
    }

    /// Block (GIL released) until the session is cancelled (True) or the timeout passes
    /// (False; ``None`` = no limit).
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

/// A cursor into one session, at an absolute byte offset.
///
/// ``await reader.aread()`` reads without blocking the event loop (see ``aread``).
#[pyclass(module = "ringcast")]
pub(crate) struct Reader {
    r: Option<core::Reader>,
}

impl From<core::Reader> for Reader {
    fn from(r: core::Reader) -> Self {
        Reader { r: Some(r) }
    }
}

impl Reader {
    fn get(&mut self, py: Python<'_>) -> PyResult<&mut core::Reader> {
        self.r.as_mut().ok_or_else(|| reader_closed(py))
    }
    /// The open core reader (`fanout`'s passes read through it).
    pub(crate) fn core(&mut self, py: Python<'_>) -> PyResult<&mut core::Reader> {
        self.get(py)
    }
    fn get_ref(&self, py: Python<'_>) -> PyResult<&core::Reader> {
        self.r.as_ref().ok_or_else(|| reader_closed(py))
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

fn check_max_bytes(max_bytes: u64) -> PyResult<()> {
    if max_bytes == 0 {
        return Err(PyValueError::new_err("max_bytes must be at least 1"));
    }
    Ok(())
}

#[pymethods]
impl Reader {
    #[getter]
    fn conversation_id(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.get_ref(py)?.conversation_id().to_string())
    }
    /// Next offset this reader will return.
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
    /// True when the session is finalized and this reader has every byte.
    #[getter]
    fn at_end(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.get_ref(py)?.at_end())
    }

    /// True if ``read_nowait`` would not return ``None``.
    fn ready(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.get_ref(py)?.ready())
    }

    /// The session's state, or the end reason if it is gone.
    fn state(&self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(match self.get_ref(py)?.state() {
            Ok(s) => s.as_str(),
            Err(r) => r.as_str(),
        })
    }

    /// Bytes available now, ``b""`` at the end, ``None`` if it would have to wait.
    #[pyo3(signature = (max_bytes=1<<20), text_signature = "($self, max_bytes=1048576)")]
    fn read_nowait(&mut self, py: Python<'_>, max_bytes: u64) -> PyResult<Option<Py<PyBytes>>> {
        check_max_bytes(max_bytes)?;
        take_now(py, self.get(py)?, max_bytes)
    }

    /// Bytes available from ``offset`` (waiting up to ``timeout``; ``None`` = forever).
    ///
    /// Returns ``b""`` at the end of a finished stream *and* when the timeout passes with no
    /// data: check ``at_end`` to tell which. Raises ``OffsetLost`` if the reader fell behind
    /// the ring and ``SessionEnded`` if the session was cancelled, replaced or evicted.
    #[pyo3(
        signature = (max_bytes=1<<20, timeout=None),
        text_signature = "($self, max_bytes=1048576, timeout=None)"
    )]
    fn read(
        &mut self,
        py: Python<'_>,
        max_bytes: u64,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyBytes>> {
        check_max_bytes(max_bytes)?;
        let t = timeout_of(timeout)?;
        let r = self.get(py)?;
        if let Some(b) = take_now(py, r, max_bytes)? {
            return Ok(b);
        }
        // Wait with the GIL released and no buffer (allocating `max_bytes` per wait, e.g.
        // 1 MiB, cost every wake-up a zeroed megabyte), then copy exactly what is there into
        // the bytes object. The wait is interrupted now and then so that Ctrl-C reaches Python.
        let deadline = t.map(|t| Instant::now() + t);
        let mut watch = ProducerWatch::default();
        loop {
            let slice = Duration::from_millis(200);
            let step = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(slice),
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
            if let Some(pid) = watch.check(&*r) {
                return Err(producer_died(py, pid));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(PyBytes::new(py, b"").unbind());
            }
        }
    }

    /// The pid of this session's producer if the session is running but that process is
    /// gone (no byte will come unless another process takes the session over), else None.
    fn dead_producer(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        Ok(self.get_ref(py)?.dead_producer())
    }

    /// ``dead_producer()`` of each reader (None for a closed one), looking at each distinct
    /// producer once: what a loop that checks thousands of waiting readers, most of them fed
    /// by a few producers, calls instead of one ``/proc`` read per reader.
    #[staticmethod]
    fn dead_producers(readers: Vec<PyRef<'_, Reader>>) -> Vec<Option<u32>> {
        let mut check = core::ProducerCheck::default();
        readers
            .iter()
            .map(|r| r.r.as_ref().and_then(|r| r.dead_producer_in(&mut check)))
            .collect()
    }

    /// Like ``read`` but fills a writable buffer; returns the byte count. The copy runs
    /// without the GIL: no other thread may use ``buffer`` until this returns.
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

    /// The ``Notifier`` of the segment handle this reader came from (the one
    /// ``Segment.notifier()`` returns): what ``aread`` waits on.
    fn notifier(&self, py: Python<'_>) -> PyResult<Notifier> {
        Ok(Notifier::from(self.get_ref(py)?.notifier().py_err(py)?))
    }

    /// Detach (the reader no longer counts in ``SessionInfo.readers``).
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

/// How a blocking ``read`` learns that its producer died when no manager sweeps the segment:
/// every ``PRODUCER_CHECK`` of waiting it looks at the producer, and a producer found dead
/// twice in a row (so a sweeping manager has had its chance to take the session over and end
/// it in-band) ends the read with ``SessionEnded("producer_died")``: within about a second.
#[derive(Default)]
struct ProducerWatch {
    last: Option<Instant>,
    dead_once: bool,
}

const PRODUCER_CHECK: Duration = Duration::from_millis(500);

impl ProducerWatch {
    fn check(&mut self, r: &core::Reader) -> Option<u32> {
        let now = Instant::now();
        let last = *self.last.get_or_insert(now);
        if now.duration_since(last) < PRODUCER_CHECK {
            return None;
        }
        self.last = Some(now);
        match r.dead_producer() {
            Some(pid) if self.dead_once => Some(pid),
            Some(_) => {
                self.dead_once = true;
                None
            }
            None => {
                self.dead_once = false;
                None
            }
        }
    }
}
