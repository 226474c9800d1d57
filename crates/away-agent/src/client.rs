//! A client of the agent's HTTP API; the migration source uses it as its `TargetNode`.

use async_trait::async_trait;
use away_migrate::journal::{MoveJournal, MoveKind, OutgoingMove, OutgoingState};
use away_migrate::target::{MoveRecord, NoAnswer, TargetInfo, TargetNode};
use away_migrate::MigrateError;
use away_model::{error_chain, ApiError, ErrorChain};

#[derive(Clone)]
pub struct AgentClient {
    base: String,
    http: reqwest::Client,
}

fn http_client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(value) = token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok()) {
        let mut value = value;
        // keeps the token out of debug output
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    away_identity::http::client_builder(None)
        .default_headers(headers)
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client")
}

impl AgentClient {
    /// `addr` is `host:port` or a full `http://host:port` URL.
    pub fn new(addr: &str) -> Self {
        let base =
            if addr.starts_with("http://") { addr.trim_end_matches('/').to_string() } else { format!("http://{addr}") };
        let http = http_client(None);
        AgentClient { base, http }
    }

    /// A client of node `node`'s agent at `addr` over mutual TLS with `identity`: the
    /// handshake checks the agent is that node (its certificate names it), whatever
    /// address it was reached at.
    pub async fn for_node(
        identity: &away_identity::Identity,
        node: &str,
        addr: &str,
    ) -> Result<Self, away_identity::IdentityError> {
        let (base, builder) = away_identity::http::node_client(identity, node, addr).await?;
        let http = builder
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("http client");
        Ok(AgentClient { base, http })
    }

    /// A client of node `node`'s agent at `addr`, as `agent` reaches other nodes: by name
    /// over mutual TLS with its identity once it has one, else plain HTTP with the
    /// cluster token. The error says why there is none.
    pub async fn from_agent(agent: &crate::Agent, node: Option<&str>, addr: &str) -> Result<Self, String> {
        match (agent.identity(), node) {
            (Some(id), Some(node)) => {
                Self::for_node(&id, node, addr).await.map_err(|e| format!("target {node}: {e}", e = ErrorChain(&e)))
            }
            (Some(_), None) => Err(format!(
                "the target at {addr} has no node name: a node with an identity calls other nodes over mutual TLS by name"
            )),
            (None, _) => Ok(Self::new(addr).with_token(agent.cluster_token.read().await.clone())),
        }
    }

    /// Present `token` (the cluster's) on every call, when the target belongs to a broker.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.http = http_client(token.as_deref());
        self
    }

    fn err(&self, message: impl Into<String>) -> MigrateError {
        MigrateError::Target { target: self.base.clone(), message: message.into() }
    }

    async fn check(&self, resp: Result<reqwest::Response, reqwest::Error>) -> Result<reqwest::Response, MigrateError> {
        let resp = resp.map_err(|e| self.err(format!("unreachable: {e}", e = ErrorChain(&e))))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&body).map(|e| e.to_string()).unwrap_or(body);
        Err(self.err(format!("{status}: {message}")))
    }
}

/// How long a VM disk's base image may take to reach a target.
const BASE_UPLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

impl AgentClient {
    /// Whether the target's disk store holds base image `digest` (`GET /v1/disks`).
    pub async fn has_disk_base(&self, digest: &str) -> Result<bool, MigrateError> {
        let url = format!("{}/v1/disks", self.base);
        let resp = self.check(self.http.get(url).query(&[("base", digest)]).send().await).await?;
        let v: serde_json::Value =
            resp.json().await.map_err(|e| self.err(format!("bad /v1/disks answer: {e}", e = ErrorChain(&e))))?;
        v["present"].as_bool().ok_or_else(|| self.err("a /v1/disks answer without `present`"))
    }

