//! The session registry of one segment handle: which slot holds which (owner, conversation id)
//! session, and this process's row in the process table.
//!
//! It owns allocation, installation, ending and crash recovery of sessions (under the robust
//! registry lock), the lock-free lookups (`find`, `snapshot`: seqlock-style reads that trust
//! only what did not change under them), producer claims (which Writer may append), reader
//! counts, and the process-table row and notifier of this handle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backoff::Backoff;
use crate::error::{EndReason, Error, Result, SegmentError};
use crate::layout::{end_reason, state, SlotMeta, ENDED_BIT, MAX_OWNER_LEN, MAX_PROCESSES};
use crate::notify::{self, Notifier, Wakers};
use crate::ring::{self, Cursors};
use crate::sync::{fence, AtomicBool, AtomicU64, Ordering};
use crate::sys::process::{self, ProcessId};
use crate::sys::robust_mutex::Locked;
use crate::view::SegmentView;

/// Public state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Running,
    Done,
    Cancelled,
    Failed,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Done => "done",
            SessionState::Cancelled => "cancelled",
            SessionState::Failed => "failed",
        }
    }
    /// The state of a live session; `None` for a free or INIT slot (or a scribbled value).
    pub(crate) fn from_raw(s: u32) -> Option<SessionState> {
        match s {
            state::RUNNING => Some(SessionState::Running),
            state::DONE => Some(SessionState::Done),
            state::CANCELLED => Some(SessionState::Cancelled),
            state::FAILED => Some(SessionState::Failed),
            _ => None,
        }
    }
    pub(crate) fn raw(self) -> u32 {
        match self {
            SessionState::Running => state::RUNNING,
            SessionState::Done => state::DONE,
            SessionState::Cancelled => state::CANCELLED,
            SessionState::Failed => state::FAILED,
        }
    }
}

/// A consistent snapshot of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub conversation_id: String,
    pub owner: String,
    pub state: SessionState,
    pub total_bytes: u64,
    pub first_available: u64,
    pub started_at_ns: u64,
    pub completed_at_ns: u64,
    pub last_write_ns: u64,
    pub last_access_ns: u64,
    pub producer: ProcessId,
    pub producer_alive: bool,
    pub readers: u32,
    pub generation: u64,
    pub slot: u32,
}

/// The right to append to one session, handed out under the registry lock: a `Writer` wraps
/// one. Only the claim whose `token` is in the slot's `producer_token` may append.
pub(crate) struct ProducerClaim {
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    pub(crate) token: u64,
    /// This process as a slot's `busy` word holds it (see [`busy_holder_alive`]).
    pub(crate) busy_tag: u64,
}

/// A producer token unique to one claim (process identity plus a local counter).
fn new_token(me: ProcessId) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // splitmix64 of the three, so tokens of different processes do not collide in practice.
    let mut z = (me.pid as u64) << 40 ^ me.start_time << 8 ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// Whether the process encoded in a `busy` word (`pid | start_low32 << 32`) still runs.
pub(crate) fn busy_holder_alive(busy: u64) -> bool {
    process::alive_with_start_low32(busy as u32, (busy >> 32) as u32)
}

/// FNV-1a over owner, a separator, and id: a cheap filter before comparing bytes.
fn id_hash(owner: &[u8], id: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.iter().chain(&[0xffu8]).chain(id) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1 // never 0, so a zeroed slot never matches
}

fn reason_code(r: EndReason) -> u8 {
    match r {
        EndReason::Cancelled => end_reason::CANCELLED,
        EndReason::Replaced => end_reason::REPLACED,
        EndReason::Evicted => end_reason::EVICTED,
    }
}

