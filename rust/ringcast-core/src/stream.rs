//! Session handles: the producer's [`Writer`] and a [`Reader`] at an absolute byte offset.
//! They hold a slot and generation from the registry, append and copy through the ring, and
//! wait through `notify`; every handle re-checks its generation after each operation, so none
//! ever touches a newer session in a reused slot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{EndReason, Error, Result};
use crate::layout::{state, SlotMeta};
use crate::notify::{self, Notifier};
use crate::registry::{busy_holder_alive, ProducerClaim, Registry, SessionState};
use crate::ring::{self, Cursors, ReadOutcome};
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::sys::futex::WaitOutcome;
use crate::sys::process;

/// The most a producer's ring is backed ahead at once: the step doubles from one page (a short
/// stream costs the pages it writes, no more) up to this, so a long one costs one `fallocate`
/// per this many bytes, until the ring has been written around once.
const BACKING_CHUNK: u64 = 64 << 10;

/// Room kept backed past every append, so that a writer refused for want of memory can still
/// append a short error event before it finalizes.
const APPEND_RESERVE: u64 = 1 << 10;

/// `Writer::backed` before the first append has looked at the ring.
const BACKED_UNKNOWN: u64 = u64::MAX;

/// The producer of one session.
pub struct Writer {
    reg: Arc<Registry>,
    claim: ProducerClaim,
    conversation_id: String,
    owner: String,
    /// Bytes of the ring region, from its start, known to be backed by memory. Read and
    /// written only under the append lock.
    backed: AtomicU64,
    /// Set when backing failed for want of memory: from then on appends may use the reserve.
    short_of_memory: AtomicBool,
}

/// When an append tells the event loops of other processes (their notifiers) about itself.
/// Threads blocked in a read are woken at once either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A datagram to each subscribed, armed process now.
    Now,
    /// At this segment handle's next `Segment::flush_wakes`, once per process for every
    /// deferred append since the last one. The caller must flush soon (once per turn of its
    /// event loop, say): until then those loops are not told.
    Deferred,
}

/// Outcome of a non-blocking read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// This many bytes were copied.
    Data(usize),
    /// The session is finished and the reader has every byte.
    End,
    /// Nothing yet; the session is still running.
    Pending,
}

/// What is left of a wait until `deadline` (`None` = no limit); `Err(())` once it has passed.
fn time_left(deadline: Option<Instant>) -> std::result::Result<Option<Duration>, ()> {
    match deadline {
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(l) if !l.is_zero() => Ok(Some(l)),
            _ => Err(()),
        },
        None => Ok(None),
    }
}

impl Writer {
    pub(crate) fn new(reg: Arc<Registry>, claim: ProducerClaim, id: &str, owner: &str) -> Writer {
        Writer {
            reg,
            claim,
            conversation_id: id.to_string(),
            owner: owner.to_string(),
            backed: AtomicU64::new(BACKED_UNKNOWN),
            short_of_memory: AtomicBool::new(false),
        }
    }

    fn meta(&self) -> &SlotMeta {
        self.reg.view().slot(self.claim.slot)
    }

    pub fn conversation_id(&self) -> &str {
        &self.conversation_id
    }
    pub fn owner(&self) -> &str {
        &self.owner
    }
    pub fn slot(&self) -> u32 {
        self.claim.slot
    }
    pub fn generation(&self) -> u64 {
        self.claim.generation
    }
    pub fn total_bytes(&self) -> u64 {
        self.meta().cursor.load(Ordering::Acquire)
    }

    /// Whether the session runs, is still this writer's, and had no write that counts as
    /// progress (keep-alives do not) in the `ns` nanoseconds before `now_ns` (Unix time).
    pub fn silent_for(&self, now_ns: u64, ns: u64) -> bool {
        let m = self.meta();
        !self.cancelled()
            && m.state.load(Ordering::Acquire) == state::RUNNING
            && now_ns.saturating_sub(m.last_write_ns.load(Ordering::Relaxed)) >= ns
    }

    /// True once the session was cancelled, replaced or evicted.
    pub fn cancelled(&self) -> bool {
        let m = self.meta();
        m.generation.load(Ordering::Acquire) != self.claim.generation
            || m.cancel.load(Ordering::Acquire) != 0
    }