    /// Send base image `base` to the target's disk store (`PUT /v1/disks`), streamed
    /// from its file; the target hashes what it stores and refuses another digest.
    pub async fn upload_disk_base(&self, base: &away_runtime::qemu::BaseImage) -> Result<(), MigrateError> {
        let file = tokio::fs::File::open(&base.path)
            .await
            .map_err(|e| MigrateError::Io { path: base.path.clone(), source: e })?;
        let len = file.metadata().await.map_err(|e| MigrateError::Io { path: base.path.clone(), source: e })?.len();
        // 1 MiB reads, never the whole file in memory
        let chunks = futures_util::stream::try_unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::with_capacity(1 << 20);
            let n = (&mut f).take(1 << 20).read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>((n > 0).then_some((buf, f)))
        });
        let url = format!("{}/v1/disks", self.base);
        let req = self
            .http
            .put(url)
            .query(&[("base", base.digest.as_str())])
            .header(reqwest::header::CONTENT_LENGTH, len)
            .timeout(BASE_UPLOAD_TIMEOUT)
            .body(reqwest::Body::wrap_stream(chunks));
        self.check(req.send().await).await.map(|_| ())
    }
}

/// The lease assumed for a VM destination whose answer gave none (its default commit wait).
const VM_CONFIRM_WAIT: std::time::Duration = away_migrate::vm::DEFAULT_VM_COMMIT_WAIT;

