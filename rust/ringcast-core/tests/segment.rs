//! Segment-level tests: registry semantics, validation of foreign files, and a many-thread
//! stress of one producer against readers started on a barrier.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use ringcast_core::{EndReason, Error, Notifier, Poll, Quota, Segment, SessionState, Wake, Writer};

mod common;
use common::{cfg, TempSeg};

/// Deterministic stream content: byte at offset `o`.
fn byte_at(o: u64) -> u8 {
    (o.wrapping_mul(2_654_435_761) >> 7) as u8
}

#[test]
fn one_producer_many_readers_on_a_barrier() {
    let t = TempSeg::new("stress");
    let seg = Segment::create(&t.0, cfg(4, 1 << 16)).unwrap();
    let total: u64 = if cfg!(debug_assertions) {
        4 << 20
    } else {
        32 << 20
    };
    let readers = 6;
    let barrier = Arc::new(Barrier::new(readers + 1));
    let w = seg.create_or_replace("stress", "").unwrap();
    let mut handles = Vec::new();
    for _ in 0..readers {
        let seg = seg.clone();
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let mut r = seg.reader("stress", "", 0).unwrap();
            barrier.wait();
            let mut buf = vec![0u8; 4096];
            let mut lost = 0u64;
            loop {
                match r.read_into(&mut buf, Some(Duration::from_secs(10))) {
                    Ok(Poll::Data(n)) => {
                        let start = r.offset() - n as u64;
                        for (i, b) in buf[..n].iter().enumerate() {
                            assert_eq!(
                                *b,
                                byte_at(start + i as u64),
                                "wrong byte at {}",
                                start + i as u64
                            );
                        }
                    }
                    Ok(Poll::End) => return (r.offset(), lost),
                    Ok(Poll::Pending) => panic!("stalled at {}", r.offset()),
                    Err(Error::OffsetLost {
                        first_available, ..
                    }) => {
                        // A slow reader skips ahead; what it then reads must still be right.
                        lost += 1;
                        let mut at = first_available;
                        r = loop {
                            match seg.reader("stress", "", at + 1024) {
                                Ok(r) => break r,
                                // The producer lapped us again while we re-attached.
                                Err(Error::OffsetLost {
                                    first_available, ..
                                }) => at = first_available,
                                Err(e) => panic!("{e}"),
                            }
                        };
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    barrier.wait();
    let mut o = 0u64;
    let mut chunk = vec![0u8; 0];
    while o < total {
        let n = 1 + (o % 700) as usize;
        chunk.clear();
        chunk.extend((0..n as u64).map(|i| byte_at(o + i)));
        assert!(w.write(&chunk).unwrap());
        o += n as u64;
    }
    assert!(w.finalize(SessionState::Done).unwrap());
    for h in handles {
        let (end, _lost) = h.join().unwrap();
        assert_eq!(end, o, "every reader reaches the end");
    }
}

#[test]
fn replace_cancels_the_old_session_and_its_readers() {
    let t = TempSeg::new("replace");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let w1 = seg.create_or_replace("c", "").unwrap();
    w1.write(b"one").unwrap();
    let mut r1 = seg.reader("c", "", 0).unwrap();
    let w2 = seg.create_or_replace("c", "").unwrap();
    assert!(w1.cancelled());
    assert!(
        !w1.write(b"more").unwrap(),
        "a replaced producer cannot append"
    );
    assert!(!w2.cancelled());
    let mut buf = [0u8; 16];
    match r1.poll_into(&mut buf) {
        Err(Error::Ended(EndReason::Replaced)) => {}
        other => panic!("expected Replaced, got {other:?}"),
    }
    assert_eq!(seg.list(None).len(), 1);
    assert_eq!(seg.get("c", "").unwrap().generation, w2.generation());
}

#[test]
fn owners_are_separate_namespaces() {
    let t = TempSeg::new("owners");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let a = seg.create_or_replace("same", "alice").unwrap();
    let b = seg.create_or_replace("same", "bob").unwrap();
    assert!(!a.cancelled() && !b.cancelled());
    assert!(seg.get("same", "").is_none());
    assert_eq!(seg.list(Some("alice")).len(), 1);
    assert!(seg.evict("same", "alice", EndReason::Evicted).unwrap());
    assert!(
        !seg.evict("same", "alice", EndReason::Evicted).unwrap(),
        "evict is idempotent"
    );
    assert!(seg.get("same", "bob").is_some());
}

#[test]
fn registry_full_then_freed() {
    let t = TempSeg::new("full");
    let seg = Segment::create(&t.0, cfg(2, 4096)).unwrap();
    let _a = seg.create_or_replace("a", "").unwrap();
    let _b = seg.create_or_replace("b", "").unwrap();
    assert!(matches!(
        seg.create_or_replace("c", ""),
        Err(Error::RegistryFull { max_sessions: 2 })
    ));
    // Replacing an existing id needs a free slot too (the new session is built first).
    seg.evict("a", "", EndReason::Evicted).unwrap();
    assert!(seg.create_or_replace("c", "").is_ok());
}

#[test]
fn quota_counts_running_sessions_of_its_groups() {
    let t = TempSeg::new("quota");
    let seg = Segment::create(&t.0, cfg(16, 4096)).unwrap();
    let groups = [("k", ""), ("~anon", "anon-k-")];
    let q = Quota {
        max_running: 3,
        groups: &groups,
    };
    let exceeded = |r: Result<_, Error>| matches!(r, Err(Error::QuotaExceeded { max_running: 3 }));
    let a = seg.create_or_replace_within("a", "k", &q).unwrap();
    let _b = seg
        .create_or_replace_within("anon-k-1", "~anon", &q)
        .unwrap();
    // Not counted: another owner, and another key's anonymous session.
    seg.create_or_replace("x", "other").unwrap();
    seg.create_or_replace("anon-j-1", "~anon").unwrap();
    let _c = seg.create_or_replace_within("c", "k", &q).unwrap();
    assert!(exceeded(seg.create_or_replace_within("d", "k", &q)));
    assert!(exceeded(
        seg.create_or_replace_within("anon-k-2", "~anon", &q)
    ));
    // A replacement of a counted running session does not grow the count.
    let a2 = seg.create_or_replace_within("a", "k", &q).unwrap();
    drop(a);
    // A finished session no longer counts.
    a2.finalize(SessionState::Done).unwrap();
    seg.create_or_replace_within("d", "k", &q).unwrap();
    assert!(exceeded(seg.create_or_replace_within("e", "k", &q)));
    // The uncounted groups were never limited.
    let none = Quota {
        max_running: 0,
        groups: &[],
    };
    assert!(seg.create_or_replace_within("y", "other", &none).is_err());
    assert!(seg.create_or_replace("y", "other").is_ok());
    assert_eq!(seg.check_registry(), Ok(7));
}

#[test]
fn quota_is_exact_under_racing_creates() {
    let t = TempSeg::new("quota-race");
    let seg = Arc::new(Segment::create(&t.0, cfg(64, 4096)).unwrap());
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (seg, barrier) = (seg.clone(), barrier.clone());
            std::thread::spawn(move || {
                let groups = [("k", "")];
                let q = Quota {
                    max_running: 5,
                    groups: &groups,
                };
                barrier.wait();
                (0..4)
                    .filter_map(|j| {
                        seg.create_or_replace_within(&format!("{i}-{j}"), "k", &q)
                            .ok()
                    })
                    .count()
            })
        })
        .collect();
    let created: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(created, 5);
    assert_eq!(seg.list(Some("k")).len(), 5);
}

#[test]
fn lookup_prefix_follows_llama_server() {
    let t = TempSeg::new("prefix");
    let seg = Segment::create(&t.0, cfg(8, 4096)).unwrap();
    for id in [
        "conv-1",
        "conv-1::ggml-org/tinygemma3-GGUF:Q8_0",
        "conv-10",
        "conv-1:x",
    ] {
        seg.create_or_replace(id, "").unwrap();
    }
    let mut got: Vec<String> = seg
        .lookup_prefix("conv-1", "")
        .into_iter()
        .map(|i| i.conversation_id)
        .collect();
    got.sort();
    assert_eq!(got, vec!["conv-1", "conv-1::ggml-org/tinygemma3-GGUF:Q8_0"]);
}

#[test]
fn foreign_and_corrupt_files_are_refused() {
    let t = TempSeg::new("corrupt");
    std::fs::write(&t.0, b"not a segment at all").unwrap();
    assert!(matches!(Segment::open(&t.0), Err(Error::Segment(_))));
    std::fs::remove_file(&t.0).unwrap();
    let seg = Segment::create(&t.0, cfg(2, 4096)).unwrap();
    drop(seg);
    let mut bytes = std::fs::read(&t.0).unwrap();
    bytes[8] ^= 0xff; // layout version
    std::fs::write(&t.0, &bytes).unwrap();
    let e = Segment::open(&t.0)
        .err()
        .expect("must refuse another layout");
    assert!(e.to_string().contains("layout version"), "{e}");
    bytes[8] ^= 0xff;
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&t.0, &bytes).unwrap();
    let e = Segment::open(&t.0)
        .err()
        .expect("must refuse a truncated file");
    assert!(e.to_string().contains("truncated"), "{e}");
}

/// The message of a refusal, which must be a `SegmentError`.
fn segment_refusal(r: ringcast_core::Result<Segment>) -> String {
    match r {
        Err(Error::Segment(e)) => e.to_string(),
        Err(e) => panic!("not a segment error: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn a_symbolic_link_at_the_segment_path_is_refused_never_followed() {
    let t = TempSeg::new("link");
    // Dangling: open finds nothing, create finds the link; this used to recurse until the
    // stack overflowed.
    let target = format!("{}-target", t.0);
    std::os::unix::fs::symlink(&target, &t.0).unwrap();
    for e in [
        segment_refusal(Segment::open_or_create(&t.0, cfg(2, 4096))),
        segment_refusal(Segment::create(&t.0, cfg(2, 4096))),
        segment_refusal(Segment::open(&t.0)),
    ] {
        assert!(e.contains("symbolic link") && e.contains(&t.0), "{e}");
    }
    assert!(
        !std::path::Path::new(&target).exists(),
        "nothing created at the target"
    );
    // To a real segment: refused too, the segment left as it was.
    let real = TempSeg::new("link-target");
    drop(Segment::create(&real.0, cfg(2, 4096)).unwrap());
    std::fs::remove_file(&t.0).unwrap();
    std::os::unix::fs::symlink(&real.0, &t.0).unwrap();
    let e = segment_refusal(Segment::open_or_create(&t.0, cfg(2, 4096)));
    assert!(e.contains("symbolic link"), "{e}");
    Segment::open(&real.0).expect("the target is untouched");
    std::fs::remove_file(&t.0).unwrap();
}

#[test]
fn only_a_regular_file_is_opened() {
    let t = TempSeg::new("notfile");
    std::fs::create_dir(&t.0).unwrap();
    let e = segment_refusal(Segment::open_or_create(&t.0, cfg(2, 4096)));
    assert!(e.contains(&t.0), "{e}");
    std::fs::remove_dir(&t.0).unwrap();
    let c = std::ffi::CString::new(t.0.as_str()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = segment_refusal(Segment::open_or_create(&t.0, cfg(2, 4096)));
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn unlink_removes_only_the_file_it_opened() {
    let t = TempSeg::new("unlink");
    let seg = Segment::create(&t.0, cfg(2, 4096)).unwrap();
    // Replaced under us: the new file stays.
    std::fs::remove_file(&t.0).unwrap();
    std::fs::write(&t.0, b"someone else's").unwrap();
    let e = seg.unlink().expect_err("must not remove another file");
    assert!(e.to_string().contains("replaced"), "{e}");
    assert_eq!(std::fs::read(&t.0).unwrap(), b"someone else's");
    std::fs::remove_file(&t.0).unwrap();
    // Still ours: removed.
    let seg = Segment::create(&t.0, cfg(2, 4096)).unwrap();
    seg.unlink().unwrap();
    assert!(!std::path::Path::new(&t.0).exists());
}

#[test]
fn a_file_truncated_under_a_writer_is_reported_before_a_page_past_its_end_is_written() {
    let t = TempSeg::new("truncated");
    let seg = Segment::create(&t.0, cfg(2, 1 << 20)).unwrap();
    let w = seg.create_or_replace("c", "").unwrap();
    let g = seg.geometry();
    // The tables stay; every ring page is past the new end (writing one would be SIGBUS).
    let f = std::fs::OpenOptions::new().write(true).open(&t.0).unwrap();
    f.set_len(g.rings_offset).unwrap();
    let e = w
        .write(b"data: x\n\n")
        .expect_err("must not write past the end");
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_eq!(seg.get("c", "").unwrap().total_bytes, 0);
}

#[test]
fn scribbled_slot_metadata_never_escapes_bounds() {
    let t = TempSeg::new("scribble");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let w = seg.create_or_replace("victim", "").unwrap();
    w.write(b"data: x\n\n").unwrap();
    let g = seg.geometry();
    // Overwrite the registry area of every slot with 0xff: absurd lengths, states, cursors.
    let f = std::fs::OpenOptions::new().write(true).open(&t.0).unwrap();
    use std::os::unix::fs::FileExt;
    let garbage = vec![0xffu8; (g.slot_stride * g.max_sessions as u64) as usize];
    f.write_all_at(&garbage, g.slots_offset).unwrap();
    // Every entry point must answer without crashing.
    let _ = seg.list(None);
    let _ = seg.get("victim", "");
    let _ = seg.reader("victim", "", 0);
    let _ = seg.stats();
    let _ = w.write(b"more");
    let _ = w.finalize(SessionState::Done);
}

#[test]
fn memory_follows_the_bytes() {
    let t = TempSeg::new("sparse");
    let seg = Segment::create(&t.0, cfg(1000, 4 << 20)).unwrap();
    let before = seg.stats().resident_bytes;
    assert!(
        seg.stats().file_bytes > 4_000_000_000,
        "apparent size covers every ring"
    );
    let w = seg.create_or_replace("big", "").unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..4 {
        w.write(&chunk).unwrap();
    }
    let full = seg.stats().resident_bytes;
    assert!(
        full >= before + (4 << 20) - 4096,
        "writing 4 MiB makes 4 MiB resident"
    );
    seg.evict("big", "", EndReason::Evicted).unwrap();
    let after = seg.stats().resident_bytes;
    assert!(
        after < full - (3 << 20),
        "evicting gives the ring's pages back ({after} vs {full})"
    );
    assert!(
        after < 16 << 20,
        "1000 idle 4 MiB slots must not cost 4 GB ({after} bytes resident)"
    );
}

#[test]
fn cancel_wakes_a_waiting_producer() {
    let t = TempSeg::new("cancel");
    let seg = Segment::create(&t.0, cfg(2, 4096)).unwrap();
    let w = seg.create_or_replace("c", "").unwrap();
    let s2 = seg.clone();
    let h = std::thread::spawn(move || w.wait_cancelled(Some(Duration::from_secs(30))));
    std::thread::sleep(Duration::from_millis(50));
    s2.evict("c", "", EndReason::Cancelled).unwrap();
    assert!(
        h.join().unwrap(),
        "wait_cancelled must return true on cancel, not time out"
    );
}

#[test]
fn wait_ready_waits_for_data_end_or_timeout_without_reading() {
    let t = TempSeg::new("ready");
    let seg = Segment::create(&t.0, cfg(2, 4096)).unwrap();
    let w = seg.create_or_replace("r", "").unwrap();
    let mut r = seg.reader("r", "", 0).unwrap();
    let t0 = std::time::Instant::now();
    assert!(!r.wait_ready(Some(Duration::from_millis(50))));
    assert!(t0.elapsed() >= Duration::from_millis(50));
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        assert!(w.write(b"hello").unwrap());
        w
    });
    assert!(r.wait_ready(Some(Duration::from_secs(30))));
    let w = h.join().unwrap();
    // Waiting consumed nothing: the bytes are all still there to read.
    assert_eq!(r.offset(), 0);
    let mut buf = [0u8; 16];
    assert_eq!(r.poll_into(&mut buf).unwrap(), Poll::Data(5));
    assert!(!r.wait_ready(Some(Duration::from_millis(10))));
    w.finalize(SessionState::Done).unwrap();
    assert!(r.wait_ready(None), "the end of the stream is ready too");
    assert_eq!(r.poll_into(&mut buf).unwrap(), Poll::End);
}

fn fd_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
}

/// Reads (and so consumes) every datagram waiting on `fd`.
fn pending_datagrams(fd: i32) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 16];
    // SAFETY: receives at most 16 bytes into `buf`, which lives across the call.
    while unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) } >= 0 {
        n += 1;
    }
    n
}

