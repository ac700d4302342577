//! `ringcast.SocketFanOut`: the live edge of one session written straight into its clients'
//! sockets, one call per pass.
//!
//! An HTTP process's fan-out pump (`ringcast.server.fanout.Pump`) reads the new bytes of a
//! session and writes them to every client at the live edge. Done in Python, a pass costs a
//! read into a bytes object, its chunk framing, and a transport write per client (each a few
//! Python steps); here it is one call that reads the ring into a reused buffer, frames it once
//! and `send`s it to each client's socket. What it cannot do (a socket that takes only part of
//! a pass, or none, or fails) it hands back, and the pump lets that client go on through its
//! transport, as one whose write buffer filled.
//!
//! A producer in the same process can write through (`Writer.write_event_through`): its
//! append is followed at once by a pass of the set it names, in the same call, so an event of
//! a stream whose clients all sit in the set costs no step of the pump's at all (no wake-up,
//! no Python). The pump allows it (`through`) only while nothing else in its process waits
//! on the session and every client is in the set; a pass that goes wrong is kept (`stash`)
//! for the pump's next `pass_`, which the writer's caller then wakes as usual.
//!
//! The one rule that makes writing behind the event loop's transport correct: while a client
//! is in the set, nothing else writes to its connection, and its transport's write buffer was
//! empty when it joined (the pump checks both), so the bytes leave in order. Each client's
//! socket is held by a descriptor of our own (`dup`), closed when it leaves: a connection the
//! loop closes meanwhile cannot have its descriptor number reused under us for another one.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use ringcast_core as core;

use crate::errors::IntoPyResult;
use crate::stream::Reader;

/// The largest pass, as `ringcast.server.fanout.RELAY_READ` caps the Python pump's reads.
const MAX_PASS: u64 = 16 << 20;

struct Client {
    id: u64,
    fd: OwnedFd,
    chunked: bool,
}

/// Body bytes the passes of every `SocketFanOut` given it sent whole to the sockets of their
/// clients (by `pass_` or written through: no Python step runs per write through to count
/// them), for the process's bytes-sent counter.
#[pyclass(module = "ringcast", frozen)]
pub(crate) struct SentCounter {
    n: AtomicU64,
}

#[pymethods]
impl SentCounter {
    #[new]
    fn new() -> Self {
        SentCounter {
            n: AtomicU64::new(0),
        }
    }

    /// The bytes counted since the last call (then 0 again).
    fn take(&self) -> u64 {
        self.n.swap(0, Ordering::Relaxed)
    }
}

/// The clients at the live edge of one session and the reader that feeds them (see the
/// module docs): ``pass_`` reads what is new and sends it to every client's socket.
#[pyclass(module = "ringcast")]
pub(crate) struct SocketFanOut {
    reader: Py<Reader>,
    clients: Vec<Client>,
    /// The start of an event a capped read cut, sent with its rest at the next pass.
    carry: Vec<u8>,
    buf: Vec<u8>,
    /// A pass framed as one chunk (head, bytes, CRLF) for the chunked clients: one
    /// contiguous buffer, kept between passes, sent with one `send` (cheaper in the kernel
    /// than a `sendmsg` of three parts).
    framed: Vec<u8>,
    /// Bytes of the stream passed so far (by `pass_` and by passes written through).
    passed: u64,
    /// The largest pass a write through makes; 0: writes through make none.
    through: u64,
    /// This process's row bit (`Reader::own_row_mask`), taken when `through` was set.
    own_row: u64,
    /// A pass written through that the pump must see (trouble, more to read, or the end):
    /// the next `pass_` returns it before reading anything.
    stash: Option<Pass>,
    sent: Option<Py<SentCounter>>,
}

/// One pass's outcome, as `pass_` returns it but for `data` (see there).
struct Pass {
    n: u64,
    events: u64,
    again: bool,
    trouble: Vec<(u64, Option<Py<PyBytes>>)>,
}

/// What `pass_` returns for a pass that found something (see there).
type PassOutcome = (
    u64,
    u64,
    bool,
    Vec<(u64, Option<Py<PyBytes>>)>,
    Option<Py<PyBytes>>,
);

/// What `Writer.write_event_through` returns: the append was refused (as `write_event`'s
/// False), ...
pub(crate) const THROUGH_REFUSED: u8 = 0;
/// ... it was made and the readers of the session must be told as after a deferred
/// `write_event` (no pass was written through, or it left the pump work), ...
pub(crate) const THROUGH_APPENDED: u8 = 1;
/// ... or it was made and passed to every client of the set, and no other process waits
/// for a wake-up: nobody needs telling.
pub(crate) const THROUGH_DELIVERED: u8 = 2;

