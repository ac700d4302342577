//! Wake latency without Python: how long from an append until each of N sleeping reader
//! processes has the bytes, measured two ways on this machine:
//!
//! - `ringcast-core`: a `Writer` appends 16-byte events (sequence, `CLOCK_MONOTONIC` ns) one
//!   every INTERVAL; N forked processes block in `Reader::read_into` and compute the latency of
//!   every event they receive;
//! - `notifier`: the same, but each reader waits as an event loop does: on its process's
//!   `Notifier` socket (subscribe, arm, `poll(2)` on the descriptor, drain), not on the futex;
//! - `bare futex`: the floor of any futex design: a counter in shared memory bumped and woken
//!   the same way, N processes in `FUTEX_WAIT` doing nothing else.
//!
//! ```text
//! cargo run --release -p ringcast-core --example wake_latency -- [READERS] [EVENTS] [INTERVAL_US]
//! ```
//! (defaults: 8 readers, 500 events, 1000 µs). `bench/core_fanout.py` measures the same through
//! the Python binding; the difference is the cost of Python around each wake-up.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use ringcast_core::{Poll, Segment, SegmentConfig, SessionState};

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs `body` in a forked child whose latencies (ns, native-endian u64s) come back through a
/// pipe; returns the child's pid and the pipe's read end.
fn spawn(body: impl FnOnce() -> Vec<u64>) -> (libc::pid_t, std::fs::File) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: this program is single-threaded when it forks (readers are started before the
    // producer does anything else), so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: fds[0] is our copy of the read end, unused in the child.
        unsafe { libc::close(fds[0]) };
        let lat = body();
        // SAFETY: fds[1] is an open descriptor this process owns from here on.
        let mut out = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
        let bytes: Vec<u8> = lat.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let _ = out.write_all(&bytes);
        drop(out);
        // SAFETY: leaving the child without running the parent's destructors or atexit hooks.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: fds[1] is the parent's copy of the write end, unused here.
    unsafe { libc::close(fds[1]) };
    // SAFETY: fds[0] is an open descriptor the parent owns from here on.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    (pid, f)
}

fn collect(children: Vec<(libc::pid_t, std::fs::File)>) -> Vec<u64> {
    let mut all = Vec::new();
    for (pid, mut f) in children {
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).expect("read latencies");
        all.extend(
            buf.chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))),
        );
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is writable.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    all
}

fn report(what: &str, readers: usize, mut lat: Vec<u64>, expected: usize) {
    assert_eq!(lat.len(), expected, "{what}: every reader gets every event");
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
    println!(
        "{what:<14} readers={readers:<3} p50 {:>7.1} us   p99 {:>7.1} us",
        q(0.5),
        q(0.99)
    );
}

/// Waits for the next change as `_aio` does: arm (yielding once), and if that found the
/// process disarmed, rescan instead of sleeping; else sleep in `poll(2)` on the socket.
fn wait_on_notifier(n: &ringcast_core::Notifier) {
    if n.arm(true) {
        n.drain();
        return;
    }
    let mut pfd = libc::pollfd {
        fd: n.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, -1) };
    n.drain();
}