#[test]
fn notifier_fd_turns_readable_for_subscribed_sessions_only() {
    let t = TempSeg::new("notify");
    let seg = Segment::create(&t.0, cfg(8, 4096)).unwrap();
    let a = seg.create_or_replace("a", "").unwrap();
    let b = seg.create_or_replace("b", "").unwrap();
    let n = seg.notifier().unwrap();
    // A new notifier starts armed: the first subscribed append sends a datagram.
    n.subscribe(a.slot(), a.generation()).unwrap();
    a.write(b"x").unwrap();
    assert!(
        fd_readable(n.fd(), 10_000),
        "a subscribed append makes the fd readable"
    );
    assert_eq!(n.drain(), vec![a.slot()]);
    // The datagram disarmed it: nothing is sent until a reader is about to wait (`arm`),
    // and `arm` says so, so that the caller scans what came meanwhile.
    a.write(b"w").unwrap();
    assert!(!fd_readable(n.fd(), 100));
    assert!(n.arm(false));
    assert!(!n.arm(true), "already armed");
    assert_eq!(n.drain(), vec![a.slot()]);
    // An unsubscribed session rings nobody.
    b.write(b"y").unwrap();
    assert!(!fd_readable(n.fd(), 100));
    assert!(n.drain().is_empty());
    // A burst while the loop has not drained yet costs one datagram and is reported once.
    for _ in 0..100 {
        a.write(b"z").unwrap();
    }
    assert!(fd_readable(n.fd(), 10_000));
    assert_eq!(pending_datagrams(n.fd()), 1);
    assert!(!fd_readable(n.fd(), 0));
    assert_eq!(n.drain(), vec![a.slot()]);
    assert!(n.drain().is_empty());
    assert!(n.arm(true));
    // Ending the session (evict) wakes its subscribers too.
    seg.evict("a", "", EndReason::Evicted).unwrap();
    assert!(fd_readable(n.fd(), 10_000));
    assert_eq!(n.drain(), vec![a.slot()]);
}

