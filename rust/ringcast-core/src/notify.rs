//! Waking readers: the per-session futex word for blocking readers, and per-process doorbells
//! for event loops.
//!
//! After every publish the producer bumps the session's `seq` and then:
//! - if a thread sleeps on `seq` (`waiters > 0`), one `FUTEX_WAKE`;
//! - for each process subscribed to the session (bit in `subscribers`), bumps that process's
//!   doorbell and makes a wake syscall only if its notifier thread sleeps.
//!
//! A notifier thread that was woken signals the process's eventfd and then stays awake (not
//! `sleeping`) until the event loop drains, so a burst of appends costs the producer one
//! syscall per process, not one per append.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::layout::{Geometry, SlotMeta};
use crate::segment::proc_entry;
use crate::sync::Ordering;
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
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        let e = proc_entry(base, geo, i);
        e.doorbell.fetch_add(1, Ordering::SeqCst);
        if e.sleeping.load(Ordering::SeqCst) != 0 {
            futex::wake(&e.doorbell, 1);
        }
    }
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
                    run(proc_entry(base.0, &geo, index), first, &efd, &shared)
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

fn run(entry: &crate::layout::ProcEntry, mut last: u32, efd: &EventFd, shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        // SeqCst: pairs with the producer's SeqCst bump of `doorbell` then load of `sleeping`.
        entry.sleeping.store(1, Ordering::SeqCst);
        let now = entry.doorbell.load(Ordering::SeqCst);
        if now == last && !shared.stop.load(Ordering::Acquire) {
            futex::wait(&entry.doorbell, now, None);
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
        let e = proc_entry(self.map.as_ptr(), &self.geo, self.index);
        e.doorbell.fetch_add(1, Ordering::SeqCst);
        futex::wake(&e.doorbell, u32::MAX);
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
