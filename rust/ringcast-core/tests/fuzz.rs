//! A fuzz campaign, bounded in time, over everything that reads shared memory: opening arbitrary
//! bytes as a segment, segments truncated at arbitrary lengths, and live segments whose header,
//! process table, reader counts and slot metadata are scribbled with arbitrary bytes, after
//! which every entry point is called. What must hold: no panic, no access out of bounds (the
//! same binary runs under valgrind in `ci/test-rust.sh`), no hang, and a reader of one key never
//! returns another key's bytes.
//!
//! Cases per property: `FUZZ_CASES` (default below), times `RINGCAST_TEST_SCALE` (valgrind runs
//! it at 0.05). Arbitrary bytes come from proptest, so a failure is shrunk and saved.

use std::os::unix::fs::{FileExt, OpenOptionsExt};

use proptest::prelude::*;
use ringcast_core::layout::GENERATION_OFFSET;
use ringcast_core::{EndReason, Error, Poll, Segment, SegmentConfig, SessionState};

fn cases(base: u32) -> u32 {
    let base = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(base);
    let scale: f64 = std::env::var("RINGCAST_TEST_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    ((base as f64 * scale) as u32).max(4)
}

fn config(base: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(base),
        // Shrinking a failure of these tests is cheap; keep the default limits otherwise.
        ..ProptestConfig::default()
    }
}

/// A unique path under /dev/shm, removed (with its wake directory) when dropped.
struct TempPath(String);
impl TempPath {
    fn new(tag: &str) -> TempPath {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempPath(format!(
            "/dev/shm/ringcast-fuzz-{}-{n}-{tag}",
            std::process::id()
        ))
    }
}
impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(format!("{}.wake", self.0));
    }
}

/// Writes `bytes` as a private (0600) file, as a segment would be.
fn write_private(path: &str, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all_at(bytes, 0).unwrap();
}

const ID: &str = "conv";
/// Offset of the header's `ready` flag (`layout::HeaderConsts`).
const READY_AT: usize = 104;
const KEYS: [(&str, u8); 2] = [("alice", b'a'), ("bob", b'b')];

fn small() -> SegmentConfig {
    SegmentConfig {
        max_sessions: 8,
        session_bytes: 4096,
        max_id_len: 256,
    }
}

/// Every byte a reader of `owner` returned is that owner's fill byte, or 0 (a byte never
/// written, after a scribbled cursor): never the other key's.
fn check_own_bytes(owner: &str, fill: u8, got: &[u8]) {
    for &b in got {
        assert!(
            b == fill || b == 0,
            "a reader of {owner:?} returned byte {b:#x}, which is not its own"
        );
    }
}

/// Calls every entry point of a segment that may have been scribbled; none may panic, and
/// readers must return only their own key's bytes.
fn exercise(seg: &Segment) {
    let _ = seg.stats();
    let _ = seg.list(None);
    for (owner, fill) in KEYS {
        let _ = seg.list(Some(owner));
        let _ = seg.get(ID, owner);
        let _ = seg.lookup_prefix(ID, owner);
        for offset in [0, 1, 4095, 4096, u64::MAX / 2] {
            if let Ok(mut r) = seg.reader(ID, owner, offset) {
                let _ = r.available();
                let _ = r.ready();
                let _ = r.at_end();
                let _ = r.state();
                let mut buf = vec![0u8; 8192];
                for _ in 0..4 {
                    match r.poll_into(&mut buf) {
                        Ok(Poll::Data(n)) => check_own_bytes(owner, fill, &buf[..n]),
                        _ => break,
                    }
                }
            }
        }
        if let Ok(Some(w)) = seg.take_over_dead(ID, owner) {
            let _ = w.write(&[fill; 100]);
        }
    }
    if let Ok(n) = seg.notifier() {
        for slot in 0..small().max_sessions + 1 {
            let _ = n.subscribe(slot, 1);
        }
        let _ = n.drain();
        let _ = n.arm(false);
        let _ = n.owns_row();
    }
}

/// A segment with one session per key, each ring filled with its key's byte, a reader and a
/// notifier (so the process table and the reader counts have content).
struct Populated {
    seg: Segment,
    writers: Vec<ringcast_core::Writer>,
    _reader: ringcast_core::Reader,
}

fn populated(path: &str) -> Populated {
    let seg = Segment::create(path, small()).unwrap();
    let mut writers = Vec::new();
    for (owner, fill) in KEYS {
        let w = seg.create_or_replace(ID, owner).unwrap();
        // More than the ring holds: every ring byte is the key's.
        for _ in 0..3 {
            w.write(&[fill; 2000]).unwrap();
        }
        writers.push(w);
    }
    let n = seg.notifier().unwrap();
    let r = seg.reader(ID, "alice", 4000).unwrap();
    n.subscribe(r.slot(), r.generation()).unwrap();
    Populated {
        seg,
        writers,
        _reader: r,
    }
}