/// A segment with sessions "a" and "b", both subscribed by this process's notifier.
fn two_subscribed(t: &TempSeg) -> (Segment, Writer, Writer, Arc<Notifier>) {
    let seg = Segment::create(&t.0, cfg(8, 4096)).unwrap();
    let a = seg.create_or_replace("a", "").unwrap();
    let b = seg.create_or_replace("b", "").unwrap();
    let n = seg.notifier().unwrap();
    n.subscribe(a.slot(), a.generation()).unwrap();
    n.subscribe(b.slot(), b.generation()).unwrap();
    (seg, a, b, n)
}

#[test]
fn deferred_wakes_wait_for_the_flush_and_send_one_datagram_per_process() {
    let t = TempSeg::new("notify-deferred");
    let (seg, a, b, n) = two_subscribed(&t);
    assert_eq!(seg.flush_wakes(), 0, "nothing deferred yet");
    // Deferred appends to two sessions: the bytes are there, the notifier is not told yet.
    for _ in 0..50 {
        assert!(a.append(b"x", true, Wake::Deferred).unwrap());
        assert!(b.append(b"y", true, Wake::Deferred).unwrap());
    }
    assert!(!fd_readable(n.fd(), 100));
    assert_eq!(seg.reader("a", "", 0).unwrap().available(), 50);
    // The flush tells the process once for the whole batch.
    assert_eq!(seg.flush_wakes(), 1);
    assert!(fd_readable(n.fd(), 10_000));
    assert_eq!(pending_datagrams(n.fd()), 1);
    let mut changed = n.drain();
    changed.sort_unstable();
    assert_eq!(changed, vec![a.slot(), b.slot()]);
    assert_eq!(seg.flush_wakes(), 0, "a flush takes the pending set");
    // A process that was not armed at the flush is not sent anything; its next arm reports
    // what came meanwhile.
    assert!(a.append(b"z", true, Wake::Deferred).unwrap());
    assert_eq!(seg.flush_wakes(), 0);
    assert!(!fd_readable(n.fd(), 100));
    assert!(n.arm(false));
    assert_eq!(n.drain(), vec![a.slot()]);
    // Keep-alive bytes defer the same way.
    assert!(b.append(b": ping\n\n", false, Wake::Deferred).unwrap());
    assert!(!fd_readable(n.fd(), 100));
    assert_eq!(seg.flush_wakes(), 1);
    assert_eq!(n.drain(), vec![b.slot()]);
    // Closing the handle flushes what is pending.
    assert!(n.arm(false));
    assert!(a.append(b"last", true, Wake::Deferred).unwrap());
    seg.close();
    assert!(
        fd_readable(n.fd(), 10_000),
        "close flushed the deferred wake-up"
    );
}

