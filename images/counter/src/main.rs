//! counter: counts in memory and serves the count over HTTP and to its log.
//!
//! It is the proof that a migration kept the state: the count, the start time
//! and the pid live only in this process's memory, so after a checkpoint/restore
//! or a VM live migration the count continues instead of starting at 0.
//!
//! Std only, with a hand-written minimal HTTP/1.1 server on std::net: the app
//! must be one static, dependency-free binary that runs in a scratch image.
//!
//! Configuration (env): COUNTER_PORT (8080; 0: serve nothing), COUNTER_INTERVAL_MS (100),
//! COUNTER_LOG_EVERY (10: one log line per second at the default interval).
//!
//! With COUNTER_VOLUME=DIR (a volume) it also writes there, every COUNTER_VOLUME_MS (50):
//! a new file `f-NNNNNN` ([`volume_file`]: `N` and the start time, 4 KiB, written under
//! another name and renamed, so a file is there whole or not at all) and one line `N`
//! appended to `grow.log` (kept open); at start, COUNTER_VOLUME_PRELOAD_KIB (0) KiB of
//! pseudo-random bytes in `preload.bin`. The proof that a move carried the volume.
//!
//! GET /      -> JSON {"count":..,"pid":..,"started_unix_ms":..,...}
//! GET /count -> the count as text
//! GET /stream -> keeps the connection open and writes `1\n`, `2\n`, … one line per
//!               interval: a client that sees every number once, in order, knows that
//!               no byte of the connection was lost or repeated (across a migration)

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct State {
    count: AtomicU64,
    pid: u32,
    started_unix_ms: u64,
    interval_ms: u64,
}

impl State {
    fn json(&self) -> String {
        format!(
            "{{\"count\":{},\"pid\":{},\"started_unix_ms\":{},\"now_unix_ms\":{},\"interval_ms\":{}}}\n",
            self.count.load(Ordering::SeqCst),
            self.pid,
            self.started_unix_ms,
            unix_ms(),
            self.interval_ms
        )
    }
}

fn main() {
    sigterm::exit_on_term();
    let port = env_u64("COUNTER_PORT", 8080);
    let state = Arc::new(State {
        count: AtomicU64::new(0),
        pid: std::process::id(),
        started_unix_ms: unix_ms(),
        interval_ms: env_u64("COUNTER_INTERVAL_MS", 100).max(1),
    });
    let log_every = env_u64("COUNTER_LOG_EVERY", 10).max(1);
    if let Ok(dir) = std::env::var("COUNTER_VOLUME") {
        let (every, started) = (env_u64("COUNTER_VOLUME_MS", 50).max(1), state.started_unix_ms);
        let preload = env_u64("COUNTER_VOLUME_PRELOAD_KIB", 0);
        if let Err(e) = volume::prepare(&dir, preload) {
            eprintln!("counter: cannot write {dir}: {e}");
            std::process::exit(1);
        }
        std::thread::spawn(move || volume::write_forever(&dir, every, started));
    }
    if port == 0 {
        println!("counter: started pid={} (no port)", state.pid);
        tick(&state, log_every);
    }
    let listener = match TcpListener::bind(("0.0.0.0", port as u16)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("counter: cannot listen on 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "counter: started pid={} started_unix_ms={} port={port} interval_ms={}",
        state.pid, state.started_unix_ms, state.interval_ms
    );

    let ticker = Arc::clone(&state);
    std::thread::spawn(move || tick(&ticker, log_every));

    for conn in listener.incoming().flatten() {
        let state = Arc::clone(&state);
        std::thread::spawn(move || serve(conn, &state));
    }
}

fn tick(state: &State, log_every: u64) -> ! {
    loop {
        std::thread::sleep(Duration::from_millis(state.interval_ms));
        let n = state.count.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(log_every) {
            println!("counter: count={n} pid={} unix_ms={}", state.pid, unix_ms());
        }
    }
}

/// What the counter writes into its volume (COUNTER_VOLUME).
mod volume {
    use std::io::Write;
    use std::path::Path;
    use std::time::Duration;

    /// The bytes of file `f-NNNNNN`: the line `N STARTED` repeated to 4 KiB.
    pub fn volume_file(n: u64, started_unix_ms: u64) -> Vec<u8> {
        let line = format!("{n} {started_unix_ms}\n");
        line.bytes().cycle().take(4096).collect()
    }

    /// `preload.bin` (`kib` KiB of xorshift bytes: incompressible), when asked for.
    pub fn prepare(dir: &str, kib: u64) -> std::io::Result<()> {
        if kib == 0 {
            return Ok(());
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut bytes = Vec::with_capacity((kib * 1024) as usize);
        while bytes.len() < (kib * 1024) as usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(Path::new(dir).join("preload.bin"), bytes)
    }

    pub fn write_forever(dir: &str, every_ms: u64, started_unix_ms: u64) {
        let dir = Path::new(dir);
        let grow = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("grow.log"));
        let mut grow = match grow {
            Ok(f) => f,
            Err(e) => {
                eprintln!("counter: cannot open {}/grow.log: {e}", dir.display());
                std::process::exit(1);
            }
        };
        for n in 1u64.. {
            std::thread::sleep(Duration::from_millis(every_ms));
            let (tmp, path) = (dir.join(".tmp"), dir.join(format!("f-{n:06}")));
            let written = std::fs::write(&tmp, volume_file(n, started_unix_ms))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .and_then(|()| writeln!(grow, "{n}"));
            if let Err(e) = written {
                eprintln!("counter: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}

fn serve(mut conn: TcpStream, state: &State) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip headers: this server needs none of them.
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if (method, path) == ("GET", "/stream") {
        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n");
        for n in 1u64.. {
            if writeln!(conn, "{n}").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(state.interval_ms));
        }
    }
    let (status, ctype, body) = match (method, path) {
        ("GET", "/") | ("GET", "/state") => ("200 OK", "application/json", state.json()),
        ("GET", "/count") => ("200 OK", "text/plain", format!("{}\n", state.count.load(Ordering::SeqCst))),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".into()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found: try / or /count\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Exit at once on SIGTERM/SIGINT. As PID 1 of a container the process gets no
/// default signal actions, so without a handler `docker stop` waits 10 s and
/// kills it. std has no signal API; the C library's `signal` (which std links
/// anyway) is enough for "exit now" and keeps the app free of dependencies.
#[allow(unsafe_code)]
mod sigterm {
    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }
    extern "C" fn on_term(_: i32) {
        // SAFETY: _exit is async-signal-safe and takes no pointers; nothing needs
        // flushing (stdout is line-buffered).
        unsafe { _exit(0) }
    }
    pub fn exit_on_term() {
        // SAFETY: on_term is an `extern "C" fn(i32)` that only calls _exit, the
        // handler signal(2) expects; SIGTERM and SIGINT may be caught.
        unsafe {
            signal(15, on_term);
            signal(2, on_term);
        }
    }
}
