//! `away run`, `ps`, `logs`, `stop`, `rm`: workloads on this node, on whichever runtime
//! the fallback rule (or the user) picks.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use away_model::{
    ByteSize, PortMapping, Resources, RuntimeKind, SpecFormat, WorkloadKind, WorkloadSpec, WorkloadState,
};
use away_runtime::{LocalNode, NodeOptions};
use futures_util::StreamExt;

use crate::output::print_json;

/// Run a workload from a spec file, or straight from an image.
///
/// With a spec (YAML or JSON, see examples/), everything comes from the spec; flags
/// given as well override it. With an image (a reference in the image store, as
/// `away image build` leaves it, or a path to an image tar) the flags make the spec.
///
/// The runtime: with `--runtime auto` (the default) a container on containerd, else
/// Docker, when one is healthy and the image's architecture matches this node; a QEMU
/// VM otherwise, or when the spec says `kind: vm`. The answer says why.
///
/// Examples:
///   away run examples/counter.yaml
///   away run away/counter:latest --name c1 -p 18080:8080 --memory 64Mi
///   away run away/counter:latest --vm -p 18080      (host 18080 to the image's EXPOSE 8080)
///   away run examples/labdesk.yaml --runtime qemu --json
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// A spec file (.yaml, .yml, .json) or an image (reference or tar path)
    source: String,
    /// Runtime to use; `auto` applies the fallback rule
    #[arg(long, value_enum, default_value = "auto")]
    runtime: RuntimeArg,
    /// Workload name [default: the spec's, or the image's name]
    #[arg(long)]
    name: Option<String>,
    /// Memory, e.g. 256Mi
    #[arg(long)]
    memory: Option<ByteSize>,
    /// CPUs, e.g. 0.5
    #[arg(long)]
    cpus: Option<f64>,
    /// Publish a port, HOST:CONTAINER or PORT (repeatable). PORT alone maps host PORT to
    /// the image's exposed port when the image exposes exactly one (EXPOSE 8080: -p 18080
    /// is 18080:8080), else to the same port (PORT:PORT). containerd's containers share
    /// the node's network and cannot remap a port: auto then takes Docker
    #[arg(short, long = "publish", value_name = "HOST:CONTAINER")]
    publish: Vec<String>,
    /// Set an environment variable, K=V (repeatable)
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// A named volume, NAME:/PATH (repeatable; containerd): a directory of the node
    /// mounted read-write at PATH, removed with the workload, moved with it
    #[arg(short, long = "volume", value_name = "NAME:/PATH")]
    volume: Vec<String>,
    /// Run as a VM even when a container could run it
    #[arg(long)]
    vm: bool,
    /// Print one JSON document: {"decision": ..., "workload": ...}
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RuntimeArg {
    Auto,
    Containerd,
    Docker,
    Qemu,
}

impl RuntimeArg {
    fn kind(self) -> Option<RuntimeKind> {
        match self {
            RuntimeArg::Auto => None,
            RuntimeArg::Containerd => Some(RuntimeKind::Containerd),
            RuntimeArg::Docker => Some(RuntimeKind::Docker),
            RuntimeArg::Qemu => Some(RuntimeKind::Qemu),
        }
    }
}

/// List workloads on this node (all runtimes).
#[derive(clap::Args)]
pub struct PsArgs {
    /// Print JSON: {"workloads": [...], "unreachable": [...]}
    #[arg(long)]
    json: bool,
}

/// Print a workload's output (stdout and stderr; a VM's serial console).
#[derive(clap::Args)]
pub struct LogsArgs {
    name: String,
    /// Keep printing new output until the workload stops (Ctrl-C to leave)
    #[arg(short, long)]
    follow: bool,
    /// Print JSON lines: {"name": ..., "line": ...}
    #[arg(long)]
    json: bool,
}

/// Stop a workload: SIGTERM (a VM: ACPI power-down), then kill after the grace period.
#[derive(clap::Args)]
pub struct StopArgs {
    name: String,
    /// Seconds to wait before killing
    #[arg(long, default_value_t = 10)]
    grace: u64,
    #[arg(long)]
    json: bool,
}

