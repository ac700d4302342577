//! The session registry of one segment handle: which slot holds which (owner, conversation id)
//! session, and this process's row in the process table.
//!
//! It owns allocation, installation, ending and crash recovery of sessions (under the robust
//! registry lock), the lock-free lookups (`find`, `snapshot`: seqlock-style reads that trust
//! only what did not change under them), producer claims (which Writer may append), reader
//! counts, and the process-table row and notifier of this handle.
//!
//! Every operation on one session costs O(1) whatever the number of slots: lookups go through
//! the index (`index`, its buckets in the segment), free slots are a stack, finished sessions a
//! list in least-recently-used order, each owner's sessions a list whose head the index names
//! (all linked through the slots), and the slots ever used are `[0, high_water)`, so a listing
//! of everything scans only those and one owner's costs only that owner's sessions. Those structures are written
//! under the lock in steps a crash can cut anywhere; the next locker (`Locked::OwnerDied`)
//! rebuilds them all from the slots' own states, as does any locker that finds them damaged.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{EndReason, Error, Result, SegmentError};
use crate::index::{self, Index, Lookup};
use crate::layout::{
    end_reason, list, state, RegistryHead, SlotMeta, ENDED_BIT, MAX_OWNER_LEN, MAX_PROCESSES,
};
use crate::notify::{self, Notifier, Wakers};
use crate::ring::{self, Cursors};
use crate::seqlock;
use crate::sync::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use crate::sys::futex::WaitOutcome;
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

/// What `Registry::scan` shows its filter of one live session. Read without the registry
/// lock: a session may change or leave its slot meanwhile, which the snapshot taken of a
/// chosen one catches (by its generation).
pub struct Glance<'a> {
    pub state: SessionState,
    pub owner: &'a [u8],
    pub producer: ProcessId,
    pub completed_at_ns: u64,
    pub last_write_ns: u64,
}

impl Glance<'_> {
    /// Whether the owner starts with `prefix`, a non-empty one (an empty prefix names none).
    pub fn owner_under(&self, prefix: &[u8]) -> bool {
        !prefix.is_empty() && self.owner.starts_with(prefix)
    }
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

/// A cap on running sessions that [`Segment::create_or_replace_within`] checks inside the
/// create's locked step, so that it holds exactly however many processes create at once.
///
/// The sessions counted are the running ones whose owner is one of `groups`' owners and
/// whose id starts with that group's prefix (`""`: every id of the owner). Counting walks
/// those owners' lists of live sessions: its cost grows with their live sessions, not with
/// the table.
///
/// [`Segment::create_or_replace_within`]: crate::Segment::create_or_replace_within
#[derive(Debug, Clone, Copy)]
pub struct Quota<'a> {
    /// The most running sessions the groups may hold once the create is done.
    pub max_running: u32,
    /// (owner, id prefix) pairs.
    pub groups: &'a [(&'a str, &'a str)],
}

impl Quota<'_> {
    /// Whether a session (id, owner) is one the quota counts (when running).
    fn counts(&self, id: &[u8], owner: &[u8]) -> bool {
        self.groups
            .iter()
            .any(|(o, p)| o.as_bytes() == owner && id.starts_with(p.as_bytes()))
    }
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

fn reason_code(r: EndReason) -> u8 {
    match r {
        EndReason::Cancelled => end_reason::CANCELLED,
        EndReason::Replaced => end_reason::REPLACED,
        EndReason::Evicted => end_reason::EVICTED,
    }
}

/// A seqlock read of one slot (`seqlock::read_stable`): runs `read` (given the generation)
/// only while the slot holds a live session, and returns its result with that generation only
/// if neither the generation nor the liveness changed meanwhile, so a read that passes saw one
/// session's data.
///
/// Live means a session's state *and* a generation not marked ended: `end` marks the
/// generation before it frees the slot, so a slot marked but not free is a session being
/// ended, or one whose `end` was cut short by a lock holder that died (the next locker frees
/// it). Either way the session is gone, and no lock-free view may show it.
fn read_stable<T>(m: &SlotMeta, read: impl FnOnce(u64) -> Option<T>) -> Option<(u64, T)> {
    seqlock::read_stable(&m.state, &m.generation, SessionState::from_raw, read)
}

/// The generation and state of the session in a slot, if one is live there now (live as
/// `read_stable` has it). Read without the lock: what it picks is read again (`snapshot`)
/// before anything is made of it, or only counted.
fn live_now(m: &SlotMeta) -> Option<(u64, SessionState)> {
    seqlock::live_now(&m.state, &m.generation, SessionState::from_raw)
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
    /// What `alive_procs` last found of each process-table row, and when.
    rows_seen: Mutex<[Option<(ProcessId, bool, Instant)>; MAX_PROCESSES]>,
}

/// How long `alive_procs` keeps a row's liveness.
const ROW_SEEN_FOR: Duration = Duration::from_millis(100);

/// This process's private bookkeeping for the segment.
#[derive(Default)]
struct Local {
    pid: u32,
    proc_index: Option<usize>,
    /// Readers this process holds, per (slot, generation); mirrored into its counts row.
    readers: HashMap<(u32, u64), u32>,
    /// Threads of this process in `wait_for_publish`, per slot; its bit in the slot's
    /// `waiting` is set while this is above 0.
    waiting: HashMap<u32, u32>,
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
            rows_seen: Mutex::new([None; MAX_PROCESSES]),
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

    /// This process's bit in the masks of subscribed processes (bit `i` = row `i` of the
    /// process table), or 0 while this handle has claimed no row.
    pub(crate) fn own_row_mask(&self) -> u64 {
        self.local().proc_index.map_or(0, |i| 1u64 << i)
    }

    /// Whether deferred publishes through this handle left a wake-up pending for a process
    /// outside `except` (bit `i` = row `i`) that the next [`Registry::flush_wakes`] would
    /// signal.
    pub(crate) fn wakes_pending(&self, except: u64) -> bool {
        self.wake.pending() & !except != 0
    }

