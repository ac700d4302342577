//! `ringcast.Notifier`: one readable descriptor per segment handle that an event loop watches
//! for session wake-ups (see `ringcast._aio`, its only user in the package).

use std::sync::Arc;

use pyo3::prelude::*;

use ringcast_core as core;

use crate::errors::IntoPyResult;

/// One per process: turns session wake-ups into one readable file descriptor.
///
/// ``fileno()`` is a datagram socket (abstract ``AF_UNIX`` name, no thread behind it); a
/// producer sends it one byte when a session this process subscribed to advances and the
/// notifier is armed; sending disarms it until ``arm()``. An event loop watches ``fileno()``
/// and calls ``drain()`` to learn which sessions advanced; before a reader waits, ``arm()``,
/// and if that returns True, ``drain()`` again (changes while disarmed were not signalled).
/// Repeat that ``arm()`` + ``drain()`` until ``arm()`` returns False: a drain empties the
/// socket, so it can swallow the datagram of a publish that came just after the arm, and a
/// loop that went back to waiting then would wait disarmed, with nothing in its socket.
/// A notifier inherited across ``fork`` is inert in the child: call ``Segment.notifier()``
/// there.
#[pyclass(module = "ringcast", frozen)]
pub(crate) struct Notifier {
    n: Arc<core::Notifier>,
}

impl From<Arc<core::Notifier>> for Notifier {
    fn from(n: Arc<core::Notifier>) -> Self {
        Notifier { n }
    }
}

#[pymethods]
impl Notifier {
    /// The socket's descriptor, to watch for readability.
    fn fileno(&self) -> i32 {
        self.n.fd()
    }
    /// Ask to be told when this session advances (reference counted per slot; a newer
    /// generation of the slot replaces the subscription).
    fn subscribe(&self, py: Python<'_>, slot: u32, generation: u64) -> PyResult<()> {
        self.n.subscribe(slot, generation).py_err(py)
    }
    /// Drop one reference to a subscription made by ``subscribe``.
    fn unsubscribe(&self, py: Python<'_>, slot: u32, generation: u64) -> PyResult<()> {
        self.n.unsubscribe(slot, generation).py_err(py)
    }
    /// Empty the socket and return the subscribed slots that advanced (or ended) since
    /// the last drain. Does not re-arm.
    fn drain(&self) -> Vec<u32> {
        self.n.drain()
    }
    /// Like ``drain()``, but reads no datagram, or with ``take_one`` just one (the one a
    /// readiness callback was woken by; more left in the socket keep it readable). A scan
    /// after ``arm()`` leaves a datagram sent after that arm in the socket, so one ``arm()``
    /// + ``scan()`` is enough before waiting again, where ``drain()`` needs the repeat.
    #[pyo3(signature = (take_one=false))]
    fn scan(&self, take_one: bool) -> Vec<u32> {
        self.n.scan(take_one)
    }
    /// Like ``scan()`` without the socket, limited to ``slots``: those of them this notifier
    /// is subscribed to whose session moved since the last look (which this updates, as
    /// ``scan`` does). For a producer sharing its event loop with its readers, which
    /// flushes with ``Segment.flush_wakes(skip_own=True)`` and knows where it appended.
    fn scan_slots(&self, slots: Vec<u32>) -> Vec<u32> {
        self.n.scan_slots(&slots)
    }
    /// Re-arm if a producer disarmed this notifier; True if it was disarmed (then drain:
    /// what was published meanwhile sent nothing). ``yield_first`` yields the CPU once
    /// before re-arming, so a busy producer appends more before this process sleeps.
    #[pyo3(signature = (yield_first=false))]
    fn arm(&self, py: Python<'_>, yield_first: bool) -> bool {
        if yield_first {
            py.detach(|| self.n.arm(true))
        } else {
            self.n.arm(false)
        }
    }
    /// What producers see now: ``"armed"`` (the next change sends a datagram),
    /// ``"sending"`` (a producer took the arm and its datagram is on the way) or ``"idle"``
    /// (a datagram was sent since the last ``arm()``); ``"invalid"`` only on a scribbled
    /// segment.
    #[getter]
    fn arm_state(&self) -> &'static str {
        match self.n.arm_state() {
            core::arm_state::ARMED => "armed",
            core::arm_state::SENDING => "sending",
            core::arm_state::IDLE => "idle",
            _ => "invalid",
        }
    }
    /// Whether this process still holds the process-table row its notifier started on;
    /// False if another process claimed it as if this one had died (producers then signal
    /// that process, and only ``arm()`` + ``drain()`` rescans see this one's sessions).
    fn owns_row(&self) -> bool {
        self.n.owns_row()
    }
}
