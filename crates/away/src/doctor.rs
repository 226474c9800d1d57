//! `away doctor`: what this host can run, what is missing, and the command that fixes it.

use std::process::ExitCode;
use std::time::Duration;

use away_runtime::host::{fingerprint, Check, FingerprintOptions, HostPaths, Status};

use crate::output::print_json;

/// Check this host: containerd, Docker, runc, CRIU (pre-dump, lazy pages, and whether a
/// lazy dump stays lazy when a thread's stack pointer is on a page boundary), QEMU, KVM,
/// cgroups, overlayfs and the CPU.
///
/// Every answer comes from asking the real thing: the daemons' sockets, the binaries,
/// and for KVM a probe guest that must actually boot (a /dev/kvm that exists but hangs
/// guests counts as unusable, and VMs then run under TCG). The KVM answer is cached in
/// /var/cache/away/kvm-probe.json (AWAY_KVM_PROBE_CACHE) per host kernel, guest kernel and QEMU version.
///
/// Exit status: 0 when nothing away needs is missing (warnings allowed), 1 otherwise.
///
/// Examples:
///   away doctor
///   away doctor --json | jq '.checks[] | select(.status != "ok")'
///   away doctor --reprobe-kvm --kvm-timeout 30
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Print one JSON document (the full host report) instead of the table
    #[arg(long)]
    json: bool,
    /// Boot the KVM probe guest again instead of using the cached answer
    #[arg(long)]
    reprobe_kvm: bool,
    /// Seconds the KVM probe guest has to reach its init
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    kvm_timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let opts = FingerprintOptions {
        paths: HostPaths::default(),
        kvm_timeout: Duration::from_secs(args.kvm_timeout),
        reprobe_kvm: args.reprobe_kvm,
        // away itself is the probe process of the CRIU stack-page check
        criu_stack_probe: std::env::current_exe().ok(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if !args.json {
        eprintln!("checking this host (a KVM probe boot may take up to {} s)...", args.kvm_timeout);
    }
    let mut report = rt.block_on(fingerprint(&opts));
    report.checks.extend(identity_checks(&opts.paths.state_dir));
    if args.json {
        print_json(&report)?;
    } else {
        print_table(&report);
    }
    Ok(if report.healthy() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Renew a node certificate this long before it expires (a node joins again for it).
const RENEW_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// The node's identity (STATE_DIR/identity): its certificate's subject, expiry and CA;
/// a warning when it has none (a standalone agent with a bearer token over plain HTTP,
/// or one that has not joined a broker yet), or when it is about to expire.
fn identity_checks(state_dir: &std::path::Path) -> Vec<Check> {
    let dir = state_dir.join("identity");
    let join_fix = "away agent --broker https://BROKER:7700 --ca ca.pem with AWAY_JOIN_TOKEN set (docs/security.md)";
    let mut checks = Vec::new();
    let identity = match away_identity::Identity::load(&dir) {
        Ok(Some(id)) => {
            let left = id.not_after().duration_since(std::time::SystemTime::now()).unwrap_or_default();
            let days = left.as_secs() / 86400;
            let crl = match id.revocations().summary() {
                Some(c) => format!("revocation list #{} ({} revoked)", c.number, c.revoked),
                None => "no revocation list from the broker yet".to_string(),
            };
            let detail = format!(
                "{} (node {}), expires in {days} days, CA sha256 {}, {crl}",
                id.subject(),
                id.name(),
                id.ca_fingerprint()
            );
            let revoked =
                away_identity::serial_hex(&id.cert_pem()).is_ok_and(|serial| id.revocations().is_revoked(&serial));
            let (status, fix) = if revoked {
                (
                    Status::Warn,
                    Some(format!(
                        "the broker revoked this node's certificate: stop the agent, remove {} and join again with a \
                         join token (a new key)",
                        dir.display()
                    )),
                )
            } else if !id.suits_qemu() {
                (
                    Status::Warn,
                    Some(format!(
                        "this certificate predates VM moves over QEMU's TLS (its key usage lacks key encipherment, \
                         which QEMU requires): remove {} and restart the agent to join again",
                        dir.join("cert.pem").display()
                    )),
                )
            } else if left < RENEW_BEFORE {
                (
                    Status::Warn,
                    Some(format!(
                        "join again for a new certificate: remove {} and restart the agent",
                        dir.join("cert.pem").display()
                    )),
                )
            } else {
                (Status::Ok, None)
            };
            checks.push(Check { name: "node identity".into(), status, detail, fix });
            true
        }
        Ok(None) => {
            checks.push(Check {
                name: "node identity".into(),
                status: Status::Warn,
                detail: format!("no node certificate in {}: the agent API is plain HTTP", dir.display()),
                fix: Some(join_fix.into()),
            });
            false
        }
        Err(e) => {
            checks.push(Check {
                name: "node identity".into(),
                status: Status::Warn,
                detail: format!("{}: {}", dir.display(), away_model::error_chain(&e)),
                fix: Some(format!("chmod 600 {}/key.pem, or remove {} and join again", dir.display(), dir.display())),
            });
            false
        }
    };
    if !identity && std::env::var_os("AWAY_AGENT_TOKEN").is_some() {
        checks.push(Check {
            name: "insecure mode".into(),
            status: Status::Warn,
            detail: "AWAY_AGENT_TOKEN: a standalone agent's bearer token, sent over plain HTTP (loopback or a trusted network only)".into(),
            fix: Some(join_fix.into()),
        });
    }
    checks
}

fn print_table(report: &away_runtime::host::HostReport) {
    let name_w = report.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    println!("away doctor: {} ({} {}, kernel {})", report.hostname, report.arch, report.cpu.vendor, report.kernel);
    println!();
    for c in &report.checks {
        let mark = match c.status {
            Status::Ok => "ok     ",
            Status::Warn => "warn   ",
            Status::Missing => "MISSING",
        };
        println!("  {mark}  {:<name_w$}  {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("  {:7}  {:<name_w$}  fix: {fix}", "", "");
        }
    }
    println!();
    let missing = report.checks.iter().filter(|c| c.status == Status::Missing).count();
    let warns = report.checks.iter().filter(|c| c.status == Status::Warn).count();
    println!(
        "containers: {}   VMs: {}   ({missing} missing, {warns} warnings)",
        if report.containerd.version.is_some() || report.docker.version.is_some() { "yes" } else { "no" },
        match (report.qemu.version.is_some() && report.guest_kernel.is_some(), report.accel) {
            (false, _) => "no".to_string(),
            (true, accel) => format!("yes, {accel}"),
        }
    );
}