    /// Sends the wake-ups that deferred appends through this handle left (`notify::flush`);
    /// with `skip_own`, none to this process's own row (its caller wakes its own readers).
    pub(crate) fn flush_wakes(&self, skip_own: bool) -> usize {
        let skip = if skip_own { self.own_row_mask() } else { 0 };
        notify::flush(&self.view, &self.wake, skip)
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Segment(SegmentError::Closed));
        }
        Ok(())
    }

    /// Makes every handle of this mapping refuse further use, and drops its notifier (its
    /// socket file goes now, even if a reader still holds the notifier).
    pub(crate) fn close(&self) {
        // Appends made before the close are told about, deferred or not.
        self.flush_wakes(false);
        self.closed.store(true, Ordering::Release);
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = local.notifier.take() {
            n.remove_socket_file();
        }
    }

    /// Removes the segment's notifier sockets that no running process holds (those of rows
    /// whose process has gone, or never bound one) and this handle's own, then the directory
    /// if that emptied it. A running process keeps its socket, and removes it (and the
    /// directory, once it is the last) when it closes. Under the registry lock, so no process
    /// claims a row, and binds its socket, in between.
    pub(crate) fn remove_wake_sockets(&self) {
        if let Some(n) = self.local().notifier.clone() {
            n.remove_socket_file();
        }
        match self.lock() {
            Ok(_reg) => {
                let gone: Vec<usize> = (0..MAX_PROCESSES).filter(|&i| !self.row_alive(i)).collect();
                self.wake.dir.remove_sockets(gone);
            }
            Err(_) => self.wake.dir.remove_if_empty(),
        }
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
            guard.rebuild(true, "its lock holder died");
            // SAFETY: we hold the lock, obtained with EOWNERDEAD, and repaired the registry.
            unsafe { self.view.mark_registry_consistent() }
                .map_err(|e| Error::io(&self.path, "repair the registry of", e))?;
        } else if self.head().damaged.load(Ordering::Relaxed) != 0 {
            guard.rebuild(false, "a reader found the index disagreeing with a slot");
        }
        Ok(guard)
    }

    fn head(&self) -> &RegistryHead {
        self.view.registry_head()
    }

    fn index(&self) -> Index<'_, SegmentView> {
        Index {
            buckets: &self.view,
            version: &self.head().index_version,
        }
    }

    fn key_hash(&self, id: &str, owner: &str) -> u64 {
        index::key_hash(self.view.hash_key(), owner.as_bytes(), id.as_bytes())
    }

    fn owner_hash(&self, owner: &[u8]) -> u64 {
        index::owner_hash(self.view.hash_key(), owner)
    }

    /// Records that an index entry moved to bucket `to` (in the slot it names).
    fn entry_moved(&self, e: u64, to: usize) {
        if let Some(m) = index::entry_slot(e).and_then(|s| self.view.try_slot(s)) {
            let at = match index::is_owner_entry(e) {
                true => &m.owner_pos,
                false => &m.index_pos,
            };
            at.store(to as u32, Ordering::Relaxed);
        }
    }

    /// The head of `owner`'s list of live sessions and its entry's bucket (lock held).
    fn owner_head(&self, owner: &[u8], except: u32) -> Option<(u32, usize)> {
        let n = self.view.geometry().max_sessions;
        self.index().find_locked(self.owner_hash(owner), n, |s| {
            s != except
                && self.view.slot(s).owner_prev.load(Ordering::Relaxed) == 0
                && self.view.read_key(s).is_some_and(|(_, o)| o == owner)
        })
    }

    /// Slots that ever held a session (`high_water`, clamped: it is segment data). Whole-table
    /// views (list, usage, a process row's cleanup) scan only these.
    fn used_slots(&self) -> u32 {
        let head = self.head();
        let copies = [&head.high_water, &head.high_water_copy];
        copies
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
            .min(self.view.geometry().max_sessions)
    }

    /// Whether `slot` holds the live session of (owner, id) now: its generation if so.
    fn holds(&self, slot: u32, hash: u64, id: &str, owner: &str) -> Option<u64> {
        let m = self.view.slot(slot);
        if m.id_hash.load(Ordering::Relaxed) != hash {
            return None;
        }
        // `read_stable` passes no session whose generation is marked ended (an `end` in
        // progress or cut short).
        let (gen, ()) = read_stable(m, |_| {
            let (kid, kowner) = self.view.read_key(slot)?;
            (kid == id.as_bytes() && kowner == owner.as_bytes()).then_some(())
        })?;
        Some(gen)
    }

    /// Whether a process with a row (dead or not: no liveness check, this is a hint for
    /// eviction) counts a reader of `gen` in `slot`.
    fn has_readers(&self, slot: u32, gen: u64) -> bool {
        (0..MAX_PROCESSES).any(|i| {
            self.view.proc_entry(i).pid.load(Ordering::Relaxed) != 0 && {
                let cell = self.view.count_cell(i, slot).load(Ordering::Acquire);
                cell >> 32 == gen & 0xffff_ffff && cell as u32 > 0
            }
        })
    }

    /// Finds the live session of (owner, id) without locking: O(1), through the index. Only
    /// when removals keep moving entries under it does it look again under the lock.
    pub(crate) fn find(&self, id: &str, owner: &str) -> Option<(u32, u64)> {
        let hash = self.key_hash(id, owner);
        let mut gen = 0;
        let max_sessions = self.view.geometry().max_sessions;
        let found = self.index().find(hash, max_sessions, |slot| {
            self.holds(slot, hash, id, owner).map(|g| gen = g).is_some()
        });
        match found {
            Lookup::Hit { slot, pos, version } => {
                if self.view.slot(slot).index_pos.load(Ordering::Relaxed) as usize != pos
                    && !self.index().moved_since(version)
                {
                    // The right session (its slot said so), found through a bucket the slot
                    // does not name while nothing moved: the index was damaged. The next
                    // locker rebuilds it.
                    self.head().damaged.store(1, Ordering::Relaxed);
                }
                Some((slot, gen))
            }
            Lookup::Miss => None,
            Lookup::Unsure => self.lock().ok()?.find(hash, id, owner),
        }
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

    /// The process the process-table row `i` names, if any.
    fn row_process(&self, i: usize) -> Option<ProcessId> {
        let e = self.view.proc_entry(i);
        let pid = e.pid.load(Ordering::Acquire);
        (pid != 0).then(|| ProcessId {
            pid,
            start_time: e.start_time.load(Ordering::Acquire),
        })
    }

    /// Whether the process-table row `i` names a process that runs.
    fn row_alive(&self, i: usize) -> bool {
        self.row_process(i).is_some_and(|p| p.is_alive())
    }

    /// Entries of the process table whose owners run, as a bit mask, for the reader counts of
    /// snapshots. A row found alive is asked `/proc` again only after `ROW_SEEN_FOR` (a `GET`
    /// asked `/proc` of every registered process twice); meanwhile one `kill(pid, 0)` tells
    /// whether its pid still names a process, so a process that exited and was reaped stops
    /// counting at once. A zombie's readers (or a reused pid's row) count until the next
    /// `/proc` read: the direction `ProcessId::is_alive` errs in too.
    fn alive_procs(&self) -> u64 {
        let now = Instant::now();
        let mut seen = self.rows_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut mask = 0u64;
        for (i, kept) in seen.iter_mut().enumerate() {
            let Some(who) = self.row_process(i) else {
                continue;
            };
            let alive = match *kept {
                // Still there (a pid that no longer names any process is seen at once: the
                // kept answer holds back only a zombie's, or a reused pid's, for a moment).
                Some((w, true, at)) if w == who && now.duration_since(at) < ROW_SEEN_FOR => {
                    let still = process::pid_exists(who.pid);
                    if !still {
                        *kept = Some((who, false, now));
                    }
                    still
                }
                Some((w, false, _)) if w == who => false, // that process never comes back
                _ => {
                    let alive = who.is_alive();
                    *kept = Some((who, alive, now));
                    alive
                }
            };
            if alive {
                mask |= 1 << i;
            }
        }
        mask
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

    /// Every live session, or only `owner`'s, oldest first; with `shard` = `(index, count)`
    /// only those whose slot is `index` modulo `count` (no snapshot is taken of the others).
    pub(crate) fn list(&self, owner: Option<&str>, shard: Option<(u32, u32)>) -> Vec<SessionInfo> {
        // One owner's: its list's (slot, generation) pairs, collected under the lock (a few
        // loads per session of that owner, none for anyone else's), snapshotted after.
        let sessions: Vec<(u32, u64)> = match owner.map(|o| self.owner_sessions(o)) {
            Some(Ok(sessions)) => sessions,
            // A closed segment, or a list found damaged (rebuilt by the next locker): scan.
            None | Some(Err(())) => (0..self.used_slots())
                .filter_map(|slot| live_now(self.view.slot(slot)).map(|(gen, _)| (slot, gen)))
                .collect(),
        };
        let alive = self.alive_procs();
        let mut cache = HashMap::new();
        let mut out: Vec<SessionInfo> = sessions
            .into_iter()
            .filter(|&(slot, _)| shard.is_none_or(|(index, count)| slot % count.max(1) == index))
            .filter_map(|(slot, gen)| self.snapshot(slot, gen, alive, &mut cache))
            .filter(|info| owner.is_none_or(|o| o == info.owner))
            .collect();
        out.sort_by_key(|i| (i.started_at_ns, i.slot));
        out
    }

    /// The live sessions that `choose` picks from a glance at each (its state, owner,
    /// producer and times, read with atomic loads and one copy of the owner into a buffer:
    /// nothing allocated per session), each snapshotted as `list` does, oldest first. A scan
    /// of every slot costs a few loads per session, so the manager's sweeps of a segment
    /// holding a hundred thousand finished sessions make objects only of the few they act on.
    pub(crate) fn scan(&self, mut choose: impl FnMut(&Glance<'_>) -> bool) -> Vec<SessionInfo> {
        let mut owner = [0u8; MAX_OWNER_LEN];
        let mut chosen = Vec::new();
        for slot in 0..self.used_slots() {
            let m = self.view.slot(slot);
            // One seqlock read: a slot that changed hands meanwhile (freed and made anew, as a
            // create on a full table does in one step) is skipped, so the glance never mixes
            // two sessions' fields.
            let Some((gen, (state, n, producer, completed_at_ns, last_write_ns))) =
                read_stable(m, |_| {
                    Some((
                        SessionState::from_raw(m.state.load(Ordering::Acquire))?,
                        self.view.copy_owner(slot, &mut owner)?,
                        ProcessId {
                            pid: m.producer_pid.load(Ordering::Acquire),
                            start_time: m.producer_start.load(Ordering::Acquire),
                        },
                        m.completed_at_ns.load(Ordering::Relaxed),
                        m.last_write_ns.load(Ordering::Relaxed),
                    ))
                })
            else {
                continue;
            };
            let glance = Glance {
                state,
                owner: &owner[..n],
                producer,
                completed_at_ns,
                last_write_ns,
            };
            if choose(&glance) {
                chosen.push((slot, gen));
            }
        }
        if chosen.is_empty() {
            return Vec::new();
        }
        let alive = self.alive_procs();
        let mut cache = HashMap::new();
        let mut out: Vec<SessionInfo> = chosen
            .into_iter()
            .filter_map(|(slot, gen)| self.snapshot(slot, gen, alive, &mut cache))
            .collect();
        out.sort_by_key(|i| (i.started_at_ns, i.slot));
        out
    }

    /// The live sessions of `owner`, from its list; `Err` if the list is damaged (the next
    /// locker is told to rebuild it) or the lock cannot be taken.
    fn owner_sessions(&self, owner: &str) -> std::result::Result<Vec<(u32, u64)>, ()> {
        let guard = self.lock().map_err(|_| ())?;
        let mut out = Vec::new();
        guard
            .walk_owner(owner.as_bytes(), |slot, gen| {
                out.push((slot, gen));
                true
            })
            .map_err(|_| self.head().damaged.store(1, Ordering::Relaxed))?;
        Ok(out)
    }

    /// The session with exactly `id` plus every one whose id starts with `id + "::"`.
    pub(crate) fn lookup_prefix(&self, id: &str, owner: &str) -> Vec<SessionInfo> {
        let prefix = format!("{id}::");
        self.list(Some(owner), None)
            .into_iter()
            .filter(|i| i.conversation_id == id || i.conversation_id.starts_with(&prefix))
            .collect()
    }

    /// Live sessions and the bytes their rings hold.
    pub(crate) fn usage(&self) -> (u32, u64) {
        let g = self.view.geometry();
        let mut used = 0;
        let mut buffered = 0;
        for i in 0..self.used_slots() {
            let m = self.view.slot(i);
            if live_now(m).is_some() {
                used += 1;
                buffered += m.cursor.load(Ordering::Acquire).min(g.session_bytes);
            }
        }
        (used, buffered)
    }

    /// Installs a new running session for (owner, id), replacing a live one; with a `quota`,
    /// only if that leaves at most `quota.max_running` running sessions in its groups (counted
    /// in this locked step, so the cap is exact across processes).
    pub(crate) fn create_or_replace(
        &self,
        id: &str,
        owner: &str,
        quota: Option<&Quota<'_>>,
    ) -> Result<ProducerClaim> {
        self.check_key(id, owner)?;
        let me = ProcessId::current();
        let reg = self.lock()?;
        let hash = self.key_hash(id, owner);
        let mut existing = reg.find(hash, id, owner);
        if let Some(q) = quota {
            // A replacement of a running session that counts ends that one: no growth.
            let replaces = existing.is_some_and(|(slot, _)| {
                self.view.slot(slot).state.load(Ordering::Acquire) == state::RUNNING
                    && q.counts(id.as_bytes(), owner.as_bytes())
            });
            let running = reg.count_running(q, q.max_running.saturating_add(1));
            if running.saturating_sub(u32::from(replaces)) >= q.max_running {
                return Err(Error::QuotaExceeded {
                    max_running: q.max_running,
                });
            }
        }
        let slot = match reg.alloc() {
            Ok(slot) => slot,
            Err(Error::RegistryFull { .. }) if existing.is_some() => {
                // Full, but the session being replaced frees a slot: end it first. (A crash
                // right here loses the old session, which the caller was replacing anyway.)
                let (old, old_gen) = existing.take().expect("checked above");
                reg.end(old, old_gen, end_reason::REPLACED);
                reg.alloc_waiting()?
            }
            // Full: the least recently used finished session makes room, in this same locked
            // step. Only a table of running streams refuses.
            Err(Error::RegistryFull { .. }) if reg.evict_lru() => reg.alloc_waiting()?,
            Err(e) => return Err(e),
        };
        let gen = reg.install(slot, id, owner, hash);
        if let Some((old, old_gen)) = existing {
            reg.end(old, old_gen, end_reason::REPLACED);
        }
        let claim = reg.claim(slot, gen, me);
        reg.index_live(slot, hash);
        Ok(claim)
    }

    /// Claims a running session created by another process, if it is still `generation`.
    pub(crate) fn adopt(&self, id: &str, owner: &str, generation: u64) -> Result<ProducerClaim> {
        self.check_key(id, owner)?;
        let me = ProcessId::current();
        let reg = self.lock()?;
        let Some((slot, gen)) = reg.find(self.key_hash(id, owner), id, owner) else {
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
        let Some((slot, gen)) = reg.find(self.key_hash(id, owner), id, owner) else {
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
        Ok(match reg.find(self.key_hash(id, owner), id, owner) {
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
        let reg = self.lock()?;
        let Some(i) = (0..MAX_PROCESSES).find(|&i| !self.row_alive(i)) else {
            return Err(Error::TooManyProcesses);
        };
        let e = self.view.proc_entry(i);
        e.pid.store(me.pid, Ordering::SeqCst);
        e.start_time.store(me.start_time, Ordering::SeqCst);
        // Not armed until this handle starts a notifier, which draws a fresh nonce.
        e.armed.store(0, Ordering::SeqCst);
        e.wake_nonce.store(0, Ordering::SeqCst);
        // The row is ours now: forget its last owner's counts and subscriptions outside the
        // lock (a pass over every slot ever used must not hold up everyone's creates). Until
        // then a stale count or bit costs a wrong reader count or a spurious datagram, nothing
        // worse; only slots ever used can hold either.
        drop(reg);
        //
        // A `waiting` bit of the row is a thread of its last owner killed in a futex wait (a
        // live process clears its own): nobody of this process waits yet, so clearing it
        // cannot hide a sleeper, and producers stop paying a wake syscall for a dead one.
        let bit = 1u64 << i;
        for slot in 0..self.used_slots() {
            let cell = self.view.count_cell(i, slot);
            if cell.load(Ordering::Relaxed) != 0 {
                cell.store(0, Ordering::Relaxed);
            }
            let m = self.view.slot(slot);
            for word in [&m.subscribers, &m.waiting] {
                if word.load(Ordering::Relaxed) & bit != 0 {
                    word.fetch_and(!bit, Ordering::SeqCst);
                }
            }
        }
        local.proc_index = Some(i);
        Ok(i)
    }

    /// Sleeps until `slot` is published again (its `seq` moves from `seen`), at most
    /// `timeout`; spurious returns happen. Marks this process in the slot's `waiting` for the
    /// duration, so that producers know to wake the futex; without a process entry (more than
    /// `MAX_PROCESSES` handles) it cannot be marked, and polls every 10 ms instead.
    pub(crate) fn wait_for_publish(
        &self,
        slot: u32,
        seen: u32,
        timeout: Option<Duration>,
    ) -> WaitOutcome {
        let m = self.view.slot(slot);
        if self.mark_waiting(slot, true).is_err() {
            let poll = Duration::from_millis(10);
            std::thread::sleep(timeout.map_or(poll, |t| t.min(poll)));
            return WaitOutcome::Woken;
        }
        let outcome = notify::sleep_unless_published(m, seen, timeout);
        // Cannot fail: the entry was claimed by the call above.
        let _ = self.mark_waiting(slot, false);
        outcome
    }

    /// Counts one more (or one fewer) thread of this process waiting on `slot`, setting (or
    /// clearing) the process's bit in the slot's `waiting` when the count leaves (or returns
    /// to) 0. Under the process's lock, so the bit's changes follow the count's.
    fn mark_waiting(&self, slot: u32, add: bool) -> Result<()> {
        let mut local = self.local();
        let bit = 1u64 << self.proc_index(&mut local)?;
        let waiting = &self.view.slot(slot).waiting;
        if add {
            let n = local.waiting.entry(slot).or_insert(0);
            if *n == 0 {
                // SeqCst: before the caller's load of `seq` (see `sleep_unless_published`).
                waiting.fetch_or(bit, Ordering::SeqCst);
            }
            *n += 1;
        } else if let Entry::Occupied(mut e) = local.waiting.entry(slot) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
                waiting.fetch_and(!bit, Ordering::SeqCst);
            }
        }
        Ok(())
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

    /// The live session of (owner, id), looked up under the lock (nothing moves meanwhile).
    fn find(&self, hash: u64, id: &str, owner: &str) -> Option<(u32, u64)> {
        let reg = self.reg;
        let mut gen = 0;
        reg.index()
            .find_locked(hash, reg.view.geometry().max_sessions, |slot| {
                reg.holds(slot, hash, id, owner).map(|g| gen = g).is_some()
            })
            .map(|(slot, _)| (slot, gen))
    }

    /// Calls `f(slot, generation)` for each session on `owner`'s list until it returns false.
    /// `Err` if the list is damaged: a link out of range, a session not live, or more links
    /// than slots ever used (a cycle).
    fn walk_owner(
        &self,
        owner: &[u8],
        mut f: impl FnMut(u32, u64) -> bool,
    ) -> std::result::Result<(), Damage> {
        let reg = self.reg;
        let bound = reg.used_slots();
        let mut seen = 0u32;
        let mut at = reg.owner_head(owner, u32::MAX).map(|(s, _)| s + 1);
        while let Some(slot) = at.and_then(|a| a.checked_sub(1)) {
            let m = reg.view.try_slot(slot).ok_or(Damage("owner list link"))?;
            let gen = m.generation.load(Ordering::Acquire);
            let live = SessionState::from_raw(m.state.load(Ordering::Acquire)).is_some();
            if !live || gen & ENDED_BIT != 0 || seen >= bound {
                return Err(Damage(
                    "an owner list holds a slot that is not its live session",
                ));
            }
            seen += 1;
            if !f(slot, gen) {
                return Ok(());
            }
            at = Some(m.owner_next.load(Ordering::Relaxed));
        }
        Ok(())
    }

    /// Running sessions in `q`'s groups, counted up to `enough` (the caller only needs to
    /// know whether there are that many). Walks each group owner's list: a few loads per live
    /// session of those owners, none for anyone else's. A damaged list is rebuilt (we hold
    /// the lock) and walked again; if it is still damaged, the used slots are scanned.
    fn count_running(&self, q: &Quota<'_>, enough: u32) -> u32 {
        let reg = self.reg;
        let running = |slot: u32, prefix: &[u8]| {
            reg.view.slot(slot).state.load(Ordering::Acquire) == state::RUNNING
                && (prefix.is_empty()
                    || reg
                        .view
                        .read_key(slot)
                        .is_some_and(|(id, _)| id.starts_with(prefix)))
        };
        let walk = |n: &mut u32| -> std::result::Result<(), Damage> {
            *n = 0;
            for (owner, prefix) in q.groups {
                self.walk_owner(owner.as_bytes(), |slot, _| {
                    *n += u32::from(running(slot, prefix.as_bytes()));
                    *n < enough
                })?;
                if *n >= enough {
                    break;
                }
            }
            Ok(())
        };
        let mut n = 0;
        if let Err(Damage(why)) = walk(&mut n) {
            self.rebuild(false, why);
            if walk(&mut n).is_err() {
                n = (0..reg.used_slots())
                    .filter(|&slot| {
                        running(slot, b"")
                            && reg
                                .view
                                .read_key(slot)
                                .is_some_and(|(id, o)| q.counts(&id, &o))
                    })
                    .count() as u32;
            }
        }
        n
    }

    /// Picks a free slot nobody is still appending to and marks it INIT: the top of the free
    /// stack, else the first slot never used. O(1) but for slots with an append in flight.
    fn alloc(&self) -> Result<u32> {
        match self.try_alloc() {
            Err(Damage(why)) => {
                self.rebuild(false, why);
                self.try_alloc().map_err(|_| Error::RegistryFull {
                    max_sessions: self.reg.view.geometry().max_sessions,
                })?
            }
            Ok(found) => found,
        }
    }

    fn try_alloc(&self) -> std::result::Result<Result<u32>, Damage> {
        let reg = self.reg;
        let head = reg.head();
        let n = reg.view.geometry().max_sessions;
        // Slots whose previous session's producer is still inside an append: put back after.
        let mut in_flight = Vec::new();
        let mut found = None;
        while found.is_none() {
            let top = head.free_head.load(Ordering::Relaxed);
            let Some(slot) = top.checked_sub(1) else {
                break;
            };
            let m = reg
                .view
                .try_slot(slot)
                .ok_or(Damage("free stack names no slot"))?;
            if m.list.load(Ordering::Relaxed) != list::FREE
                || m.state.load(Ordering::Acquire) != state::FREE
            {
                return Err(Damage("free stack holds a slot that is not free"));
            }
            head.free_head
                .store(m.next.load(Ordering::Relaxed), Ordering::Relaxed);
            m.list.store(list::NONE, Ordering::Relaxed);
            if self.busy_elsewhere(m) {
                in_flight.push(slot);
            } else {
                found = Some(slot);
            }
        }
        let busy = in_flight.len() as u32;
        for slot in in_flight.into_iter().rev() {
            self.push_free(slot);
        }
        if found.is_none() {
            // Slots never used: zeroed, on no list, nobody can be appending to them.
            let hw = reg.used_slots();
            if hw < n {
                // Their pages are not: back them before anything touches them.
                if let Err(e) = reg.view.back_new_slot(hw) {
                    if e.kind() != std::io::ErrorKind::Unsupported {
                        return Ok(Err(Error::no_space(&reg.path, e, 0)));
                    }
                }
                head.high_water.store(hw + 1, Ordering::Relaxed);
                head.high_water_copy.store(hw + 1, Ordering::Relaxed);
                let m = reg.view.slot(hw);
                if m.state.load(Ordering::Acquire) != state::FREE {
                    return Err(Damage("a slot above the high-water mark is in use"));
                }
                found = Some(hw);
            }
        }
        let Some(slot) = found else {
            if head.live.load(Ordering::Relaxed).saturating_add(busy) < n {
                return Err(Damage(
                    "no free slot found, yet not every slot holds a session",
                ));
            }
            return Ok(Err(Error::RegistryFull { max_sessions: n }));
        };
        reg.view
            .slot(slot)
            .state
            .store(state::INIT, Ordering::SeqCst);
        Ok(Ok(slot))
    }

    /// Whether a live process other than a finished append holds `busy` (clears a dead one's).
    fn busy_elsewhere(&self, m: &SlotMeta) -> bool {
        // SeqCst pairs with the producer's SeqCst CAS of `busy` followed by its load of
        // `generation`: either we see it busy, or it sees the generation bump of the free.
        let busy = m.busy.load(Ordering::SeqCst);
        if busy == 0 {
            return false;
        }
        if busy_holder_alive(busy) {
            return true;
        }
        m.busy.store(0, Ordering::SeqCst);
        false
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
    fn install(&self, slot: u32, id: &str, owner: &str, hash: u64) -> u64 {
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
        m.id_hash.store(hash, Ordering::Release);
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

    /// The last step of a create: enters the session installed in `slot` (still INIT) into
    /// the index and its owner's list, then makes it RUNNING.
    ///
    /// In that order because lock-free lookups and listings both skip an INIT slot: the
    /// session appears to both at the one RUNNING store. A creator killed in between leaves
    /// an INIT slot that neither shows and the next locker frees (RUNNING first, it left a
    /// session that listings showed and lookups could not find until a locker repaired it).
    fn index_live(&self, slot: u32, hash: u64) {
        let head = self.reg.head();
        head.live
            .store(head.live.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let m = self.reg.view.slot(slot);
        // Release: a lookup that sees RUNNING (Acquire) sees every field the create wrote.
        let run = || m.state.store(state::RUNNING, Ordering::Release);
        let placed = |pos: usize| m.index_pos.store(pos as u32, Ordering::Relaxed);
        let owner = self.reg.view.read_key(slot).map(|(_, owner)| owner);
        let linked = match (self.reg.index().insert(hash, slot, placed), owner) {
            (Ok(_), Some(owner)) => self.link_owner(slot, &owner),
            (Err(index::Corrupt(why)), _) => Err(Damage(why)),
            (_, None) => Err(Damage("a session just installed has no readable key")),
        };
        match linked {
            Ok(()) => run(),
            Err(Damage(why)) => {
                // The rebuild enters every live session, this one included once RUNNING (it
                // leaves an INIT slot to its creator). Lookups stop trusting a miss first (the
                // index's version goes odd), so that a crash after the RUNNING store leaves
                // them asking the lock, whose next holder repairs, rather than missing a
                // session that listings show.
                self.reg.index().begin_rebuild();
                run();
                self.rebuild(false, why);
            }
        }
    }

    /// Puts `slot` at the head of its owner's list (creating the owner's entry if it has
    /// none): the new head's links are set before the entry names it, the old head's back
    /// link after, so a walker under the lock always sees a whole list.
    fn link_owner(&self, slot: u32, owner: &[u8]) -> std::result::Result<(), Damage> {
        let reg = self.reg;
        let m = reg.view.slot(slot);
        m.owner_prev.store(0, Ordering::Relaxed);
        match reg.owner_head(owner, slot) {
            Some((head, pos)) => {
                m.owner_next.store(head + 1, Ordering::Relaxed);
                m.owner_pos.store(pos as u32, Ordering::Relaxed);
                reg.index()
                    .repoint(pos, head, slot)
                    .map_err(|index::Corrupt(why)| Damage(why))?;
                reg.view
                    .slot(head)
                    .owner_prev
                    .store(slot + 1, Ordering::Relaxed);
            }
            None => {
                m.owner_next.store(0, Ordering::Relaxed);
                let placed = |pos: usize| m.owner_pos.store(pos as u32, Ordering::Relaxed);
                reg.index()
                    .insert(reg.owner_hash(owner), slot, placed)
                    .map_err(|index::Corrupt(why)| Damage(why))?;
            }
        }
        Ok(())
    }

    /// Takes `slot` off its owner's list: its neighbours are linked to each other, or the
    /// owner's entry is pointed at the next session (or removed with the last one).
    fn unlink_owner(&self, slot: u32) -> std::result::Result<(), Damage> {
        let reg = self.reg;
        let m = reg.view.slot(slot);
        let (prev, next) = (
            m.owner_prev.load(Ordering::Relaxed),
            m.owner_next.load(Ordering::Relaxed),
        );
        let neighbour = |at: u32, back: fn(&SlotMeta) -> &AtomicU32| {
            let n = reg.view.try_slot(at - 1).ok_or(Damage("owner list link"))?;
            match back(n).load(Ordering::Relaxed) == slot + 1 {
                true => Ok(n),
                false => Err(Damage("an owner list's links disagree")),
            }
        };
        let after = match next {
            0 => None,
            n => Some(neighbour(n, |x| &x.owner_prev)?),
        };
        if prev != 0 {
            neighbour(prev, |x| &x.owner_next)?
                .owner_next
                .store(next, Ordering::Relaxed);
        } else {
            let pos = m.owner_pos.load(Ordering::Relaxed) as usize;
            let ix = reg.index();
            match after {
                Some(n) => {
                    n.owner_pos.store(pos as u32, Ordering::Relaxed);
                    ix.repoint(pos, slot, next - 1)
                }
                None => ix.remove(pos, slot, |e, to| reg.entry_moved(e, to)),
            }
            .map_err(|index::Corrupt(why)| Damage(why))?;
        }
        if let Some(n) = after {
            n.owner_prev.store(prev, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Ends the session in `slot` if it is still `gen`: readers and the producer see it gone.
    fn end(&self, slot: u32, gen: u64, reason: u8) -> bool {
        let reg = self.reg;
        let m = reg.view.slot(slot);
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

    /// The last steps of `end`, once the generation is marked ended: take the session out of
    /// the index and the finished list, free the slot, tell its readers (their wait ends) and
    /// give its pages back. A rebuild repeats them for an `end` cut short.
    fn free_ended(&self, slot: u32) {
        let reg = self.reg;
        let m = reg.view.slot(slot);
        let pos = m.index_pos.load(Ordering::Relaxed) as usize;
        let unindexed = reg
            .index()
            .remove(pos, slot, |e, to| reg.entry_moved(e, to))
            .map_err(|index::Corrupt(why)| Damage(why))
            .and_then(|()| self.unlink_owner(slot));
        let unlisted = if m.list.load(Ordering::Relaxed) == list::FINISHED {
            self.unlink_finished(slot)
        } else {
            Ok(())
        };
        m.state.store(state::FREE, Ordering::SeqCst);
        let head = reg.head();
        head.live.store(
            head.live.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        notify::publish(&reg.view, &reg.wake, m);
        reg.view.release_pages(slot);
        match (unindexed, unlisted) {
            (Ok(()), Ok(())) => self.push_free(slot),
            // The rebuild puts the slot on the free stack with the others.
            (Err(Damage(why)), _) | (_, Err(Damage(why))) => self.rebuild(false, why),
        }
    }

    fn push_free(&self, slot: u32) {
        let head = self.reg.head();
        let m = self.reg.view.slot(slot);
        m.next
            .store(head.free_head.load(Ordering::Relaxed), Ordering::Relaxed);
        m.list.store(list::FREE, Ordering::Relaxed);
        head.free_head.store(slot + 1, Ordering::Relaxed);
    }

    /// Puts a session that just finished at the most recently used end of the finished list.
    pub(crate) fn link_finished(&self, slot: u32) {
        let m = self.reg.view.slot(slot);
        if m.list.load(Ordering::Relaxed) != list::NONE {
            return self.rebuild(false, "a session that just finished was already on a list");
        }
        m.queued_at_ns
            .store(process::unix_nanos(), Ordering::Relaxed);
        self.append_finished(slot);
    }

    fn append_finished(&self, slot: u32) {
        let head = self.reg.head();
        let m = self.reg.view.slot(slot);
        let tail = head.lru_tail.load(Ordering::Relaxed);
        m.prev.store(tail, Ordering::Relaxed);
        m.next.store(0, Ordering::Relaxed);
        m.list.store(list::FINISHED, Ordering::Relaxed);
        match tail.checked_sub(1).and_then(|t| self.reg.view.try_slot(t)) {
            Some(t) => t.next.store(slot + 1, Ordering::Relaxed),
            None => head.lru_head.store(slot + 1, Ordering::Relaxed),
        }
        head.lru_tail.store(slot + 1, Ordering::Relaxed);
        head.finished.store(
            head.finished.load(Ordering::Relaxed).saturating_add(1),
            Ordering::Relaxed,
        );
    }

    /// The word that points at a finished-list member from one side: its neighbour's link
    /// (`side` of slot `neighbour - 1`), or the list's `end` word if it has no neighbour there.
    fn list_link<'v>(
        &'v self,
        neighbour: u32,
        end: &'v AtomicU32,
        side: fn(&SlotMeta) -> &AtomicU32,
    ) -> std::result::Result<&'v AtomicU32, Damage> {
        match neighbour.checked_sub(1) {
            None => Ok(end),
            Some(n) => self
                .reg
                .view
                .try_slot(n)
                .map(side)
                .ok_or(Damage("finished list link")),
        }
    }

    /// Takes `slot` off the finished list, checking that its neighbours agree.
    fn unlink_finished(&self, slot: u32) -> std::result::Result<(), Damage> {
        let reg = self.reg;
        let head = reg.head();
        let m = reg.view.slot(slot);
        let (prev, next) = (
            m.prev.load(Ordering::Relaxed),
            m.next.load(Ordering::Relaxed),
        );
        let before = self.list_link(prev, &head.lru_head, |m| &m.next)?;
        let after = self.list_link(next, &head.lru_tail, |m| &m.prev)?;
        if before.load(Ordering::Relaxed) != slot + 1 || after.load(Ordering::Relaxed) != slot + 1 {
            return Err(Damage("the finished list's links disagree"));
        }
        before.store(next, Ordering::Relaxed);
        after.store(prev, Ordering::Relaxed);
        m.list.store(list::NONE, Ordering::Relaxed);
        head.finished.store(
            head.finished.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Ends the least recently used finished session to make room; false if none is finished.
    ///
    /// LRU with a second chance: a session a reader attached to since it was queued
    /// (`last_access_ns` newer than `queued_at_ns`) goes back to the tail instead, once per
    /// attach, so that cost is paid by the attaches (amortized O(1)). One with readers right
    /// now is spared too, but only a few times per call, so the call stays O(1).
    fn evict_lru(&self) -> bool {
        let reg = self.reg;
        let head = reg.head();
        let mut spared_for_readers = 0;
        // At most one lap of the list (its count is segment data: clamp it).
        let mut visits = head.finished.load(Ordering::Relaxed).min(reg.used_slots());
        loop {
            let Some(slot) = head.lru_head.load(Ordering::Relaxed).checked_sub(1) else {
                if head.lru_tail.load(Ordering::Relaxed) != 0
                    || head.finished.load(Ordering::Relaxed) != 0
                {
                    self.rebuild(false, "the finished list is empty but says it is not");
                    return self.evict_lru_after_rebuild();
                }
                return false;
            };
            let Some(m) = reg.view.try_slot(slot) else {
                self.rebuild(false, "the finished list names no slot");
                return self.evict_lru_after_rebuild();
            };
            let st = SessionState::from_raw(m.state.load(Ordering::Acquire));
            let gen = m.generation.load(Ordering::Acquire);
            if m.list.load(Ordering::Relaxed) != list::FINISHED
                || !matches!(st, Some(s) if s != SessionState::Running)
                || gen & ENDED_BIT != 0
            {
                self.rebuild(false, "the finished list holds a slot that is not finished");
                return self.evict_lru_after_rebuild();
            }
            if visits > 0 {
                visits -= 1;
                let touched = m.last_access_ns.load(Ordering::Relaxed)
                    > m.queued_at_ns.load(Ordering::Relaxed);
                let read_now = !touched && spared_for_readers < 4 && reg.has_readers(slot, gen);
                if touched || read_now {
                    spared_for_readers += read_now as u32;
                    if self.unlink_finished(slot).is_err() {
                        self.rebuild(false, "the finished list's links disagree");
                        return self.evict_lru_after_rebuild();
                    }
                    m.queued_at_ns
                        .store(process::unix_nanos(), Ordering::Relaxed);
                    self.append_finished(slot);
                    continue;
                }
            }
            head.lru_evictions.fetch_add(1, Ordering::Relaxed);
            return self.end(slot, gen, end_reason::EVICTED);
        }
    }

    /// After a rebuild the list is sound: evict its head without second chances.
    fn evict_lru_after_rebuild(&self) -> bool {
        let reg = self.reg;
        let Some(slot) = reg.head().lru_head.load(Ordering::Relaxed).checked_sub(1) else {
            return false;
        };
        let gen = reg.view.slot(slot).generation.load(Ordering::Acquire);
        reg.head().lru_evictions.fetch_add(1, Ordering::Relaxed);
        self.end(slot, gen, end_reason::EVICTED)
    }

    /// Rebuilds the index, the free stack and the finished list from the slots, in one pass
    /// over the slots ever used. `dead_owner`: the previous lock holder died, so INIT slots
    /// are abandoned creates (freed); otherwise an INIT slot belongs to the caller's create.
    fn rebuild(&self, dead_owner: bool, why: &str) {
        let reg = self.reg;
        let head = reg.head();
        if !dead_owner {
            eprintln!(
                "ringcast: segment {}: the registry was damaged ({why}); rebuilding it from the slots",
                reg.path
            );
        }
        let ix = reg.index();
        ix.begin_rebuild();
        let used = reg.used_slots();
        head.high_water.store(used, Ordering::Relaxed);
        head.high_water_copy.store(used, Ordering::Relaxed);
        head.free_head.store(0, Ordering::Relaxed);
        head.lru_head.store(0, Ordering::Relaxed);
        head.lru_tail.store(0, Ordering::Relaxed);
        head.finished.store(0, Ordering::Relaxed);
        let mut live = 0u32;
        let mut finished = Vec::new();
        // Backwards, so the free stack hands out low slots first and the used part stays dense.
        for slot in (0..used).rev() {
            let m = reg.view.slot(slot);
            m.list.store(list::NONE, Ordering::Relaxed);
            let s = m.state.load(Ordering::Acquire);
            let gen = m.generation.load(Ordering::Acquire);
            let st = SessionState::from_raw(s);
            let key = reg.view.read_key(slot);
            match (s, st) {
                (state::INIT, _) if !dead_owner => continue,
                (state::FREE, _) => {
                    if dead_owner {
                        reg.view.release_pages(slot);
                    }
                    self.push_free(slot);
                    continue;
                }
                (_, Some(st)) if gen & ENDED_BIT == 0 && key.is_some() => {
                    let (id, owner) = key.expect("checked");
                    let hash = index::key_hash(reg.view.hash_key(), &owner, &id);
                    m.id_hash.store(hash, Ordering::Relaxed);
                    // A second live session of one key cannot come from a crash; only damage
                    // makes one. Keep the first found; the other leaves below.
                    let dup = ix
                        .find_locked(hash, reg.view.geometry().max_sessions, |other| {
                            reg.view.read_key(other) == Some((id.clone(), owner.clone()))
                        })
                        .is_some();
                    let placed = |pos: usize| m.index_pos.store(pos as u32, Ordering::Relaxed);
                    if !dup
                        && ix.insert(hash, slot, placed).is_ok()
                        && self.link_owner(slot, &owner).is_ok()
                    {
                        live += 1;
                        if st != SessionState::Running {
                            finished.push((m.queued_at_ns.load(Ordering::Relaxed), slot));
                        }
                        continue;
                    }
                }
                _ => {}
            }
            // An abandoned create, an `end` cut short after marking the generation ended (its
            // reason is already stored), a duplicate, or a slot whose state or key is garbage:
            // it leaves.
            if gen & ENDED_BIT == 0 {
                m.last_end
                    .store(gen << 8 | end_reason::EVICTED as u64, Ordering::SeqCst);
            }
            m.generation.store(gen | ENDED_BIT, Ordering::SeqCst);
            m.state.store(state::FREE, Ordering::SeqCst);
            notify::publish(&reg.view, &reg.wake, m);
            reg.view.release_pages(slot);
            self.push_free(slot);
        }
        finished.sort_unstable();
        for (_, slot) in finished {
            self.append_finished(slot);
        }
        head.live.store(live, Ordering::Relaxed);
        head.damaged.store(0, Ordering::Relaxed);
        head.rebuilds.fetch_add(1, Ordering::Relaxed);
        ix.end_rebuild();
    }
}

impl Registry {
    /// Checks every invariant of the registry's structures against the slots, under the lock
    /// (so a dead holder's leftovers are repaired first): the index holds exactly the live
    /// sessions, each where its slot says and reachable from its home bucket, and one entry
    /// per owner naming the head of that owner's list, whose links agree; the free stack
    /// holds exactly the free slots ever used; the finished list holds exactly the finished
    /// sessions, its links agreeing both ways; the counters match; no slot past the high-water
    /// mark is in use. Returns the number of live sessions, or what is wrong.
    pub(crate) fn check(&self) -> std::result::Result<u32, String> {
        let _guard = self.lock().map_err(|e| e.to_string())?;
        let view = &self.view;
        let head = self.head();
        let n = view.geometry().max_sessions;
        let used = head.high_water.load(Ordering::Relaxed);
        if used > n || head.high_water_copy.load(Ordering::Relaxed) != used {
            return Err(format!(
                "high-water mark {used} past {n} slots or not copied"
            ));
        }
        let live_at = |slot: u32| {
            let m = view.slot(slot);
            SessionState::from_raw(m.state.load(Ordering::Acquire))
                .filter(|_| m.generation.load(Ordering::Acquire) & ENDED_BIT == 0)
        };
        // Each entry: a live session's, where its slot says, under its hash; or an owner's,
        // naming the head of that owner's list, where the head says, under the owner's hash.
        let expect = |e: u64| {
            let slot = index::entry_slot(e)?;
            live_at(slot)?;
            let m = view.slot(slot);
            let (hash, at) = match index::is_owner_entry(e) {
                false => (m.id_hash.load(Ordering::Relaxed), &m.index_pos),
                true if m.owner_prev.load(Ordering::Relaxed) == 0 => {
                    (self.owner_hash(&view.read_key(slot)?.1), &m.owner_pos)
                }
                true => return None,
            };
            (hash as u32 == (e >> 32) as u32).then(|| at.load(Ordering::Relaxed) as usize)
        };
        let entries = self
            .index()
            .verify(n, expect)
            .map_err(|index::Corrupt(why)| why.to_string())?;
        // Owner lists: links agree both ways within one owner; one head (list) per owner.
        let mut heads = std::collections::HashSet::new();
        for slot in (0..used).filter(|s| live_at(*s).is_some()) {
            let m = view.slot(slot);
            let owner = view.read_key(slot).ok_or("a live slot without a key")?.1;
            let (prev, next) = (
                m.owner_prev.load(Ordering::Relaxed),
                m.owner_next.load(Ordering::Relaxed),
            );
            let linked = |at: u32, back: fn(&SlotMeta) -> &AtomicU32| {
                view.try_slot(at - 1).is_some_and(|o| {
                    live_at(at - 1).is_some()
                        && back(o).load(Ordering::Relaxed) == slot + 1
                        && view.read_key(at - 1).is_some_and(|(_, w)| w == owner)
                })
            };
            if (prev == 0 && !heads.insert(owner.clone()))
                || (prev != 0 && !linked(prev, |o| &o.owner_next))
                || (next != 0 && !linked(next, |o| &o.owner_prev))
            {
                return Err(format!("slot {slot}'s owner list is broken"));
            }
        }
        let (mut live, mut free, mut finished) = (0u32, 0u32, 0u32);
        for slot in 0..n {
            let m = view.slot(slot);
            let s = m.state.load(Ordering::Acquire);
            if slot >= used {
                if s != state::FREE {
                    return Err(format!(
                        "slot {slot} past the high-water mark is in state {s}"
                    ));
                }
                continue;
            }
            let on = m.list.load(Ordering::Relaxed);
            let want = match live_at(slot) {
                Some(SessionState::Running) => list::NONE,
                Some(_) => list::FINISHED,
                None if s == state::FREE => list::FREE,
                None => return Err(format!("slot {slot} is in state {s} at rest")),
            };
            if on != want {
                return Err(format!(
                    "slot {slot} (state {s}) is on list {on}, not {want}"
                ));
            }
            live += (want != list::FREE) as u32;
            free += (want == list::FREE) as u32;
            finished += (want == list::FINISHED) as u32;
        }
        if entries != live as usize + heads.len() || head.live.load(Ordering::Relaxed) != live {
            return Err(format!(
                "{live} live sessions of {} owners, {entries} index entries, {} counted",
                heads.len(),
                head.live.load(Ordering::Relaxed)
            ));
        }
        let mut seen = 0u32;
        let mut at = head.free_head.load(Ordering::Relaxed);
        while let Some(slot) = at.checked_sub(1) {
            let m = view.try_slot(slot).ok_or("free stack names no slot")?;
            if m.list.load(Ordering::Relaxed) != list::FREE || seen > free {
                return Err(format!(
                    "free stack reaches slot {slot}, not free (or a cycle)"
                ));
            }
            seen += 1;
            at = m.next.load(Ordering::Relaxed);
        }
        if seen != free {
            return Err(format!("{free} free slots, {seen} on the free stack"));
        }
        let (mut seen, mut prev) = (0u32, 0u32);
        let mut at = head.lru_head.load(Ordering::Relaxed);
        while let Some(slot) = at.checked_sub(1) {
            let m = view.try_slot(slot).ok_or("finished list names no slot")?;
            if m.list.load(Ordering::Relaxed) != list::FINISHED
                || m.prev.load(Ordering::Relaxed) != prev
                || seen > finished
            {
                return Err(format!("finished list broken at slot {slot}"));
            }
            seen += 1;
            prev = at;
            at = m.next.load(Ordering::Relaxed);
        }
        if seen != finished
            || head.lru_tail.load(Ordering::Relaxed) != prev
            || head.finished.load(Ordering::Relaxed) != finished
        {
            return Err(format!(
                "{finished} finished sessions, {seen} on the list, {} counted",
                head.finished.load(Ordering::Relaxed)
            ));
        }
        Ok(live)
    }
}

/// The registry's lists are in a state no sequence of its own steps leaves them in.
struct Damage(&'static str);
