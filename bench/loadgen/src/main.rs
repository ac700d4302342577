//! `ringcast-loadgen`: the measuring client of `bench/http_fanout.py`.
//!
//! It opens S streams × R readers over HTTP/1.1 exactly as the Python client of that script
//! does (per stream: one `POST /v1/chat/completions` with `X-Conversation-Id`, and once its
//! response head has arrived, R − 1 `GET /v1/stream?conv_id=…&from=0`), de-chunks every
//! response as bytes arrive, and takes the producer-to-client latency of every event: each
//! event's `"content":"<ns>"` is the producer's (or its schedule's) `CLOCK_REALTIME`, the
//! arrival time is read once per `read(2)`.
//!
//! Why a second client: on a 2-core machine the client shares the cores with the servers it
//! measures. The Python client spends ~1 µs of CPU per event; at a million events per second it
//! is the bottleneck of every system and hides the servers' differences. This one spends about
//! a tenth of that, so the servers, not the client, set the figures. One thread, one epoll
//! loop, level-triggered, one `read` per ready connection per pass (every connection is served
//! in turn, as a fair client would).
//!
//! Output: one JSON object on stdout (events, bytes, arrival span, latency percentiles, the
//! client's own CPU seconds). Errors (a non-200 response, a stream that ends early, a timeout)
//! go to stderr with exit status 1.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use memchr::memmem;

const USAGE: &str = "\
usage: ringcast-loadgen --port PORT [--host 127.0.0.1] [--streams 8] [--readers 16]
                        [--tokens 200] [--timeout-s 300] [--run-id ID] [--timeline FILE]
                        [--read-port PORT]

Opens STREAMS x READERS HTTP/1.1 connections to an OpenAI-compatible streaming server with
ringcast's resume routes: per stream one POST /v1/chat/completions (X-Conversation-Id:
bench-<run-id>-<s>, max_tokens = TOKENS) and, once its response head is in, READERS - 1
GET /v1/stream?conv_id=<id>&from=0. Every event whose delta content is a decimal
CLOCK_REALTIME nanosecond stamp counts; its latency is arrival - stamp.

Prints one JSON object: events, bytes, span_s (first to last arrival of an event),
p50_ms p90_ms p99_ms p999_ms max_ms, cpu_s (this process, user + system), wait_s (time it
was runnable but waiting for a CPU).
--read-port PORT sends the GETs to another server (another node of a cluster sharing
Redis with the first: cross-node fan-out); before a stream's GETs it polls that server's
POST /v1/streams/lookup every 2 ms until the stream is there (at most 10 s).
--timeline FILE writes a CSV of the run in 10 ms steps of arrival time (from the first
connect): t_s, events, max_latency_ms (empty when no event arrived in that step).
Exit status 1 with a message on stderr if any response is not 200, ends before its last
chunk, or the run exceeds --timeout-s.";

struct Args {
    host: String,
    port: u16,
    streams: usize,
    readers: usize,
    tokens: u64,
    timeout: Duration,
    run_id: String,
    timeline: Option<String>,
    /// Where the GETs go (`--read-port`); `port` if absent.
    read_port: Option<u16>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 0,
        streams: 8,
        readers: 16,
        tokens: 200,
        timeout: Duration::from_secs(300),
        run_id: std::process::id().to_string(),
        timeline: None,
        read_port: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |what: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("{what} must be a non-negative integer, got {value:?}"))
        };
        match flag.as_str() {
            "--host" => a.host = value.clone(),
            "--port" => {
                a.port = u16::try_from(num("--port")?)
                    .map_err(|_| format!("--port out of range: {value}"))?
            }
            "--streams" => a.streams = num("--streams")? as usize,
            "--readers" => a.readers = num("--readers")? as usize,
            "--tokens" => a.tokens = num("--tokens")?,
            "--timeout-s" => a.timeout = Duration::from_secs(num("--timeout-s")?),
            "--timeline" => a.timeline = Some(value.clone()),
            "--read-port" => {
                a.read_port = Some(
                    u16::try_from(num("--read-port")?)
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| format!("--read-port out of range: {value}"))?,
                )
            }
            "--run-id" => {
                if value.is_empty()
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(format!("--run-id must be [A-Za-z0-9_-]+, got {value:?}"));
                }
                a.run_id = value.clone()
            }
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    if a.port == 0 {
        return Err("--port is required".into());
    }
    if a.streams == 0 || a.readers == 0 {
        return Err("--streams and --readers must be at least 1".into());
    }
    Ok(a)
}

