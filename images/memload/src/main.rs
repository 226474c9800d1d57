//! memload: the stress load of the migration experiments, like `stress`.
//!
//! CPU: busy-loops at a given percent (duty cycle in 100 ms periods) on N threads.
//! RAM: allocates SIZE bytes, fills them once (so they are resident; half of each page
//! pseudo-random, half zero, compressing like a real heap to about half), then
//! rewrites RAM % of the pages over and over, which is what keeps a VM's
//! pre-copy migration from converging. Every heartbeat it prints a line with a
//! counter, the pages written per second and the totals; GET / on the status
//! port answers with the same numbers as JSON.
//!
//! Std only, with a hand-written minimal HTTP/1.1 server on std::net: the app
//! must be one static, dependency-free binary that runs in a scratch image.
//!
//! Configuration, arguments win over env:
//!   --cpu PCT      MEMLOAD_CPU          0..100 (default 0: idle)
//!   --threads N    MEMLOAD_CPU_THREADS  CPU threads (default: number of CPUs)
//!   --ram PCT      MEMLOAD_RAM          share of SIZE rewritten continuously (default 0)
//!   --size SIZE    MEMLOAD_SIZE         bytes, or with Ki/Mi/Gi (default 64Mi)
//!   --interval MS  MEMLOAD_INTERVAL_MS  heartbeat period (default 1000)
//!   --port PORT    MEMLOAD_PORT         status endpoint, 0 = none (default 8080)
//!   --disk-rate RATE  MEMLOAD_DISK_RATE   bytes per second written to files, with Ki/Mi
//!                  (default 0: none); the lab's vm-disk and container-volume paths
//!   --disk-dir DIR    MEMLOAD_DISK_DIR    where they go: the VM's disk or the
//!                  container's volume (default /data)
//!   --disk-size SIZE  MEMLOAD_DISK_SIZE   bytes kept there: 1 MiB segment files written
//!                  in turn, the oldest removed past SIZE, as a database's log does
//!                  (default 64Mi)
//!   --sleep-at-page-boundary  MEMLOAD_SLEEP_AT_PAGE_BOUNDARY=1
//!                  the main thread sleeps with its stack pointer on a page boundary
//!                  (x86_64): CRIU 4.2.1 as released then leaves no page of a lazy dump
//!                  lazy, and the lazy-move test checks that the CRIU away installs does

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PAGE: usize = 4096;

struct Settings {
    cpu: u64,
    threads: u64,
    ram: u64,
    size: u64,
    interval_ms: u64,
    port: u64,
    sleep_at_page_boundary: bool,
    disk_rate: u64,
    disk_dir: String,
    disk_size: u64,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) =
        [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)]
            .iter()
            .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
            .unwrap_or((s, 1));
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