/// How a `send` of `data` to one client went.
enum Sent {
    All,
    /// This many bytes went; the rest did not (the socket's buffer is full).
    Part(usize),
    Failed,
}

/// The most capacity `SocketFanOut::framed` keeps between passes.
const FRAMED_KEPT: usize = 64 << 10;

/// Sends `bytes` with `send` until the socket has taken them all or refuses more.
fn send_all(fd: RawFd, bytes: &[u8]) -> Sent {
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        // SAFETY: `rest` is a live slice, read and never written by send; `fd` is a
        // descriptor this set owns (a duplicate of the client's socket, open until the client
        // is removed). MSG_NOSIGNAL: a closed peer gives EPIPE, not SIGPIPE; MSG_DONTWAIT:
        // never blocks the event loop, whatever the descriptor's flags.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Sent::Part(done),
            _ => return Sent::Failed,
        }
    }
    Sent::All
}

/// The head of one chunk of `len` bytes: its size in hex and CRLF, written into `out`.
fn chunk_head(len: usize, out: &mut [u8; 18]) -> &[u8] {
    let digits = if len == 0 {
        1
    } else {
        (usize::BITS - len.leading_zeros()).div_ceil(4) as usize
    };
    for (i, digit) in out.iter_mut().take(digits).enumerate() {
        *digit = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    &out[..digits + 2]
}

/// Non-overlapping `\n\n` in `data` (as `bytes.count` counts them).
fn count_event_ends(data: &[u8]) -> u64 {
    let mut n = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == b'\n' && data[i + 1] == b'\n' {
            n += 1;
            i += 2;
        } else {
            i += 1;
        }
    }
    n
}

/// Whether `fd` is a connected stream socket (what a client's transport has).
fn is_stream_socket(fd: &OwnedFd) -> bool {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are live locals of the sizes getsockopt is told; the
    // descriptor is owned here and open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && kind == libc::SOCK_STREAM
}

#[pymethods]
impl SocketFanOut {
    /// ``sent``: where every pass counts the body bytes it sends whole to clients' sockets.
    #[new]
    #[pyo3(signature = (reader, sent=None))]
    fn new(reader: Py<Reader>, sent: Option<Py<SentCounter>>) -> Self {
        SocketFanOut {
            reader,
            clients: Vec::new(),
            carry: Vec::new(),
            buf: Vec::new(),
            framed: Vec::new(),
            passed: 0,
            through: 0,
            own_row: 0,
            stash: None,
            sent,
        }
    }

    /// Bytes of the stream passed so far, by ``pass_`` and by writes through.
    #[getter]
    fn passed(&self) -> u64 {
        self.passed
    }

    /// The trouble of a pass written through that no ``pass_`` has returned yet (see
    /// ``pass_``), handed over now (for a pump that stops): ``(id, rest)`` of each client it
    /// could not wholly send to; empty if there is none.
    fn take_trouble(&mut self) -> Vec<(u64, Option<Py<PyBytes>>)> {
        self.stash.take().map(|p| p.trouble).unwrap_or_default()
    }

    /// The largest pass a ``Writer.write_event_through`` naming this set makes (0: none).
    #[getter]
    fn get_through(&self) -> u64 {
        self.through
    }

    /// Let writes through pass up to ``max_bytes`` at once (between 1 and 16 MiB), or none
    /// (``0``). The caller allows it only while nothing else in this process waits to be told
    /// of the session's appends (a write through that delivers tells nobody).
    #[setter]
    fn set_through(&mut self, py: Python<'_>, max_bytes: u64) -> PyResult<()> {
        if max_bytes > MAX_PASS {
            return Err(PyValueError::new_err(format!(
                "through must be between 0 and {MAX_PASS}, got {max_bytes}"
            )));
        }
        if max_bytes > 0 && self.through == 0 {
            self.own_row = self
                .reader
                .bind(py)
                .try_borrow_mut()?
                .core(py)?
                .own_row_mask();
        }
        self.through = max_bytes;
        Ok(())
    }

