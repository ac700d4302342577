//! Waking readers: the per-session futex word for blocking readers, and per-process doorbells
//! plus one shared bell for event loops.
//!
//! After every publish the producer bumps the session's `seq` and then:
//! - if a thread sleeps on `seq` (`waiters > 0`), one `FUTEX_WAKE` for all of them;
//! - for each process subscribed to the session (bit in `subscribers`), bumps that process's
//!   doorbell counter (an atomic add, no syscall); if any of those processes' notifier threads
//!   sleeps, bumps the segment's **bell** and makes one `FUTEX_WAKE` on it.
//!
//! Every notifier thread sleeps on the one bell, so an append read by 64 sleeping processes
//! costs the producer one syscall, not 64 (measured: per-process doorbell wakes cut a producer
//! to 821 appends/s with 64 async reader processes on 2 cores). The price is that a ring wakes
//! every *sleeping* notifier thread of the segment; one whose doorbell did not move goes back
//! to sleep after two atomic loads.
//!
//! A notifier thread that was woken for real signals the process's eventfd and then stays
//! awake (not `sleeping`) until the event loop drains, so a burst of appends costs the producer
//! no syscall at all while the reader process is busy.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::layout::{Geometry, SlotMeta, BELL_OFFSET};
use crate::segment::proc_entry;
use crate::sync::{AtomicU32, Ordering};
use crate::sys::eventfd::EventFd;
use crate::sys::futex;
use crate::sys::mmap::Mapping;

/// Tells every kind of waiter that `m` changed (new bytes or a new state).
pub(crate) fn publish(base: *mut u8, geo: &Geometry, m: &SlotMeta) {
    // SeqCst: pairs with the waiter's SeqCst increment of `waiters` (or subscription) followed
    // by its load of `seq`: either it sees the new seq, or we see it waiting.
    m.seq.fetch_add(1, Ordering::SeqCst);
    if m.waiters.load(Ordering::SeqCst) > 0 {
        futex::wake(&m.seq, u32::MAX);
    }
    let mut mask = m.subscribers.load(Ordering::SeqCst);
    let mut ring = false;
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        let e = proc_entry(base, geo, i);
        // SeqCst pairs with the notifier thread's store of `sleeping` then loads of the bell
        // and its doorbell: either it sees this bump, or we see it sleeping and ring.
        e.doorbell.fetch_add(1, Ordering::SeqCst);
        ring |= e.sleeping.load(Ordering::SeqCst) != 0;
    }
    if ring {
        let b = bell(base);
        b.fetch_add(1, Ordering::SeqCst);
        futex::wake(b, u32::MAX);
    }
}

/// The segment's bell word.
pub(crate) fn bell<'a>(base: *mut u8) -> &'a AtomicU32 {
    // SAFETY: BELL_OFFSET lies in the header page of every valid mapping and is 4-byte aligned
    // (checked at compile time in `layout`); AtomicU32 is valid for any bit pattern. Callers
    // keep the mapping alive for the reference's use.
    unsafe { &*(base.add(BELL_OFFSET) as *const AtomicU32) }
}

struct Subscription {
    generation: u64,
    refs: u32,
    last_seq: u32,
}

struct Shared {
    armed: Mutex<bool>,
    cv: Condvar,
    stop: AtomicBool,
}

/// One per segment handle: a thread that sleeps on this process's doorbell and an eventfd.
pub struct Notifier {
    map: Arc<Mapping>,
    geo: Geometry,
    index: usize,
    efd: Arc<EventFd>,
    shared: Arc<Shared>,
    subs: Mutex<HashMap<u32, Subscription>>,
    thread: Option<JoinHandle<()>>,
}

/// Raw pointer to the mapping, carried into the notifier thread with an `Arc<Mapping>` that
/// keeps it valid.
struct Base(*mut u8);
// SAFETY: the pointer targets shared memory kept mapped by the `Arc<Mapping>` moved with it.
unsafe impl Send for Base {}

