//! Helpers shared by the integration tests.

#![allow(dead_code)] // each test binary uses its own subset

use ringcast_core::SegmentConfig;

/// A segment path under /dev/shm, removed when dropped.
pub struct TempSeg(pub String);
impl TempSeg {
    pub fn new(tag: &str) -> TempSeg {
        let p = format!(
            "/dev/shm/ringcast-test-{}-{}-{tag}",
            std::process::id(),
            rand_suffix()
        );
        let _ = std::fs::remove_file(&p);
        TempSeg(p)
    }
}
impl Drop for TempSeg {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn cfg(n: u32, bytes: u64) -> SegmentConfig {
    SegmentConfig {
        max_sessions: n,
        session_bytes: bytes,
        max_id_len: 256,
    }
}