#[test]
fn a_flush_except_own_sends_this_process_nothing_and_scan_slots_reports_only_the_named() {
    let t = TempSeg::new("notify-own");
    let (seg, a, b, n) = two_subscribed(&t);
    assert!(!n.arm(false), "a new notifier starts armed");
    assert!(a.append(b"x", true, Wake::Deferred).unwrap());
    assert!(b.append(b"y", true, Wake::Deferred).unwrap());
    // Our own row is the only subscriber: nothing is sent, and the row stays armed.
    assert_eq!(seg.flush_wakes_except_own(), 0);
    assert!(!fd_readable(n.fd(), 100));
    assert!(!n.arm(false), "still armed");
    // The producer names the slot it appended to: only that one is reported, once.
    assert_eq!(n.scan_slots(&[a.slot()]), vec![a.slot()]);
    assert_eq!(n.scan_slots(&[a.slot()]), Vec::<u32>::new());
    // An unsubscribed or out-of-range slot is skipped; b is still news to a full scan.
    assert_eq!(n.scan_slots(&[7, u32::MAX]), Vec::<u32>::new());
    assert_eq!(n.scan(false), vec![b.slot()]);
    // What the flush skipped is gone from the pending set: a plain flush sends nothing now.
    assert_eq!(seg.flush_wakes(), 0);
}