/// Bound on one commit or question: the source asks again after it.
const MOVE_QUESTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl AgentClient {
    /// A target's answer about a move: its record, None when it does not know the move,
    /// Err(Ok(message)) when it refused a commit (409: the move is not committed, ask what
    /// it is), or no definite answer (and whether the request may have arrived).
    async fn move_answer(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Option<MoveRecord>, Result<String, NoAnswer>> {
        let resp = resp.map_err(|e| {
            Err(NoAnswer {
                message: format!("{}: {e}", self.base, e = ErrorChain(&e)),
                // a connection that could not be opened carried nothing
                maybe_delivered: !e.is_connect(),
            })
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| {
            Err(NoAnswer {
                message: format!("{}: the answer broke off: {e}", self.base, e = ErrorChain(&e)),
                maybe_delivered: true,
            })
        })?;
        match status.as_u16() {
            200 => serde_json::from_str(&body).map(Some).map_err(|e| {
                Err(NoAnswer {
                    message: format!("{}: a move answer that is not a move record: {e}", self.base),
                    maybe_delivered: true,
                })
            }),
            404 => Ok(None),
            409 => Err(Ok(serde_json::from_str::<ApiError>(&body).map(|e| e.message).unwrap_or(body))),
            _ => Err(Err(NoAnswer {
                message: format!("{}: {status}: {body}", self.base),
                // refused before anything was done: the token, a bad request
                maybe_delivered: !matches!(status.as_u16(), 400 | 401 | 403),
            })),
        }
    }
}

impl AgentClient {
    /// A commit's (or a VM confirm's) answer as the source takes it: a refusal is followed
    /// by the question what the move is (aborted, or not answered yet). With fault
    /// injection the first answer may be dropped (`AWAY_FAULT_COMMIT=lose-answer`).
    async fn commit_answer(
        &self,
        transfer_id: &str,
        answer: Result<Option<MoveRecord>, Result<String, NoAnswer>>,
    ) -> Result<Option<MoveRecord>, NoAnswer> {
        #[cfg(feature = "fault-injection")]
        if let Some(lost) = lose_commit_answer() {
            tracing::warn!(transfer = transfer_id, "the commit reached the target, its answer is dropped: {answer:?}");
            return Err(lost);
        }
        match answer {
            Ok(record) => Ok(record),
            // refused, so not committed now: what the move is (aborted, or not answered yet)
            Err(Ok(refused)) => {
                tracing::info!(transfer = transfer_id, "the target did not commit: {refused}");
                self.move_state(transfer_id).await
            }
            Err(Err(no_answer)) => Err(no_answer),
        }
    }
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_COMMIT=lose-answer`): the first
/// commit reaches the target and is carried out, and its answer is lost on the way back.
#[cfg(feature = "fault-injection")]
fn lose_commit_answer() -> Option<NoAnswer> {
    static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let asked = std::env::var("AWAY_FAULT_COMMIT").as_deref() == Ok("lose-answer");
    (asked && !LOST.swap(true, std::sync::atomic::Ordering::SeqCst)).then(|| NoAnswer {
        message: "the commit's answer was lost (AWAY_FAULT_COMMIT=lose-answer)".into(),
        maybe_delivered: true,
    })
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_COMMIT=partition`): from the
/// commit on, the target cannot be reached (nothing is sent).
#[cfg(feature = "fault-injection")]
fn partitioned() -> Option<NoAnswer> {
    (std::env::var("AWAY_FAULT_COMMIT").as_deref() == Ok("partition")).then(|| NoAnswer {
        message: "cannot reach the target (AWAY_FAULT_COMMIT=partition)".into(),
        maybe_delivered: false,
    })
}

#[async_trait]
impl TargetNode for AgentClient {
    async fn info(&self) -> Result<TargetInfo, MigrateError> {
        let resp = self.check(self.http.get(format!("{}/v1/node", self.base)).send().await).await?;
        resp.json().await.map_err(|e| self.err(format!("bad /v1/node answer: {e}", e = ErrorChain(&e))))
    }

    async fn announce(
        &self,
        transfer_id: &str,
        workload: &str,
        source: &str,
        prepare: Option<&away_migrate::target::PrepareImage>,
    ) -> Result<away_migrate::target::Announcement, MigrateError> {
        let body = crate::api::Announce {
            transfer_id: transfer_id.into(),
            workload: workload.into(),
            source: source.into(),
            prepare: prepare.cloned(),
        };
        let resp = self.check(self.http.post(format!("{}/v1/transfers", self.base)).json(&body).send().await).await?;
        let v: serde_json::Value =
            resp.json().await.map_err(|e| self.err(format!("bad /v1/transfers answer: {e}", e = ErrorChain(&e))))?;
        let secret = v["secret"].as_str().ok_or_else(|| self.err("no secret in the announcement's answer"))?;
        Ok(away_migrate::target::Announcement {
            secret: away_migrate::transfer::MoveSecret::from_string(secret.to_string()),
            page_link: v["page_link"].as_bool().unwrap_or(false),
        })
    }

    async fn has_image(&self, reference: &str) -> Result<bool, MigrateError> {
        let resp = self
            .check(self.http.get(format!("{}/v1/images", self.base)).query(&[("reference", reference)]).send().await)
            .await?;
        let v: serde_json::Value =
            resp.json().await.map_err(|e| self.err(format!("bad /v1/images answer: {e}", e = ErrorChain(&e))))?;
        Ok(v["present"].as_bool().unwrap_or(false))
    }

    async fn commit(&self, transfer_id: &str) -> Result<Option<MoveRecord>, NoAnswer> {
        #[cfg(feature = "fault-injection")]
        if let Some(cut) = partitioned() {
            return Err(cut);
        }
        let url = format!("{}/v1/transfers/{transfer_id}/commit", self.base);
        let answer = self.move_answer(self.http.post(url).timeout(MOVE_QUESTION_TIMEOUT).send().await).await;
        self.commit_answer(transfer_id, answer).await
    }

    async fn move_state(&self, transfer_id: &str) -> Result<Option<MoveRecord>, NoAnswer> {
        #[cfg(feature = "fault-injection")]
        if let Some(cut) = partitioned() {
            return Err(cut);
        }
        let url = format!("{}/v1/transfers/{transfer_id}", self.base);
        // a question changes nothing on the target: whatever became of it, nothing was
        // committed by it
        self.move_answer(self.http.get(url).timeout(MOVE_QUESTION_TIMEOUT).send().await).await.map_err(|e| {
            let message = match e {
                Ok(refused) => refused,
                Err(no_answer) => no_answer.message,
            };
            NoAnswer { message, maybe_delivered: false }
        })
    }

    async fn upload_image(&self, tar: &std::path::Path) -> Result<(), MigrateError> {
        let body = tokio::fs::read(tar).await.map_err(|e| MigrateError::Io { path: tar.to_path_buf(), source: e })?;
        self.check(self.http.post(format!("{}/v1/images", self.base)).body(body).send().await).await.map(|_| ())
    }

    async fn abort(&self, transfer_id: &str) -> Result<(), MigrateError> {
        self.check(self.http.delete(format!("{}/v1/transfers/{transfer_id}", self.base)).send().await).await.map(|_| ())
    }

    async fn probe(&self, bytes: usize) -> Result<Option<away_migrate::estimate::ProbeAnswer>, MigrateError> {
        let resp =
            self.check(self.http.post(format!("{}/v1/probe", self.base)).body(vec![0u8; bytes]).send().await).await?;
        let answer =
            resp.json().await.map_err(|e| self.err(format!("bad /v1/probe answer: {e}", e = ErrorChain(&e))))?;
        Ok(Some(answer))
    }
}

/// A VM destination behind another node's agent.
pub struct RemoteVmTarget {
    pub client: AgentClient,
    pub name: String,
    /// When the destination's "the VM is here" answer came, and the lease it gave: a
    /// commit that provably never arrived may be given up once that lease has run out.
    pub answered: Option<(tokio::time::Instant, std::time::Duration)>,
    /// A cancel of the move: checked before the confirm (the commit point).
    pub cancel: away_migrate::Cancel,
    /// How long to keep confirming without a definite answer (then in doubt).
    pub commit_wait: std::time::Duration,
    /// The source's journal of the move, each step written before it is taken (a
    /// restarted source finishes the move from it: `recover_move`).
    pub journal: Option<JournaledMove>,
    /// Where the prepared destination exports the VM's disk over NBD (host, port), from
    /// its prepare answer.
    pub disk_export: Option<(String, u16)>,
}

/// A move and the journal its steps go to.
pub struct JournaledMove {
    pub journal: std::sync::Arc<dyn MoveJournal>,
    pub m: OutgoingMove,
}

impl JournaledMove {
    fn record(&mut self, state: OutgoingState) -> Result<(), String> {
        self.m = self.m.with_state(state);
        self.journal.record(&self.m)
    }

    /// Write a step the move goes on after either way (a failure is logged).
    fn record_logged(&mut self, state: OutgoingState) {
        self.m = self.m.with_state(state);
        away_migrate::journal::record_logged(Some(self.journal.as_ref()), &self.m);
    }
}

/// Finish move `m`, which a previous run of this source left open, against the target
/// behind `target`: a VM's by its QEMU (`away_migrate::vm::recover_source`), a
/// container's from its checkpoint (`away_migrate::journal::recover`).
pub async fn recover_move(
    node: &away_runtime::LocalNode,
    archives: &away_migrate::archive::ArchiveStore,
    target: &AgentClient,
    m: OutgoingMove,
    journal: &dyn MoveJournal,
    retry: std::time::Duration,
) -> Result<away_migrate::journal::Recovered, String> {
    match m.kind {
        MoveKind::Container => away_migrate::journal::recover(node, archives, target, m, journal, retry).await,
        MoveKind::VmPrecopy | MoveKind::VmPostcopy => {
            let name = m.workload.clone();
            let vm = VmMove { client: target, name: &name, answer: Default::default() };
            away_migrate::vm::recover_source(node.qemu(), &vm, m, journal, retry).await
        }
    }
}

/// The lease assumed for a destination whose answer gave none (an agent from before
/// VM leases: its destination runs, so a source must never give up on it early).
const VM_LEASE_UNKNOWN: std::time::Duration = VM_CONFIRM_WAIT;

/// The commit protocol's questions about VM move `vm-NAME` (`away_migrate::target::commit_move`):
/// the commit is `POST /v1/vm-migrations/NAME/confirm`, the question the same as for a
/// container move (`GET /v1/transfers/vm-NAME`).
struct VmMove<'a> {
    client: &'a AgentClient,
    name: &'a str,
    /// The last confirm answer (where the VM lives, when it started).
    answer: std::sync::Mutex<Option<serde_json::Value>>,
}

#[async_trait]
impl TargetNode for VmMove<'_> {
    async fn info(&self) -> Result<TargetInfo, MigrateError> {
        self.client.info().await
    }

    async fn announce(
        &self,
        transfer_id: &str,
        workload: &str,
        source: &str,
        prepare: Option<&away_migrate::target::PrepareImage>,
    ) -> Result<away_migrate::target::Announcement, MigrateError> {
        self.client.announce(transfer_id, workload, source, prepare).await
    }

    async fn has_image(&self, reference: &str) -> Result<bool, MigrateError> {
        self.client.has_image(reference).await
    }

    async fn upload_image(&self, tar: &std::path::Path) -> Result<(), MigrateError> {
        self.client.upload_image(tar).await
    }

    async fn commit(&self, transfer_id: &str) -> Result<Option<MoveRecord>, NoAnswer> {
        #[cfg(feature = "fault-injection")]
        if let Some(cut) = partitioned() {
            return Err(cut);
        }
        let c = self.client;
        let url = format!("{}/v1/vm-migrations/{}/confirm", c.base, self.name);
        let sent = c.http.post(url).timeout(MOVE_QUESTION_TIMEOUT).send().await;
        let answer = match sent {
            Ok(resp) if resp.status().is_success() => match resp.json::<serde_json::Value>().await {
                Ok(v) => {
                    let record = serde_json::from_value::<MoveRecord>(v.clone()).ok();
                    *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
                    record.map(Some).ok_or_else(|| {
                        Err(NoAnswer {
                            message: format!("{}: a confirm answer without its move", c.base),
                            maybe_delivered: true,
                        })
                    })
                }
                Err(e) => Err(Err(NoAnswer {
                    message: format!("{}: the answer broke off: {e}", c.base, e = ErrorChain(&e)),
                    maybe_delivered: true,
                })),
            },
            other => c.move_answer(other).await,
        };
        c.commit_answer(transfer_id, answer).await
    }

    async fn move_state(&self, transfer_id: &str) -> Result<Option<MoveRecord>, NoAnswer> {
        self.client.move_state(transfer_id).await
    }

    async fn abort(&self, _transfer_id: &str) -> Result<(), MigrateError> {
        let c = self.client;
        c.check(c.http.delete(format!("{}/v1/vm-migrations/{}", c.base, self.name)).send().await).await.map(|_| ())
    }
}