impl Notifier {
    pub(crate) fn start(map: Arc<Mapping>, geo: Geometry, index: usize) -> Result<Notifier> {
        let efd =
            Arc::new(EventFd::new().map_err(|e| Error::InvalidArgument(format!("eventfd: {e}")))?);
        let shared = Arc::new(Shared {
            armed: Mutex::new(true),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let (map, efd, shared) = (map.clone(), efd.clone(), shared.clone());
            let base = Base(map.as_ptr());
            // Read before the thread starts: a ring between now and its first sleep must count.
            let first = proc_entry(map.as_ptr(), &geo, index)
                .doorbell
                .load(Ordering::SeqCst);
            std::thread::Builder::new()
                .name("ringcast-notifier".into())
                .spawn(move || {
                    let base = base;
                    let _keep = map;
                    run(
                        proc_entry(base.0, &geo, index),
                        bell(base.0),
                        first,
                        &efd,
                        &shared,
                    )
                })
                .map_err(|e| {
                    Error::InvalidArgument(format!("cannot start the notifier thread: {e}"))
                })?
        };
        Ok(Notifier {
            map,
            geo,
            index,
            efd,
            shared,
            subs: Mutex::new(HashMap::new()),
            thread: Some(thread),
        })
    }

    pub fn fd(&self) -> i32 {
        self.efd.fd()
    }

    fn slot(&self, slot: u32) -> Result<&SlotMeta> {
        if slot >= self.geo.max_sessions {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is out of range"
            )));
        }
        let off = self.geo.slots_offset + slot as u64 * self.geo.slot_stride;
        // SAFETY: slot index checked; offsets from the validated geometry lie in the mapping,
        // which `self.map` keeps alive; SlotMeta is all atomics and padding.
        Ok(unsafe { &*(self.map.as_ptr().add(off as usize) as *const SlotMeta) })
    }

    /// Subscribes to a session; reference counted per (slot, generation).
    pub fn subscribe(&self, slot: u32, generation: u64) -> Result<()> {
        let m = self.slot(slot)?;
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        let sub = subs.entry(slot).or_insert(Subscription {
            generation,
            refs: 0,
            last_seq: 0,
        });
        if sub.refs == 0 || sub.generation != generation {
            sub.generation = generation;
            sub.last_seq = m.seq.load(Ordering::SeqCst);
        }
        sub.refs += 1;
        // SeqCst: pairs with the producer's bump of `seq` then load of `subscribers`.
        m.subscribers.fetch_or(1 << self.index, Ordering::SeqCst);
        Ok(())
    }

    pub fn unsubscribe(&self, slot: u32, generation: u64) -> Result<()> {
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

    /// Clears the fd and returns the subscribed slots whose session advanced or ended.
    pub fn drain(&self) -> Vec<u32> {
        self.efd.clear();
        let mut changed = Vec::new();
        {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            for (slot, sub) in subs.iter_mut() {
                let Ok(m) = self.slot(*slot) else { continue };
                let seq = m.seq.load(Ordering::SeqCst);
                if seq != sub.last_seq || m.generation.load(Ordering::Acquire) != sub.generation {
                    sub.last_seq = seq;
                    changed.push(*slot);
                }
            }
        }
        let mut armed = self.shared.armed.lock().unwrap_or_else(|p| p.into_inner());
        *armed = true;
        self.shared.cv.notify_one();
        changed
    }
}

fn run(
    entry: &crate::layout::ProcEntry,
    bell: &AtomicU32,
    mut last: u32,
    efd: &EventFd,
    shared: &Shared,
) {
    while !shared.stop.load(Ordering::Acquire) {
        // SeqCst: pairs with the producer's SeqCst bump of `doorbell` then load of `sleeping`
        // (then bump of the bell): if our doorbell load misses its bump, it saw us sleeping and
        // the bell differs from `rung`, so the wait below returns at once or is woken.
        entry.sleeping.store(1, Ordering::SeqCst);
        let rung = bell.load(Ordering::SeqCst);
        let now = entry.doorbell.load(Ordering::SeqCst);
        if now == last && !shared.stop.load(Ordering::Acquire) {
            futex::wait(bell, rung, None);
        }
        entry.sleeping.store(0, Ordering::SeqCst);
        let now = entry.doorbell.load(Ordering::SeqCst);
        if now == last {
            continue;
        }
        last = now;
        let mut armed = shared.armed.lock().unwrap_or_else(|p| p.into_inner());
        *armed = false;
        efd.signal();
        // Stay awake (producers skip the syscall) until the loop has drained.
        while !*armed && !shared.stop.load(Ordering::Acquire) {
            armed = shared.cv.wait(armed).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let b = bell(self.map.as_ptr());
        b.fetch_add(1, Ordering::SeqCst);
        futex::wake(b, u32::MAX);
        {
            let _g = self.shared.armed.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
