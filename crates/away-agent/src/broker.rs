//! The agent's side of the broker protocol (`away_model::cluster`): register once,
//! then heartbeat; do the work each answer asks for. While the broker is unreachable
//! the agent keeps every workload running and queues its events (in SQLite); the next
//! heartbeat that gets through carries them, and the broker's answer reconciles.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use away_migrate::container::{migrate_container, ContainerMigrationOptions};
use away_model::{
    error_chain, AgentEvent, Assignment, Desired, ErrorChain, Heartbeat, HeartbeatResponse, MigrationOrder, NodeLoad,
    RegisterRequest, RegisterResponse, RuntimeKind,
};

use crate::client::AgentClient;
use crate::Agent;

/// Where the broker is and how to join it.
#[derive(Clone)]
pub struct BrokerLink {
    /// `https://host:port` (`http://` only for a broker on loopback started with
    /// `--insecure-loopback`)
    pub url: String,
    pub join_token: String,
    /// The broker's CA certificate (PEM), to trust it when joining (`--ca`).
    pub ca: Option<String>,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink").field("url", &self.url).finish_non_exhaustive()
    }
}

impl BrokerLink {
    fn tls(&self) -> bool {
        self.url.starts_with("https://")
    }
}

/// The client for calls to the broker: over TLS with the node's certificate once it has
/// one, trusting only the broker's CA (before the join: the CA given with `--ca`).
fn broker_client(agent: &Agent, link: &BrokerLink) -> Result<reqwest::Client, String> {
    let tls = if link.tls() {
        let config = match (agent.identity(), &link.ca) {
            (Some(id), _) => id.client_config(),
            (None, Some(ca)) => away_identity::trusting_client_config(ca),
            (None, None) => {
                return Err(format!("{} is https: give the broker's CA certificate (--ca FILE or AWAY_CA)", link.url))
            }
        };
        Some(config.map_err(|e| error_chain(&e))?)
    } else {
        None
    };
    away_identity::http::client_builder(tls)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| error_chain(&e))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn event(kind: &str, workload: Option<&str>, message: impl Into<String>) -> AgentEvent {
    AgentEvent {
        seq: 0,
        at_ms: now_ms(),
        kind: kind.into(),
        workload: workload.map(str::to_string),
        message: message.into(),
        migration_id: None,
        report: None,
    }
}

/// CPU busy share since the previous call, from /proc/stat.
struct CpuSampler(Option<(u64, u64)>);

impl CpuSampler {
    fn sample(&mut self) -> f64 {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().next() else { return 0.0 };
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let total: u64 = v.iter().sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        let pct = match self.0 {
            Some((t0, i0)) if total > t0 => 100.0 * (1.0 - (idle - i0) as f64 / (total - t0) as f64),
            _ => 0.0,
        };
        self.0 = Some((total, idle));
        pct.clamp(0.0, 100.0)
    }
}

fn memory_used() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("MemTotal:").saturating_sub(kib("MemAvailable:"))) * 1024
}