fn vm_err(e: MigrateError) -> away_migrate::vm::VmMigrateError {
    away_migrate::vm::VmMigrateError::Invalid { field: "target".into(), reason: error_chain(&e) }
}

#[async_trait]
impl away_migrate::vm::VmTarget for RemoteVmTarget {
    fn describe(&self) -> String {
        format!("agent {}", self.client.base)
    }

    async fn prepare(
        &mut self,
        spec: &away_model::WorkloadSpec,
        image: &away_runtime::ResolvedImage,
        opts: &away_migrate::vm::VmMigrationOptions,
    ) -> Result<away_migrate::vm::VmListen, away_migrate::vm::VmMigrateError> {
        if let Some(j) = self.journal.as_mut() {
            // on disk before anything moves: a source that cannot record the move does not start it
            j.record(OutgoingState::Checkpointing).map_err(|e| away_migrate::vm::VmMigrateError::Invalid {
                field: "journal".into(),
                reason: format!("cannot journal the move, so it does not start: {e}"),
            })?;
        }
        let body = crate::api::VmPrepare {
            spec: spec.clone(),
            image: image.reference.clone(),
            multifd: opts.multifd,
            multifd_compression: opts.multifd_compression,
            postcopy: opts.postcopy,
        };
        let c = &self.client;
        let resp = c
            .check(c.http.post(format!("{}/v1/vm-migrations", c.base)).json(&body).send().await)
            .await
            .map_err(vm_err)?;
        let v: serde_json::Value = resp.json().await.map_err(|e| vm_err(c.err(error_chain(&e))))?;
        let uri = v["uri"].as_str().map(str::to_string).ok_or_else(|| vm_err(c.err("no uri in the answer")))?;
        self.disk_export = match (&v["disk"]["host"], v["disk"]["port"].as_u64()) {
            (serde_json::Value::String(host), Some(port)) => Some((host.clone(), port as u16)),
            _ => None,
        };
        // an agent from before QEMU's TLS says nothing: plain TCP
        Ok(away_migrate::vm::VmListen { uri, tls: v["tls"].as_bool().unwrap_or(false) })
    }