fn settings() -> Result<Settings, String> {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mut values: Vec<(&str, String)> = Vec::new();
    for (flag, env) in [
        ("--cpu", "MEMLOAD_CPU"),
        ("--threads", "MEMLOAD_CPU_THREADS"),
        ("--ram", "MEMLOAD_RAM"),
        ("--size", "MEMLOAD_SIZE"),
        ("--interval", "MEMLOAD_INTERVAL_MS"),
        ("--port", "MEMLOAD_PORT"),
        ("--sleep-at-page-boundary", "MEMLOAD_SLEEP_AT_PAGE_BOUNDARY"),
        ("--disk-rate", "MEMLOAD_DISK_RATE"),
        ("--disk-dir", "MEMLOAD_DISK_DIR"),
        ("--disk-size", "MEMLOAD_DISK_SIZE"),
    ] {
        if let Ok(v) = std::env::var(env) {
            values.push((flag, v));
        }
    }
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "-h" || a == "--help" {
            println!(
                "usage: memload [--cpu PCT] [--threads N] [--ram PCT] [--size 256Mi] [--interval MS] [--port PORT] \
                 [--sleep-at-page-boundary] [--disk-rate 1Mi] [--disk-dir /data] [--disk-size 64Mi]"
            );
            std::process::exit(0);
        }
        if a == "--sleep-at-page-boundary" {
            values.push(("--sleep-at-page-boundary", "1".into()));
            continue;
        }
        let (flag, value) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), v.to_string()),
            None => (a.clone(), args.next().ok_or(format!("{a} needs a value"))?),
        };
        let known = [
            "--cpu",
            "--threads",
            "--ram",
            "--size",
            "--interval",
            "--port",
            "--sleep-at-page-boundary",
            "--disk-rate",
            "--disk-dir",
            "--disk-size",
        ];
        let flag = *known.iter().find(|k| **k == flag).ok_or(format!("unknown argument {flag}"))?;
        values.push((flag, value));
    }
    let get = |flag: &str, default: u64| -> Result<u64, String> {
        match values.iter().rev().find(|(f, _)| *f == flag) {
            None => Ok(default),
            Some((_, v)) if ["--size", "--disk-rate", "--disk-size"].contains(&flag) => {
                parse_size(v).ok_or(format!("{flag}: bad size {v:?} (e.g. 256Mi)"))
            }
            Some((_, v)) => v.trim().trim_end_matches('%').parse().map_err(|_| format!("{flag}: bad number {v:?}")),
        }
    };
    let s = Settings {
        cpu: get("--cpu", 0)?,
        threads: get("--threads", cpus)?.max(1),
        ram: get("--ram", 0)?,
        size: get("--size", 64 << 20)?,
        interval_ms: get("--interval", 1000)?.max(1),
        port: get("--port", 8080)?,
        sleep_at_page_boundary: get("--sleep-at-page-boundary", 0)? != 0,
        disk_rate: get("--disk-rate", 0)?,
        disk_dir: values.iter().rev().find(|(f, _)| *f == "--disk-dir").map_or("/data".into(), |(_, v)| v.clone()),
        disk_size: get("--disk-size", 64 << 20)?,
    };
    if s.disk_rate > 0 && s.disk_size < SEGMENT {
        return Err(format!("--disk-size must be at least one segment ({SEGMENT} bytes)"));
    }
    if s.cpu > 100 || s.ram > 100 {
        return Err("--cpu and --ram are percentages (0..100)".into());
    }
    if s.sleep_at_page_boundary && !cfg!(target_arch = "x86_64") {
        return Err("--sleep-at-page-boundary is for x86_64 only".into());
    }
    Ok(s)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Stats {
    disk_bytes: AtomicU64,
    tick: AtomicU64,
    pages_total: AtomicU64,
    pages_per_s: AtomicU64,
    passes: AtomicU64,
}

fn main() {
    sigterm::exit_on_term();
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("memload: {e}");
            std::process::exit(2);
        }
    };
    let pid = std::process::id();
    let started = unix_ms();
    println!(
        "memload: started pid={pid} cpu={}% threads={} ram={}% size={} interval_ms={} port={} disk_rate={} disk_dir={}",
        s.cpu, s.threads, s.ram, s.size, s.interval_ms, s.port, s.disk_rate, s.disk_dir
    );
    let stats = Arc::new(Stats {
        disk_bytes: AtomicU64::new(0),
        tick: AtomicU64::new(0),
        pages_total: AtomicU64::new(0),
        pages_per_s: AtomicU64::new(0),
        passes: AtomicU64::new(0),
    });

    if s.cpu > 0 {
        for _ in 0..s.threads {
            let pct = s.cpu;
            std::thread::spawn(move || cpu_load(pct));
        }
    }

    // Touch every page once so the whole SIZE is resident, as the experiments assume.
    // Half of each page is pseudo-random and half zero: real heaps compress to roughly
    // half, and a checkpoint of all-zero pages would flatter every compressor.
    let pages = (s.size as usize).div_ceil(PAGE);
    let mut mem = vec![0u8; pages * PAGE];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for p in 0..pages {
        for chunk in mem[p * PAGE..p * PAGE + PAGE / 2].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
    println!("memload: {} pages resident", pages);
    let hot = pages * s.ram as usize / 100;
    if hot > 0 {
        let stats = Arc::clone(&stats);
        std::thread::spawn(move || ram_load(mem, hot, &stats));
    } else {
        std::mem::forget(mem); // keep it resident for the lifetime of the process
    }

    if s.disk_rate > 0 {
        let stats = Arc::clone(&stats);
        let (dir, rate, size) = (std::path::PathBuf::from(&s.disk_dir), s.disk_rate, s.disk_size);
        std::thread::spawn(move || {
            if let Err(e) = disk_load(&dir, rate, size, &stats) {
                eprintln!("memload: disk writes stopped: {e}");
            }
        });
    }

    if s.port > 0 {
        match TcpListener::bind(("0.0.0.0", s.port as u16)) {
            Ok(l) => {
                let stats = Arc::clone(&stats);
                let (cpu, ram, size) = (s.cpu, s.ram, s.size);
                std::thread::spawn(move || {
                    for mut conn in l.incoming().flatten() {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut line = String::new();
                        let mut r = BufReader::new(&conn);
                        while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                            line.clear();
                        }
                        let body = format!(
                            "{{\"pid\":{pid},\"started_unix_ms\":{started},\"tick\":{},\"cpu_percent\":{cpu},\"ram_percent\":{ram},\"size\":{size},\"pages_per_s\":{},\"pages_total\":{},\"passes\":{}}}\n",
                            stats.tick.load(Ordering::Relaxed),
                            stats.pages_per_s.load(Ordering::Relaxed),
                            stats.pages_total.load(Ordering::Relaxed),
                            stats.passes.load(Ordering::Relaxed)
                        );
                        let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    }
                });
            }
            Err(e) => eprintln!("memload: status endpoint off: cannot listen on port {}: {e}", s.port),
        }
    }

    let mut last_total = 0;
    let mut last = Instant::now();
    loop {
        let interval = Duration::from_millis(s.interval_ms);
        if s.sleep_at_page_boundary {
            page_boundary::sleep(interval);
        } else {
            std::thread::sleep(interval);
        }
        let tick = stats.tick.fetch_add(1, Ordering::Relaxed) + 1;
        let total = stats.pages_total.load(Ordering::Relaxed);
        let secs = last.elapsed().as_secs_f64().max(1e-6);
        let rate = ((total - last_total) as f64 / secs) as u64;
        stats.pages_per_s.store(rate, Ordering::Relaxed);
        (last_total, last) = (total, Instant::now());
        println!(
            "memload: tick={tick} unix_ms={} pages_per_s={rate} pages_total={total} passes={} disk_bytes={}",
            unix_ms(),
            stats.passes.load(Ordering::Relaxed),
            stats.disk_bytes.load(Ordering::Relaxed)
        );
    }
}