#[test]
fn append_headed_makes_its_header_from_the_offset_where_it_lands() {
    let t = TempSeg::new("headed");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let w = seg.create_or_replace("h", "").unwrap();
    assert!(w.write(b"abc").unwrap());
    let header = |start: u64| format!("<{start}>").into_bytes();
    assert!(w.append_headed(b"xy", header, true, Wake::Now).unwrap());
    assert!(w.append_headed(b"z", header, true, Wake::Deferred).unwrap());
    let mut r = seg.reader("h", "", 0).unwrap();
    let mut buf = [0u8; 64];
    let Ok(Poll::Data(n)) = r.read_into(&mut buf, None) else {
        panic!("no data")
    };
    assert_eq!(&buf[..n], b"abc<3>xy<8>z");
    // A writer that is no longer the producer appends nothing and makes no header.
    seg.evict("h", "", EndReason::Evicted).unwrap();
    let called = std::cell::Cell::new(false);
    let refused = w
        .append_headed(
            b"late",
            |_| {
                called.set(true);
                Vec::new()
            },
            true,
            Wake::Now,
        )
        .unwrap();
    assert!(!refused && !called.get());
}

#[test]
fn a_deferred_append_wakes_a_blocked_reader_at_once() {
    let t = TempSeg::new("notify-deferred-block");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let w = seg.create_or_replace("c", "").unwrap();
    let mut r = seg.reader("c", "", 0).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let b2 = barrier.clone();
    let h = std::thread::spawn(move || {
        b2.wait();
        let mut buf = [0u8; 8];
        // No flush ever comes: the futex wake of the append itself must end this read.
        match r.read_into(&mut buf, Some(Duration::from_secs(60))) {
            Ok(Poll::Data(n)) => buf[..n].to_vec(),
            other => panic!("{other:?}"),
        }
    });
    barrier.wait();
    std::thread::sleep(Duration::from_millis(50));
    assert!(w.append(b"now", true, Wake::Deferred).unwrap());
    assert_eq!(h.join().unwrap(), b"now");
}