/// A seqlock read of one slot: runs `read` (given the generation) only while the slot holds a
/// live session, and returns its result with that generation only if neither the generation
/// nor the liveness changed meanwhile. The registry writes slots under its lock and bumps the
/// generation around every install and end, so a read that passes saw one session's data.
fn read_stable<T>(m: &SlotMeta, read: impl FnOnce(u64) -> Option<T>) -> Option<(u64, T)> {
    SessionState::from_raw(m.state.load(Ordering::Acquire))?;
    let g1 = m.generation.load(Ordering::Acquire);
    let out = read(g1)?;
    // Orders the reads above before the re-check below.
    fence(Ordering::Acquire);
    let g2 = m.generation.load(Ordering::Acquire);
    if g1 != g2 || SessionState::from_raw(m.state.load(Ordering::Acquire)).is_none() {
        return None;
    }
    Some((g1, out))
}

/// The registry as one segment handle sees it (shared by the handle's clones, writers,
/// readers and notifier).
pub(crate) struct Registry {
    view: Arc<SegmentView>,
    path: String,
    wake: Wakers,
    /// Set by `close`: every handle of this mapping refuses further use.
    closed: AtomicBool,
    local: Mutex<Local>,
}

/// This process's private bookkeeping for the segment.
#[derive(Default)]
struct Local {
    pid: u32,
    proc_index: Option<usize>,
    /// Readers this process holds, per (slot, generation); mirrored into its counts row.
    readers: HashMap<(u32, u64), u32>,
    notifier: Option<Arc<Notifier>>,
}

impl Registry {
    pub(crate) fn new(view: SegmentView, path: &str) -> Registry {
        Registry {
            view: Arc::new(view),
            path: path.to_string(),
            wake: Wakers::of_segment(path),
            closed: AtomicBool::new(false),
            local: Mutex::new(Local::default()),
        }
    }