/// Busy for `pct` of every 100 ms period, asleep for the rest.
fn cpu_load(pct: u64) {
    let period = Duration::from_millis(100);
    let busy = period * pct as u32 / 100;
    let mut x = 0u64;
    loop {
        let start = Instant::now();
        while start.elapsed() < busy {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        if busy < period {
            std::thread::sleep(period - busy);
        }
    }
}

/// Rewrite one byte in each of the first `hot` pages, forever: every write dirties a page.
fn ram_load(mut mem: Vec<u8>, hot: usize, stats: &Stats) {
    let mut value = 0u8;
    loop {
        value = value.wrapping_add(1);
        for chunk in 0..hot.div_ceil(256) {
            let end = ((chunk + 1) * 256).min(hot);
            for p in chunk * 256..end {
                mem[p * PAGE] = value;
            }
            stats.pages_total.fetch_add((end - chunk * 256) as u64, Ordering::Relaxed);
        }
        std::hint::black_box(&mem);
        stats.passes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Size of one segment file of the disk load.
const SEGMENT: u64 = 1 << 20;
/// One write of the disk load (then `fdatasync`, so a VM's writes reach its disk now).
const BLOCK: usize = 64 << 10;

/// Write `rate` bytes per second into segment files `seg-NNNNNNNN` of `dir`, keeping
/// at most `size` bytes of them (the oldest removed), forever. Each block is half
/// pseudo-random, half zero, as the memory is.
fn disk_load(dir: &std::path::Path, rate: u64, size: u64, stats: &Stats) -> Result<(), String> {
    use std::io::Write as _;
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let keep = size / SEGMENT;
    let seg_path = |n: u64| dir.join(format!("seg-{n:08}"));
    let mut block = vec![0u8; BLOCK];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let started = Instant::now();
    let (mut written, mut seg, mut in_seg) = (0u64, 0u64, 0u64);
    let mut file = std::fs::File::create(seg_path(0)).map_err(|e| format!("create {}: {e}", seg_path(0).display()))?;
    loop {
        for chunk in block[..BLOCK / 2].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        file.write_all(&block)
            .and_then(|_| file.sync_data())
            .map_err(|e| format!("write {}: {e}", seg_path(seg).display()))?;
        written += BLOCK as u64;
        in_seg += BLOCK as u64;
        stats.disk_bytes.store(written, Ordering::Relaxed);
        if in_seg >= SEGMENT {
            seg += 1;
            in_seg = 0;
            file =
                std::fs::File::create(seg_path(seg)).map_err(|e| format!("create {}: {e}", seg_path(seg).display()))?;
            if seg >= keep {
                let _ = std::fs::remove_file(seg_path(seg - keep));
            }
        }
        // paced on the total, so a slow write is caught up rather than lost
        let due = Duration::from_secs_f64(written as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// The doctor's CRIU stack-page probe has the same sleep: one file, included by path
/// (std only, so memload stays dependency-free).
#[allow(unsafe_code)]
#[path = "../../../crates/away-runtime/src/host/page_boundary.rs"]
mod page_boundary;

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
