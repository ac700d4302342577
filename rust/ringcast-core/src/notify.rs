//! Waking readers: the per-session futex word for blocking readers (the waiting side too:
//! [`wait_for_publish`]), and one datagram socket per process (segment handle) for event
//! loops ([`Notifier`]). Every change a reader can wait for goes through [`publish`].
//!
//! After every publish the producer bumps the session's `seq` and then:
//! - if a thread sleeps on `seq` (`waiters > 0`), one `FUTEX_WAKE` for all of them;
//! - for each process subscribed to the session (bit `i` in `subscribers`) whose row is
//!   ARMED, moves it to SENDING; if that succeeded, sends one byte to the row's notifier
//!   socket and moves the row on to IDLE (see `layout::arm_state`). The socket is an
//!   abstract-namespace `AF_UNIX` datagram socket named
//!   `"\0ringcast-<epoch:016x>-<row>-<nonce:016x>"` (nonce from the row, drawn by the notifier
//!   with `getrandom`). The event loop watches that socket directly, so a wake-up is one
//!   hop: producer → the loop's thread. There is no notifier thread.
//!
//! A notifier is disarmed from the first datagram until one of its loop's readers is about to
//! wait again (`arm`, then a `drain` to see what came meanwhile), so a burst of appends while
//! the reader process is busy costs the producer one `sendto` per process, then nothing (one
//! atomic load per subscribed process per publish). The price against a shared
//! futex word: an append to N *idle* subscribed processes costs N `sendto`s, not one wake.
//!
//! The socket name, not a descriptor, is what a producer needs, so no fds are passed between
//! processes. Abstract names belong to the network namespace: every process attached to a
//! segment must share one (see docs/ARCHITECTURE.md). The row index comes from the mask
//! (always < 64) and the nonce is untrusted segment data: a scribbled nonce at worst sends a
//! spurious byte to another socket named `ringcast-…`, whose drain finds nothing changed.
//! Sending never blocks and never fails the publish: a full receive queue (`EAGAIN`) means a
//! datagram is already pending, and a name nobody holds (`ECONNREFUSED`; the process died)
//! is skipped. Any other failure re-arms the row, so the next publish tries again.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout::{arm_state, ProcEntry, SlotMeta};
use crate::sync::Ordering;
use crate::sys::dgram::{self, AbstractAddr, Receiver, Sent};
use crate::sys::futex::{self, WaitOutcome};
use crate::view::SegmentView;

/// The abstract socket name of row `row`'s notifier.
fn wake_addr(epoch: u64, row: usize, nonce: u64) -> AbstractAddr {
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    // Fits: 9 + 16 + 1 + 2 + 1 + 16 bytes.
    let _ = write!(w, "ringcast-{epoch:016x}-{row}-{nonce:016x}");
    let len = 64 - w.len();
    AbstractAddr::new(&buf[..len]).expect("wake name fits sun_path")
}

/// Sleeps until `m` is published again (its `seq` moves from `seen`, read before the caller
/// last checked its condition), at most `timeout` (`None` = no limit). Spurious returns happen:
/// the caller re-checks its condition.
pub(crate) fn wait_for_publish(m: &SlotMeta, seen: u32, timeout: Option<Duration>) -> WaitOutcome {
    // SeqCst: pairs with `publish` (bump `seq`, then load `waiters`): either the publisher
    // sees us counted and wakes the futex, or our re-check below sees its bump.
    m.waiters.fetch_add(1, Ordering::SeqCst);
    let outcome = if m.seq.load(Ordering::SeqCst) == seen {
        futex::wait(&m.seq, seen, timeout)
    } else {
        WaitOutcome::Woken
    };
    m.waiters.fetch_sub(1, Ordering::SeqCst);
    outcome
}

/// Tells every kind of waiter that `m`, a slot of `view`, changed (new bytes or a new state).
pub(crate) fn publish(view: &SegmentView, m: &SlotMeta) {
    // SeqCst: pairs with the waiter's SeqCst increment of `waiters` (or subscription, or the
    // notifier's store of `armed`) followed by its load of `seq`: either it sees the new seq,
    // or we see it waiting (armed).
    m.seq.fetch_add(1, Ordering::SeqCst);
    if m.waiters.load(Ordering::SeqCst) > 0 {
        futex::wake(&m.seq, u32::MAX);
    }
    let mut mask = m.subscribers.load(Ordering::SeqCst);
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
        let nonce = e.wake_nonce.load(Ordering::SeqCst);
        // Not delivered and the process may still be there: leave it armed for the next
        // publish. Otherwise the datagram is in the socket (or the name is gone): IDLE.
        let after = match dgram::send_wake(&wake_addr(view.epoch(), row, nonce)) {
            Sent::Failed => arm_state::ARMED,
            _ => arm_state::IDLE,
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
}

struct Subscription {
    generation: u64,
    refs: u32,
    last_seq: u32,
}

/// One per segment handle: the datagram socket its event loop watches, and its subscriptions.
pub struct Notifier {
    view: Arc<SegmentView>,
    index: usize,
    /// The process that created it; in a forked child the notifier is inert (the row and the
    /// socket's name are the parent's).
    pid: u32,
    /// The row's start time and socket nonce when this notifier started (see `owns_row`).
    start_time: u64,
    nonce: u64,
    socket: Receiver,
    subs: Mutex<HashMap<u32, Subscription>>,
}

impl Notifier {
    /// Binds this row's socket under a fresh nonce and arms the row. The row has just been
    /// claimed (or was ours already): nobody else writes its `wake_nonce` or arms it.
    pub(crate) fn start(view: Arc<SegmentView>, index: usize) -> Result<Notifier> {
        let e = view.proc_entry(index);
        let mut tries = 0;
        let (nonce, socket) = loop {
            let nonce = dgram::random_u64();
            match Receiver::bind(&wake_addr(view.epoch(), index, nonce)) {
                Ok(s) => break (nonce, s),
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && tries < 8 => tries += 1,
                Err(err) => {
                    return Err(Error::InvalidArgument(format!(
                        "cannot bind the notifier socket: {err}"
                    )))
                }
            }
        };
        // The nonce is visible before the row is armed: a producer that moves `armed` from
        // ARMED (SeqCst) then loads the nonce (SeqCst) gets this one.
        e.wake_nonce.store(nonce, Ordering::SeqCst);
        // A new notifier starts armed: its first wake-up needs a datagram.
        e.armed.store(arm_state::ARMED, Ordering::SeqCst);
        let start_time = e.start_time.load(Ordering::SeqCst);
        Ok(Notifier {
            view,
            index,
            pid: std::process::id(),
            start_time,
            nonce,
            socket,
            subs: Mutex::new(HashMap::new()),
        })
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
    }
}