/// A segment at a path of about 200 bytes (far more than a socket address holds): a notifier
/// in another process is woken by this one's append, and this one's by that process's.
#[test]
fn notifiers_wake_across_processes_at_a_segment_path_longer_than_a_socket_address() {
    let top = format!("/dev/shm/ringcast-test-deep-{}", common::rand_suffix());
    let parent = format!("{top}/{}/{}", "d".repeat(60), "e".repeat(60));
    std::fs::create_dir_all(&parent).unwrap();
    let path = format!("{parent}/{}", "s".repeat(200 - parent.len() - 1));
    assert_eq!(path.len(), 200);
    let seg = Segment::create(&path, cfg(4, 4096)).unwrap();
    let to_child = seg.create_or_replace("to-child", "").unwrap();
    // This process makes the wake directory; the child binds in it and sends into it.
    let n = seg.notifier().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "deep_path_wake_child",
            "--ignored",
            "--nocapture",
        ])
        .env("RINGCAST_WAKE_CHILD", &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = loop {
        let line = lines.next().expect("the child printed ready").unwrap();
        if let Some(rest) = line.strip_prefix("ready ") {
            break rest.to_string();
        }
    };
    let (slot, generation) = ready.split_once(' ').unwrap();
    let (slot, generation): (u32, u64) = (slot.parse().unwrap(), generation.parse().unwrap());
    n.subscribe(slot, generation).unwrap();
    // The child waits on its notifier until this append wakes it; then it appends to its
    // own session, which must wake this process's notifier.
    to_child.write(b"ping").unwrap();
    assert!(
        fd_readable(n.fd(), 60_000),
        "the child's append woke this process"
    );
    assert_eq!(n.drain(), vec![slot]);
    let status = child.wait().unwrap();
    assert!(status.success(), "child: {status}");
    let mut r = seg.reader("to-parent", "", 0).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(r.read_into(&mut buf, None), Ok(Poll::Data(4))));
    assert_eq!(&buf[..4], b"pong");
    drop(n);
    seg.unlink().unwrap();
    std::fs::remove_dir_all(&top).unwrap();
}

