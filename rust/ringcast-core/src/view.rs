//! The typed view of a mapped segment: the one place that turns offsets into references. Every
//! other module asks it, by index, for a slot's [`SlotMeta`], a [`ProcEntry`], a reader-count
//! cell, a slot's key bytes or ring bytes, an index bucket, or the header's lock, generation
//! counter and registry head; none of them computes an address.
//!
//! # The safety argument, made once
//! A [`SegmentView`] exists only through [`SegmentView::create`] (a new file, sized for its
//! geometry) or [`SegmentView::open`] (a file whose header was found ready and whose constants
//! became a `Geometry` via `Geometry::from_header`), and both check, before any reference is
//! made, that:
//! 1. the geometry is exactly `Geometry::compute` of its own sizes, so the regions follow each
//!    other without overlap: header (`HEADER_BYTES`, holding the lock, the generation counter
//!    and the registry head at fixed offsets) ≤ process table ≤ counts ≤ slots ≤ index ≤
//!    rings, the last ending at `file_bytes`; the table, counts and slot offsets and the slot
//!    stride are multiples of 128 (the alignment of every shared struct), the index's and the
//!    rings' of the page size;
//! 2. the mapping is at least `file_bytes` long.
//!
//! The view owns the mapping and unmaps it only when dropped, and every reference it returns
//! borrows the view, so it points into live memory. Every index is checked against the geometry
//! before use (a failed check panics: indices come from our own handles or the mask width, never
//! unchecked from the file). Every shared struct is `#[repr(C)]` and made only of atomics and
//! padding, so it is valid for any bit pattern another process may have written. Plain bytes
//! (keys, ring contents) are only ever copied, never referenced; lengths read from the file are
//! clamped before a copy, and torn copies are caught by the callers' seqlock-style rechecks.

use std::io;
use std::marker::PhantomData;

use crate::index::Buckets;
use crate::layout::{
    Geometry, HeaderConsts, ProcEntry, RegistryHead, SlotMeta, GENERATION_OFFSET, HEADER_BYTES,
    LAYOUT_VERSION, LOCK_OFFSET, MAGIC, MAX_OWNER_LEN, MAX_PROCESSES, REGISTRY_OFFSET,
};
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::sys::mmap::Mapping;
use crate::sys::process;
use crate::sys::robust_mutex::{self, Locked};

/// A mapped segment seen through its validated geometry.
pub(crate) struct SegmentView {
    map: Mapping,
    geo: Geometry,
    epoch: u64,
    /// Key of the index's hash (from the header; constant for the segment's life).
    hash_key: [u64; 2],
}

/// The header of a mapping not validated yet (to decide whether it is a segment at all); `None`
/// if the mapping is too short to hold one.
pub(crate) fn header_of(map: &Mapping) -> Option<&HeaderConsts> {
    if map.len() < HEADER_BYTES {
        return None;
    }
    // SAFETY: the mapping holds at least HEADER_BYTES (checked), which covers HeaderConsts
    // (asserted in `layout`); it is page aligned; the struct is plain data plus one atomic,
    // valid for any bit pattern. The reference borrows `map`, which stays mapped meanwhile.
    Some(unsafe { &*(map.as_ptr() as *const HeaderConsts) })
}

impl SegmentView {
    /// Checks what the safety argument (module doc) rests on; a failure is a bug of ours.
    fn new(map: Mapping, geo: Geometry, epoch: u64, hash_key: [u64; 2]) -> SegmentView {
        assert_eq!(
            Geometry::compute(
                geo.max_sessions,
                geo.session_bytes,
                geo.max_id_len,
                geo.page_size
            ),
            Some(geo),
            "a segment geometry that is not the computed layout of its sizes"
        );
        assert!(
            map.len() as u64 >= geo.file_bytes,
            "a mapping shorter than its geometry"
        );
        SegmentView {
            map,
            geo,
            epoch,
            hash_key,
        }
    }