    pub(crate) fn view(&self) -> &SegmentView {
        &self.view
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// This handle's way to this segment's notifiers.
    pub(crate) fn wakers(&self) -> &Wakers {
        &self.wake
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Segment(SegmentError::Closed));
        }
        Ok(())
    }

    /// Makes every handle of this mapping refuse further use, and drops its notifier.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.notifier = None;
    }

    pub(crate) fn check_key(&self, id: &str, owner: &str) -> Result<()> {
        self.check_open()?;
        let max_id_len = self.view.geometry().max_id_len;
        if id.is_empty() {
            return Err(Error::InvalidArgument(
                "conversation id must not be empty".into(),
            ));
        }
        if id.len() > max_id_len as usize {
            return Err(Error::InvalidArgument(format!(
                "conversation id is {} bytes; this segment allows at most {max_id_len}",
                id.len(),
            )));
        }
        if owner.len() > MAX_OWNER_LEN {
            return Err(Error::InvalidArgument(format!(
                "owner tag is {} bytes; at most {MAX_OWNER_LEN} are allowed",
                owner.len()
            )));
        }
        Ok(())
    }

    /// Takes the registry lock, repairing the registry first if its last holder died.
    pub(crate) fn lock(&self) -> Result<RegistryGuard<'_>> {
        self.check_open()?;
        let how = self
            .view
            .lock_registry()
            .map_err(|e| Error::io(&self.path, "lock the registry of", e))?;
        let guard = RegistryGuard { reg: self };
        if how == Locked::OwnerDied {
            guard.recover();
            // SAFETY: we hold the lock, obtained with EOWNERDEAD, and repaired the registry.
            unsafe { self.view.mark_registry_consistent() }
                .map_err(|e| Error::io(&self.path, "repair the registry of", e))?;
        }
        Ok(guard)
    }

    /// Finds the live session of (owner, id) without locking.
    pub(crate) fn find(&self, id: &str, owner: &str) -> Option<(u32, u64)> {
        let h = id_hash(owner.as_bytes(), id.as_bytes());
        for slot in 0..self.view.geometry().max_sessions {
            let m = self.view.slot(slot);
            if m.id_hash.load(Ordering::Relaxed) != h {
                continue;
            }
            let found = read_stable(m, |_| self.view.read_key(slot));
            if let Some((gen, (kid, kowner))) = found {
                if kid == id.as_bytes() && kowner == owner.as_bytes() {
                    return Some((slot, gen));
                }
            }
        }
        None
    }

    fn not_found(id: &str) -> Error {
        Error::NotFound {
            conversation_id: id.to_string(),
        }
    }

    /// Why the session `gen` left `slot` (evicted if the slot moved on since).
    pub(crate) fn end_reason(&self, slot: u32, gen: u64) -> EndReason {
        let last = self.view.slot(slot).last_end.load(Ordering::Acquire);
        if last >> 8 != gen & (u64::MAX >> 8) {
            return EndReason::Evicted;
        }
        match last as u8 {
            end_reason::CANCELLED => EndReason::Cancelled,
            end_reason::REPLACED => EndReason::Replaced,
            _ => EndReason::Evicted,
        }
    }

    /// Whether the process-table row `i` names a process that runs.
    fn row_alive(&self, i: usize) -> bool {
        let e = self.view.proc_entry(i);
        let pid = e.pid.load(Ordering::Acquire);
        pid != 0
            && (ProcessId {
                pid,
                start_time: e.start_time.load(Ordering::Acquire),
            })
            .is_alive()
    }

    /// Entries of the process table whose owners run, as a bit mask.
    fn alive_procs(&self) -> u64 {
        (0..MAX_PROCESSES)
            .filter(|&i| self.row_alive(i))
            .fold(0, |mask, i| mask | 1 << i)
    }

    fn snapshot(
        &self,
        slot: u32,
        gen: u64,
        alive: u64,
        cache: &mut HashMap<(u32, u64), bool>,
    ) -> Option<SessionInfo> {
        let m = self.view.slot(slot);
        let (_, info) = read_stable(m, |g| {
            if g != gen {
                return None;
            }
            let st = SessionState::from_raw(m.state.load(Ordering::Acquire))?;
            let (id, owner) = self.view.read_key(slot)?;
            let producer = ProcessId {
                pid: m.producer_pid.load(Ordering::Acquire),
                start_time: m.producer_start.load(Ordering::Acquire),
            };
            let mut readers = 0u32;
            for i in 0..MAX_PROCESSES {
                if alive & (1 << i) != 0 {
                    let cell = self.view.count_cell(i, slot).load(Ordering::Acquire);
                    if cell >> 32 == gen & 0xffff_ffff {
                        readers = readers.saturating_add(cell as u32);
                    }
                }
            }
            Some(SessionInfo {
                conversation_id: String::from_utf8_lossy(&id).into_owned(),
                owner: String::from_utf8_lossy(&owner).into_owned(),
                state: st,
                total_bytes: m.cursor.load(Ordering::Acquire),
                first_available: ring::first_available(
                    &Cursors::of(m),
                    self.view.geometry().session_bytes,
                ),
                started_at_ns: m.started_at_ns.load(Ordering::Relaxed),
                completed_at_ns: m.completed_at_ns.load(Ordering::Relaxed),
                last_write_ns: m.last_write_ns.load(Ordering::Relaxed),
                last_access_ns: m.last_access_ns.load(Ordering::Relaxed),
                producer,
                producer_alive: *cache
                    .entry((producer.pid, producer.start_time))
                    .or_insert_with(|| producer.is_alive()),
                readers,
                generation: gen,
                slot,
            })
        })?;
        Some(info)
    }

    pub(crate) fn get(&self, id: &str, owner: &str) -> Option<SessionInfo> {
        let (slot, gen) = self.find(id, owner)?;
        self.snapshot(slot, gen, self.alive_procs(), &mut HashMap::new())
    }

    /// Every live session, or only `owner`'s, oldest first.
    pub(crate) fn list(&self, owner: Option<&str>) -> Vec<SessionInfo> {
        let alive = self.alive_procs();
        let mut cache = HashMap::new();
        let mut out = Vec::new();
        for slot in 0..self.view.geometry().max_sessions {
            let m = self.view.slot(slot);
            if SessionState::from_raw(m.state.load(Ordering::Acquire)).is_none() {
                continue;
            }
            let gen = m.generation.load(Ordering::Acquire);
            if let Some(info) = self.snapshot(slot, gen, alive, &mut cache) {
                if owner.is_none_or(|o| o == info.owner) {
                    out.push(info);
                }
            }
        }
        out.sort_by_key(|i| (i.started_at_ns, i.slot));
        out
    }

    /// The session with exactly `id` plus every one whose id starts with `id + "::"`.
    pub(crate) fn lookup_prefix(&self, id: &str, owner: &str) -> Vec<SessionInfo> {
        let prefix = format!("{id}::");
        self.list(Some(owner))
            .into_iter()
            .filter(|i| i.conversation_id == id || i.conversation_id.starts_with(&prefix))
            .collect()
    }

    /// Live sessions and the bytes their rings hold.
    pub(crate) fn usage(&self) -> (u32, u64) {
        let g = self.view.geometry();
        let mut used = 0;
        let mut buffered = 0;
        for i in 0..g.max_sessions {
            let m = self.view.slot(i);
            if SessionState::from_raw(m.state.load(Ordering::Acquire)).is_some() {
                used += 1;
                buffered += m.cursor.load(Ordering::Acquire).min(g.session_bytes);
            }
        }
        (used, buffered)
    }

    /// Installs a new running session for (owner, id), replacing a live one.
    pub(crate) fn create_or_replace(&self, id: &str, owner: &str) -> Result<ProducerClaim> {
        self.check_key(id, owner)?;
        let me = ProcessId::current();
        let reg = self.lock()?;
        let mut existing = self.find(id, owner);
        let slot = match reg.alloc() {
            Ok(slot) => slot,
            Err(Error::RegistryFull { .. }) if existing.is_some() => {
                // Full, but the session being replaced frees a slot: end it first. (A crash
                // right here loses the old session, which the caller was replacing anyway.)
                let (old, old_gen) = existing.take().expect("checked above");
                reg.end(old, old_gen, end_reason::REPLACED);
                reg.alloc_waiting()?
            }
            Err(e) => return Err(e),
        };
        let gen = reg.install(slot, id, owner);
        if let Some((old, old_gen)) = existing {
            reg.end(old, old_gen, end_reason::REPLACED);
        }
        let claim = reg.claim(slot, gen, me);
        // Release: a lookup that sees RUNNING (Acquire) sees every field written above.
        self.view
            .slot(slot)
            .state
            .store(state::RUNNING, Ordering::Release);
        Ok(claim)
    }

    /// Claims a running session created by another process, if it is still `generation`.
    pub(crate) fn adopt(&self, id: &str, owner: &str, generation: u64) -> Result<ProducerClaim> {
        self.check_key(id, owner)?;
        let me = ProcessId::current();
        let reg = self.lock()?;
        let Some((slot, gen)) = self.find(id, owner) else {
            return Err(Self::not_found(id));
        };
        if gen != generation {
            return Err(Error::Ended(EndReason::Replaced));
        }
        if self.view.slot(slot).state.load(Ordering::Acquire) != state::RUNNING {
            return Err(Error::InvalidArgument(format!(
                "session {id:?} is already finished; only a running session can be adopted"
            )));
        }
        Ok(reg.claim(slot, gen, me))
    }

    /// Claims the session if its producer is dead (dropping a torn append); `None` if it runs.
    pub(crate) fn take_over_dead(&self, id: &str, owner: &str) -> Result<Option<ProducerClaim>> {
        self.check_key(id, owner)?;
        let me = ProcessId::current();
        let reg = self.lock()?;
        let Some((slot, gen)) = self.find(id, owner) else {
            return Err(Self::not_found(id));
        };
        let m = self.view.slot(slot);
        let producer = ProcessId {
            pid: m.producer_pid.load(Ordering::Acquire),
            start_time: m.producer_start.load(Ordering::Acquire),
        };
        if producer.is_alive() {
            return Ok(None);
        }
        let busy = m.busy.load(Ordering::SeqCst);
        if busy != 0 && !busy_holder_alive(busy) {
            // The dead producer was mid-append. Its torn bytes past `cursor` were never
            // published; `head` keeps counting the range they overwrote as lost.
            m.busy.store(0, Ordering::SeqCst);
        } else if busy != 0 {
            return Ok(None);
        }
        Ok(Some(reg.claim(slot, gen, me)))
    }

    /// Removes the session; its readers end with `reason`. True if it existed.
    pub(crate) fn evict(&self, id: &str, owner: &str, reason: EndReason) -> Result<bool> {
        self.check_key(id, owner)?;
        let reg = self.lock()?;
        Ok(match self.find(id, owner) {
            Some((slot, gen)) => reg.end(slot, gen, reason_code(reason)),
            None => false,
        })
    }

    /// Removes exactly this session if it still has that generation.
    pub(crate) fn evict_slot(&self, slot: u32, generation: u64, reason: EndReason) -> Result<bool> {
        let max_sessions = self.view.geometry().max_sessions;
        if slot >= max_sessions {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} is out of range (the segment has {max_sessions} slots)"
            )));
        }
        let reg = self.lock()?;
        Ok(reg.end(slot, generation, reason_code(reason)))
    }

    /// Finds (owner, id) for a reader at `offset`, checks the offset is still in the ring and,
    /// if `counted`, counts the reader; returns the session's (slot, generation).
    pub(crate) fn attach_reader(
        &self,
        id: &str,
        owner: &str,
        offset: u64,
        counted: bool,
    ) -> Result<(u32, u64)> {
        self.check_key(id, owner)?;
        let Some((slot, gen)) = self.find(id, owner) else {
            return Err(Self::not_found(id));
        };
        let m = self.view.slot(slot);
        let first = ring::first_available(&Cursors::of(m), self.view.geometry().session_bytes);
        if offset < first {
            return Err(Error::OffsetLost {
                requested: offset,
                first_available: first,
            });
        }
        m.last_access_ns
            .store(process::unix_nanos(), Ordering::Relaxed);
        if counted {
            self.count_reader(slot, gen, true)?;
        }
        // Validate after counting: a session replaced in between is reported as ended.
        if m.generation.load(Ordering::Acquire) != gen {
            if counted {
                // Uncounting only fails where counting did (no row): nothing to undo then.
                let _ = self.count_reader(slot, gen, false);
            }
            return Err(Error::Ended(self.end_reason(slot, gen)));
        }
        Ok((slot, gen))
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let pid = std::process::id();
        if local.pid != pid {
            // First use, or we are a forked child: the parent's entry and notifier are not
            // ours. Dropping the notifier here only closes the child's copy of its socket (a
            // notifier touches shared state only in the process that made it).
            *local = Local {
                pid,
                ..Local::default()
            };
        }
        local
    }

    /// This handle's process-table index, claiming an entry on first use.
    fn proc_index(&self, local: &mut Local) -> Result<usize> {
        if let Some(i) = local.proc_index {
            return Ok(i);
        }
        let me = ProcessId::current();
        let _reg = self.lock()?;
        let Some(i) = (0..MAX_PROCESSES).find(|&i| !self.row_alive(i)) else {
            return Err(Error::TooManyProcesses);
        };
        let e = self.view.proc_entry(i);
        e.pid.store(me.pid, Ordering::SeqCst);
        e.start_time.store(me.start_time, Ordering::SeqCst);
        // Not armed until this handle starts a notifier, which draws a fresh nonce.
        e.armed.store(0, Ordering::SeqCst);
        e.wake_nonce.store(0, Ordering::SeqCst);
        let bit = !(1u64 << i);
        for slot in 0..self.view.geometry().max_sessions {
            self.view.count_cell(i, slot).store(0, Ordering::Relaxed);
            self.view
                .slot(slot)
                .subscribers
                .fetch_and(bit, Ordering::SeqCst);
        }
        local.proc_index = Some(i);
        Ok(i)
    }

    /// Adds or removes one of this process's readers of (slot, gen) in the shared counts.
    pub(crate) fn count_reader(&self, slot: u32, gen: u64, add: bool) -> Result<()> {
        let mut local = self.local();
        let index = self.proc_index(&mut local)?;
        let n = {
            let c = local.readers.entry((slot, gen)).or_insert(0);
            if add {
                *c += 1;
            } else {
                *c = c.saturating_sub(1);
            }
            *c
        };
        if n == 0 {
            local.readers.remove(&(slot, gen));
        }
        // Only this process writes its row, so a plain store publishes the new count.
        let cell = self.view.count_cell(index, slot);
        if n > 0 || cell.load(Ordering::Relaxed) >> 32 == gen & 0xffff_ffff {
            cell.store((gen & 0xffff_ffff) << 32 | n as u64, Ordering::Release);
        }
        Ok(())
    }

    /// This handle's notifier (created on first use; one socket per handle, no thread).
    pub(crate) fn notifier(&self) -> Result<Arc<Notifier>> {
        self.check_open()?;
        let mut local = self.local();
        if let Some(n) = &local.notifier {
            return Ok(n.clone());
        }
        let index = self.proc_index(&mut local)?;
        let n = Arc::new(Notifier::start(
            self.view.clone(),
            self.wake.dir.clone(),
            index,
        )?);
        local.notifier = Some(n.clone());
        Ok(n)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let local = self.local.get_mut().unwrap_or_else(|p| p.into_inner());
        if local.pid != std::process::id() {
            return;
        }
        local.notifier = None; // disarms the row and clears its subscriptions first
        if let Some(i) = local.proc_index {
            self.view.proc_entry(i).pid.store(0, Ordering::SeqCst);
        }
    }
}

