//! What an append costs when every page it writes is new: one producer appends EVENT-byte
//! events to a session until its ring has been written around once, evicts it (its pages go
//! back to the OS) and starts the next, so the ring's pages are backed again and again, as in
//! a server whose streams are short. Reports nanoseconds per append, and per append of the
//! second lap (pages already backed) for comparison.
//!
//! ```text
//! cargo run --release -p ringcast-core --example append_cost -- [SESSIONS] [EVENT] [RING]
//! ```
//! (defaults: 64 sessions, 100-byte events, 4 MiB rings; the segment goes in /dev/shm).

use std::time::Instant;

use ringcast_core::{EndReason, Segment, SegmentConfig};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("SESSIONS EVENT RING are integers"))
        .collect();
    let sessions = *args.first().unwrap_or(&64);
    let event = *args.get(1).unwrap_or(&100) as usize;
    let ring = *args.get(2).unwrap_or(&(4 << 20));
    let path = format!("/dev/shm/ringcast-append-cost-{}", std::process::id());
    let _ = std::fs::remove_file(&path);
    let cfg = SegmentConfig {
        max_sessions: 4,
        session_bytes: ring,
        max_id_len: 256,
    };
    let seg = Segment::create(&path, cfg).expect("create segment");
    let data = vec![b'x'; event];
    let per_lap = ring.div_ceil(event as u64);
    let (mut fresh_ns, mut warm_ns) = (0u128, 0u128);
    for s in 0..sessions {
        let id = format!("s{s}");
        let w = seg.create_or_replace(&id, "").expect("session");
        let t = Instant::now();
        for _ in 0..per_lap {
            w.write(&data).expect("write");
        }
        fresh_ns += t.elapsed().as_nanos();
        let t = Instant::now();
        for _ in 0..per_lap {
            w.write(&data).expect("write");
        }
        warm_ns += t.elapsed().as_nanos();
        seg.evict(&id, "", EndReason::Evicted).expect("evict");
    }
    let n = (sessions * per_lap) as f64;
    println!(
        "append_cost sessions={sessions} event={event} ring={ring}: {:.1} ns per append on new \
         pages, {:.1} ns on backed pages",
        fresh_ns as f64 / n,
        warm_ns as f64 / n
    );
    let _ = std::fs::remove_file(&path);
}
