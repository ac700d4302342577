//! The session index: an open-addressing hash table from (owner, conversation id) to a slot,
//! generic over where its buckets live (the segment mapping in production, a heap array under
//! proptest and loom), so every lookup, insert and removal costs O(1) expected whatever the
//! number of slots.
//!
//! - **Buckets** are one `u64` each: `hash_low32 << 32 | (slot + 1)`, 0 = empty. The low bits of
//!   the hash pick the home bucket; the 32 stored bits filter out most other keys without
//!   touching their slots. Linear probing, at most half full (the table has at least four
//!   buckets per slot and holds at most two entries per slot), so an expected probe is short.
//! - **Two kinds of entries**, told apart by bit 31 of the stored hash: a session's
//!   ([`key_hash`], bit clear) and an owner's ([`owner_hash`], bit set), which names the head
//!   of the list of that owner's sessions. A lookup of one kind never matches the other.
//! - **No tombstones**: a removal shifts the following entries of its cluster back (the
//!   classic backward-shift deletion), so churn never lengthens probes and the table never
//!   needs a rebuild to stay fast.
//! - **Writers** (insert, remove) run under the registry lock: one at a time.
//! - **Readers never lock.** A hit is trusted only after the caller's `matches` validated the
//!   slot itself (it holds that key, live, unchanged during the check), so a stale or scribbled
//!   bucket can cost a miss, never another key's session. A *miss* needs more: a removal moves
//!   entries backwards, and a reader that had already passed the bucket an entry moved into
//!   would not see it. So removals bracket their moves with a version counter (odd while
//!   moving, a seqlock), and a miss is trusted only if the version was even and unchanged
//!   across the whole probe. After a few failed attempts the reader says [`Lookup::Unsure`]
//!   and the caller looks again under the registry lock (which also repairs a table left
//!   half-moved by a writer that died: see `segment`).
//! - Inserts need no version bump: filling an empty bucket moves nothing and cuts no other
//!   key's probe path.
//!
//! Everything read from the buckets is untrusted: slot numbers are checked against the caller's
//! bound, probes stop after one lap of the table, and a writer that finds the table in a state
//! it cannot have left (no empty bucket, an entry that is not where its slot says) reports
//! [`Corrupt`] so the caller rebuilds the table from the slots.

use crate::sync::{fence, AtomicU64, Ordering};

/// Where the buckets live.
pub trait Buckets {
    /// How many buckets: a power of two.
    fn count(&self) -> usize;
    /// Bucket `i`; `i < count()` (implementations assert it).
    fn bucket(&self, i: usize) -> &AtomicU64;
}

/// The index: its buckets and the version counter that lets readers trust a miss.
pub struct Index<'a, B: Buckets> {
    pub buckets: &'a B,
    pub version: &'a AtomicU64,
}

/// What a lock-free lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The caller's `matches` accepted this slot, found in bucket `pos` while the version
    /// was `version` (see [`Index::moved_since`]).
    Hit { slot: u32, pos: usize, version: u64 },
    /// No bucket holds a slot the caller accepts, and no removal moved entries meanwhile.
    Miss,
    /// Removals kept moving entries (or one was cut short by a dead writer): look again
    /// under the registry lock.
    Unsure,
}

/// The table is not in any state the writers leave it in: rebuild it from the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt(pub &'static str);

/// Lock-free attempts before a reader gives up with `Unsure` (fewer under the model checker,
/// whose state space grows with every retry).
#[cfg(not(loom))]
const READ_ATTEMPTS: u32 = 16;
#[cfg(loom)]
const READ_ATTEMPTS: u32 = 3;

pub const EMPTY: u64 = 0;

/// The bucket word of `slot` under `hash`.
pub fn entry(hash: u64, slot: u32) -> u64 {
    (hash as u32 as u64) << 32 | (slot as u64 + 1)
}

/// The slot a bucket word names, if any.
pub fn entry_slot(e: u64) -> Option<u32> {
    (e as u32).checked_sub(1)
}