    /// Writes a new segment's header into `map` (just created: nobody else can have opened it
    /// while `ready` is 0), initialises the registry lock, and marks the header ready last.
    pub(crate) fn create(
        map: Mapping,
        geo: Geometry,
        epoch: u64,
        hash_key: [u64; 2],
    ) -> io::Result<SegmentView> {
        let view = SegmentView::new(map, geo, epoch, hash_key);
        let h = view.map.as_ptr() as *mut HeaderConsts;
        // SAFETY: the mapping holds the header page (`new` checked file_bytes, which starts
        // with it), page aligned; nobody reads the header before `ready` is 1.
        unsafe {
            std::ptr::write(
                h,
                HeaderConsts {
                    magic: MAGIC,
                    layout_version: LAYOUT_VERSION,
                    max_sessions: geo.max_sessions,
                    max_id_len: geo.max_id_len,
                    page_size: geo.page_size,
                    session_bytes: geo.session_bytes,
                    slot_stride: geo.slot_stride,
                    ring_stride: geo.ring_stride,
                    procs_offset: geo.procs_offset,
                    counts_offset: geo.counts_offset,
                    slots_offset: geo.slots_offset,
                    rings_offset: geo.rings_offset,
                    file_bytes: geo.file_bytes,
                    epoch,
                    created_at_ns: process::unix_nanos(),
                    ready: AtomicU32::new(0),
                    _reserved: 0,
                    index_offset: geo.index_offset,
                    index_buckets: geo.index_buckets,
                    hash_key,
                },
            );
        }
        // SAFETY: the lock's bytes lie in the header page; nobody else uses them yet.
        unsafe { robust_mutex::init(view.lock_ptr())? };
        // SAFETY: written just above; the header stays mapped as long as the view.
        let ready = unsafe { &(*h).ready };
        // Release: openers that see `ready == 1` (Acquire, in `open`) see the whole header and
        // an initialised lock.
        ready.store(1, Ordering::Release);
        Ok(view)
    }

    /// Wraps a mapping whose header was found ready (Acquire load of `ready` == 1) and gave
    /// `geo` through `Geometry::from_header`.
    pub(crate) fn open(map: Mapping, geo: Geometry, epoch: u64, hash_key: [u64; 2]) -> SegmentView {
        SegmentView::new(map, geo, epoch, hash_key)
    }

    pub(crate) fn hash_key(&self) -> [u64; 2] {
        self.hash_key
    }

    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// A pointer into the mapping, `offset` bytes in; panics past the file (callers compute
    /// offsets inside the layout, so that would be a bug of ours).
    fn at(&self, offset: u64) -> *mut u8 {
        assert!(offset < self.geo.file_bytes, "offset past the segment");
        // SAFETY: offset < file_bytes <= the mapping's length (checked in `new`), so the
        // result points inside the mapping.
        unsafe { self.map.as_ptr().add(offset as usize) }
    }

    fn lock_ptr(&self) -> *mut libc::pthread_mutex_t {
        self.at(LOCK_OFFSET as u64) as *mut libc::pthread_mutex_t
    }

    /// Takes the registry's robust lock. `Locked::OwnerDied` hands the caller a registry to
    /// repair and then [`mark_registry_consistent`](Self::mark_registry_consistent).
    pub(crate) fn lock_registry(&self) -> io::Result<Locked> {
        // SAFETY: the mutex was initialised before `ready` was set (`create`), and a view is
        // only made of a ready header.
        unsafe { robust_mutex::lock(self.lock_ptr()) }
    }

    /// Releases the registry lock.
    ///
    /// # Safety
    /// The calling thread holds it (from `lock_registry`).
    pub(crate) unsafe fn unlock_registry(&self) {
        // SAFETY: initialised (see `lock_registry`) and held, per this function's contract.
        unsafe { robust_mutex::unlock(self.lock_ptr()) }
    }

    /// Marks the registry repaired after a lock obtained with `Locked::OwnerDied`.
    ///
    /// # Safety
    /// The calling thread holds the lock, obtained with `Locked::OwnerDied`.
    pub(crate) unsafe fn mark_registry_consistent(&self) -> io::Result<()> {
        // SAFETY: per this function's contract.
        unsafe { robust_mutex::make_consistent(self.lock_ptr()) }
    }

    /// The registry's state beside the index (free stack, finished list, counts, index
    /// version) in the header.
    pub(crate) fn registry_head(&self) -> &RegistryHead {
        // SAFETY: REGISTRY_OFFSET + size_of::<RegistryHead>() lies inside the header page
        // (asserted in `layout`), 128-aligned like the struct; it is atomics and padding.
        unsafe { &*(self.at(REGISTRY_OFFSET as u64) as *const RegistryHead) }
    }

    /// The segment-wide source of generations in the header.
    pub(crate) fn generation_counter(&self) -> &AtomicU64 {
        // SAFETY: GENERATION_OFFSET is inside the header page and 8-byte aligned; an AtomicU64
        // is valid for any bit pattern.
        unsafe { &*(self.at(GENERATION_OFFSET as u64) as *const AtomicU64) }
    }

    /// Slot metadata; panics on an out-of-range index (a bug of ours, never segment data).
    pub(crate) fn slot(&self, slot: u32) -> &SlotMeta {
        self.try_slot(slot).expect("slot index out of range")
    }

