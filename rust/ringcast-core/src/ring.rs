//! The ring algorithm, generic over where its bytes live (a slot's region of the segment
//! mapping in production, a heap array of atomics under loom and in unit tests).
//!
//! One producer appends; any number of readers copy without locks and validate afterwards.
//! Two monotonic counters describe the ring:
//! - `head`: the end of the bytes the producer has *started* writing. Bytes at logical offsets
//!   below `head - capacity` may be overwritten at any moment.
//! - `cursor`: the end of the bytes that are completely written (published).
//!
//! Producer: `head = new_end` → release fence → copy bytes → `cursor = new_end` (Release).
//! Reader: `c = cursor` (Acquire, pairs with the producer's Release store) → copy
//! `[offset, min(c, offset + len))` → acquire fence → `h = head` → the copy is valid iff
//! `offset >= h - capacity`. The acquire fence pairs with the producer's release fence: if the
//! copy observed any byte of a newer append, the reader also observes that append's `head`.

use crate::sync::{fence, AtomicU64, Ordering};

/// Where a ring's bytes live. Positions are always `< capacity()`.
///
/// Implementations must tolerate a concurrent writer on the positions being read (the reader
/// validates afterwards and discards torn copies), so bytes are copied as plain `u8`s.
pub trait RingBytes {
    fn capacity(&self) -> u64;
    /// Copies `src` to positions `pos..pos + src.len()` (never wrapping; the caller splits).
    fn store(&self, pos: usize, src: &[u8]);
    /// Copies positions `pos..pos + dst.len()` into `dst` (never wrapping).
    fn load(&self, pos: usize, dst: &mut [u8]);
}

/// The two published counters of one ring.
pub struct Cursors<'a> {
    pub cursor: &'a AtomicU64,
    pub head: &'a AtomicU64,
}

#[cfg(not(loom))]
impl<'a> Cursors<'a> {
    /// The counters of a segment slot's ring.
    pub(crate) fn of(slot: &'a crate::layout::SlotMeta) -> Cursors<'a> {
        Cursors {
            cursor: &slot.cursor,
            head: &slot.head,
        }
    }
}

/// Result of a read attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// `n` bytes copied from the requested offset.
    Copied(usize),
    /// Nothing at this offset yet (the reader is at or beyond the published end).
    Empty { published: u64 },
    /// The requested offset was dropped; the lowest readable offset is given.
    Lost { first_available: u64 },
}

/// Appends `data`; returns the new published end. The caller is the only producer.
pub fn append<M: RingBytes>(c: &Cursors<'_>, mem: &M, data: &[u8]) -> u64 {
    let cap = mem.capacity();
    // Relaxed: only this producer writes the cursor, so it reads its own last store.
    let start = c.cursor.load(Ordering::Relaxed);
    let len = data.len() as u64;
    let end = start.wrapping_add(len);
    // Only the last `cap` bytes of an oversized append can survive in the ring.
    let keep = len.min(cap) as usize;
    let tail = &data[data.len() - keep..];
    let first = end - keep as u64;
    // `head` never moves back: after a producer died mid-append and another took over, the
    // torn range it had reserved stays counted as overwritten.
    let head = c.head.load(Ordering::Relaxed).max(end);
    c.head.store(head, Ordering::Relaxed);
    // Pairs with the reader's acquire fence after its copy: a reader that saw any byte stored
    // below also sees `head == end` and rejects the overwritten range.
    fence(Ordering::Release);
    copy_in(mem, first, tail);
    // Pairs with the reader's Acquire load of `cursor`: the bytes above are visible first.
    c.cursor.store(end, Ordering::Release);
    end
}

