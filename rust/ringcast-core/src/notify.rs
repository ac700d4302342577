//! Waking readers: the per-session futex word for blocking readers (the waiting side too:
//! [`wait_for_publish`]), and one datagram socket per process (segment handle) for event
//! loops ([`Notifier`]). Every change a reader can wait for goes through [`publish`].
//!
//! After every publish the producer bumps the session's `seq` and then:
//! - if a thread sleeps on `seq` (a bit of `waiting` set), one `FUTEX_WAKE` for all of them;
//! - for each process subscribed to the session (bit `i` in `subscribers`) whose row is
//!   ARMED, moves it to SENDING; if that succeeded, sends one byte to the row's notifier
//!   socket and moves the row on to IDLE (see `layout::arm_state`). The socket is an
//!   `AF_UNIX` datagram socket bound to the file `<segment>.wake/<row>`, in a directory of
//!   mode 0700 ([`WakeDir`]): only this user's processes (and root) can send to it, where an
//!   abstract name, listed in `/proc/net/unix`, let any local user flood a process's event
//!   loop. The event loop watches that socket directly, so a wake-up is one hop: producer →
//!   the loop's thread. There is no notifier thread.
//!
//! A producer may also *defer* the datagrams ([`publish_deferred`]): the `seq` bump and the
//! futex wake happen at once, the subscribed rows are added to this handle's pending set, and
//! [`flush`] (`Segment::flush_wakes`, once per turn of the producer's event loop) then does
//! the ARMED → SENDING → IDLE step once per row for every append of the batch, instead of per
//! append. The no-lost-wake-up argument is the same with the look at `armed` moved to the
//! flush, which comes after the bump: a row found not ARMED there is re-armed later, and the
//! scan after that arm sees the bump. The price: until the flush (or for a producer killed
//! before it, until the next publish to that process, its rescan or the dead-producer sweep)
//! the bytes are readable but the event loops are not told.
//!
//! A notifier is disarmed from the first datagram until one of its loop's readers is about to
//! wait again (`arm`, then a `drain` to see what came meanwhile), so a burst of appends while
//! the reader process is busy costs the producer one `sendto` per process, then nothing (one
//! atomic load per subscribed process per publish). The price against a shared
//! futex word: an append to N *idle* subscribed processes costs N `sendto`s, not one wake.
//!
//! The socket name, not a descriptor, is what a producer needs, so no fds are passed between
//! processes; the name follows from the segment's path and the row (which comes from the mask,
//! always < 64), nothing read from the segment. The row's nonce (from `getrandom`) only tells
//! a notifier whether its row is still its own (`owns_row`). Sending never blocks and never
//! fails the publish: a full receive queue (`EAGAIN`) means a datagram is already pending, and
//! a name nobody holds (`ECONNREFUSED`, `ENOENT`: the process died) is skipped. Any other
//! failure re-arms the row, so the next publish tries again.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout::MAX_PROCESSES;
use crate::layout::{arm_state, ProcEntry, SlotMeta};
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::sys::dgram::{self, Receiver, Senders, Sent, SocketDir};
use crate::sys::futex::{self, WaitOutcome};
use crate::view::SegmentView;

/// Where a segment's notifier sockets live: the directory `<segment path>.wake` (made absolute,
/// so every process finds the same files whatever its working directory), mode 0700, holding
/// one socket file per process-table row, named by the row's index.
#[derive(Clone, Debug)]
pub(crate) struct WakeDir {
    dir: Vec<u8>,
}

impl WakeDir {
    pub(crate) fn of_segment(segment_path: &str) -> WakeDir {
        let abs = std::path::absolute(segment_path)
            .unwrap_or_else(|_| std::path::PathBuf::from(segment_path));
        let mut dir = abs.as_os_str().as_bytes().to_vec();
        dir.extend_from_slice(b".wake");
        WakeDir { dir }
    }

    /// Removes the directory if no socket is left in it (best effort).
    pub(crate) fn remove_if_empty(&self) {
        dgram::remove_dir_if_empty(&self.dir);
    }

    /// Removes the sockets of `rows` (only sockets, see [`dgram::remove_sockets_in`]), then
    /// the directory if that emptied it.
    pub(crate) fn remove_sockets(&self, rows: impl IntoIterator<Item = usize>) {
        dgram::remove_sockets_in(&self.dir, rows);
    }

