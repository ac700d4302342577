//! Bounded waiting for a condition another process will soon make true: spin briefly, then
//! yield the CPU, and give up at a deadline. The one place the core's spin/yield policy lives
//! (blocking for longer than a moment is the futex's job, in `notify`).

use std::time::{Duration, Instant};

/// Snoozes before this many steps spin (a few nanoseconds each); later ones yield the CPU.
const SPIN_STEPS: u32 = 16;

/// One bounded wait: call [`Backoff::snooze`] after each failed attempt.
pub(crate) struct Backoff {
    step: u32,
    deadline: Instant,
}

impl Backoff {
    /// A wait that gives up `limit` from now.
    pub(crate) fn with_limit(limit: Duration) -> Backoff {
        Backoff {
            step: 0,
            deadline: Instant::now() + limit,
        }
    }

    /// How many times `snooze` has been called.
    pub(crate) fn steps(&self) -> u32 {
        self.step
    }

    /// Waits a little before the next attempt: a spin hint for the first few steps, then a
    /// yield of the CPU (the process we wait for may need it). False, without waiting, once
    /// the deadline has passed.
    pub(crate) fn snooze(&mut self) -> bool {
        if Instant::now() > self.deadline {
            return false;
        }
        if self.step < SPIN_STEPS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
        self.step += 1;
        true
    }
}