/// The registry lock, held for the guard's lifetime.
pub(crate) struct RegistryGuard<'a> {
    reg: &'a Registry,
}

impl Drop for RegistryGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: a guard exists only while this thread holds the lock (see `Registry::lock`).
        unsafe { self.reg.view.unlock_registry() }
    }
}

impl RegistryGuard<'_> {
    fn view(&self) -> &SegmentView {
        &self.reg.view
    }

    /// Picks a free slot nobody is still appending to and marks it INIT.
    fn alloc(&self) -> Result<u32> {
        let view = self.view();
        let n = view.geometry().max_sessions;
        let hint = view.hint().load(Ordering::Relaxed) % n;
        for k in 0..n {
            let slot = (hint + k) % n;
            let m = view.slot(slot);
            if m.state.load(Ordering::Acquire) != state::FREE {
                continue;
            }
            // SeqCst pairs with the producer's SeqCst CAS of `busy` followed by its load of
            // `generation`: either we see it busy, or it sees the generation bump of the free.
            let busy = m.busy.load(Ordering::SeqCst);
            if busy != 0 {
                if busy_holder_alive(busy) {
                    continue;
                }
                m.busy.store(0, Ordering::SeqCst);
            }
            m.state.store(state::INIT, Ordering::SeqCst);
            view.hint().store(slot + 1, Ordering::Relaxed);
            return Ok(slot);
        }
        Err(Error::RegistryFull { max_sessions: n })
    }

    /// Like `alloc`, but waits (briefly) for an append still in flight on a freed slot.
    fn alloc_waiting(&self) -> Result<u32> {
        let mut backoff = Backoff::with_limit(std::time::Duration::from_secs(2));
        loop {
            match self.alloc() {
                Err(Error::RegistryFull { .. }) if backoff.snooze() => {}
                other => return other,
            }
        }
    }

    /// Writes a new session's metadata into an INIT slot; returns its generation.
    fn install(&self, slot: u32, id: &str, owner: &str) -> u64 {
        let view = self.view();
        let m = view.slot(slot);
        // Under the registry lock, so a plain load/store pair is a unique increment.
        let counter = view.generation_counter();
        let gen = (counter.load(Ordering::Acquire) + 1) & !ENDED_BIT;
        counter.store(gen, Ordering::Release);
        m.generation.store(gen, Ordering::SeqCst);
        // Pairs with the acquire loads of readers: anyone who sees the reset cursors below
        // also sees the new generation and discards what it copied.
        fence(Ordering::Release);
        m.cursor.store(0, Ordering::Release);
        m.head.store(0, Ordering::Release);
        m.cancel.store(0, Ordering::Release);
        let now = process::unix_nanos();
        m.started_at_ns.store(now, Ordering::Relaxed);
        m.completed_at_ns.store(0, Ordering::Relaxed);
        m.last_write_ns.store(now, Ordering::Relaxed);
        m.last_access_ns.store(now, Ordering::Relaxed);
        // The slot is INIT, so lock-free lookups skip it while these bytes change.
        view.write_key(slot, id.as_bytes(), owner.as_bytes());
        m.id_len.store(id.len() as u32, Ordering::Relaxed);
        m.owner_len.store(owner.len() as u32, Ordering::Relaxed);
        m.id_hash
            .store(id_hash(owner.as_bytes(), id.as_bytes()), Ordering::Release);
        gen
    }

    /// Makes `me`, through a new token, the one producer of the session in `slot`: from now on
    /// an older claim's appends fail. Under the lock, so no other claim interleaves.
    fn claim(&self, slot: u32, generation: u64, me: ProcessId) -> ProducerClaim {
        let m = self.view().slot(slot);
        m.producer_pid.store(me.pid, Ordering::Release);
        m.producer_start.store(me.start_time, Ordering::Release);
        let token = new_token(me);
        m.producer_token.store(token, Ordering::Release);
        ProducerClaim {
            slot,
            generation,
            token,
            busy_tag: me.pid as u64 | (me.start_time & 0xffff_ffff) << 32,
        }
    }

    /// Ends the session in `slot` if it is still `gen`: readers and the producer see it gone.
    fn end(&self, slot: u32, gen: u64, reason: u8) -> bool {
        let m = self.view().slot(slot);
        let s = m.state.load(Ordering::Acquire);
        if SessionState::from_raw(s).is_none() || m.generation.load(Ordering::Acquire) != gen {
            return false;
        }
        if reason == end_reason::CANCELLED || reason == end_reason::REPLACED {
            m.cancel.store(1, Ordering::SeqCst);
        }
        m.last_end.store(gen << 8 | reason as u64, Ordering::SeqCst);
        m.generation.store(gen | ENDED_BIT, Ordering::SeqCst);
        self.free_ended(slot);
        true
    }

    /// The last steps of `end`, once the generation is marked ended: free the slot, tell its
    /// readers (their wait ends) and give its pages back. Recovery repeats them for an `end`
    /// cut short.
    fn free_ended(&self, slot: u32) {
        let view = self.view();
        let m = view.slot(slot);
        m.state.store(state::FREE, Ordering::SeqCst);
        notify::publish(view, &self.reg.wake, m);
        view.release_pages(slot);
    }

    /// After a lock holder died: undo what it can have left half done.
    fn recover(&self) {
        let view = self.view();
        for slot in 0..view.geometry().max_sessions {
            let m = view.slot(slot);
            match m.state.load(Ordering::Acquire) {
                state::INIT => {
                    let gen = m.generation.load(Ordering::Acquire);
                    m.last_end
                        .store(gen << 8 | end_reason::EVICTED as u64, Ordering::SeqCst);
                    m.generation.store(gen | ENDED_BIT, Ordering::SeqCst);
                    m.state.store(state::FREE, Ordering::SeqCst);
                    view.release_pages(slot);
                }
                state::FREE => view.release_pages(slot),
                _ if m.generation.load(Ordering::Acquire) & ENDED_BIT != 0 => {
                    // Died inside `end`, between marking the generation ended and freeing the
                    // slot: finish the job, so the session is not listed as live.
                    self.free_ended(slot);
                }
                _ => {}
            }
        }
    }
}