/// Copies bytes from logical `offset` into `dst`, validating against concurrent overwrites.
pub fn read<M: RingBytes>(c: &Cursors<'_>, mem: &M, offset: u64, dst: &mut [u8]) -> ReadOutcome {
    let cap = mem.capacity();
    // Acquire pairs with the producer's Release store of `cursor`.
    let published = c.cursor.load(Ordering::Acquire);
    if offset >= published {
        return ReadOutcome::Empty { published };
    }
    let first = c
        .head
        .load(Ordering::Acquire)
        .max(published)
        .saturating_sub(cap);
    if offset < first {
        return ReadOutcome::Lost {
            first_available: first,
        };
    }
    let n = (published - offset).min(dst.len() as u64) as usize;
    copy_out(mem, offset, &mut dst[..n]);
    // Pairs with the producer's release fence after it advanced `head`.
    fence(Ordering::Acquire);
    let head = c.head.load(Ordering::Acquire);
    let safe_from = head.saturating_sub(cap);
    if offset < safe_from {
        return ReadOutcome::Lost {
            first_available: safe_from,
        };
    }
    ReadOutcome::Copied(n)
}

/// Lowest offset readable right now.
pub fn first_available(c: &Cursors<'_>, cap: u64) -> u64 {
    let published = c.cursor.load(Ordering::Acquire);
    c.head
        .load(Ordering::Acquire)
        .max(published)
        .saturating_sub(cap)
}

fn copy_in<M: RingBytes>(mem: &M, offset: u64, src: &[u8]) {
    let cap = mem.capacity();
    let pos = (offset % cap) as usize;
    let first = src.len().min(cap as usize - pos);
    mem.store(pos, &src[..first]);
    if first < src.len() {
        mem.store(0, &src[first..]);
    }
}

fn copy_out<M: RingBytes>(mem: &M, offset: u64, dst: &mut [u8]) {
    let cap = mem.capacity();
    let pos = (offset % cap) as usize;
    let first = dst.len().min(cap as usize - pos);
    mem.load(pos, &mut dst[..first]);
    if first < dst.len() {
        mem.load(0, &mut dst[first..]);
    }
}

/// The production memory: a slot's ring bytes in the segment mapping.
#[cfg(not(loom))]
impl RingBytes for crate::view::RingRegion<'_> {
    fn capacity(&self) -> u64 {
        crate::view::RingRegion::capacity(self)
    }
    fn store(&self, pos: usize, src: &[u8]) {
        crate::view::RingRegion::store(self, pos, src)
    }
    fn load(&self, pos: usize, dst: &mut [u8]) {
        crate::view::RingRegion::load(self, pos, dst)
    }
}

/// A heap ring of atomic bytes: the memory the model checker and unit tests run on.
pub struct HeapBytes {
    bytes: Vec<crate::sync::AtomicU8>,
}

impl HeapBytes {
    pub fn new(capacity: usize) -> HeapBytes {
        assert!(capacity > 0);
        HeapBytes {
            bytes: (0..capacity)
                .map(|_| crate::sync::AtomicU8::new(0))
                .collect(),
        }
    }
}