    fn path_text(&self) -> String {
        String::from_utf8_lossy(&self.dir).into_owned()
    }
}

/// The sending side of a segment's wake-ups: where the sockets are, and this handle's sockets
/// connected to them.
pub(crate) struct Wakers {
    pub(crate) dir: WakeDir,
    senders: Senders,
    /// The rows (bit `i` = row `i`) that deferred publishes left for the next [`flush`].
    deferred: AtomicU64,
}

impl Wakers {
    pub(crate) fn of_segment(segment_path: &str) -> Wakers {
        Wakers {
            dir: WakeDir::of_segment(segment_path),
            senders: Senders::new(MAX_PROCESSES),
            deferred: AtomicU64::new(0),
        }
    }

    fn send(&self, row: usize) -> Sent {
        self.senders.send(row, &self.dir.dir)
    }

    /// The rows deferred publishes left pending (bit `i` = row `i`), a snapshot.
    pub(crate) fn pending(&self) -> u64 {
        self.deferred.load(Ordering::Relaxed)
    }
}

/// Sleeps until `m` is published again (its `seq` moves from `seen`, read before the caller
/// last checked its condition), at most `timeout` (`None` = no limit). Spurious returns happen:
/// the caller re-checks its condition. The caller has set its process's bit in `m.waiting`
/// (SeqCst, after reading `seen`) and clears it after (`Registry::wait_for_publish`).
pub(crate) fn sleep_unless_published(
    m: &SlotMeta,
    seen: u32,
    timeout: Option<Duration>,
) -> WaitOutcome {
    // SeqCst: pairs with `publish` (bump `seq`, then load `waiting`): either the publisher
    // sees our process's bit (set SeqCst before this load, by this thread or, under the
    // process's lock, by another of its threads still waiting) and wakes the futex, or this
    // load sees its bump.
    if m.seq.load(Ordering::SeqCst) == seen {
        futex::wait(&m.seq, seen, timeout)
    } else {
        WaitOutcome::Woken
    }
}

/// Bumps `m`'s `seq` and wakes the threads sleeping on it; returns the processes subscribed to
/// it (bit `i` = row `i`), which the caller signals now ([`publish`]) or at the flush
/// ([`publish_deferred`]).
fn bump(m: &SlotMeta) -> u64 {
    // SeqCst: pairs with the waiter's SeqCst setting of its bit in `waiting` (or subscription,
    // or the notifier's store of `armed`) followed by its load of `seq`: either it sees the
    // new seq, or we see it waiting (armed).
    m.seq.fetch_add(1, Ordering::SeqCst);
    if m.waiting.load(Ordering::SeqCst) != 0 {
        futex::wake(&m.seq, u32::MAX);
    }
    m.subscribers.load(Ordering::SeqCst)
}

/// Tells every kind of waiter that `m`, a slot of `view` (whose notifiers `wake` reaches),
/// changed (new bytes or a new state).
pub(crate) fn publish(view: &SegmentView, wake: &Wakers, m: &SlotMeta) {
    signal_rows(view, wake, bump(m));
}

/// Like [`publish`], except that the datagrams wait for the next [`flush`] of `wake`: the
/// futex waiters are woken now, the subscribed rows are remembered.
pub(crate) fn publish_deferred(wake: &Wakers, m: &SlotMeta) {
    let mask = bump(m);
    // The plain load first: in a batch most appends find their rows already pending.
    if mask != 0 && wake.deferred.load(Ordering::Relaxed) & mask != mask {
        // SeqCst, after the bump: the flush's swap that takes these bits, and so its look at
        // each row's `armed`, comes after the bump (the argument of `signal_rows`).
        wake.deferred.fetch_or(mask, Ordering::SeqCst);
    }
}

/// Signals the rows that deferred publishes on `wake` left pending (each once, however many
/// publishes named it), except those of `skip` (bit `i` = row `i`: the caller's own row, whose
/// event loop it tells itself); returns how many were delivered a datagram.
pub(crate) fn flush(view: &SegmentView, wake: &Wakers, skip: u64) -> usize {
    if wake.deferred.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    signal_rows(view, wake, wake.deferred.swap(0, Ordering::SeqCst) & !skip)
}