    /// Slot metadata, or `None` for an index past the last slot.
    pub(crate) fn try_slot(&self, slot: u32) -> Option<&SlotMeta> {
        if slot >= self.geo.max_sessions {
            return None;
        }
        let off = self.geo.slots_offset + slot as u64 * self.geo.slot_stride;
        // SAFETY: slot < max_sessions, so the slot's stride lies inside the slots region;
        // 128-aligned; SlotMeta is atomics and padding (module doc).
        Some(unsafe { &*(self.at(off) as *const SlotMeta) })
    }

    /// Row `index` of the process table; panics past `MAX_PROCESSES`.
    pub(crate) fn proc_entry(&self, index: usize) -> &ProcEntry {
        assert!(index < MAX_PROCESSES, "process index out of range");
        let off = self.geo.procs_offset + (index * std::mem::size_of::<ProcEntry>()) as u64;
        // SAFETY: the table holds MAX_PROCESSES rows of 128 bytes (index checked), 128-aligned;
        // ProcEntry is atomics and padding.
        unsafe { &*(self.at(off) as *const ProcEntry) }
    }

    /// Process `proc_index`'s count of readers of `slot`: `generation_low32 << 32 | count`.
    pub(crate) fn count_cell(&self, proc_index: usize, slot: u32) -> &AtomicU64 {
        assert!(proc_index < MAX_PROCESSES && slot < self.geo.max_sessions);
        let off = self.geo.counts_offset
            + (proc_index as u64 * self.geo.max_sessions as u64 + slot as u64) * 8;
        // SAFETY: inside the counts region (both indices checked), 8-byte aligned
        // (counts_offset is 128-aligned); AtomicU64 is valid for any bit pattern.
        unsafe { &*(self.at(off) as *const AtomicU64) }
    }

    /// Where a slot's id bytes start (its owner bytes follow `max_id_len` later).
    fn key_at(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.geo.max_sessions);
        let off = self.geo.slots_offset
            + slot as u64 * self.geo.slot_stride
            + std::mem::size_of::<SlotMeta>() as u64;
        self.at(off)
    }

    /// Copies the id and owner of `slot`; `None` if the stored lengths are out of bounds
    /// (scribbled). A copy torn by a concurrent install is for the caller's recheck to catch.
    pub(crate) fn read_key(&self, slot: u32) -> Option<(Vec<u8>, Vec<u8>)> {
        let m = self.slot(slot);
        let id_len = m.id_len.load(Ordering::Acquire) as usize;
        let owner_len = m.owner_len.load(Ordering::Acquire) as usize;
        if id_len > self.geo.max_id_len as usize || owner_len > MAX_OWNER_LEN {
            return None;
        }
        let mut id = vec![0u8; id_len];
        let mut owner = vec![0u8; owner_len];
        let id_at = self.key_at(slot);
        // SAFETY: the id area (`max_id_len` bytes) and the owner area (MAX_OWNER_LEN) follow
        // SlotMeta inside the slot's stride (`slot_stride >= size_of::<SlotMeta>() + max_id_len
        // + MAX_OWNER_LEN`, by `Geometry::compute`); both lengths were checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(id_at, id.as_mut_ptr(), id_len);
            let owner_at = id_at.add(self.geo.max_id_len as usize);
            std::ptr::copy_nonoverlapping(owner_at, owner.as_mut_ptr(), owner_len);
        }
        Some((id, owner))
    }

    /// Copies the owner of `slot` into `buf` (at most MAX_OWNER_LEN bytes) and returns its
    /// length; `None` if the stored length is out of bounds (scribbled). Like `read_key`, a
    /// copy torn by a concurrent install is for the caller to recheck; nothing is allocated.
    pub(crate) fn copy_owner(&self, slot: u32, buf: &mut [u8; MAX_OWNER_LEN]) -> Option<usize> {
        let owner_len = self.slot(slot).owner_len.load(Ordering::Acquire) as usize;
        if owner_len > MAX_OWNER_LEN {
            return None;
        }
        // SAFETY: the owner area (MAX_OWNER_LEN bytes) follows the id area inside the slot's
        // stride, as in `read_key`; `owner_len` was checked against both it and `buf`.
        unsafe {
            let owner_at = self.key_at(slot).add(self.geo.max_id_len as usize);
            std::ptr::copy_nonoverlapping(owner_at, buf.as_mut_ptr(), owner_len);
        }
        Some(owner_len)
    }

    /// Writes the key bytes of `slot` (the caller then stores the lengths). Panics on lengths
    /// past the geometry's bounds (callers validate keys first).
    pub(crate) fn write_key(&self, slot: u32, id: &[u8], owner: &[u8]) {
        assert!(id.len() <= self.geo.max_id_len as usize && owner.len() <= MAX_OWNER_LEN);
        let id_at = self.key_at(slot);
        // SAFETY: bounds as in `read_key`, lengths checked above. Concurrent readers only copy
        // these bytes and validate afterwards.
        unsafe {
            std::ptr::copy_nonoverlapping(id.as_ptr(), id_at, id.len());
            let owner_at = id_at.add(self.geo.max_id_len as usize);
            std::ptr::copy_nonoverlapping(owner.as_ptr(), owner_at, owner.len());
        }
    }

    /// The bytes of `slot`'s ring.
    pub(crate) fn ring(&self, slot: u32) -> RingRegion<'_> {
        assert!(slot < self.geo.max_sessions);
        RingRegion {
            base: self.at(self.geo.rings_offset + slot as u64 * self.geo.ring_stride),
            cap: self.geo.session_bytes,
            _view: PhantomData,
        }
    }

    /// Backs the pages a slot used for the first time will touch: its metadata and keys, and
    /// in each process row the page of reader counts its cell starts, if it starts one (slots
    /// are first used in order, from 0, so the pages of earlier cells are backed already).
    pub(crate) fn back_new_slot(&self, slot: u32) -> io::Result<()> {
        assert!(slot < self.geo.max_sessions);
        let g = &self.geo;
        let meta = g.slots_offset + slot as u64 * g.slot_stride;
        self.map.allocate(meta as usize, g.slot_stride as usize)?;
        let page = g.page_size as u64;
        for row in 0..MAX_PROCESSES as u64 {
            let cell = g.counts_offset + (row * g.max_sessions as u64 + slot as u64) * 8;
            if slot == 0 || cell % page < 8 {
                self.map.allocate(cell as usize, 8)?;
            }
        }
        Ok(())
    }

    /// Backs bytes `from..to` of `slot`'s ring region (`to` at most the ring stride: the ring
    /// rounded up to pages) with memory now; see `Mapping::allocate`.
    pub(crate) fn back_ring(&self, slot: u32, from: u64, to: u64) -> io::Result<()> {
        assert!(slot < self.geo.max_sessions && from <= to && to <= self.geo.ring_stride);
        let off = self.geo.rings_offset + slot as u64 * self.geo.ring_stride + from;
        self.map.allocate(off as usize, (to - from) as usize)
    }

    /// Gives the pages of `slot`'s ring back to the OS (they read as zeros after).
    pub(crate) fn release_pages(&self, slot: u32) {
        assert!(slot < self.geo.max_sessions);
        let off = self.geo.rings_offset + slot as u64 * self.geo.ring_stride;
        self.map
            .punch_hole(off as usize, self.geo.ring_stride as usize);
    }
}