impl RingBytes for HeapBytes {
    fn capacity(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn store(&self, pos: usize, src: &[u8]) {
        for (cell, b) in self.bytes[pos..pos + src.len()].iter().zip(src) {
            cell.store(*b, Ordering::Relaxed);
        }
    }
    fn load(&self, pos: usize, dst: &mut [u8]) {
        let n = dst.len();
        for (b, cell) in dst.iter_mut().zip(&self.bytes[pos..pos + n]) {
            *b = cell.load(Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Ring {
        cursor: AtomicU64,
        head: AtomicU64,
        mem: HeapBytes,
    }
    impl Ring {
        fn new(cap: usize) -> Ring {
            Ring {
                cursor: AtomicU64::new(0),
                head: AtomicU64::new(0),
                mem: HeapBytes::new(cap),
            }
        }
        fn c(&self) -> Cursors<'_> {
            Cursors {
                cursor: &self.cursor,
                head: &self.head,
            }
        }
    }

    #[test]
    fn wraps_and_drops_front() {
        let r = Ring::new(8);
        append(&r.c(), &r.mem, b"abcdef");
        append(&r.c(), &r.mem, b"ghij");
        let mut buf = [0u8; 16];
        assert_eq!(
            read(&r.c(), &r.mem, 0, &mut buf),
            ReadOutcome::Lost { first_available: 2 }
        );
        assert_eq!(read(&r.c(), &r.mem, 2, &mut buf), ReadOutcome::Copied(8));
        assert_eq!(&buf[..8], b"cdefghij");
        assert_eq!(
            read(&r.c(), &r.mem, 10, &mut buf),
            ReadOutcome::Empty { published: 10 }
        );
    }

    #[test]
    fn oversized_append_keeps_the_tail() {
        let r = Ring::new(4);
        append(&r.c(), &r.mem, b"0123456789");
        let mut buf = [0u8; 4];
        assert_eq!(read(&r.c(), &r.mem, 6, &mut buf), ReadOutcome::Copied(4));
        assert_eq!(&buf, b"6789");
    }

    proptest! {
        /// The ring against a model: the whole byte history, of which the last `cap` are kept.
        #[test]
        fn matches_model(cap in 1usize..64,
                         ops in proptest::collection::vec((0usize..100, any::<u64>()), 1..60)) {
            let r = Ring::new(cap);
            let mut history: Vec<u8> = Vec::new();
            for (i, (len, read_seed)) in ops.into_iter().enumerate() {
                let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                append(&r.c(), &r.mem, &chunk);
                history.extend_from_slice(&chunk);
                let total = history.len() as u64;
                let offset = read_seed % (total + 2);
                let mut buf = vec![0u8; (read_seed % 97) as usize + 1];
                let first = total.saturating_sub(cap as u64);
                match read(&r.c(), &r.mem, offset, &mut buf) {
                    ReadOutcome::Copied(n) => {
                        prop_assert!(offset >= first && offset < total);
                        prop_assert_eq!(n as u64, (total - offset).min(buf.len() as u64));
                        prop_assert_eq!(&buf[..n], &history[offset as usize..offset as usize + n]);
                    }
                    ReadOutcome::Empty { published } => {
                        prop_assert!(offset >= total);
                        prop_assert_eq!(published, total);
                    }
                    ReadOutcome::Lost { first_available } => {
                        prop_assert!(offset < first);
                        prop_assert_eq!(first_available, first);
                    }
                }
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    struct Ring {
        cursor: AtomicU64,
        head: AtomicU64,
        mem: HeapBytes,
    }

    /// Readers racing a producer that wraps a 2-byte ring never return a byte that was not the
    /// byte at that offset in the producer's history (0, 1, 2, 3: the byte at offset k is k).
    #[test]
    fn reader_never_returns_overwritten_bytes() {
        loom::model(|| {
            let r = Arc::new(Ring {
                cursor: AtomicU64::new(0),
                head: AtomicU64::new(0),
                mem: HeapBytes::new(2),
            });
            let p = r.clone();
            let producer = loom::thread::spawn(move || {
                let c = Cursors {
                    cursor: &p.cursor,
                    head: &p.head,
                };
                append(&c, &p.mem, &[0, 1]);
                append(&c, &p.mem, &[2]);
                append(&c, &p.mem, &[3]);
            });
            let q = r.clone();
            let reader = loom::thread::spawn(move || {
                let c = Cursors {
                    cursor: &q.cursor,
                    head: &q.head,
                };
                for offset in [0u64, 1] {
                    let mut buf = [0xffu8; 2];
                    if let ReadOutcome::Copied(n) = read(&c, &q.mem, offset, &mut buf) {
                        for (i, b) in buf[..n].iter().enumerate() {
                            assert_eq!(
                                *b as u64,
                                offset + i as u64,
                                "torn read at offset {offset}"
                            );
                        }
                    }
                }
            });
            producer.join().unwrap();
            reader.join().unwrap();
        });
    }
}
