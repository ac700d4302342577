//! Process identity: a pid plus the process's start time (clock ticks since boot, field 22 of
//! `/proc/<pid>/stat`), so that a pid the kernel reused is never mistaken for a dead producer.

use std::fs;

/// Identity of a process that can be compared across processes and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    /// The calling process.
    pub fn current() -> ProcessId {
        let pid = std::process::id();
        ProcessId {
            pid,
            start_time: start_time_of(pid).unwrap_or(0),
        }
    }

    /// Whether this exact process (same pid *and* start time) still exists.
    pub fn is_alive(&self) -> bool {
        if self.pid == 0 {
            return false;
        }
        match start_time_of(self.pid) {
            Some(t) => t == self.start_time && !is_zombie(self.pid),
            None => false,
        }
    }
}

/// Start time of `pid` in clock ticks since boot, `None` if there is no such process.
pub fn start_time_of(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first token; the start time is field 22.
    after
        .split_whitespace()
        .nth(22 - 3)
        .and_then(|s| s.parse().ok())
}

/// A zombie has exited: it produces nothing more even though its pid is still taken.
fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
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
}