fn ringcast_core(readers: usize, events: u64, interval: Duration, notifier: bool) {
    let path = format!("/dev/shm/ringcast-wake-latency-{}", std::process::id());
    let _ = std::fs::remove_file(&path);
    let cfg = SegmentConfig {
        max_sessions: 2,
        session_bytes: 1 << 20,
        max_id_len: 256,
    };
    let seg = Segment::create(&path, cfg).expect("create segment");
    let w = seg.create_or_replace("bench", "").expect("session");
    let children: Vec<_> = (0..readers)
        .map(|_| {
            let path = path.clone();
            spawn(move || {
                let seg = Segment::open(&path).expect("open segment");
                let mut r = seg.reader("bench", "", 0).expect("reader");
                let n = notifier.then(|| {
                    let n = r.notifier().expect("notifier");
                    n.subscribe(r.slot(), r.generation()).expect("subscribe");
                    n
                });
                let mut buf = vec![0u8; 1 << 16];
                let mut lat = Vec::new();
                loop {
                    let got = match &n {
                        None => r.read_into(&mut buf, None),
                        Some(n) => loop {
                            match r.poll_into(&mut buf) {
                                Ok(Poll::Pending) => wait_on_notifier(n),
                                other => break other,
                            }
                        },
                    };
                    match got.expect("read") {
                        Poll::Data(n) => {
                            let t = now_ns();
                            for ev in buf[..n].chunks_exact(16) {
                                let sent = u64::from_ne_bytes(ev[8..16].try_into().expect("8"));
                                lat.push(t.saturating_sub(sent));
                            }
                        }
                        Poll::End | Poll::Pending => return lat,
                    }
                }
            })
        })
        .collect();
    // Every reader attached and asleep before the first event.
    while seg
        .get("bench", "")
        .map(|i| i.readers as usize)
        .unwrap_or(0)
        < readers
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..events {
        std::thread::sleep(interval);
        let mut ev = [0u8; 16];
        ev[..8].copy_from_slice(&i.to_ne_bytes());
        ev[8..].copy_from_slice(&now_ns().to_ne_bytes());
        w.write(&ev).expect("write");
    }
    w.finalize(SessionState::Done).expect("finalize");
    let lat = collect(children);
    let _ = std::fs::remove_file(&path);
    let what = if notifier {
        "notifier"
    } else {
        "ringcast-core"
    };
    report(what, readers, lat, readers * events as usize);
}

#[repr(C)]
struct Shared {
    seq: AtomicU32,
    stamp: AtomicU64,
}

fn bare_futex(readers: usize, events: u64, interval: Duration) {
    // SAFETY: an anonymous shared mapping of the struct's size; checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            std::mem::size_of::<Shared>(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: the mapping is zeroed, page-aligned, large enough, and stays mapped (never
    // unmapped) in this process and its children; atomics are valid for all-zero bytes.
    let sh: &'static Shared = unsafe { &*(p as *const Shared) };
    let events32 = u32::try_from(events).expect("events fit u32");
    let children: Vec<_> = (0..readers)
        .map(|_| {
            spawn(move || {
                let mut lat = Vec::new();
                let mut last = 0u32;
                while last < events32 {
                    while sh.seq.load(Ordering::SeqCst) == last {
                        // SAFETY: FUTEX_WAIT on a valid, aligned u32 in shared memory.
                        unsafe {
                            libc::syscall(
                                libc::SYS_futex,
                                &sh.seq as *const AtomicU32,
                                libc::FUTEX_WAIT,
                                last,
                                std::ptr::null::<libc::timespec>(),
                            )
                        };
                    }
                    last = sh.seq.load(Ordering::SeqCst);
                    lat.push(now_ns().saturating_sub(sh.stamp.load(Ordering::SeqCst)));
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..events {
        std::thread::sleep(interval);
        sh.stamp.store(now_ns(), Ordering::SeqCst);
        sh.seq.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE on a valid, aligned u32 in shared memory.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                &sh.seq as *const AtomicU32,
                libc::FUTEX_WAKE,
                i32::MAX,
            )
        };
    }
    let lat = collect(children);
    // A reader that slept through two bumps records one wake for both: compare per wake.
    let wakes = lat.len();
    report("bare futex", readers, lat, wakes);
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("READERS EVENTS INTERVAL_US are integers"))
        .collect();
    let readers = *args.first().unwrap_or(&8) as usize;
    let events = *args.get(1).unwrap_or(&500);
    let interval = Duration::from_micros(*args.get(2).unwrap_or(&1000));
    assert!((1..=64).contains(&readers), "READERS must be 1..=64");
    println!("# {events} events, one every {interval:?}, to {readers} sleeping reader processes");
    ringcast_core(readers, events, interval, false);
    ringcast_core(readers, events, interval, true);
    bare_futex(readers, events, interval);
}