    /// Adds a client, known by ``id``, whose connection's socket is ``fd`` (duplicated: the
    /// set holds its own descriptor until ``remove``) and has inode ``inode`` (``os.fstat``,
    /// taken when the connection was made: a descriptor the event loop closed and the
    /// kernel gave to another socket since is refused, never written to); ``chunked``: its
    /// body is chunked, so a pass is sent to it as one chunk. Raises ``ValueError`` if ``id``
    /// is in the set already and ``OSError`` if ``fd`` is not that open stream socket.
    fn add(&mut self, id: u64, fd: RawFd, chunked: bool, inode: u64) -> PyResult<()> {
        if self.clients.iter().any(|c| c.id == id) {
            return Err(PyValueError::new_err(format!(
                "client {id} is in the set already"
            )));
        }
        if fd < 0 {
            return Err(PyOSError::new_err(format!("not a descriptor: {fd}")));
        }
        // SAFETY: the borrow lives only for the duplication below; the caller's transport
        // keeps `fd` open meanwhile (and a closed or foreign number fails the checks).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let own = borrowed.try_clone_to_owned()?;
        if !is_stream_socket(&own) {
            return Err(PyOSError::new_err(format!(
                "descriptor {fd} is not a stream socket"
            )));
        }
        // The very socket the connection was made with: its inode, by one fstat of our own
        // descriptor (a client joins once per session: each system call counts).
        // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a live, writable stat; the descriptor is owned here and open.
        if unsafe { libc::fstat(own.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let found = st.st_ino;
        if found != inode {
            return Err(PyOSError::new_err(format!(
                "descriptor {fd} is another socket now (inode {found}, not {inode})"
            )));
        }
        self.clients.push(Client {
            id,
            fd: own,
            chunked,
        });
        Ok(())
    }

    /// Removes a client (closing the set's descriptor of its socket); False if it was not in
    /// the set.
    fn remove(&mut self, id: u64) -> bool {
        let before = self.clients.len();
        self.clients.retain(|c| c.id != id);
        self.clients.len() != before
    }

    /// Removes every client.
    fn clear(&mut self) {
        self.clients.clear();
    }

    fn __len__(&self) -> usize {
        self.clients.len()
    }

    /// One pass: reads what the session has now (at most ``max_bytes``; a read capped there
    /// ends at an event's end, the start of the last event kept for the next pass) and sends
    /// it to every client. ``None``: nothing new yet. Else ``(n, events, again, trouble,
    /// data)``:
    /// ``n`` bytes of the stream were passed (``0``: it finished and every byte was passed
    /// before), holding ``events`` event ends (``\n\n``); ``again``: call again now (more is
    /// in the ring, or its end); ``trouble``: ``(id, rest)`` of each client the pass could not
    /// wholly send to, already removed from the set: ``rest`` is what its socket did not take
    /// (to write through its transport), ``None`` if the socket failed; ``data``: the bytes
    /// passed, with ``want_data`` (for clients served otherwise), else ``None``. Raises as
    /// ``Reader.read_nowait`` does (``OffsetLost``, ``SessionEnded``).
    #[pyo3(signature = (max_bytes, want_data=false))]
    fn pass_(
        &mut self,
        py: Python<'_>,
        max_bytes: u64,
        want_data: bool,
    ) -> PyResult<Option<PassOutcome>> {
        if max_bytes == 0 || max_bytes > MAX_PASS {
            return Err(PyValueError::new_err(format!(
                "max_bytes must be between 1 and {MAX_PASS}, got {max_bytes}"
            )));
        }
        if let Some(p) = self.stash.take() {
            // Passed already; a client joined since came in after it and needs none of it.
            // Appends made while it was kept were not passed, and their wake-up may be the
            // one that brought the caller here: it must read again.
            return Ok(Some((p.n, p.events, true, p.trouble, None)));
        }
        let Some(p) = self.pass_once(py, max_bytes)? else {
            return Ok(None);
        };
        let data = (want_data && p.n > 0).then(|| PyBytes::new(py, &self.buf).unbind());
        Ok(Some((p.n, p.events, p.again, p.trouble, data)))
    }
}

impl SocketFanOut {
    /// One pass (see `pass_`), its bytes left in `buf`.
    fn pass_once(&mut self, py: Python<'_>, max_bytes: u64) -> PyResult<Option<Pass>> {
        let bound = self.reader.bind(py);
        let mut reader = bound.try_borrow_mut()?;
        let r = reader.core(py)?;
        let avail = r.available().min(max_bytes) as usize;
        let carried = self.carry.len();
        self.buf.clear();
        self.buf.append(&mut self.carry);
        self.buf.resize(carried + avail.max(1), 0);
        let got = match r.poll_into(&mut self.buf[carried..]).py_err(py) {
            Ok(p) => p,
            Err(e) => {
                self.buf.truncate(carried);
                std::mem::swap(&mut self.carry, &mut self.buf);
                return Err(e);
            }
        };
        let mut read = match got {
            core::Poll::Data(n) => n,
            core::Poll::End | core::Poll::Pending if carried > 0 => 0,
            core::Poll::End => {
                self.buf.clear();
                return Ok(Some(Pass {
                    n: 0,
                    events: 0,
                    again: false,
                    trouble: Vec::new(),
                }));
            }
            core::Poll::Pending => return Ok(None),
        };
        // An append may have landed between `available` and the read: a pass sized for
        // nothing then read one byte of it. Top the pass up to what is there now, so that it
        // ends where an append ended (never inside an event: a client detached after this
        // pass may be sent an end event of its relay's own). An error now is left to the
        // next pass: these bytes are read already.
        if read > 0 {
            loop {
                let more = r.available().min(max_bytes - read as u64) as usize;
                if more == 0 {
                    break;
                }
                let at = carried + read;
                self.buf.resize(at + more, 0);
                match r.poll_into(&mut self.buf[at..]) {
                    Ok(core::Poll::Data(n)) if n > 0 => read += n,
                    _ => break,
                }
            }
        }
        let at_end = r.at_end();
        drop(reader);
        self.buf.truncate(carried + read);
        let capped = read as u64 >= max_bytes;
        if capped && !self.buf.ends_with(b"\n\n") {
            if let Some(i) = self.buf.windows(2).rposition(|w| w == b"\n\n") {
                self.carry.extend_from_slice(&self.buf[i + 2..]);
                self.buf.truncate(i + 2);
            }
        }
        let data = &self.buf[..];
        let events = count_event_ends(data);
        self.framed.clear();
        if self.clients.iter().any(|c| c.chunked) {
            let mut head_buf = [0u8; 18];
            self.framed
                .extend_from_slice(chunk_head(data.len(), &mut head_buf));
            self.framed.extend_from_slice(data);
            self.framed.extend_from_slice(b"\r\n");
        }
        let framed = &self.framed[..];
        let mut trouble = Vec::new();
        self.clients.retain(|c| {
            let out = if c.chunked { framed } else { data };
            match send_all(c.fd.as_raw_fd(), out) {
                Sent::All => true,
                Sent::Part(n) => {
                    trouble.push((c.id, Some(PyBytes::new(py, &out[n..]).unbind())));
                    false
                }
                Sent::Failed => {
                    trouble.push((c.id, None));
                    false
                }
            }
        });
        if self.framed.capacity() > FRAMED_KEPT {
            // A backlog's pass: not kept for the next, which is one event as a rule.
            self.framed = Vec::new();
        }
        let n = self.buf.len() as u64;
        self.passed += n;
        if let Some(sent) = &self.sent {
            // The clients left in the set took all of it.
            sent.get()
                .n
                .fetch_add(n * self.clients.len() as u64, Ordering::Relaxed);
        }
        Ok(Some(Pass {
            n,
            events,
            again: capped || !self.carry.is_empty() || at_end,
            trouble,
        }))
    }

    /// The pass of a write through (`Writer.write_event_through`), made after its append:
    /// `THROUGH_DELIVERED` if it went to every client and no process but this one has a
    /// wake-up pending through `writer`'s segment handle, else `THROUGH_APPENDED` (no pass
    /// was allowed, or the pump is to see it: kept in `stash`).
    pub(crate) fn pass_through(&mut self, py: Python<'_>, writer: &core::Writer) -> u8 {
        if self.through == 0
            || self.clients.is_empty()
            || !self.carry.is_empty()
            || self.stash.is_some()
        {
            return THROUGH_APPENDED;
        }
        let pass = match self.pass_once(py, self.through) {
            Ok(Some(p)) => p,
            // Nothing (cannot be, after an append) or an error: the pump's pass finds it.
            Ok(None) | Err(_) => return THROUGH_APPENDED,
        };
        if pass.n == 0 || pass.again || !pass.trouble.is_empty() {
            self.stash = Some(pass);
            return THROUGH_APPENDED;
        }
        if writer.wakes_pending(self.own_row) {
            THROUGH_APPENDED
        } else {
            THROUGH_DELIVERED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_head_is_the_size_in_lowercase_hex_then_crlf() {
        let mut buf = [0u8; 18];
        for len in [
            0usize,
            1,
            9,
            10,
            15,
            16,
            255,
            256,
            4095,
            65536,
            16 << 20,
            usize::MAX,
        ] {
            assert_eq!(chunk_head(len, &mut buf), format!("{len:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn event_ends_are_counted_as_bytes_count_counts_them() {
        assert_eq!(count_event_ends(b""), 0);
        assert_eq!(count_event_ends(b"a\n\nb\n\n"), 2);
        assert_eq!(count_event_ends(b"\n\n\n"), 1);
        assert_eq!(count_event_ends(b"\n\n\n\n"), 2);
    }
}