/// Remove a stopped workload and everything it holds (snapshot, logs, VM state).
#[derive(clap::Args)]
pub struct RmArgs {
    name: String,
    /// Remove it even if it runs (kills it)
    #[arg(short, long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn is_spec_file(source: &str) -> bool {
    let p = Path::new(source);
    p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// The spec to run: the file's, or one made from the image and flags; flags override.
fn spec_from(a: &RunArgs) -> anyhow::Result<WorkloadSpec> {
    let mut spec = if is_spec_file(&a.source) {
        let spec = WorkloadSpec::load(Path::new(&a.source))?;
        // a relative image tar path in a spec is relative to the spec's directory
        let dir = Path::new(&a.source).parent().unwrap_or(Path::new("."));
        let image_path = dir.join(&spec.image);
        if image_path.is_file() {
            WorkloadSpec { image: image_path.display().to_string(), ..spec }
        } else {
            spec
        }
    } else {
        let base = a.source.rsplit('/').next().unwrap_or(&a.source);
        let base = base.split(':').next().unwrap_or(base).trim_end_matches(".tar");
        WorkloadSpec {
            name: base.to_string(),
            image: a.source.clone(),
            kind: WorkloadKind::Auto,
            command: None,
            env: BTreeMap::new(),
            ports: vec![],
            resources: Resources::default(),
            placement: Default::default(),
            labels: Default::default(),
            user: None,
            capabilities: Default::default(),
            seccomp: Default::default(),
            disk: None,
            volumes: Vec::new(),
            network: None,
            overlay: None,
        }
    };
    if let Some(n) = &a.name {
        spec.name = n.clone();
    }
    if let Some(m) = a.memory {
        spec.resources.memory = m;
    }
    if let Some(c) = a.cpus {
        spec.resources.cpus = c;
    }
    if a.vm {
        spec.kind = WorkloadKind::Vm;
    }
    for kv in &a.env {
        let (k, v) = kv.split_once('=').with_context(|| format!("--env {kv:?}: expected K=V"))?;
        spec.env.insert(k.to_string(), v.to_string());
    }
    for v in &a.volume {
        let (name, path) = v.split_once(':').with_context(|| format!("--volume {v:?}: expected NAME:/PATH"))?;
        spec.volumes.push(away_model::VolumeSpec { name: name.to_string(), path: path.to_string() });
    }
    // the image's exposed ports, read once and only when a bare `-p PORT` needs them
    let mut exposed: Option<Vec<u16>> = None;
    for p in &a.publish {
        let mapping = parse_publish(p, || match &exposed {
            Some(e) => Ok(e.clone()),
            None => {
                let store = away_runtime::ImageStore::new(&away_runtime::host::HostPaths::default().state_dir);
                let e = store.resolve(&spec.image)?.summary.exposed_ports;
                exposed = Some(e.clone());
                Ok(e)
            }
        })?;
        spec.ports.push(mapping);
    }
    // the same checks as a file gets, with field names in the message
    let json = serde_json::to_string(&spec)?;
    Ok(WorkloadSpec::parse(&json, SpecFormat::Json, &a.source)?)
}

/// One `--publish` value: HOST:CONTAINER, or PORT, which goes to the image's one
/// exposed port (`exposed` reads them) or, when it exposes none or several, to PORT.
fn parse_publish(p: &str, exposed: impl FnOnce() -> anyhow::Result<Vec<u16>>) -> anyhow::Result<PortMapping> {
    let parse = |s: &str| s.parse::<u16>().with_context(|| format!("--publish {p:?}: {s:?} is not a port"));
    if let Some((host, container)) = p.split_once(':') {
        return Ok(PortMapping { container: parse(container)?, host: Some(parse(host)?) });
    }
    let host = parse(p)?;
    let container = match exposed().with_context(|| format!("--publish {p:?}: reading the image's exposed ports"))?[..]
    {
        [one] => one,
        _ => host,
    };
    Ok(PortMapping { container, host: Some(host) })
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let spec = spec_from(&a)?;
    let rt = rt()?;
    // before anything starts: Ctrl-C or SIGTERM while the workload starts (a VM boots for
    // a while) undoes the start instead of leaving it half made
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    let node = rt.block_on(LocalNode::open(NodeOptions::default()));
    if !a.json {
        eprintln!("starting {} from {}...", spec.name, spec.image);
    }
    let name = spec.name.clone();
    let (started, stopped) = rt.block_on(async {
        let run = node.run(spec, a.runtime.kind());
        tokio::pin!(run);
        tokio::select! {
            started = &mut run => (started, None),
            why = stops.next() => {
                // the start runs to its end (each of its steps is bounded): cut short, it
                // could leave a process whose pidfile is not written yet
                eprintln!("{why}: stopping; {name} is removed once its start has ended");
                (run.await, Some(why))
            }
        }
    });
    if let Some(why) = stopped {
        return undo_start(&rt, &node, &name, started.ok(), why);
    }
    let started = started?;
    if a.json {
        print_json(&started)?;
    } else {
        let w = &started.workload;
        println!(
            "{} is {} on {}{}",
            w.name,
            w.state,
            w.runtime,
            w.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        );
        println!("  why: {}", started.decision.reason);
        if !w.ports.is_empty() {
            println!("  ports: {}", w.ports.join(", "));
        }
        println!("  logs: away logs -f {}", w.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// A stop signal came while `name` was starting: remove what the start made.
fn undo_start(
    rt: &tokio::runtime::Runtime,
    node: &LocalNode,
    name: &str,
    started: Option<away_runtime::Started>,
    why: &str,
) -> anyhow::Result<ExitCode> {
    if let Some(s) = started {
        let runtime = node.runtime(s.workload.runtime)?;
        rt.block_on(runtime.remove(name)).with_context(|| format!("{why}: removing {name}, which had just started"))?;
        eprintln!("{why}: removed {name} ({}): the start is undone", s.workload.runtime);
    } else {
        eprintln!("{why}: the start of {name} failed and left nothing");
    }
    Ok(ExitCode::from(if why == "SIGINT" { 130 } else { 143 }))
}

pub fn ps(a: PsArgs) -> anyhow::Result<ExitCode> {
    let rt = rt()?;
    let node = rt.block_on(LocalNode::open(NodeOptions::default()));
    let (list, unreachable) = rt.block_on(node.list());
    if a.json {
        print_json(&serde_json::json!({"workloads": list, "unreachable": unreachable}))?;
        return Ok(ExitCode::SUCCESS);
    }
    let w = list.iter().map(|w| w.name.len()).max().unwrap_or(4).max(4);
    println!("{:<w$}  {:<10}  {:<8}  {:>7}  {:<13}  IMAGE", "NAME", "RUNTIME", "STATE", "PID", "PORTS");
    for s in &list {
        println!(
            "{:<w$}  {:<10}  {:<8}  {:>7}  {:<13}  {}",
            s.name,
            s.runtime.to_string(),
            s.state.to_string(),
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            if s.ports.is_empty() { "-".into() } else { s.ports.join(",") },
            s.image
        );
    }
    for note in &unreachable {
        eprintln!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logs(a: LogsArgs) -> anyhow::Result<ExitCode> {
    let rt = rt()?;
    rt.block_on(async {
        let node = LocalNode::open(NodeOptions::default()).await;
        let (runtime, _) = node.get(&a.name).await?;
        let mut stream = runtime.logs(&a.name, a.follow).await?;
        let mut out = std::io::stdout().lock();
        let mut pending = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if a.json {
                pending.extend(chunk);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
                    writeln!(out, "{}", serde_json::json!({"name": a.name, "line": text}))?;
                }
            } else {
                out.write_all(&chunk)?;
            }
            out.flush()?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn stop(a: StopArgs) -> anyhow::Result<ExitCode> {
    let rt = rt()?;
    let node = rt.block_on(LocalNode::open(NodeOptions::default()));
    let st = rt.block_on(node.stop(&a.name, Duration::from_secs(a.grace)))?;
    if a.json {
        print_json(&st)?;
    } else {
        println!("{} is {}", st.name, st.state);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(a: RmArgs) -> anyhow::Result<ExitCode> {
    let rt = rt()?;
    let node = rt.block_on(LocalNode::open(NodeOptions::default()));
    let (runtime, st) = rt.block_on(node.get(&a.name))?;
    if matches!(st.state, WorkloadState::Running | WorkloadState::Paused) && !a.force {
        bail!("{} is {} on {}: stop it first (away stop {}) or use --force", st.name, st.state, st.runtime, st.name);
    }
    rt.block_on(runtime.remove(&a.name))?;
    if a.json {
        print_json(&serde_json::json!({"removed": a.name, "runtime": st.runtime}))?;
    } else {
        println!("removed {} ({})", a.name, st.runtime);
    }
    Ok(ExitCode::SUCCESS)
}

/// `away image build` leaves its tar in the image store too, so that specs can name
/// the image by reference.
pub fn store_image(tar: &Path) -> anyhow::Result<Vec<String>> {
    let store = away_runtime::ImageStore::new(&away_runtime::host::HostPaths::default().state_dir);
    Ok(store.add(tar, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(p: &str, exposed: &[u16]) -> anyhow::Result<(u16, u16)> {
        let m = parse_publish(p, || Ok(exposed.to_vec()))?;
        Ok((m.host_port(), m.container))
    }

    #[test]
    fn a_bare_port_goes_to_the_one_exposed_port() {
        assert_eq!(map("18080", &[8080]).unwrap(), (18080, 8080));
        // none or several exposed: the same port, as before
        assert_eq!(map("18080", &[]).unwrap(), (18080, 18080));
        assert_eq!(map("18080", &[80, 443]).unwrap(), (18080, 18080));
        // HOST:CONTAINER is taken as given, without reading the image
        let m = parse_publish("18080:9000", || panic!("the image is not read")).unwrap();
        assert_eq!((m.host_port(), m.container), (18080, 9000));
    }

    #[test]
    fn bad_ports_are_named() {
        let err = map("80x", &[8080]).unwrap_err().to_string();
        assert!(err.contains("\"80x\" is not a port"), "{err}");
        let err = map("1:99999", &[]).unwrap_err().to_string();
        assert!(err.contains("\"99999\" is not a port"), "{err}");
        let err = format!("{:#}", parse_publish("18080", || anyhow::bail!("no such image")).unwrap_err());
        assert!(err.contains("reading the image's exposed ports: no such image"), "{err}");
    }
}