/// Where in a live segment a scribble lands: any byte of the tables after the registry's
/// robust mutex (glibc trusts its own state: not defended, docs/SECURITY.md; the constants
/// before it are read once, at open: `scribbled_headers_are_refused_or_consistent`), so the
/// generation counter, the registry's head (free stack, LRU list, counters, high-water mark),
/// the process table, the reader counts, the slot metadata and the index; except the key bytes
/// (which *are* the keys: rewriting them renames a session, it does not corrupt it). A pick in
/// a slot's key bytes lands in that slot's metadata instead.
fn scribble_target(seg: &Segment, pick: u64) -> u64 {
    let g = seg.geometry();
    let slot_meta = 384u64;
    let from = GENERATION_OFFSET as u64;
    let at = from + pick % (g.rings_offset - from);
    if (g.slots_offset..g.index_offset).contains(&at) {
        let (slot, within) = (
            (at - g.slots_offset) / g.slot_stride,
            (at - g.slots_offset) % g.slot_stride,
        );
        if slot < g.max_sessions as u64 {
            return g.slots_offset + slot * g.slot_stride + within % slot_meta;
        }
    }
    at
}

proptest! {
    #![proptest_config(config(1000))]

    /// Arbitrary bytes (with a real header's magic and version at times) are refused or
    /// opened, never a crash.
    #[test]
    fn arbitrary_bytes_open_or_are_refused(
        mut bytes in prop::collection::vec(any::<u8>(), 1..3 * 4096),
        real_prefix in any::<bool>(),
    ) {
        let t = TempPath::new("bytes");
        if real_prefix {
            // A real segment's magic and layout version, and `ready` set (else the open
            // waits 2 s for a creator), so the geometry checks run on the arbitrary rest.
            let real = TempPath::new("real");
            drop(Segment::create(&real.0, small()).unwrap());
            let head = std::fs::read(&real.0).unwrap();
            let n = 12.min(bytes.len());
            bytes[..n].copy_from_slice(&head[..n]);
            if bytes.len() >= READY_AT + 4 {
                bytes[READY_AT..READY_AT + 4].copy_from_slice(&1u32.to_le_bytes());
            }
        }
        write_private(&t.0, &bytes);
        if let Ok(seg) = Segment::open(&t.0) {
            exercise(&seg);
        }
    }

    /// A real segment's header with arbitrary values in its fields (the ready flag kept, so
    /// the open does not wait for a creator) is refused unless it is consistent.
    #[test]
    fn scribbled_headers_are_refused_or_consistent(
        edits in prop::collection::vec((8usize..104, any::<u64>(), 1usize..9), 1..6),
    ) {
        let t = TempPath::new("header");
        drop(populated(&t.0));
        let f = std::fs::OpenOptions::new().write(true).open(&t.0).unwrap();
        for (at, value, len) in edits {
            let len = len.min(104 - at);
            f.write_all_at(&value.to_le_bytes()[..len], at as u64).unwrap();
        }
        if let Ok(seg) = Segment::open(&t.0) {
            exercise(&seg);
        }
    }

    /// A real segment cut at any length is refused when opened.
    #[test]
    fn truncated_segments_are_refused(cut in 1u64..1 << 20) {
        let t = TempPath::new("cut");
        let p = populated(&t.0);
        let full = p.seg.geometry().file_bytes;
        drop(p);
        let cut = cut % full;
        std::fs::OpenOptions::new().write(true).open(&t.0).unwrap().set_len(cut).unwrap();
        match Segment::open(&t.0) {
            Err(Error::Segment(_)) => {}
            Err(e) => panic!("not a segment error: {e}"),
            Ok(_) => panic!("a segment cut to {cut} of {full} bytes was opened"),
        }
    }

    /// A live segment whose tables are scribbled while it is mapped: every entry point still
    /// answers, within bounds, and readers get only their own key's bytes. Then its writers go
    /// on, and the file opens again (or is refused).
    #[test]
    fn scribbled_live_segments_stay_in_bounds_and_keys_apart(
        edits in prop::collection::vec(
            (any::<u64>(), prop::collection::vec(any::<u8>(), 1..64)),
            1..8,
        ),
    ) {
        let t = TempPath::new("live");
        let Populated { seg, writers, _reader } = populated(&t.0);
        let f = std::fs::OpenOptions::new().write(true).open(&t.0).unwrap();
        for (pick, bytes) in &edits {
            let at = scribble_target(&seg, *pick);
            let room = (seg.geometry().rings_offset - at) as usize;
            f.write_all_at(&bytes[..bytes.len().min(room)], at).unwrap();
        }
        exercise(&seg);
        for (w, (owner, fill)) in writers.iter().zip(KEYS) {
            let _ = w.write(&[fill; 300]);
            let _ = w.write_keepalive(&[fill; 3]);
            let _ = w.cancelled();
            let _ = w.total_bytes();
            let _ = w.finalize(SessionState::Done);
            let _ = seg.evict(ID, owner, EndReason::Evicted);
        }
        exercise(&seg);
        if let Ok(w) = seg.create_or_replace("fresh", "alice") {
            let _ = w.write(b"aaaa");
        }
        for slot in 0..small().max_sessions {
            let _ = seg.evict_slot(slot, 1, EndReason::Evicted);
        }
        if let Ok(again) = Segment::open(&t.0) {
            exercise(&again);
        }
    }
}

/// The process table holds MAX_PROCESSES rows; the fuzz's notifier subscribes to slots past
/// the last one too, which must be refused, not indexed.
#[test]
fn out_of_range_slots_are_refused_by_the_notifier() {
    let t = TempPath::new("range");
    let seg = Segment::create(&t.0, small()).unwrap();
    let n = seg.notifier().unwrap();
    assert!(n.subscribe(small().max_sessions, 1).is_err());
    assert!(n.subscribe(u32::MAX, 1).is_err());
}