/// The other process of the test above: subscribes to "to-child", waits to be woken, then
/// appends to "to-parent".
#[test]
#[ignore = "a child process of notifiers_wake_across_processes_at_a_segment_path_longer_than_a_socket_address"]
fn deep_path_wake_child() {
    let Ok(path) = std::env::var("RINGCAST_WAKE_CHILD") else {
        return;
    };
    let seg = Segment::open(&path).unwrap();
    let to_parent = seg.create_or_replace("to-parent", "").unwrap();
    let n = seg.notifier().unwrap();
    let info = seg.get("to-child", "").unwrap();
    n.subscribe(info.slot, info.generation).unwrap();
    println!("ready {} {}", to_parent.slot(), to_parent.generation());
    assert!(fd_readable(n.fd(), 60_000), "the parent's append woke us");
    assert_eq!(n.drain(), vec![info.slot]);
    to_parent.write(b"pong").unwrap();
}

#[test]
fn notifier_reports_a_slot_reused_by_a_newer_session_before_the_drain() {
    let t = TempSeg::new("notify-reuse");
    let seg = Segment::create(&t.0, cfg(1, 4096)).unwrap();
    let old = seg.create_or_replace("a", "").unwrap();
    let n = seg.notifier().unwrap();
    n.subscribe(old.slot(), old.generation()).unwrap();
    assert!(n.drain().is_empty());
    // The old session leaves the slot and a newer one moves in (one slot: the same one), and
    // the newer session is subscribed before the loop drained: the old session's waiters must
    // still hear about the change.
    seg.evict("a", "", EndReason::Evicted).unwrap();
    let new = seg.create_or_replace("b", "").unwrap();
    assert_eq!(new.slot(), old.slot());
    n.subscribe(new.slot(), new.generation()).unwrap();
    assert!(fd_readable(n.fd(), 10_000));
    assert_eq!(n.drain(), vec![new.slot()]);
    assert!(n.arm(false));
    // One unsubscribe of the newer generation ends the subscription: nothing rings any more.
    n.unsubscribe(new.slot(), new.generation()).unwrap();
    new.write(b"x").unwrap();
    assert!(!fd_readable(n.fd(), 100));
    assert!(n.drain().is_empty());
}