    /// Runs `f` holding the slot's append lock, if this writer is still the producer of a
    /// running session. `None` otherwise.
    fn with_append_lock<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let m = self.meta();
        let mut backoff = Backoff::with_limit(Duration::from_secs(2));
        loop {
            // SeqCst: pairs with the allocator's SeqCst load of `busy` after freeing (see
            // `RegistryGuard::alloc`): either it sees us busy, or we see the new generation.
            match m.busy.compare_exchange(
                0,
                self.claim.busy_tag,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(holder) => {
                    if !self.is_producer() || self.gone() {
                        return None;
                    }
                    if backoff.steps() > 64 && !busy_holder_alive(holder) {
                        let _ =
                            m.busy
                                .compare_exchange(holder, 0, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    if !backoff.snooze() {
                        return None;
                    }
                }
            }
        }
        let ok =
            !self.gone() && self.is_producer() && m.state.load(Ordering::SeqCst) == state::RUNNING;
        let out = if ok { Some(f()) } else { None };
        m.busy.store(0, Ordering::Release);
        out
    }

    fn gone(&self) -> bool {
        self.meta().generation.load(Ordering::SeqCst) != self.claim.generation
    }

    fn is_producer(&self) -> bool {
        self.meta().producer_token.load(Ordering::Acquire) == self.claim.token
    }

    /// Appends bytes; false (nothing written) once the session ended or another producer took
    /// over. `SegmentError::NoSpace` (nothing written) when the segment's filesystem has no
    /// memory left for them; see `back_pages`.
    pub fn write(&self, data: &[u8]) -> Result<bool> {
        self.append(data, true, Wake::Now)
    }

    /// Appends keep-alive bytes (an SSE `: ping` comment, say): like `write`, except that they
    /// are not progress, so the session's last write time (what idle detection reads) stays.
    pub fn write_keepalive(&self, data: &[u8]) -> Result<bool> {
        self.append(data, false, Wake::Now)
    }

    /// Appends bytes as `write` (`progress`) or `write_keepalive` (not), telling readers as
    /// `wake` says: with `Wake::Deferred`, the event loops of other processes learn of them
    /// at this segment handle's next `Segment::flush_wakes` (blocking readers at once).
    pub fn append(&self, data: &[u8], progress: bool, wake: Wake) -> Result<bool> {
        self.append_inner(data, None::<fn(u64) -> Vec<u8>>, progress, wake)
    }

    /// Appends `header(start) ++ data` as one append, where `start` is the session's
    /// `total_bytes` just before it, read under the append lock (so a header that names an
    /// offset, as an SSE `id:` line does, is exact even with other appends from other threads
    /// or handles). Otherwise as `append`.
    pub fn append_headed(
        &self,
        data: &[u8],
        header: impl FnOnce(u64) -> Vec<u8>,
        progress: bool,
        wake: Wake,
    ) -> Result<bool> {
        self.append_inner(data, Some(header), progress, wake)
    }

    fn append_inner(
        &self,
        data: &[u8],
        header: Option<impl FnOnce(u64) -> Vec<u8>>,
        progress: bool,
        wake: Wake,
    ) -> Result<bool> {
        self.reg.check_open()?;
        let view = self.reg.view();
        let m = self.meta();
        let done = self.with_append_lock(|| {
            let joined;
            let bytes = match header {
                None => data,
                Some(header) => {
                    // Relaxed: only the producer (us, under the append lock) writes `cursor`.
                    let mut buf = header(m.cursor.load(Ordering::Relaxed));
                    buf.extend_from_slice(data);
                    joined = buf;
                    &joined[..]
                }
            };
            self.back_pages(m, bytes.len() as u64)?;
            ring::append(&Cursors::of(m), &view.ring(self.claim.slot), bytes);
            if progress {
                m.last_write_ns
                    .store(process::unix_nanos(), Ordering::Relaxed);
            }
            Ok(())
        });
        match done {
            Some(Err(e)) => Err(e),
            Some(Ok(())) => {
                match wake {
                    Wake::Now => notify::publish(view, self.reg.wakers(), m),
                    Wake::Deferred => notify::publish_deferred(self.reg.wakers(), m),
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Backs the ring pages an append of `len` bytes will write, before it writes them: on a
    /// full filesystem a write to an unbacked page of the mapping is a `SIGBUS` that kills the
    /// process; this turns it into an error for this one stream. Called under the append lock.
    ///
    /// Until the ring has been written around once, the bytes below the end of an append are
    /// the ones it and earlier appends wrote, so `backed` (a prefix of the ring region) only
    /// grows, `APPEND_RESERVE` ahead of the end, by steps that double from a page to
    /// `BACKING_CHUNK`; then never again (the whole ring is backed while the session holds the
    /// slot).
    fn back_pages(&self, m: &SlotMeta, len: u64) -> Result<()> {
        let view = self.reg.view();
        let g = view.geometry();
        let stride = g.ring_stride;
        let mut backed = self.backed.load(Ordering::Relaxed);
        if backed == stride {
            return Ok(());
        }
        let page = g.page_size as u64;
        let round_up = |x: u64, to: u64| x.div_ceil(to).saturating_mul(to);
        // Relaxed: only the producer writes `cursor`; `head` is ours too (or a dead producer's,
        // published before we became the producer).
        let start = m.cursor.load(Ordering::Relaxed);
        if backed == BACKED_UNKNOWN {
            // Every byte below `head` was written (or backed ahead of writing) by a producer.
            let head = m.head.load(Ordering::Relaxed).max(start);
            backed = round_up(head.min(g.session_bytes), page).min(stride);
        }
        let end = start.saturating_add(len).min(g.session_bytes);
        let short = self.short_of_memory.load(Ordering::Relaxed);
        let want = if short { end } else { end + APPEND_RESERVE };
        if round_up(want, page).min(stride) <= backed {
            self.backed.store(backed, Ordering::Relaxed);
            return Ok(());
        }
        let goal = if short {
            round_up(want, page).min(stride)
        } else {
            let step = backed.clamp(page, BACKING_CHUNK.max(page));
            round_up(want.max(backed + step), page).min(stride)
        };
        match view.back_ring(self.claim.slot, backed, goal) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                // This filesystem cannot allocate ahead: pages are backed as they are written,
                // as they were before (docs/SECURITY.md).
                self.backed.store(stride, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => {
                self.backed.store(backed, Ordering::Relaxed);
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    self.short_of_memory.store(true, Ordering::Relaxed);
                    return Err(Error::no_space(
                        self.reg.path(),
                        e,
                        backed.saturating_sub(start),
                    ));
                }
                return Err(Error::io(self.reg.path(), "back the ring pages of", e));
            }
        }
        self.backed.store(goal, Ordering::Relaxed);
        // Cheap next to the allocation: a file truncated under us would fault on these pages
        // as surely as a full one; say so instead.
        let file = view.mapping().file_len().unwrap_or(usize::MAX) as u64;
        if file < g.file_bytes {
            return Err(Error::invalid_segment(
                self.reg.path(),
                format!(
                    "the file was truncated to {file} bytes under this process (its layout needs \
                     {}); stop every process using it and create it again",
                    g.file_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Whether appends with [`Wake::Deferred`] through this segment handle (this writer's or
    /// another's) left a wake-up pending for a process outside `except` (bit `i` = row `i` of
    /// the process table; see [`Reader::own_row_mask`]): the next `Segment::flush_wakes` would
    /// signal it.
    pub fn wakes_pending(&self, except: u64) -> bool {
        self.reg.wakes_pending(except)
    }

    /// Ends the stream with `end` (done, failed or cancelled). False if it had already ended.
    pub fn finalize(&self, end: SessionState) -> Result<bool> {
        self.finalize_waking(end, Wake::Now)
    }

    /// [`finalize`](Self::finalize), telling the event loops of other processes as `wake` says
    /// (`Deferred`: at the next `Segment::flush_wakes`, like a deferred append).
    pub fn finalize_waking(&self, end: SessionState, wake: Wake) -> Result<bool> {
        if end == SessionState::Running {
            return Err(Error::InvalidArgument(
                "finalize takes \"done\", \"failed\" or \"cancelled\", not \"running\"".into(),
            ));
        }
        self.reg.check_open()?;
        let m = self.meta();
        // Under the registry lock: the session joins the finished list (what eviction takes
        // from) in the same step as it changes state, so a crash leaves both or neither.
        let reg = self.reg.lock()?;
        let done = self.with_append_lock(|| {
            m.completed_at_ns
                .store(process::unix_nanos(), Ordering::Relaxed);
            // Release: a reader that sees the final state sees the final cursor too.
            m.state.store(end.raw(), Ordering::Release);
        });
        if done.is_some() {
            reg.link_finished(self.claim.slot);
        }
        drop(reg);
        if done.is_some() {
            match wake {
                Wake::Now => notify::publish(self.reg.view(), self.reg.wakers(), m),
                Wake::Deferred => notify::publish_deferred(self.reg.wakers(), m),
            }
        }
        Ok(done.is_some())
    }

    /// Blocks until the session is cancelled (true) or `timeout` passes (false).
    pub fn wait_cancelled(&self, timeout: Option<Duration>) -> bool {
        let m = self.meta();
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let seen = m.seq.load(Ordering::SeqCst);
            if self.cancelled() {
                return true;
            }
            let Ok(left) = time_left(deadline) else {
                return false;
            };
            // A cancel is published (`seq` bumped) after it is stored, so a cancel after the
            // check above ends this wait.
            self.reg.wait_for_publish(self.claim.slot, seen, left);
        }
    }
}

/// The producers found alive or dead during one pass of [`Reader::dead_producer_in`] checks.
/// Meant to live for one pass: a producer that dies after it was looked at is seen by the
/// next pass.
#[derive(Default)]
pub struct ProducerCheck {
    seen: HashMap<(u32, u64), bool>,
}

impl ProducerCheck {
    fn is_alive(&mut self, producer: process::ProcessId) -> bool {
        *self
            .seen
            .entry((producer.pid, producer.start_time))
            .or_insert_with(|| producer.is_alive())
    }
}

/// A cursor into one session.
pub struct Reader {
    reg: Arc<Registry>,
    slot: u32,
    generation: u64,
    offset: u64,
    conversation_id: String,
    /// Counted in `SessionInfo::readers` until closed.
    counted: bool,
}

impl Reader {
    /// A reader of the session (slot, generation) that `Registry::attach_reader` attached (and
    /// counted, if `counted`).
    pub(crate) fn new(
        reg: Arc<Registry>,
        slot: u32,
        generation: u64,
        offset: u64,
        id: &str,
        counted: bool,
    ) -> Reader {
        Reader {
            reg,
            slot,
            generation,
            offset,
            conversation_id: id.to_string(),
            counted,
        }
    }

    pub fn conversation_id(&self) -> &str {
        &self.conversation_id
    }
    pub fn slot(&self) -> u32 {
        self.slot
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn epoch(&self) -> u64 {
        self.reg.view().epoch()
    }

    /// This process's bit in the masks of the process table (bit `i` = row `i`): the row its
    /// notifier is signalled through; 0 while this segment handle has claimed no row. For
    /// [`Writer::wakes_pending`].
    pub fn own_row_mask(&self) -> u64 {
        self.reg.own_row_mask()
    }

    fn meta(&self) -> &SlotMeta {
        self.reg.view().slot(self.slot)
    }

    fn ended(&self) -> Error {
        Error::Ended(self.reg.end_reason(self.slot, self.generation))
    }

    /// The session's state, or why it is gone.
    pub fn state(&self) -> std::result::Result<SessionState, EndReason> {
        let m = self.meta();
        let s = m.state.load(Ordering::Acquire);
        if m.generation.load(Ordering::Acquire) != self.generation {
            return Err(self.reg.end_reason(self.slot, self.generation));
        }
        SessionState::from_raw(s).ok_or(EndReason::Evicted)
    }

    /// Copies what is available now into `dst` without waiting.
    pub fn poll_into(&mut self, dst: &mut [u8]) -> Result<Poll> {
        self.reg.check_open()?;
        let m = self.meta();
        if m.generation.load(Ordering::Acquire) != self.generation {
            return Err(self.ended());
        }
        // Acquire: pairs with the Release store of a final state in `finalize`, which follows
        // the last publish; so a final state implies the cursor read below is final too.
        let st = m.state.load(Ordering::Acquire);
        let out = ring::read(
            &Cursors::of(m),
            &self.reg.view().ring(self.slot),
            self.offset,
            dst,
        );
        if m.generation.load(Ordering::Acquire) != self.generation {
            return Err(self.ended());
        }
        match out {
            ReadOutcome::Copied(n) => {
                self.offset += n as u64;
                Ok(Poll::Data(n))
            }
            ReadOutcome::Empty { .. } => match st {
                state::RUNNING => Ok(Poll::Pending),
                state::DONE | state::FAILED | state::CANCELLED => Ok(Poll::End),
                // A state no installed session has, under its generation: the slot is damaged.
                // Report the session gone (as `ready` does) rather than wait for a change that
                // will never come.
                _ => Err(Error::Ended(EndReason::Evicted)),
            },
            ReadOutcome::Lost { first_available } => Err(Error::OffsetLost {
                requested: self.offset,
                first_available,
            }),
        }
    }

    /// True if `poll_into` would not return `Pending`.
    pub fn ready(&self) -> bool {
        let m = self.meta();
        let st = m.state.load(Ordering::Acquire);
        m.generation.load(Ordering::Acquire) != self.generation
            || st != state::RUNNING
            || m.cursor.load(Ordering::Acquire) > self.offset
    }

    /// The pid of this session's producer if the session is still running but its producer
    /// process (pid and start time) is gone: no byte will come unless another process takes
    /// the session over (`Segment::take_over_dead`, what `ringcast serve`'s manager does).
    /// Reads `/proc/<pid>/stat`, so a waiting reader asks now and then, not per wake-up.
    pub fn dead_producer(&self) -> Option<u32> {
        self.dead_producer_in(&mut ProducerCheck::default())
    }

    /// [`dead_producer`](Self::dead_producer), taking the answer for a producer already looked
    /// at in `check` from there: one pass over the readers of a process (thousands of
    /// sessions, a few producers) reads `/proc` once per producer, not once per session.
    pub fn dead_producer_in(&self, check: &mut ProducerCheck) -> Option<u32> {
        let m = self.meta();
        let producer = process::ProcessId {
            pid: m.producer_pid.load(Ordering::Acquire),
            start_time: m.producer_start.load(Ordering::Acquire),
        };
        let running = m.state.load(Ordering::Acquire) == state::RUNNING;
        // The generation is checked last: the producer fields read above belong to it.
        if !running || m.generation.load(Ordering::Acquire) != self.generation {
            return None;
        }
        (producer.pid != 0 && !check.is_alive(producer)).then_some(producer.pid)
    }

    /// True when the session is finished and this reader has every byte.
    pub fn at_end(&self) -> bool {
        let m = self.meta();
        let st = m.state.load(Ordering::Acquire);
        if m.generation.load(Ordering::Acquire) != self.generation
            || !matches!(st, state::DONE | state::FAILED | state::CANCELLED)
        {
            return false;
        }
        let cursor = m.cursor.load(Ordering::Acquire);
        // The generation again: a slot freed and installed anew since the check above has
        // its cursor reset, which must not pass for this session's end (a reader still behind
        // would be told it has every byte). Acquire on the cursor pairs with the install's
        // release store of it, which follows the new generation.
        cursor <= self.offset && m.generation.load(Ordering::Acquire) == self.generation
    }

    /// Waits up to `timeout` (None = forever) until a read would not be `Pending` (data, the
    /// end, or an error to report); true if so. Nothing is copied, so a caller can size its
    /// buffer to what is there instead of to the most it would take.
    pub fn wait_ready(&self, timeout: Option<Duration>) -> bool {
        self.wait_until(timeout.map(|t| Instant::now() + t))
    }

    /// `wait_ready` up to an instant (None = forever).
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let m = self.meta();
        let mut yielded = false;
        loop {
            let seen = m.seq.load(Ordering::SeqCst);
            if self.ready() {
                return true;
            }
            if !yielded {
                // Yield once before sleeping. On an idle CPU this returns at once; on a busy
                // one the producer and the other readers run first, and what they append
                // meanwhile is read without a sleep and a wake. Without it, many readers
                // faster than the producer each fall asleep after every append, and the
                // producer spends its time waking them (measured: 64 reader processes on 2
                // cores held the producer to 3.4 k appends/s; with the yield, see
                // bench/RESULTS.md).
                yielded = true;
                std::thread::yield_now();
                continue;
            }
            let Ok(left) = time_left(deadline) else {
                return false;
            };
            let outcome = self.reg.wait_for_publish(self.slot, seen, left);
            if outcome == WaitOutcome::TimedOut && deadline.is_some() {
                return self.ready();
            }
        }
    }

    /// Waits up to `timeout` (None = forever) for data, then copies it. `Pending` means the
    /// timeout passed.
    pub fn read_into(&mut self, dst: &mut [u8], timeout: Option<Duration>) -> Result<Poll> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.poll_into(dst)? {
                Poll::Pending => {}
                other => return Ok(other),
            }
            if !self.wait_until(deadline) {
                // Timed out; a final poll reports data or an end that raced the timeout.
                return self.poll_into(dst);
            }
        }
    }

    /// Detaches: stops counting in `SessionInfo::readers`.
    pub fn close(&mut self) {
        if self.counted {
            self.counted = false;
            let _ = self.reg.count_reader(self.slot, self.generation, false);
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.close();
    }
}

impl Reader {
    /// The notifier of the segment handle this reader came from (what `aread` waits on).
    pub fn notifier(&self) -> Result<Arc<Notifier>> {
        self.reg.notifier()
    }

    /// Bytes that could be returned right now from the reader's offset (0 if none or gone).
    /// Never more than the ring holds: a larger distance (the reader fell behind, or a
    /// scribbled cursor) is not bytes to size a buffer for; reading reports it.
    pub fn available(&self) -> u64 {
        self.meta()
            .cursor
            .load(Ordering::Acquire)
            .saturating_sub(self.offset)
            .min(self.reg.view().geometry().session_bytes)
    }
}
