//! `cargo bench -p away-image`: build time and size of each lab app's image and
//! VM boot artifact. Plain `main` (harness = false): the numbers are wall times
//! of whole builds, printed with the setup they were measured on.

use std::path::Path;
use std::time::{Duration, Instant};

use away_image::{build, write_vm_artifact, BuildOptions, VmOptions};

const RUNS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("setup: {cpu}, {cores} cores, {rustc}; bench profile; median of {RUNS} runs after one warm-up");
    println!("       first = first build incl. compiling the app if needed; build = recipe + cargo build (warm, no-op) + layer tar/gzip + write image tar; vm = flatten + initramfs (gzip cpio) + kernel copy");
    let quiet = |_: &str| {};
    let opts = BuildOptions { cargo_quiet: true, ..BuildOptions::default() };
    let vm_opts = VmOptions::default();
    let have_guest = vm_opts.kernel.exists() && vm_opts.modules_dir.is_dir() && vm_opts.busybox.exists();
    let out = tempfile::tempdir().expect("temp dir");
    println!(
        "{:<8} {:>9} {:>9} {:>12} {:>14} {:>7} {:>12}",
        "app", "first ms", "build ms", "image bytes", "layer uncomp.", "vm ms", "initrd bytes"
    );
    for app in ["counter", "memload", "labdesk"] {
        let ctx = root.join(app);
        // Warm-up: compiles the app if needed (cold when target/ has no build of it yet),
        // so that the timed runs measure the image build, not rustc.
        let t = Instant::now();
        let built = build(&ctx, &opts, &quiet).expect("build");
        let first = t.elapsed();
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            let b = build(&ctx, &opts, &quiet).expect("build");
            b.image.write_tar(&out.path().join(format!("{app}.tar"))).expect("write");
            times.push(t.elapsed());
        }
        let size = std::fs::metadata(out.path().join(format!("{app}.tar"))).map(|m| m.len()).unwrap_or(0);
        let uncompressed: u64 = built.image.layers.iter().map(|l| l.tar_stats().map(|s| s.0).unwrap_or(0)).sum();
        let (vm_ms, initrd) = if have_guest {
            let mut vt = Vec::new();
            let mut bytes = 0;
            for _ in 0..RUNS {
                let t = Instant::now();
                let a = write_vm_artifact(&built.image, app, out.path(), &vm_opts, &quiet).expect("vm artifact");
                vt.push(t.elapsed());
                bytes = a.spec.initrd_bytes;
            }
            (format!("{}", median(vt).as_millis()), bytes.to_string())
        } else {
            ("-".into(), "no guest kernel".into())
        };
        println!(
            "{app:<8} {:>9} {:>9} {:>12} {:>14} {:>7} {:>12}",
            first.as_millis(),
            median(times).as_millis(),
            size,
            uncompressed,
            vm_ms,
            initrd
        );
    }
}
