//! The lock-free read of one slot's session, generic over the slot's two words (its state and
//! its generation) so that loom checks this very code, as it does the ring and the index.
//!
//! The registry writes a slot only under its lock, in this order (see `registry`):
//! - `end`: the generation is marked ended ([`ENDED_BIT`]), then the state becomes FREE;
//! - `alloc`: the state becomes INIT;
//! - `install`: the new generation, a release fence, then the session's fields and key;
//! - the last step of a create: the state becomes RUNNING (a release store).
//!
//! So a slot between two sessions is FREE or INIT, and a session's fields are written after
//! its generation and before its live state.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Set in a slot's generation once its session began to leave: from then on no lock-free
/// view shows it, though its state stays a session's until the slot is freed.
pub const ENDED_BIT: u64 = 1 << 63;

/// The slot's generation and its state decoded (by `decode`: `None` for FREE, INIT or a value
/// no session has), if it holds a live session now: a live state and a generation not marked
/// ended, loaded in that order (see [`read_stable`]). The first step of `read_stable`, and all
/// that a count, or a pick that is read again later, needs.
pub fn live_now<S>(
    state: &AtomicU32,
    generation: &AtomicU64,
    decode: impl Fn(u32) -> Option<S>,
) -> Option<(u64, S)> {
    let g = generation.load(Ordering::Acquire);
    if g & ENDED_BIT != 0 {
        return None;
    }
    decode(state.load(Ordering::Acquire)).map(|s| (g, s))
}

/// Runs `read` (given the generation) only while the slot holds a live session
/// ([`live_now`]), and returns its result with that generation only if neither word changed
/// meanwhile: a read that passes saw one session's fields.
///
/// The generation is loaded first. Loaded after the state, a reader could take an old
/// session's live state together with the generation of a new one installed in the slot
/// since (the old one ended and the slot was reused in between), copy the old session's key
/// before the install overwrote it, and pass the re-check once the new session is live: the
/// old session's key under the new session's generation. Loaded first, a new generation
/// brings the INIT (or later) state with it, and a live state seen after it is the new
/// session's, whose fields its release store publishes.
pub fn read_stable<S, T>(
    state: &AtomicU32,
    generation: &AtomicU64,
    decode: impl Fn(u32) -> Option<S>,
    read: impl FnOnce(u64) -> Option<T>,
) -> Option<(u64, T)> {
    let (g1, _) = live_now(state, generation, &decode)?;
    let out = read(g1)?;
    // Orders the reads above before the re-check below (a read that saw a later install's
    // write sees that install's generation, or a later one, here).
    fence(Ordering::Acquire);
    let g2 = generation.load(Ordering::Acquire);
    if g1 != g2 || decode(state.load(Ordering::Acquire)).is_none() {
        return None;
    }
    Some((g1, out))
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    const FREE: u32 = 0;
    const INIT: u32 = 1;
    const RUNNING: u32 = 2;

    /// One slot: its state, its generation, and its key (one word standing for the id and
    /// owner bytes, which `install` writes after the generation).
    struct Slot {
        state: AtomicU32,
        generation: AtomicU64,
        key: AtomicU64,
    }

    /// A reader of the slot racing the end of session 1 and the install of session 2 in the
    /// same slot never passes a read of one session's key with the other's generation; and
    /// the check is not vacuous: some interleavings pass a read of each session.
    #[test]
    fn a_reused_slot_never_pairs_one_sessions_key_with_anothers_generation() {
        // Which sessions some interleaving read whole (outside the model: a plain mutex).
        let passed = std::sync::Arc::new(std::sync::Mutex::new([false; 2]));
        let seen = passed.clone();
        loom::model(move || {
            let seen = seen.clone();
            let s = Arc::new(Slot {
                state: AtomicU32::new(RUNNING),
                generation: AtomicU64::new(1),
                key: AtomicU64::new(1),
            });
            let w = s.clone();
            let registry = loom::thread::spawn(move || {
                // end(1)
                w.generation.store(1 | ENDED_BIT, Ordering::SeqCst);
                w.state.store(FREE, Ordering::SeqCst);
                // alloc, install(2), publish
                w.state.store(INIT, Ordering::SeqCst);
                w.generation.store(2, Ordering::SeqCst);
                fence(Ordering::Release);
                w.key.store(2, Ordering::Relaxed);
                w.state.store(RUNNING, Ordering::Release);
            });
            let r = s.clone();
            let reader = loom::thread::spawn(move || {
                let got = read_stable(
                    &r.state,
                    &r.generation,
                    |st| (st == RUNNING).then_some(()),
                    |_| Some(r.key.load(Ordering::Relaxed)),
                );
                if let Some((generation, key)) = got {
                    assert_eq!(
                        generation, key,
                        "one session's key under another's generation"
                    );
                    seen.lock().unwrap()[generation as usize - 1] = true;
                }
            });
            registry.join().unwrap();
            reader.join().unwrap();
        });
        assert_eq!(
            *passed.lock().unwrap(),
            [true, true],
            "a session was never read"
        );
    }
}