fn entry_tag(e: u64) -> u32 {
    (e >> 32) as u32
}

/// Buckets for `slots` slots: a power of two, at least four per slot (a slot has at most two
/// entries: its session's and, at the head of its owner's list, its owner's), so at most half
/// full.
pub fn buckets_for(slots: u32) -> u64 {
    (slots as u64 * 4).next_power_of_two().max(8)
}

/// Set in the stored hash of an owner's entry, clear in a session's.
pub const OWNER_KIND: u64 = 1 << 31;

/// Whether a bucket word is an owner's entry (else a session's).
pub fn is_owner_entry(e: u64) -> bool {
    e & (OWNER_KIND << 32) != 0
}

impl<B: Buckets> Index<'_, B> {
    fn mask(&self) -> usize {
        self.buckets.count() - 1
    }

    fn home(&self, tag: u32) -> usize {
        tag as usize & self.mask()
    }

    /// Looks `hash` up without locking; `matches(slot)` validates a candidate slot (it must
    /// hold the key, live). Slots `>= slots` are ignored (scribbled buckets).
    pub fn find(&self, hash: u64, slots: u32, mut matches: impl FnMut(u32) -> bool) -> Lookup {
        for attempt in 0..READ_ATTEMPTS {
            // Acquire pairs with the Release store that ends a removal: a reader that sees
            // the even version it left also sees every bucket it moved.
            let v1 = self.version.load(Ordering::Acquire);
            if v1 & 1 == 0 {
                if let Some((slot, pos)) = self.probe(hash, slots, &mut matches) {
                    return Lookup::Hit {
                        slot,
                        pos,
                        version: v1,
                    };
                }
                // Pairs with the release fence after a removal's odd store: if the probe saw
                // any bucket that removal wrote, the load below sees the odd version (or later).
                fence(Ordering::Acquire);
                if self.version.load(Ordering::Relaxed) == v1 {
                    return Lookup::Miss;
                }
            }
            if attempt > 2 {
                crate::sync::yield_now();
            }
        }
        Lookup::Unsure
    }

    /// One pass from the home bucket to the first empty one (at most one lap).
    fn probe(
        &self,
        hash: u64,
        slots: u32,
        matches: &mut impl FnMut(u32) -> bool,
    ) -> Option<(u32, usize)> {
        let tag = hash as u32;
        let mut pos = self.home(tag);
        for _ in 0..self.buckets.count() {
            let e = self.buckets.bucket(pos).load(Ordering::Acquire);
            if e == EMPTY {
                return None;
            }
            if entry_tag(e) == tag {
                if let Some(slot) = entry_slot(e).filter(|s| *s < slots) {
                    if matches(slot) {
                        return Some((slot, pos));
                    }
                }
            }
            pos = (pos + 1) & self.mask();
        }
        None
    }

    /// Whether a removal or rebuild ran (or is running) since a lookup saw `version`: if not,
    /// the buckets it read were not moving, and a hit's slot must name the bucket it was found
    /// in.
    pub fn moved_since(&self, version: u64) -> bool {
        fence(Ordering::Acquire);
        self.version.load(Ordering::Relaxed) != version
    }

    /// Looks up under the registry lock (nothing moves meanwhile): no version check needed.
    pub fn find_locked(
        &self,
        hash: u64,
        slots: u32,
        mut matches: impl FnMut(u32) -> bool,
    ) -> Option<(u32, usize)> {
        self.probe(hash, slots, &mut matches)
    }

    /// Adds `slot` under `hash`; returns its bucket, which `placed` is told before the entry
    /// becomes visible. Registry lock held.
    pub fn insert(
        &self,
        hash: u64,
        slot: u32,
        placed: impl FnOnce(usize),
    ) -> Result<usize, Corrupt> {
        let mut pos = self.home(hash as u32);
        for _ in 0..self.buckets.count() {
            let b = self.buckets.bucket(pos);
            if b.load(Ordering::Relaxed) == EMPTY {
                placed(pos);
                // Release: a reader that sees the entry sees what `placed` stored (the slot's
                // own record of its bucket).
                b.store(entry(hash, slot), Ordering::Release);
                return Ok(pos);
            }
            pos = (pos + 1) & self.mask();
        }
        Err(Corrupt("the index has no empty bucket"))
    }

    /// Points the entry at bucket `pos`, which names `old`, at `new` instead (an owner's list
    /// got a new head). Registry lock held. Bracketed by the version like a removal, so a
    /// reader that raced it retries instead of trusting a miss.
    pub fn repoint(&self, pos: usize, old: u32, new: u32) -> Result<(), Corrupt> {
        let e = self.entry_at(pos, old)?;
        let v = self.version.load(Ordering::Relaxed);
        self.version.store(v | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.buckets
            .bucket(pos)
            .store(e & !0xffff_ffff | (new as u64 + 1), Ordering::Relaxed);
        self.version
            .store((v | 1).wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// The word at bucket `pos`, if it names `slot`.
    fn entry_at(&self, pos: usize, slot: u32) -> Result<u64, Corrupt> {
        let e = match pos < self.buckets.count() {
            true => self.buckets.bucket(pos).load(Ordering::Relaxed),
            false => EMPTY,
        };
        match entry_slot(e) == Some(slot) {
            true => Ok(e),
            false => Err(Corrupt("a slot's bucket does not hold that slot")),
        }
    }

    /// Removes the entry of `slot` at bucket `pos`, shifting the rest of its cluster back;
    /// `moved(entry, new_pos)` is told of every entry that moves. Registry lock held.
    pub fn remove(
        &self,
        pos: usize,
        slot: u32,
        mut moved: impl FnMut(u64, usize),
    ) -> Result<(), Corrupt> {
        self.entry_at(pos, slot)?;
        let v = self.version.load(Ordering::Relaxed);
        // Odd: readers will not trust a miss until the even store below.
        self.version.store(v | 1, Ordering::Relaxed);
        // Pairs with the readers' acquire fence before their second version load.
        fence(Ordering::Release);
        let mask = self.mask();
        let mut hole = pos;
        let mut j = pos;
        let mut result = Err(Corrupt("the index has no empty bucket"));
        for _ in 0..self.buckets.count() {
            j = (j + 1) & mask;
            let e = self.buckets.bucket(j).load(Ordering::Relaxed);
            if e == EMPTY {
                result = Ok(());
                break;
            }
            let home = self.home(entry_tag(e));
            // The entry stays if its home lies cyclically in (hole, j]: moving it to the hole
            // would put it before its home, out of its probe path.
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if stays {
                continue;
            }
            self.buckets.bucket(hole).store(e, Ordering::Relaxed);
            moved(e, hole);
            hole = j;
        }
        self.buckets.bucket(hole).store(EMPTY, Ordering::Relaxed);
        // Release pairs with the readers' Acquire load of the version: the moves are visible
        // to a reader that sees this even value.
        self.version
            .store((v | 1).wrapping_add(1), Ordering::Release);
        result
    }

    /// Empties every bucket (before a rebuild). Registry lock held; readers see an odd
    /// version until `end_rebuild`.
    pub fn begin_rebuild(&self) {
        let v = self.version.load(Ordering::Relaxed);
        self.version.store(v | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for i in 0..self.buckets.count() {
            self.buckets.bucket(i).store(EMPTY, Ordering::Relaxed);
        }
    }

    /// Ends a rebuild begun with `begin_rebuild`.
    pub fn end_rebuild(&self) {
        let v = self.version.load(Ordering::Relaxed);
        self.version
            .store((v | 1).wrapping_add(1), Ordering::Release);
    }

    /// Checks the table's invariants (for tests and the registry's check): every entry names
    /// a slot below `slots` for which `expect(entry)` gives the bucket it should sit in (the
    /// caller knows each slot's hashes and recorded buckets), reachable from its home without
    /// crossing an empty bucket, and no entry appears twice. Returns the number of entries.
    pub fn verify(
        &self,
        slots: u32,
        expect: impl Fn(u64) -> Option<usize>,
    ) -> Result<usize, Corrupt> {
        if self.version.load(Ordering::Acquire) & 1 == 1 {
            return Err(Corrupt("a removal or rebuild was cut short"));
        }
        let n = self.buckets.count();
        let mask = self.mask();
        let mut seen = std::collections::HashSet::new();
        for i in 0..n {
            let e = self.buckets.bucket(i).load(Ordering::Acquire);
            let Some(slot) = entry_slot(e) else { continue };
            if slot >= slots || !seen.insert((slot, is_owner_entry(e))) {
                return Err(Corrupt("an entry names a bad or repeated slot"));
            }
            if expect(e) != Some(i) {
                return Err(Corrupt("an entry disagrees with its slot"));
            }
            let mut p = self.home(entry_tag(e));
            while p != i {
                if self.buckets.bucket(p).load(Ordering::Acquire) == EMPTY {
                    return Err(Corrupt("an entry is cut off from its home bucket"));
                }
                p = (p + 1) & mask;
            }
        }
        Ok(seen.len())
    }
}

/// Heap buckets: what the model tests and the model checker run the index on.
pub struct HeapBuckets {
    cells: Vec<AtomicU64>,
}

impl HeapBuckets {
    pub fn new(len: usize) -> HeapBuckets {
        assert!(len.is_power_of_two());
        HeapBuckets {
            cells: (0..len).map(|_| AtomicU64::new(EMPTY)).collect(),
        }
    }
}

impl Buckets for HeapBuckets {
    fn count(&self) -> usize {
        self.cells.len()
    }
    fn bucket(&self, i: usize) -> &AtomicU64 {
        &self.cells[i]
    }
}

/// A session's hash: SipHash-1-3 of `owner` (length-prefixed, so ("ab", "c") and ("a", "bc")
/// differ; owners are at most 128 bytes) and `id`, keyed with the segment's secret: a client
/// choosing conversation ids cannot aim them at one bucket without knowing the key, which
/// never leaves the segment file (mode 0600). Bit 31 clear (a session's entry).
pub fn key_hash(key: [u64; 2], owner: &[u8], id: &[u8]) -> u64 {
    let mut s = SipState::new(key);
    s.write(&[owner.len() as u8]);
    s.write(owner);
    s.write(id);
    s.finish() & !OWNER_KIND
}

/// An owner's hash (the entry of its list's head): the input starts with a byte no session's
/// does (0xff, past any owner length). Bit 31 set.
pub fn owner_hash(key: [u64; 2], owner: &[u8]) -> u64 {
    let mut s = SipState::new(key);
    s.write(&[0xff]);
    s.write(owner);
    s.finish() | OWNER_KIND
}

/// A streaming SipHash-1-3 (one compression round per 8-byte word, three at the end).
struct SipState {
    v: [u64; 4],
    tail: u64,
    ntail: u32,
    total: u64,
}

impl SipState {
    fn new(key: [u64; 2]) -> SipState {
        SipState {
            v: [
                key[0] ^ 0x736f_6d65_7073_6575,
                key[1] ^ 0x646f_7261_6e64_6f6d,
                key[0] ^ 0x6c79_6765_6e65_7261,
                key[1] ^ 0x7465_6462_7974_6573,
            ],
            tail: 0,
            ntail: 0,
            total: 0,
        }
    }

    fn round(&mut self) {
        let v = &mut self.v;
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    fn word(&mut self, m: u64) {
        self.v[3] ^= m;
        self.round();
        self.v[0] ^= m;
    }

    fn write(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let mut rest = bytes;
        while self.ntail != 0 && !rest.is_empty() {
            self.tail |= (rest[0] as u64) << (8 * self.ntail);
            self.ntail += 1;
            rest = &rest[1..];
            if self.ntail == 8 {
                let m = self.tail;
                self.word(m);
                self.tail = 0;
                self.ntail = 0;
            }
        }
        if self.ntail != 0 {
            return; // all of `bytes` went into the partial word
        }
        let mut chunks = rest.chunks_exact(8);
        for c in &mut chunks {
            let m = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.word(m);
        }
        for (i, b) in chunks.remainder().iter().enumerate() {
            self.tail |= (*b as u64) << (8 * i);
        }
        self.ntail = chunks.remainder().len() as u32;
    }

    fn finish(mut self) -> u64 {
        let m = (self.total & 0xff) << 56 | self.tail;
        self.word(m);
        self.v[2] ^= 0xff;
        for _ in 0..3 {
            self.round();
        }
        self.v[0] ^ self.v[1] ^ self.v[2] ^ self.v[3]
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// The index plus what the registry keeps beside it: each slot's hash and bucket.
    struct Model {
        buckets: HeapBuckets,
        version: AtomicU64,
        slots: u32,
        hash: Vec<Option<u64>>,
        pos: Vec<usize>,
    }

    impl Model {
        fn new(slots: u32) -> Model {
            Model {
                buckets: HeapBuckets::new(buckets_for(slots) as usize),
                version: AtomicU64::new(0),
                slots,
                hash: vec![None; slots as usize],
                pos: vec![usize::MAX; slots as usize],
            }
        }
        fn index(&self) -> Index<'_, HeapBuckets> {
            Index {
                buckets: &self.buckets,
                version: &self.version,
            }
        }
        fn find(&self, h: u64) -> Lookup {
            self.index()
                .find(h, self.slots, |s| self.hash[s as usize] == Some(h))
        }
        fn insert(&mut self, h: u64, slot: u32) {
            let pos = self.index().insert(h, slot, |_| ()).expect("room");
            self.hash[slot as usize] = Some(h);
            self.pos[slot as usize] = pos;
        }
        fn remove(&mut self, slot: u32) {
            let mut moves = Vec::new();
            let pos = self.pos[slot as usize];
            self.index()
                .remove(pos, slot, |e, p| moves.push((e, p)))
                .expect("consistent");
            for (e, p) in moves {
                self.pos[entry_slot(e).expect("an entry") as usize] = p;
            }
            self.hash[slot as usize] = None;
        }
        fn verify(&self) -> usize {
            self.index()
                .verify(self.slots, |e| {
                    let s = entry_slot(e)? as usize;
                    (self.hash[s]? as u32 == entry_tag(e)).then_some(self.pos[s])
                })
                .expect("invariants hold")
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Remove(u16),
        Find(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..200).prop_map(Op::Insert),
            (0u16..200).prop_map(Op::Remove),
            (0u16..260).prop_map(Op::Find),
        ]
    }

    proptest! {
        /// The index against a `HashMap` from key to slot. Keys hash into few buckets on
        /// purpose (`hash_bits`), so clusters wrap and collide and removals shift entries.
        #[test]
        fn matches_a_map(slots in 1u32..64, hash_bits in 1u32..12, seed: u64,
                         ops in proptest::collection::vec(op(), 1..300)) {
            let mut m = Model::new(slots);
            let mut model: HashMap<u16, u32> = HashMap::new();
            let hash = |k: u16| -> u64 {
                let full = key_hash([seed, 7], b"o", &k.to_le_bytes());
                // Same low bits for many keys: long clusters; distinct keys keep distinct
                // hashes above them.
                (full & !((1u64 << 32) - 1)) | (full & ((1 << hash_bits) - 1)) | (k as u64) << 20
            };
            for o in ops {
                match o {
                    Op::Insert(k) => {
                        if model.contains_key(&k) || model.len() as u32 == slots {
                            continue;
                        }
                        let slot = (0..slots).find(|s| m.hash[*s as usize].is_none()).unwrap();
                        m.insert(hash(k), slot);
                        model.insert(k, slot);
                    }
                    Op::Remove(k) => {
                        if let Some(slot) = model.remove(&k) {
                            m.remove(slot);
                        }
                    }
                    Op::Find(k) => {
                        let want = model.get(&k).copied();
                        match m.find(hash(k)) {
                            Lookup::Hit { slot, pos, .. } => {
                                prop_assert_eq!(Some(slot), want);
                                prop_assert_eq!(pos, m.pos[slot as usize]);
                            }
                            Lookup::Miss => prop_assert_eq!(want, None),
                            Lookup::Unsure => prop_assert!(false, "no writer runs: never unsure"),
                        }
                    }
                }
                prop_assert_eq!(m.verify(), model.len());
            }
        }
    }

    #[test]
    fn scribbled_buckets_are_never_trusted_into_another_slot() {
        let mut m = Model::new(16);
        for s in 0..8u32 {
            m.insert(key_hash([1, 2], b"o", &s.to_le_bytes()), s);
        }
        // Every bucket scribbled: slots out of range, tags of other keys, no empty bucket.
        for (i, b) in m.buckets.cells.iter().enumerate() {
            b.store(
                0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1),
                Ordering::Relaxed,
            );
        }
        for s in 0..40u32 {
            let h = key_hash([1, 2], b"o", &s.to_le_bytes());
            // The lookup terminates, and only ever returns a slot `matches` accepted.
            if let Lookup::Hit { slot, .. } = m.find(h) {
                assert_eq!(m.hash[slot as usize], Some(h));
            }
        }
        assert!(m.index().verify(16, |_| None).is_err());
        assert!(
            m.index().insert(5, 3, |_| ()).is_err(),
            "no empty bucket is corruption"
        );
        assert!(m.index().remove(0, 3, |_, _| ()).is_err());
    }

    #[test]
    fn key_hash_is_keyed_and_unambiguous() {
        let k = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        assert_ne!(key_hash(k, b"ab", b"c"), key_hash(k, b"a", b"bc"));
        assert_ne!(key_hash(k, b"o", b"c"), key_hash([1, 2], b"o", b"c"));
        // Streaming over word boundaries gives the one-shot result.
        let mut s = SipState::new(k);
        s.write(b"abc");
        s.write(b"defghijkl");
        s.write(b"");
        s.write(b"mnopqrstuvwxyz");
        let mut t = SipState::new(k);
        t.write(b"abcdefghijklmnopqrstuvwxyz");
        assert_eq!(s.finish(), t.finish());
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    struct Shared {
        buckets: HeapBuckets,
        version: AtomicU64,
    }

    /// A reader looking for a key that stays in the table never gets a trusted miss, while a
    /// writer removes the entry in front of it (shifting it back over the bucket the reader
    /// may already have passed) and inserts another.
    #[test]
    fn a_present_key_is_never_missed_while_entries_move() {
        loom::model(|| {
            let s = Arc::new(Shared {
                buckets: HeapBuckets::new(4),
                version: AtomicU64::new(0),
            });
            // Both keys have home bucket 1: A sits in 1, B (the one looked up) in 2.
            let (ha, hb, hc) = (0x1_0000_0001u64, 0x2_0000_0001u64, 0x3_0000_0003u64);
            {
                let ix = Index {
                    buckets: &s.buckets,
                    version: &s.version,
                };
                assert_eq!(ix.insert(ha, 0, |_| ()), Ok(1));
                assert_eq!(ix.insert(hb, 1, |_| ()), Ok(2));
            }
            let w = s.clone();
            let writer = loom::thread::spawn(move || {
                let ix = Index {
                    buckets: &w.buckets,
                    version: &w.version,
                };
                ix.remove(1, 0, |_, _| ()).expect("consistent");
                ix.insert(hc, 2, |_| ()).expect("room");
            });
            let r = s.clone();
            let reader = loom::thread::spawn(move || {
                let ix = Index {
                    buckets: &r.buckets,
                    version: &r.version,
                };
                let got = ix.find(hb, 4, |slot| slot == 1);
                assert!(
                    matches!(got, Lookup::Hit { slot: 1, .. } | Lookup::Unsure),
                    "{got:?}"
                );
            });
            reader.join().unwrap();
            writer.join().unwrap();
        });
    }
}