    async fn wait_resumed(
        &mut self,
        limit: std::time::Duration,
    ) -> Result<std::time::SystemTime, away_migrate::vm::VmMigrateError> {
        let c = &self.client;
        let url = format!("{}/v1/vm-migrations/{}/resumed", c.base, self.name);
        let resp = c
            .check(
                c.http
                    .post(url)
                    .query(&[("limit_ms", limit.as_millis() as u64)])
                    .timeout(limit + std::time::Duration::from_secs(10))
                    .send()
                    .await,
            )
            .await
            .map_err(vm_err)?;
        let v: serde_json::Value = resp.json().await.map_err(|e| vm_err(c.err(error_chain(&e))))?;
        let ms = v["resumed_at_ms"].as_u64().ok_or_else(|| vm_err(c.err("no resumed_at_ms in the answer")))?;
        let lease = v["lease_ms"].as_u64().map(std::time::Duration::from_millis).unwrap_or(VM_LEASE_UNKNOWN);
        self.answered = Some((tokio::time::Instant::now(), lease));
        if let Some(j) = self.journal.as_mut() {
            j.m.lease_ms = Some(lease.as_millis() as u64);
            j.record_logged(OutgoingState::Sent);
        }
        Ok(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }

    /// Commit the move by the commit protocol (`away_migrate::target::commit_move`):
    /// confirm, and after a lost answer confirm again (the agent answers a repeated
    /// confirm the same way) or ask what became of the move; resume the source only on
    /// a definite "aborted" or once the lease has run out with no confirm delivered. In
    /// doubt after `commit_wait`.
    async fn confirm(&mut self) -> away_migrate::vm::VmCommit {
        use away_migrate::target::{commit_move, CommitOutcome, CommitPolicy};
        use away_migrate::vm::VmCommit;
        let (answered_at, lease) = self.answered.unwrap_or_else(|| (tokio::time::Instant::now(), VM_LEASE_UNKNOWN));
        let policy = CommitPolicy {
            lease,
            retry: std::time::Duration::from_secs(1),
            give_up: self.commit_wait,
            commit_sent: false,
        };
        let moves = VmMove { client: &self.client, name: &self.name, answer: Default::default() };
        let id = format!("vm-{}", self.name);
        if self.cancel.is_cancelled() {
            // before the commit point: the destination goes (a post-copy one, committed
            // at its switchover, is refused: the move ends as it would have)
            match moves.abort(&id).await {
                Ok(()) => return VmCommit::Aborted("cancelled before the confirm: the destination was removed".into()),
                Err(e) => {
                    tracing::warn!(workload = %self.name, "cancelled, but the destination stays: {e}", e = ErrorChain(&e))
                }
            }
        }
        if let Some(j) = self.journal.as_mut() {
            j.record_logged(OutgoingState::Committing);
        }
        match commit_move(&moves, &id, answered_at, &policy).await {
            CommitOutcome::Committed => {
                let v = moves.answer.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
                let placed = format!(
                    "{} on node {}",
                    v["dir"].as_str().unwrap_or_default(),
                    v["node"].as_str().unwrap_or_default()
                );
                let resumed_at =
                    v["resumed_at_ms"].as_u64().map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
                VmCommit::Committed { placed, resumed_at }
            }
            CommitOutcome::Aborted(why) => VmCommit::Aborted(why),
            CommitOutcome::InDoubt(why) => VmCommit::InDoubt(why),
        }
    }

    async fn abort(&mut self) -> Result<(), away_migrate::vm::VmMigrateError> {
        let c = &self.client;
        c.check(c.http.delete(format!("{}/v1/vm-migrations/{}", c.base, self.name)).send().await)
            .await
            .map(|_| ())
            .map_err(vm_err)
    }

    /// The base goes over the agent API (mutual TLS between the nodes) only when the
    /// target lacks it; the target checks its digest.
    async fn ensure_base(
        &mut self,
        base: &away_runtime::qemu::BaseImage,
    ) -> Result<bool, away_migrate::vm::VmMigrateError> {
        if self.client.has_disk_base(&base.digest).await.map_err(vm_err)? {
            return Ok(false);
        }
        self.client.upload_disk_base(base).await.map_err(vm_err)?;
        Ok(true)
    }

    fn disk_export(&self, _opts: &away_migrate::vm::VmMigrationOptions) -> Option<(String, u16)> {
        self.disk_export.clone()
    }
}

/// Move VM `name` from this node to the agent behind `client` by QEMU live migration:
/// compatibility check, image upload when the target lacks it, then the VM flow. The
/// stream is QEMU's TLS with the identity of mutual TLS `channels` (the target checked
/// to be the node its agent says it is: the agent API's handshake checked that name
/// already); plain TCP only with plaintext channels.
#[allow(clippy::too_many_arguments)]
pub async fn migrate_vm_via_agent(
    node: &away_runtime::LocalNode,
    source_name: &str,
    name: &str,
    client: AgentClient,
    channels: &away_migrate::channel::Channels,
    opts: away_migrate::vm::VmMigrationOptions,
    cancel: away_migrate::Cancel,
    journal: Option<std::sync::Arc<dyn MoveJournal>>,
    progress: impl Fn(away_migrate::vm::VmProgress) + Send + Sync,
) -> Result<away_model::MigrationReport, MigrateError> {
    let (here, _) = away_migrate::local_node_info(node, source_name).await;
    let there = client.info().await?;
    let tls = away_migrate::vm::VmTls::from_channels(channels, &there.node.name)
        .map_err(|e| MigrateError::Target { target: there.node.name.clone(), message: error_chain(&e) })?;
    let compat = away_migrate::compat::check_vm(&here, &there.node);
    if !compat.allowed {
        return Err(MigrateError::Incompatible(compat.reason));
    }
    let (_, status) = node.get(name).await?;
    let image = node.store.resolve(&status.image)?;
    if !client.has_image(&image.reference).await? {
        client.upload_image(&image.tar).await?;
    }
    if cancel.is_cancelled() {
        return Err(MigrateError::Cancelled(name.into()));
    }
    let journal = journal.map(|journal| JournaledMove {
        journal,
        m: OutgoingMove {
            kind: if opts.postcopy { MoveKind::VmPostcopy } else { MoveKind::VmPrecopy },
            ..OutgoingMove::checkpointing(&format!("vm-{name}"), name, &there.node.name, node.qemu().files(name).dir)
        },
    });
    let mut target = RemoteVmTarget {
        client,
        name: name.to_string(),
        answered: None,
        cancel,
        commit_wait: opts.commit_wait,
        disk_export: None,
        journal,
    };
    // measured before the move's clock starts; a move goes ahead without a prediction
    let plan = if opts.predict {
        let planning = away_migrate::estimate::plan_vm(node, source_name, name, &target.client, &opts, None);
        match tokio::time::timeout(away_migrate::estimate::PLAN_TIMEOUT, planning).await {
            Ok(Ok(plan)) => Some(plan),
            Ok(Err(e)) => {
                tracing::warn!(workload = name, "no prediction: {e}", e = ErrorChain(&e));
                None
            }
            Err(_) => {
                tracing::warn!(workload = name, "no prediction: measuring took too long");
                None
            }
        }
    } else {
        None
    };
    let moved =
        away_migrate::vm::migrate_vm_to(node.qemu(), &mut target, name, &image, &opts, tls.as_ref(), progress).await;
    if let Some(j) = target.journal.as_mut() {
        if moved.is_ok() {
            j.record_logged(OutgoingState::Done);
        } else if matches!(node.get(name).await, Ok((_, s)) if s.state == away_model::WorkloadState::Running) {
            // rolled back: the source runs
            j.record_logged(OutgoingState::Aborted);
        }
        // else open (in doubt, or a post-copy source paused): the next start finishes it
    }
    let (mut report, _) = moved.map_err(|e| match e {
        // the source VM stays paused: the broker must not start it again
        away_migrate::vm::VmMigrateError::InDoubt { ref reason, .. } => MigrateError::InDoubt {
            transfer_id: format!("vm-{name}"),
            target: there.node.name.clone(),
            why: reason.clone(),
            checkpoint: node.qemu().files(name).dir,
        },
        e => MigrateError::Target { target: there.node.name.clone(), message: error_chain(&e) },
    })?;
    report.source = here.name;
    report.target = there.node.name;
    report.reason = format!("{}; {}", compat.reason, report.reason);
    report.predicted = plan.as_ref().and_then(|p| p.chosen_prediction().cloned());
    let history = away_migrate::estimate::History::of(&node.options.paths.state_dir);
    if let Err(e) = history.record(away_model::RuntimeKind::Qemu, &report, plan.as_ref().map(|p| &p.inputs.costs)) {
        tracing::warn!(workload = name, "cannot keep the move in this node's history: {e}");
    }
    Ok(report)
}