fn realtime_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Seconds this thread has spent runnable but waiting for a CPU (`/proc/thread-self/schedstat`,
/// second field); 0 where the kernel does not keep schedstats.
fn runqueue_wait_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF is always accepted.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Where a response's body is: chunked (both kinds of server this measures) or, without
/// `Transfer-Encoding: chunked`, everything up to the close.
#[derive(PartialEq)]
enum Framing {
    Head,
    Chunked,
    UntilClose,
}

/// One connection: its socket and what is left of the bytes not yet decoded.
struct Conn {
    sock: TcpStream,
    stream: usize,
    is_post: bool,
    framing: Framing,
    /// Undecoded bytes: a partial head or chunk-size line.
    raw: Vec<u8>,
    /// Decoded body after the last complete event.
    body: Vec<u8>,
    /// Payload bytes left in the current chunk.
    left: usize,
    /// Framing bytes (the CRLF after a chunk) still to skip.
    skip: usize,
    finished: bool,
}

impl Conn {
    fn new(sock: TcpStream, stream: usize, is_post: bool) -> Self {
        Conn {
            sock,
            stream,
            is_post,
            framing: Framing::Head,
            raw: Vec::new(),
            body: Vec::new(),
            left: 0,
            skip: 0,
            finished: false,
        }
    }

    fn describe(&self) -> String {
        let what = if self.is_post { "POST" } else { "GET" };
        format!("stream {} {what}", self.stream)
    }
}

const TIMELINE_STEP: Duration = Duration::from_millis(10);

/// What the client saw.
struct Stats {
    latencies_ns: Vec<i64>,
    /// Per TIMELINE_STEP of arrival time since `start`: events, and their largest latency.
    timeline: Vec<(u64, i64)>,
    start: Instant,
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    content: memmem::Finder<'static>,
}

impl Stats {
    fn new(capacity: usize) -> Self {
        Stats {
            latencies_ns: Vec::with_capacity(capacity),
            timeline: Vec::new(),
            start: Instant::now(),
            bytes: 0,
            first: None,
            last: None,
            content: memmem::Finder::new(b"\"content\":\"").into_owned(),
        }
    }

    /// Counts the complete events at the start of `body` (through its last blank line) and
    /// removes them.
    fn take_events(&mut self, body: &mut Vec<u8>, now_ns: i64, now: Instant) {
        let Some(end) = memmem::rfind(body, b"\n\n") else {
            return;
        };
        let complete = &body[..end + 2];
        let before = self.latencies_ns.len();
        for at in self.content.find_iter(complete) {
            let digits = &complete[at + b"\"content\":\"".len()..];
            let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
            if n == 0 || digits.get(n) != Some(&b'"') {
                continue;
            }
            // At most 19 digits fit an i64; more is not a stamp of ours.
            if let Some(stamp) = std::str::from_utf8(&digits[..n])
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            {
                self.latencies_ns.push(now_ns - stamp);
            }
        }
        if self.latencies_ns.len() > before {
            let step = ((now - self.start).as_nanos() / TIMELINE_STEP.as_nanos()) as usize;
            if self.timeline.len() <= step {
                self.timeline.resize(step + 1, (0, i64::MIN));
            }
            let worst = self.latencies_ns[before..]
                .iter()
                .copied()
                .max()
                .unwrap_or(0);
            let slot = &mut self.timeline[step];
            slot.0 += (self.latencies_ns.len() - before) as u64;
            slot.1 = slot.1.max(worst);
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
        self.bytes += complete.len() as u64;
        body.drain(..end + 2);
    }
}

/// Decodes `data` (just read from `c`); returns an error for a response that is not a 200.
fn feed(
    c: &mut Conn,
    data: &[u8],
    stats: &mut Stats,
    now_ns: i64,
    now: Instant,
) -> Result<(), String> {
    let mut owned;
    let mut raw: &[u8] = if c.raw.is_empty() {
        data
    } else {
        owned = std::mem::take(&mut c.raw);
        owned.extend_from_slice(data);
        &owned
    };
    if c.framing == Framing::Head {
        let Some(i) = memmem::find(raw, b"\r\n\r\n") else {
            c.raw = raw.to_vec();
            return Ok(());
        };
        let head = &raw[..i];
        if !head.starts_with(b"HTTP/1.1 200") {
            let shown = String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned();
            return Err(format!("{}: bad response: {shown:?}", c.describe()));
        }
        let lower = head.to_ascii_lowercase();
        c.framing = if memmem::find(&lower, b"transfer-encoding: chunked").is_some() {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
        raw = &raw[i + 4..];
    }
    if c.framing == Framing::UntilClose {
        c.body.extend_from_slice(raw);
        stats.take_events(&mut c.body, now_ns, now);
        return Ok(());
    }
    let (mut pos, n) = (0usize, raw.len());
    while pos < n && !c.finished {
        if c.skip > 0 {
            let step = c.skip.min(n - pos);
            pos += step;
            c.skip -= step;
        } else if c.left > 0 {
            let step = c.left.min(n - pos);
            c.body.extend_from_slice(&raw[pos..pos + step]);
            pos += step;
            c.left -= step;
            if c.left == 0 {
                c.skip = 2;
            }
        } else {
            let Some(j) = memmem::find(&raw[pos..], b"\r\n") else {
                break;
            };
            let line = &raw[pos..pos + j];
            let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
            let size = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                .ok_or_else(|| {
                    format!(
                        "{}: bad chunk-size line {:?}",
                        c.describe(),
                        String::from_utf8_lossy(line)
                    )
                })?;
            pos += j + 2;
            if size == 0 {
                c.finished = true;
            }
            c.left = size;
        }
    }
    if pos < n && !c.finished {
        c.raw = raw[pos..].to_vec();
    }
    stats.take_events(&mut c.body, now_ns, now);
    Ok(())
}

struct Epoll(libc::c_int);

impl Epoll {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain system call without pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Epoll(fd))
    }

    fn ctl(&self, op: libc::c_int, fd: libc::c_int, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event that outlives the call; `fd` is an open socket
        // owned by a live `Conn` (the caller deletes it before the socket is dropped).
        if unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> std::io::Result<usize> {
        // SAFETY: `events` is a writable buffer of `events.len()` epoll_events; the kernel
        // writes at most that many.
        let n = unsafe {
            libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        Ok(n as usize)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: `self.0` is the epoll descriptor this value owns; it is closed once.
        unsafe { libc::close(self.0) };
    }
}

struct Run<'a> {
    args: &'a Args,
    epoll: Epoll,
    conns: Vec<Option<Conn>>,
    open: usize,
    body: Vec<u8>,
}

impl Run<'_> {
    fn conv(&self, stream: usize) -> String {
        format!("bench-{}-{stream}", self.args.run_id)
    }

    fn connect(&mut self, stream: usize, is_post: bool) -> Result<(), String> {
        let conv = self.conv(stream);
        let mut req = if is_post {
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Conversation-Id: {conv}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                self.body.len()
            )
            .into_bytes()
        } else {
            format!(
                "GET /v1/stream?conv_id={conv}&from=0 HTTP/1.1\r\nHost: x\r\n\
                 Connection: close\r\n\r\n"
            )
            .into_bytes()
        };
        if is_post {
            req.extend_from_slice(&self.body);
        }
        let what = if is_post { "POST" } else { "GET" };
        let port = match self.args.read_port {
            Some(p) if !is_post => p,
            _ => self.args.port,
        };
        let mut sock = TcpStream::connect((self.args.host.as_str(), port))
            .map_err(|e| format!("stream {stream} {what}: connect: {e}"))?;
        sock.write_all(&req)
            .map_err(|e| format!("stream {stream} {what}: send request: {e}"))?;
        sock.set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        let token = self.conns.len() as u64;
        self.epoll
            .ctl(libc::EPOLL_CTL_ADD, sock.as_raw_fd(), token)
            .map_err(|e| format!("epoll_ctl: {e}"))?;
        self.conns.push(Some(Conn::new(sock, stream, is_post)));
        self.open += 1;
        Ok(())
    }

    /// Blocks until the `--read-port` server's lookup finds `stream` (it learns of a stream
    /// produced elsewhere through Redis, a flush window after its POST), at most 10 s.
    fn await_remote(&self, stream: usize, port: u16) -> Result<(), String> {
        let conv = self.conv(stream);
        let body = format!("{{\"conversation_ids\":[\"{conv}\"]}}");
        let req = format!(
            "POST /v1/streams/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut sock = TcpStream::connect((self.args.host.as_str(), port))
                .map_err(|e| format!("stream {stream} lookup: connect: {e}"))?;
            sock.write_all(req.as_bytes())
                .map_err(|e| format!("stream {stream} lookup: send: {e}"))?;
            let mut resp = Vec::new();
            sock.read_to_end(&mut resp)
                .map_err(|e| format!("stream {stream} lookup: read: {e}"))?;
            if memmem::find(&resp, conv.as_bytes()).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "stream {stream}: not found on --read-port {port} within 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn close(&mut self, token: usize) {
        if let Some(c) = self.conns[token].take() {
            let _ = self
                .epoll
                .ctl(libc::EPOLL_CTL_DEL, c.sock.as_raw_fd(), token as u64);
            self.open -= 1;
        }
    }
}

fn run(args: &Args) -> Result<String, String> {
    let body = format!(
        "{{\"model\":\"m\",\"stream\":true,\"max_tokens\":{},\
         \"messages\":[{{\"role\":\"user\",\"content\":\"bench\"}}]}}",
        args.tokens
    )
    .into_bytes();
    let mut r = Run {
        args,
        epoll: Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?,
        conns: Vec::with_capacity(args.streams * args.readers),
        open: 0,
        body,
    };
    let mut stats =
        Stats::new((args.streams * args.readers).saturating_mul(args.tokens.min(1 << 20) as usize));
    let (cpu0, wait0) = (cpu_seconds(), runqueue_wait_seconds());
    let deadline = Instant::now() + args.timeout;
    // Streams start one after another: the next POST goes out once the previous stream's
    // readers are attached (the Python client does the same).
    let mut next_stream = 0usize;
    r.connect(next_stream, true)?;
    next_stream += 1;
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    while r.open > 0 || next_stream < args.streams {
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {} s with {} of {} connections unfinished",
                args.timeout.as_secs(),
                r.open,
                args.streams * args.readers
            ));
        }
        let n = r
            .epoll
            .wait(&mut events, 1000)
            .map_err(|e| format!("epoll_wait: {e}"))?;
        for ev in &events[..n] {
            let token = ev.u64 as usize;
            let Some(c) = r.conns[token].as_mut() else {
                continue;
            };
            let got = match c.sock.read(&mut buf) {
                Ok(k) => k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("{}: read: {e}", c.describe())),
            };
            let now_ns = realtime_ns();
            let now = Instant::now();
            if got == 0 {
                if c.framing == Framing::UntilClose {
                    r.close(token);
                    continue;
                }
                return Err(format!(
                    "{}: closed before the end of the stream",
                    c.describe()
                ));
            }
            let was_head = c.framing == Framing::Head;
            feed(c, &buf[..got], &mut stats, now_ns, now)?;
            let (stream, is_post, head_in, finished) =
                (c.stream, c.is_post, c.framing != Framing::Head, c.finished);
            if finished {
                r.close(token);
            }
            if is_post && was_head && head_in {
                if let (Some(port), true) = (args.read_port, args.readers > 1) {
                    r.await_remote(stream, port)?;
                }
                for _ in 1..args.readers {
                    r.connect(stream, false)?;
                }
                if next_stream < args.streams {
                    r.connect(next_stream, true)?;
                    next_stream += 1;
                }
            }
        }
    }
    let cpu = cpu_seconds() - cpu0;
    let wait = runqueue_wait_seconds() - wait0;
    if let Some(path) = &args.timeline {
        let mut csv = String::from("t_s,events,max_latency_ms\n");
        for (i, &(n, worst)) in stats.timeline.iter().enumerate() {
            let t = (i as u128 * TIMELINE_STEP.as_nanos()) as f64 / 1e9;
            if n == 0 {
                csv += &format!("{t:.2},0,\n");
            } else {
                csv += &format!("{t:.2},{n},{:.3}\n", worst as f64 / 1e6);
            }
        }
        std::fs::write(path, csv).map_err(|e| format!("--timeline {path}: {e}"))?;
    }
    let lat = &mut stats.latencies_ns;
    lat.sort_unstable();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e6
    };
    let span = match (stats.first, stats.last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let json_num = |v: f64| {
        if v.is_finite() {
            format!("{v:.6}")
        } else {
            "null".into()
        }
    };
    Ok(format!(
        "{{\"events\": {}, \"bytes\": {}, \"span_s\": {}, \"p50_ms\": {}, \"p90_ms\": {}, \
         \"p99_ms\": {}, \"p999_ms\": {}, \"max_ms\": {}, \"cpu_s\": {}, \"wait_s\": {}}}",
        lat.len(),
        stats.bytes,
        json_num(span),
        json_num(q(0.5)),
        json_num(q(0.9)),
        json_num(q(0.99)),
        json_num(q(0.999)),
        json_num(lat.last().map_or(f64::NAN, |&v| v as f64 / 1e6)),
        json_num(cpu),
        json_num(wait),
    ))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ringcast-loadgen: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringcast-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Stats {
        Stats::new(0)
    }

    fn conn() -> (Conn, std::net::TcpListener) {
        // A real socket only because `Conn` owns one; nothing is read from it here.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let sock = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        (Conn::new(sock, 0, true), l)
    }

    /// The error `feed` gives for `response`.
    fn feed_error(response: &[u8]) -> String {
        let (mut c, _l) = conn();
        feed(&mut c, response, &mut stats(), 0, Instant::now()).expect_err("an error")
    }

    fn event(stamp: &str) -> Vec<u8> {
        format!("id: 1\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\"{stamp}\"}}}}]}}\n\n")
            .into_bytes()
    }

    /// A chunked response: events split over chunks of `chunk` bytes, then `[DONE]` and the
    /// last chunk; its body holds `stamps.len()` stamped events and one role event without.
    fn response(stamps: &[&str], chunk: usize) -> Vec<u8> {
        let mut body = b"data: {\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}\n\n".to_vec();
        for s in stamps {
            body.extend(event(s));
        }
        body.extend_from_slice(b"data: [DONE]\n\n");
        let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        for piece in body.chunks(chunk) {
            out.extend(format!("{:x};ext=1\r\n", piece.len()).into_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn every_split_of_a_chunked_response_gives_the_same_events() {
        let stamps = ["1000", "2000", "3000", "12345678901234567"];
        for chunk in [1, 7, 64, 4096] {
            let whole = response(&stamps, chunk);
            for split in 0..=whole.len() {
                let (mut c, _l) = conn();
                let mut st = stats();
                let now = Instant::now();
                feed(&mut c, &whole[..split], &mut st, 10_000, now).expect("first part");
                feed(&mut c, &whole[split..], &mut st, 10_000, now).expect("second part");
                assert!(
                    c.finished,
                    "chunk {chunk} split {split}: the last chunk ends it"
                );
                let mut lat = st.latencies_ns.clone();
                lat.sort_unstable();
                assert_eq!(
                    lat,
                    vec![10_000 - 12345678901234567, 7_000, 8_000, 9_000],
                    "chunk {chunk} split {split}"
                );
                assert!(c.body.is_empty() && c.raw.is_empty());
            }
        }
    }

    #[test]
    fn a_non_200_response_is_an_error_that_shows_it() {
        let err = feed_error(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}");
        assert!(err.contains("404 Not Found"), "{err}");
    }

    #[test]
    fn a_bad_chunk_size_is_an_error() {
        let err = feed_error(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert!(err.contains("bad chunk-size line \"zz\""), "{err}");
    }

    #[test]
    fn content_that_is_not_a_stamp_is_not_counted() {
        let (mut c, _l) = conn();
        let mut st = stats();
        let body = b"data: {\"content\":\"12a\"}\n\ndata: {\"content\":\"\"}\n\n\
                     data: {\"content\":\"99999999999999999999999\"}\n\ndata: {\"content\":\"5\"}\n\n";
        let mut resp = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        resp.extend_from_slice(body);
        feed(&mut c, &resp, &mut st, 7, Instant::now()).expect("until close");
        assert_eq!(st.latencies_ns, vec![2]);
        assert_eq!(st.bytes, body.len() as u64);
    }
}
