//! Process identity: a pid plus the process's start time (clock ticks since boot, field 22 of
//! `/proc/<pid>/stat`), so that a pid the kernel reused is never mistaken for a dead producer.

use std::fs;
use std::io::ErrorKind;
use std::sync::Mutex;

/// Identity of a process that can be compared across processes and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    /// The calling process. Its start time is read once per process (and again after a fork).
    pub fn current() -> ProcessId {
        static CACHE: Mutex<(u32, u64)> = Mutex::new((0, 0));
        let pid = std::process::id();
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != pid {
            // Reading our own /proc entry fails only if /proc is missing or we are out of
            // descriptors or memory; try a few times rather than register start time 0, which
            // every other process would take for a dead process's row.
            let mut start = 0;
            for _ in 0..3 {
                if let Stat::Running { start_time } | Stat::Zombie { start_time } = stat_of(pid) {
                    start = start_time;
                    break;
                }
            }
            if start == 0 {
                return ProcessId { pid, start_time: 0 };
            }
            *cache = (pid, start);
        }
        ProcessId {
            pid,
            start_time: cache.1,
        }
    }

    /// Whether this exact process (same pid *and* start time) still exists.
    ///
    /// When `/proc/<pid>/stat` exists but cannot be read (no descriptor or memory left in the
    /// calling process), the answer is yes: a live process taken for dead would lose its
    /// process-table row or its running session, while the reverse only postpones a clean-up
    /// to the next check.
    ///
    /// The calling process is answered without `/proc`: it runs, and it is this identity
    /// exactly when the start times agree (a snapshot of a session produced in this process,
    /// the commonest question on a server whose HTTP processes produce their own streams,
    /// then costs no system call).
    pub fn is_alive(&self) -> bool {
        if self.pid == 0 {
            return false;
        }
        if self.pid == std::process::id() {
            let me = ProcessId::current();
            if me.start_time != 0 {
                return self.start_time == me.start_time;
            }
        }
        alive_where(self.pid, |t| t == self.start_time)
    }
}

/// Whether `pid` runs (not a zombie) with a start time that `is_it` accepts; unreadable counts
/// as alive (see `ProcessId::is_alive`).
fn alive_where(pid: u32, is_it: impl Fn(u64) -> bool) -> bool {
    match stat_of(pid) {
        Stat::Running { start_time } => is_it(start_time),
        Stat::Zombie { .. } | Stat::Gone => false,
        Stat::Unreadable => true,
    }
}

/// What `/proc/<pid>/stat` says about a process.
enum Stat {
    Running {
        start_time: u64,
    },
    /// Exited but not yet reaped: it produces nothing more, even though its pid is taken.
    Zombie {
        start_time: u64,
    },
    /// No such process.
    Gone,
    /// The file is there (or might be) but could not be read or parsed.
    Unreadable,
}

fn stat_of(pid: u32) -> Stat {
    // Bytes, not a string: the command name may be any bytes (cut mid-character at 15).
    let text = match fs::read(format!("/proc/{pid}/stat")) {
        Ok(text) => text,
        // ESRCH: the process went away between open and read.
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Stat::Gone
        }
        Err(_) => return Stat::Unreadable,
    };
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let Some(close) = text.iter().rposition(|&b| b == b')') else {
        return Stat::Unreadable;
    };
    // After the name everything is ASCII: field 3 (state) is the first token; the start time
    // is field 22.
    let Ok(rest) = std::str::from_utf8(&text[close + 1..]) else {
        return Stat::Unreadable;
    };
    let mut fields = rest.split_whitespace();
    let zombie = fields.next() == Some("Z");
    match fields.nth(22 - 4).and_then(|s| s.parse().ok()) {
        Some(start_time) if zombie => Stat::Zombie { start_time },
        Some(start_time) => Stat::Running { start_time },
        None => Stat::Unreadable,
    }
}

/// Whether some process (a zombie too) has `pid` now: one `kill(pid, 0)`, no `/proc`. A
/// process of another user, which may not be signalled, exists too.
pub fn pid_exists(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing: the kernel only checks that the process exists and
    // that we may signal it; `p` is a positive pid, never a group or "every process".
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `pid` runs with a start time whose low 32 bits are `start_low` (the form a lock
/// word keeps); unreadable counts as alive, as in `ProcessId::is_alive`.
pub fn alive_with_start_low32(pid: u32, start_low: u32) -> bool {
    alive_where(pid, |t| t as u32 == start_low)
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_exists_sees_a_reaped_child_gone() {
        assert!(pid_exists(std::process::id()));
        assert!(!pid_exists(0));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        // Reaped: nothing has that pid now (unless the kernel reused it this instant).
        assert!(!pid_exists(pid));
    }

    #[test]
    fn current_process_is_alive_and_has_start_time() {
        let me = ProcessId::current();
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        let impostor = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(
            !impostor.is_alive(),
            "same pid, other start time must count as dead"
        );
    }

    #[test]
    fn an_exited_child_is_dead_before_and_after_it_is_reaped() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        let running = ProcessId {
            pid,
            start_time: match stat_of(pid) {
                Stat::Running { start_time } | Stat::Zombie { start_time } => start_time,
                _ => panic!("a child we have not reaped has a /proc entry"),
            },
        };
        // Not reaped yet: a zombie, which holds its pid but produces nothing more.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !matches!(stat_of(pid), Stat::Zombie { .. }) {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!running.is_alive());
        assert!(!alive_with_start_low32(pid, running.start_time as u32));
        child.wait().expect("reap");
        assert!(matches!(stat_of(pid), Stat::Gone));
        assert!(!running.is_alive());
    }

    #[test]
    fn a_process_whose_name_is_not_utf8_is_read() {
        // SAFETY: the child only renames itself and sleeps until killed; it touches nothing a
        // test thread of the parent could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let name = b"\xff\xfe)( x\0";
            // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
            unsafe {
                libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                libc::pause();
                libc::_exit(0);
            }
        }
        let pid = pid as u32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let start = loop {
            let raw = fs::read(format!("/proc/{pid}/stat")).expect("child stat");
            if raw.windows(2).any(|w| w == b"\xff\xfe") {
                match stat_of(pid) {
                    Stat::Running { start_time } => break start_time,
                    _ => panic!("a renamed child's stat must parse"),
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child never renamed itself"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(ProcessId {
            pid,
            start_time: start
        }
        .is_alive());
        // SAFETY: killing and reaping the child forked above.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
        }
    }

    #[test]
    fn current_start_time_is_read_once_and_matches_proc() {
        let a = ProcessId::current();
        let b = ProcessId::current();
        assert_eq!(a, b);
        assert!(
            matches!(stat_of(a.pid), Stat::Running { start_time } if start_time == a.start_time)
        );
    }
}