/// Heartbeat forever.
pub async fn run(agent: Arc<Agent>, link: BrokerLink) {
    let mut http: Option<(bool, reqwest::Client)> = None;
    let mut cpu = CpuSampler(None);
    let mut interval = Duration::from_secs(1);
    let mut offline_since: Option<std::time::Instant> = None;
    loop {
        // a new client once the node has its certificate
        let has_identity = agent.identity().is_some();
        if http.as_ref().is_none_or(|(had, _)| *had != has_identity) {
            match broker_client(&agent, &link) {
                Ok(c) => http = Some((has_identity, c)),
                Err(e) => {
                    tracing::error!(broker = %link.url, "cannot call the broker: {e}");
                    tokio::time::sleep(interval).await;
                    continue;
                }
            }
        }
        let Some((_, client)) = &http else { continue };
        match beat(&agent, &link, client, &mut cpu).await {
            Ok((resp, every)) => {
                if let Some(since) = offline_since.take() {
                    tracing::info!(broker = %link.url, "broker reachable again after {:.1} s; reconciling", since.elapsed().as_secs_f64());
                }
                interval = every;
                apply(&agent, resp).await;
            }
            Err(e) => {
                if offline_since.is_none() {
                    offline_since = Some(std::time::Instant::now());
                    tracing::warn!(broker = %link.url, "broker unreachable, working offline (workloads keep running, events are queued): {e}");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn register(agent: &Agent, link: &BrokerLink, http: &reqwest::Client) -> Result<RegisterResponse, String> {
    // a registration is reused while the node holds its certificate (a broker with a
    // CA), or always with a broker without one
    if let Some(r) = agent.state.registration(&link.url).map_err(|e| error_chain(&e))? {
        if !link.tls() || agent.identity().is_some() {
            return Ok(r);
        }
    }
    let identity_dir = agent.config.identity_dir();
    // the key is kept before its CSR goes out: a join retried after a crash asks for the
    // same key, which the broker accepts again for this name
    let csr = if link.tls() {
        let key = away_identity::NodeKey::load_or_create(&identity_dir).map_err(|e| error_chain(&e))?;
        Some(key.csr_pem(&agent.config.name).map_err(|e| error_chain(&e))?)
    } else {
        None
    };
    let req = RegisterRequest {
        node: agent.node_info().await,
        api_addr: agent.config.listen.to_string(),
        transfer_addr: agent.transfer_addr(),
        csr,
    };
    let resp = http
        .post(format!("{}/v1/agents/register", link.url))
        .bearer_auth(&link.join_token)
        .json(&req)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("register: {} {}", resp.status(), resp.text().await.unwrap_or_default()));
    }
    let r: RegisterResponse = resp.json().await.map_err(|e| error_chain(&e))?;
    if link.tls() {
        take_identity(agent, link, &r)?;
    }
    agent.state.save_registration(&link.url, &r).map_err(|e| error_chain(&e))?;
    tracing::info!(broker = %link.url, "registered with the broker");
    Ok(r)
}

/// Keep the certificate the broker issued: it must be for this node's key, from the CA
/// the node was told to trust.
fn take_identity(agent: &Agent, link: &BrokerLink, r: &RegisterResponse) -> Result<(), String> {
    let (Some(cert), Some(ca)) = (&r.certificate, &r.ca) else {
        return Err("the broker answered the join without a certificate for this node".into());
    };
    if let Some(trusted) = &link.ca {
        if away_identity::read_ca_pem(trusted).map_err(|e| error_chain(&e))?
            != away_identity::read_ca_pem(ca).map_err(|e| error_chain(&e))?
        {
            return Err("the broker's answer names another CA than the one given with --ca".into());
        }
    }
    let dir = agent.config.identity_dir();
    let key = away_identity::NodeKey::load_or_create(&dir).map_err(|e| error_chain(&e))?;
    let identity = key.into_identity(cert, ca).map_err(|e| error_chain(&e))?;
    identity.save(&dir).map_err(|e| error_chain(&e))?;
    tracing::info!(subject = %identity.subject(), ca = %identity.ca_fingerprint(), "joined: node certificate saved, the API is mutual TLS from now on");
    agent.set_identity(identity).map_err(|e| error_chain(&e))
}

async fn beat(
    agent: &Agent,
    link: &BrokerLink,
    http: &reqwest::Client,
    cpu: &mut CpuSampler,
) -> Result<(HeartbeatResponse, Duration), String> {
    let had_identity = agent.identity().is_some();
    let reg = register(agent, link, http).await?;
    // a join just gave this node its certificate: its first heartbeat already goes with
    // it (the client made before the join has none, and the broker would refuse it and
    // have the node join a second time)
    let joined;
    let http = if !had_identity && agent.identity().is_some() {
        joined = broker_client(agent, link)?;
        &joined
    } else {
        http
    };
    *agent.cluster_token.write().await = Some(reg.cluster_token.clone());
    let (workloads, _) = agent.node.list().await;
    let hb = Heartbeat {
        node: agent.node_info().await,
        load: NodeLoad {
            cpu_percent: cpu.sample(),
            memory_used_bytes: memory_used(),
            workloads: workloads.len() as u32,
        },
        workloads,
        events: agent.state.pending_events(200).map_err(|e| error_chain(&e))?,
        crl_number: agent.identity().and_then(|i| i.revocations().summary()).map(|s| s.number),
    };
    let url = format!("{}/v1/agents/{}/heartbeat", link.url, agent.config.name);
    let resp = http.post(url).bearer_auth(&reg.agent_token).json(&hb).send().await.map_err(|e| error_chain(&e))?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        // the broker lost or revoked us: join again on the next beat
        agent.state.forget_registration(&link.url).map_err(|e| error_chain(&e))?;
        return Err("the broker does not know this agent's token; registering again".into());
    }
    if !resp.status().is_success() {
        return Err(format!("heartbeat: {} {}", resp.status(), resp.text().await.unwrap_or_default()));
    }
    let r: HeartbeatResponse = resp.json().await.map_err(|e| error_chain(&e))?;
    agent.state.ack(r.acked_seq).map_err(|e| error_chain(&e))?;
    if let Some(crl) = &r.crl {
        // a list that does not check out is logged and the one held stays in force; the
        // next heartbeat asks again
        if let Err(e) = agent.take_crl(crl) {
            tracing::error!("the broker's certificate revocation list is not taken: {e}");
        }
    }
    Ok((r, Duration::from_millis(reg.heartbeat_interval_ms.max(100))))
}

/// Do what the broker asked: start, remove, move. Each piece of work runs once at a time.
async fn apply(agent: &Arc<Agent>, resp: HeartbeatResponse) {
    // the networks first: a workload placed on one needs its bridge
    let changed = *agent.overlay.lock().unwrap_or_else(|e| e.into_inner()) != resp.overlay;
    if changed {
        let networks = resp.overlay.clone();
        match tokio::task::spawn_blocking(move || away_overlay::ensure_networks(&networks)).await {
            Ok(Ok(())) => {
                for n in &resp.overlay {
                    tracing::info!(network = %n.address.network, vni = n.address.vni, address = %n.address.ip, peers = ?n.peers, "overlay network ready");
                }
                *agent.overlay.lock().unwrap_or_else(|e| e.into_inner()) = resp.overlay.clone();
            }
            Ok(Err(e)) => tracing::error!("cannot build the overlay networks: {}", ErrorChain(&e)),
            Err(e) => tracing::error!("overlay task: {e}"),
        }
    }
    for a in resp.assignments {
        let key = format!("assign:{}", a.spec.name);
        let present = matches!(agent.node.find(&a.spec.name).await, Ok(Some(_)));
        let needed = match a.desired {
            Desired::Running => !present,
            Desired::Removed => present,
        };
        if needed && agent.start_work(&key).await {
            let agent = agent.clone();
            tokio::spawn(async move {
                do_assignment(&agent, a).await;
                agent.finish_work(&key).await;
            });
        }
    }
    for m in resp.migrations {
        let key = format!("migrate:{}", m.id);
        if m.cancel {
            if let Some(c) = agent.cancels.lock().unwrap_or_else(|e| e.into_inner()).get(&m.id) {
                if !c.is_cancelled() {
                    tracing::warn!(workload = %m.workload, migration = %m.id, "the broker cancels the move under way");
                }
                c.cancel();
            }
        }
        if agent.start_work(&key).await {
            let agent = agent.clone();
            tokio::spawn(async move {
                do_migration(&agent, m).await;
                // a finished order stays marked: the broker may repeat it until it saw the event
            });
        }
    }
}

async fn do_assignment(agent: &Agent, a: Assignment) {
    let name = a.spec.name.clone();
    let ev = match a.desired {
        Desired::Running => match agent.node.run(a.spec, a.runtime).await {
            Ok(s) => event(
                "workload-started",
                Some(&name),
                format!("running on {}: {}", s.workload.runtime, s.decision.reason),
            ),
            Err(e) => event("workload-failed", Some(&name), error_chain(&e)),
        },
        Desired::Removed => match agent.node.get(&name).await {
            Ok((rt, _)) => match rt.remove(&name).await {
                Ok(()) => event("workload-removed", Some(&name), "removed as the broker asked"),
                Err(e) => event("workload-failed", Some(&name), format!("remove: {e}", e = ErrorChain(&e))),
            },
            Err(e) => event("workload-removed", Some(&name), format!("already gone: {e}", e = ErrorChain(&e))),
        },
    };
    tracing::info!(workload = %name, kind = %ev.kind, "{}", ev.message);
    if let Err(e) = agent.state.push_event(ev) {
        tracing::error!("cannot queue an event: {e}", e = ErrorChain(&e));
    }
}

async fn do_migration(agent: &Arc<Agent>, m: MigrationOrder) {
    tracing::info!(workload = %m.workload, target = %m.target_node, "migration ordered by the broker");
    let target = match AgentClient::from_agent(agent, Some(&m.target_node), &m.target_api).await {
        Ok(c) => c,
        Err(e) => {
            let mut ev = event("migration-failed", Some(&m.workload), e);
            ev.migration_id = Some(m.id.clone());
            if let Err(e) = agent.state.push_event(ev) {
                tracing::error!("cannot queue an event: {e}", e = ErrorChain(&e));
            }
            return;
        }
    };
    let on_vm = matches!(agent.node.find(&m.workload).await, Ok(Some((RuntimeKind::Qemu, _))));
    // registered before anything moves; an order cancelled before it got here starts cancelled
    let cancel = away_migrate::Cancel::default();
    if m.cancel {
        cancel.cancel();
    }
    agent.cancels.lock().unwrap_or_else(|e| e.into_inner()).insert(m.id.clone(), cancel.clone());
    let result = if on_vm {
        match agent.channels() {
            Ok(channels) => {
                crate::client::migrate_vm_via_agent(
                    &agent.node,
                    &agent.config.name,
                    &m.workload,
                    target,
                    &channels,
                    // pre-copy with QEMU's defaults, predicted (the report carries it)
                    away_migrate::vm::VmMigrationOptions { predict: true, ..Default::default() },
                    cancel.clone(),
                    // each step on disk: a restart finishes a move this process could not
                    Some(Arc::new(crate::outgoing::OutgoingJournal {
                        agent: agent.clone(),
                        migration_id: Some(m.id.clone()),
                        target_api: m.target_api.clone(),
                    })),
                    |_| {},
                )
                .await
            }
            Err(why) => Err(away_migrate::MigrateError::Invalid(why)),
        }
        .map_err(|e| match e {
            // the source VM stays paused: not "failed" (see below); asked about again in
            // the background until the target answers
            away_migrate::MigrateError::InDoubt { ref transfer_id, .. } => {
                agent.finish_outgoing_move(transfer_id);
                ("migration-in-doubt", error_chain(&e))
            }
            e => ("migration-failed", error_chain(&e)),
        })
    } else {
        let archives = agent.archives();
        let progress: away_migrate::container::ProgressFn = Arc::new(|_| {});
        // the broker validated the mode; an agent that cannot read it uses auto
        let mode = m.mode.as_deref().and_then(|s| s.parse().ok()).unwrap_or_default();
        // each step on disk: a restart finishes a move this process could not
        let journal = crate::outgoing::OutgoingJournal {
            agent: agent.clone(),
            migration_id: Some(m.id.clone()),
            target_api: m.target_api.clone(),
        };
        let mut opts = ContainerMigrationOptions {
            mode,
            cancel: cancel.clone(),
            journal: Some(Arc::new(journal)),
            close_connections: m.close_connections,
            ..Default::default()
        };
        let channels = agent.channels();
        if let Ok(channels) = &channels {
            opts.transfer.channels = channels.clone();
        }
        let moved = match channels {
            Ok(_) => {
                migrate_container(&agent.node, &agent.config.name, &archives, &m.workload, &target, &opts, progress)
                    .await
            }
            Err(why) => Err(away_migrate::MigrateError::Invalid(why)),
        };
        match moved {
            // not "failed": the broker would have the workload started again here while
            // the target may run the committed copy; the migration stays open instead
            Err(e @ away_migrate::MigrateError::InDoubt { .. }) => {
                // the journal has it: asked about again in the background until the
                // target answers (then `migration-finished` or `-failed`)
                if let away_migrate::MigrateError::InDoubt { transfer_id, .. } = &e {
                    agent.finish_outgoing_move(transfer_id);
                }
                Err(("migration-in-doubt", error_chain(&e)))
            }
            other => other.map_err(|e| ("migration-failed", error_chain(&e))),
        }
    };
    agent.cancels.lock().unwrap_or_else(|e| e.into_inner()).remove(&m.id);
    let mut ev = match result {
        Ok(report) => {
            let mut e = event(
                "migration-finished",
                Some(&m.workload),
                format!("moved to {} in {} ms", m.target_node, report.total_millis),
            );
            e.report = Some(report);
            e
        }
        Err((kind, why)) => event(kind, Some(&m.workload), why),
    };
    ev.migration_id = Some(m.id.clone());
    tracing::info!(workload = %m.workload, kind = %ev.kind, "{}", ev.message);
    if let Err(e) = agent.state.push_event(ev) {
        tracing::error!("cannot queue an event: {e}", e = ErrorChain(&e));
    }
}