/// The index's buckets are the mapping's index region.
impl Buckets for SegmentView {
    fn count(&self) -> usize {
        self.geo.index_buckets as usize
    }

    /// Panics past the last bucket (indices come from the index's own masking).
    fn bucket(&self, i: usize) -> &AtomicU64 {
        assert!(
            i < self.geo.index_buckets as usize,
            "bucket index out of range"
        );
        // SAFETY: the index region `[index_offset, index_offset + 8 * index_buckets)` lies
        // between the slots and the rings (module doc), `i` is checked above; index_offset is
        // page aligned, so the bucket is 8-byte aligned; AtomicU64 is valid for any bit pattern.
        unsafe { &*(self.at(self.geo.index_offset + i as u64 * 8) as *const AtomicU64) }
    }
}

/// One slot's ring bytes inside the mapping: `capacity` bytes, copied in and out, never
/// referenced (a producer may be writing them while a reader copies).
pub(crate) struct RingRegion<'a> {
    base: *mut u8,
    cap: u64,
    _view: PhantomData<&'a SegmentView>,
}

impl RingRegion<'_> {
    pub(crate) fn capacity(&self) -> u64 {
        self.cap
    }

    /// Copies `src` to `pos..pos + src.len()`; panics if that passes the end.
    pub(crate) fn store(&self, pos: usize, src: &[u8]) {
        assert!(pos as u64 + src.len() as u64 <= self.cap);
        // SAFETY: the range lies inside this slot's ring (asserted; `ring_stride >=
        // session_bytes`), which the borrowed view keeps mapped. Readers tolerate concurrent
        // stores: they copy, then validate.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(pos), src.len()) }
    }

    /// Copies `pos..pos + dst.len()` into `dst`; panics if that passes the end.
    pub(crate) fn load(&self, pos: usize, dst: &mut [u8]) {
        assert!(pos as u64 + dst.len() as u64 <= self.cap);
        // SAFETY: as in `store`; a torn copy is detected and discarded by `ring::read`.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(pos), dst.as_mut_ptr(), dst.len()) }
    }
}