#[test]
fn adopting_retires_the_previous_writer_even_in_the_same_process() {
    let t = TempSeg::new("adopt");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let a = seg.create_or_replace("c", "o").unwrap();
    assert!(a.write(b"A1").unwrap());
    let b = seg.adopt("c", "o", a.generation()).unwrap();
    assert!(
        !a.write(b"A2").unwrap(),
        "the creator's handle no longer appends"
    );
    assert!(b.write(b"B1").unwrap());
    let mut r = seg.reader("c", "o", 0).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(r.poll_into(&mut buf).unwrap(), Poll::Data(4));
    assert_eq!(&buf[..4], b"A1B1");
}

/// A blocking reader killed (SIGKILL) while asleep on the session's futex leaves its process's
/// mark in the slot's `waiting` (producers then pay a wake syscall per append for nobody);
/// the next process to claim its process entry clears it.
#[test]
fn a_reader_killed_while_waiting_is_forgotten_when_its_entry_is_claimed() {
    let t = TempSeg::new("waiter-kill");
    let seg = Segment::create(&t.0, cfg(4, 4096)).unwrap();
    let w = seg.create_or_replace("w", "").unwrap();
    let child = |role: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "waiter_child", "--ignored", "--nocapture"])
            .env("RINGCAST_WAITER_CHILD", format!("{role} {}", t.0))
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut blocked = child("wait");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seg.waiting_mask("w", "") == Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never waited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    blocked.kill().unwrap();
    blocked.wait().unwrap();
    // Dead, still marked: nobody of the dead process can clear it.
    assert_ne!(seg.waiting_mask("w", ""), Some(0));
    // A new process claims the free entry (the dead one's, the only one used).
    assert!(child("claim").wait().unwrap().success());
    assert_eq!(seg.waiting_mask("w", ""), Some(0));
    assert!(w.write(b"x").unwrap());
}

/// The other processes of the test above: `wait` blocks reading "w" (no timeout) until
/// killed; `claim` attaches a counted reader (which claims a process entry) and exits.
#[test]
#[ignore = "a child process of a_reader_killed_while_waiting_is_forgotten_when_its_entry_is_claimed"]
fn waiter_child() {
    let Ok(spec) = std::env::var("RINGCAST_WAITER_CHILD") else {
        return;
    };
    let (role, path) = spec.split_once(' ').unwrap();
    let seg = Segment::open(path).unwrap();
    let mut r = seg.reader("w", "", 0).unwrap();
    if role == "wait" {
        let mut buf = [0u8; 16];
        let _ = r.read_into(&mut buf, None);
    }
}