/// Sends a datagram to each row of `mask` that is ARMED (moving it to IDLE); returns how many
/// were delivered. Every caller has bumped the `seq` of the sessions it signals for before this.
fn signal_rows(view: &SegmentView, wake: &Wakers, mut mask: u64) -> usize {
    let mut sent = 0;
    while mask != 0 {
        let row = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        let e = view.proc_entry(row);
        // The plain (SeqCst) load first keeps a busy, disarmed row's cache line shared instead
        // of claiming it on every append; it is as good as the exchange for the ordering
        // argument in `Notifier::arm`: a value other than ARMED read before the arm's swap
        // means our `seq` bump precedes the scan (`drain`) that follows that arm.
        if e.armed.load(Ordering::SeqCst) != arm_state::ARMED
            || e.armed
                .compare_exchange(
                    arm_state::ARMED,
                    arm_state::SENDING,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_err()
        {
            continue; // a datagram is pending or on its way, or that process has no notifier
        }
        // Not delivered and the process may still be there: leave it armed for the next
        // publish. Otherwise the datagram is in the socket (or the name is gone): IDLE.
        let after = match wake.send(row) {
            Sent::Failed => arm_state::ARMED,
            Sent::NoReceiver => arm_state::IDLE,
            Sent::Delivered => {
                sent += 1;
                arm_state::IDLE
            }
        };
        // Fails only if the owner re-armed meanwhile (its arm treats SENDING as disarmed),
        // which must stay.
        let _ = e.armed.compare_exchange(
            arm_state::SENDING,
            after,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
    sent
}

struct Subscription {
    generation: u64,
    refs: u32,
    last_seq: u32,
}

/// Opens `wake` (made private first) and binds row `index`'s socket in it. A directory removed
/// between the open and the bind (its last notifier left just then: `bind` fails with
/// `ENOENT`) is made again, a few times at most.
fn bind_row_socket(wake: &WakeDir, index: usize) -> Result<(SocketDir, Receiver)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let dir = SocketDir::open(&wake.dir, true).map_err(|err| {
            Error::InvalidArgument(format!(
                "cannot use the notifier directory {:?}: {err}",
                wake.path_text()
            ))
        })?;
        match dir.bind_replacing(index) {
            Ok(socket) => return Ok((dir, socket)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && attempts < 3 => continue,
            Err(err) => {
                let hint = if err.kind() == std::io::ErrorKind::NotFound {
                    " (it is bound through /proc/self/fd: is /proc mounted?)"
                } else {
                    ""
                };
                return Err(Error::InvalidArgument(format!(
                    "cannot bind the notifier socket in {:?}{hint}: {err}",
                    wake.path_text()
                )));
            }
        }
    }
}

/// One per segment handle: the datagram socket its event loop watches, and its subscriptions.
pub struct Notifier {
    view: Arc<SegmentView>,
    wake: WakeDir,
    /// `wake`, held open: the socket is bound (and its file removed) through it.
    dir: SocketDir,
    index: usize,
    /// The process that created it; in a forked child the notifier is inert (the row and the
    /// socket's name are the parent's).
    pid: u32,
    /// The row's start time and socket nonce when this notifier started (see `owns_row`).
    start_time: u64,
    nonce: u64,
    socket: Receiver,
    subs: Mutex<HashMap<u32, Subscription>>,
    /// Set once the socket file is removed (on close, unlink or drop): done only once.
    file_removed: AtomicBool,
}

impl Notifier {
    /// Binds this row's socket (in `wake`, made private first) under a fresh nonce and arms
    /// the row. The row has just been claimed (or was ours already): nobody else writes its
    /// `wake_nonce`, arms it or holds its socket name (a file left there by a dead owner is
    /// replaced).
    pub(crate) fn start(view: Arc<SegmentView>, wake: WakeDir, index: usize) -> Result<Notifier> {
        let e = view.proc_entry(index);
        let (dir, socket) = bind_row_socket(&wake, index)?;
        let nonce = dgram::random_u64();
        // The nonce is visible before the row is armed: a producer that moves `armed` from
        // ARMED (SeqCst) then loads the nonce (SeqCst) gets this one.
        e.wake_nonce.store(nonce, Ordering::SeqCst);
        // A new notifier starts armed: its first wake-up needs a datagram.
        e.armed.store(arm_state::ARMED, Ordering::SeqCst);
        let start_time = e.start_time.load(Ordering::SeqCst);
        Ok(Notifier {
            view,
            wake,
            dir,
            index,
            pid: std::process::id(),
            start_time,
            nonce,
            socket,
            subs: Mutex::new(HashMap::new()),
            file_removed: AtomicBool::new(false),
        })
    }

    /// Removes this notifier's socket file, and the directory if that emptied it, unless
    /// another process has taken the row (and the name) over; once, and only in the process
    /// that started it. Producers then find no receiver and skip this process. Called when
    /// the segment handle is closed or unlinked, so a process that exits without the last
    /// reference being dropped leaves no file behind.
    pub(crate) fn remove_socket_file(&self) {
        if !self.owned() || self.file_removed.swap(true, Ordering::SeqCst) || !self.owns_row() {
            return;
        }
        self.dir.remove(self.index);
        self.wake.remove_if_empty();
    }

    /// The descriptor to watch for readability (the socket).
    pub fn fd(&self) -> i32 {
        self.socket.fd()
    }

    fn entry(&self) -> &ProcEntry {
        self.view.proc_entry(self.index)
    }

    fn owned(&self) -> bool {
        self.pid == std::process::id()
    }

    fn check_owner(&self) -> Result<()> {
        if self.owned() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(
                "this notifier belongs to the parent process; \
                 call Segment.notifier() in the child"
                    .into(),
            ))
        }
    }

    fn slot(&self, slot: u32) -> Result<&SlotMeta> {
        self.view
            .try_slot(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("slot {slot} is out of range")))
    }

    /// Subscribes to a session, reference counted per slot. A slot holds one generation: a
    /// newer one replaces the subscription (its count starts again at 1; the older session
    /// has left the slot, and the change that ended it is still reported by the next drain),
    /// an older one only counts as set (its readers see their session ended).
    pub fn subscribe(&self, slot: u32, generation: u64) -> Result<()> {
        self.check_owner()?;
        let m = self.slot(slot)?;
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        // SeqCst: pairs with the producer's bump of `seq` then load of `subscribers`; the
        // caller re-checks readiness after this.
        m.subscribers.fetch_or(1 << self.index, Ordering::SeqCst);
        match subs.entry(slot) {
            Entry::Vacant(v) => {
                // Read after the bit is set: a publish this snapshot misses bumped `seq` after
                // the bit was visible, so it signals us; one it includes is seen by the
                // caller's readiness check. (Read before the bit, a publish in between would
                // be counted as news by the next drain: a spurious wake-up.)
                v.insert(Subscription {
                    generation,
                    refs: 1,
                    last_seq: m.seq.load(Ordering::SeqCst),
                });
            }
            Entry::Occupied(o) => {
                let sub = o.into_mut();
                if generation == sub.generation {
                    sub.refs += 1;
                } else if generation > sub.generation {
                    // `last_seq` is kept, so a change not yet drained is not forgotten.
                    sub.generation = generation;
                    sub.refs = 1;
                }
            }
        }
        Ok(())
    }

    pub fn unsubscribe(&self, slot: u32, generation: u64) -> Result<()> {
        self.check_owner()?;
        let m = self.slot(slot)?;
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sub) = subs.get_mut(&slot) {
            if sub.generation == generation {
                sub.refs = sub.refs.saturating_sub(1);
                if sub.refs == 0 {
                    subs.remove(&slot);
                    m.subscribers
                        .fetch_and(!(1 << self.index), Ordering::SeqCst);
                }
            }
        }
        Ok(())
    }

    /// Re-arms this process's wake-up if a publish disarmed it (by sending it a datagram).
    /// Returns true if it was disarmed: publishes since then sent nothing, so the caller
    /// must `drain()` (scan) to see them. With `yield_first`, first yields the CPU once: a
    /// reader about to go idle lets the producer (and other readers) run, so what they append
    /// meanwhile is read without a datagram and a wake-up (the same as a blocking reader's
    /// yield before its futex wait).
    ///
    /// SENDING (a producer's datagram on its way) counts as disarmed: waiting for it would
    /// wait forever on a producer killed between taking the arm and sending; re-arming costs
    /// at most one extra datagram, which the loop drains and finds nothing new in.
    pub fn arm(&self, yield_first: bool) -> bool {
        if !self.owned() || self.entry().armed.load(Ordering::SeqCst) == arm_state::ARMED {
            return false;
        }
        if yield_first {
            std::thread::yield_now();
        }
        // Ordering, with `publish` (bump `seq`, then read `armed` and, if ARMED, exchange it
        // for SENDING and send when that succeeded), all SeqCst:
        // - a publish whose read of `armed` (load or exchange) comes before this swap bumped
        //   `seq` before it, so the caller's drain (after this) sees that bump;
        // - a publish whose reads come after this swap finds ARMED (or a later arm's) and one
        //   of them sends a datagram, which makes the socket readable again.
        self.entry().armed.swap(arm_state::ARMED, Ordering::SeqCst);
        true
    }

    /// This row's arm state as the producers see it now (`arm_state`): lets a caller that
    /// finds sessions advanced without a datagram tell a datagram on its way (SENDING) or a
    /// publish between its bump and its check (ARMED) from a datagram that never came (IDLE).
    pub fn arm_state(&self) -> u32 {
        self.entry().armed.load(Ordering::SeqCst)
    }

    /// Whether the process-table row this notifier was started on is still this process's
    /// (pid, start time and socket name unchanged). False means another process claimed the
    /// row as if this one had died, and producers now signal that process instead.
    pub fn owns_row(&self) -> bool {
        let e = self.entry();
        self.owned()
            && e.pid.load(Ordering::SeqCst) == self.pid
            && e.start_time.load(Ordering::SeqCst) == self.start_time
            && e.wake_nonce.load(Ordering::SeqCst) == self.nonce
    }

    /// Empties the socket and returns the subscribed slots whose session advanced or ended
    /// since the last drain. It does not re-arm: the process stays disarmed (producers send it
    /// nothing) until a reader is about to wait and calls `arm`, so appends while every
    /// reader of the process is busy cost the producer no `sendto` at all.
    pub fn drain(&self) -> Vec<u32> {
        if !self.owned() {
            return Vec::new();
        }
        self.socket.drain();
        self.changed()
    }

    /// Like [`drain`](Self::drain), but leaves the socket alone, or with `take_one` takes just
    /// one datagram (the one a readiness callback was woken by). A datagram left in the socket
    /// keeps it readable, so the loop comes back to it: a caller that re-arms and then scans
    /// cannot swallow the datagram of a publish that came right after its arm, and needs no
    /// arm-until-still-armed loop (see `ringcast._aio`). Costs one `recv` fewer per wake-up
    /// than `drain` (which also reads the socket empty), and none after an arm.
    pub fn scan(&self, take_one: bool) -> Vec<u32> {
        if !self.owned() {
            return Vec::new();
        }
        if take_one {
            self.socket.take_one();
        }
        self.changed()
    }

    /// Like [`scan`](Self::scan) without the socket, limited to `slots`: those of them that
    /// are subscribed and moved since the last look. For a producer that shares its event loop
    /// with its readers and knows which sessions it appended to (it sends its own process no
    /// datagram: `Segment::flush_wakes_except_own`), at a cost in the slots it names rather than
    /// in every subscription.
    pub fn scan_slots(&self, slots: &[u32]) -> Vec<u32> {
        let mut changed = Vec::new();
        if !self.owned() {
            return changed;
        }
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        for &slot in slots {
            let Some(sub) = subs.get_mut(&slot) else {
                continue;
            };
            let Ok(m) = self.slot(slot) else { continue };
            let seq = m.seq.load(Ordering::SeqCst);
            if seq != sub.last_seq || m.generation.load(Ordering::Acquire) != sub.generation {
                sub.last_seq = seq;
                changed.push(slot);
            }
        }
        changed
    }

    /// The subscribed slots whose `seq` (or generation) moved since the last look.
    fn changed(&self) -> Vec<u32> {
        let mut changed = Vec::new();
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, sub) in subs.iter_mut() {
            let Ok(m) = self.slot(*slot) else { continue };
            let seq = m.seq.load(Ordering::SeqCst);
            if seq != sub.last_seq || m.generation.load(Ordering::Acquire) != sub.generation {
                sub.last_seq = seq;
                changed.push(*slot);
            }
        }
        changed
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if !self.owned() {
            // A forked child's copy: close our descriptor (field drop), touch nothing shared.
            return;
        }
        // Disarm first: producers stop sending; one that swapped just before gets
        // ECONNREFUSED once the socket (dropped with the fields, right after) is closed.
        self.entry().armed.store(arm_state::IDLE, Ordering::SeqCst);
        let slots: Vec<u32> = self
            .subs
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for slot in slots {
            if let Ok(m) = self.slot(slot) {
                m.subscribers
                    .fetch_and(!(1 << self.index), Ordering::SeqCst);
            }
        }
        self.remove_socket_file();
    }
}
