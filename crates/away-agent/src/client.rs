//! A client of the agent's HTTP API; the migration source uses it as its `TargetNode`.

use async_trait::async_trait;
use away_migrate::target::{TargetInfo, TargetNode};
use away_migrate::MigrateError;
use away_model::ApiError;

pub struct AgentClient {
    base: String,
    http: reqwest::Client,
}

impl AgentClient {
    /// `addr` is `host:port` or a full `http://host:port` URL.
    pub fn new(addr: &str) -> Self {
        let base =
            if addr.starts_with("http://") { addr.trim_end_matches('/').to_string() } else { format!("http://{addr}") };
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("http client");
        AgentClient { base, http }
    }

    fn err(&self, message: impl Into<String>) -> MigrateError {
        MigrateError::Target { target: self.base.clone(), message: message.into() }
    }

    async fn check(&self, resp: Result<reqwest::Response, reqwest::Error>) -> Result<reqwest::Response, MigrateError> {
        let resp = resp.map_err(|e| self.err(format!("unreachable: {e}")))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ApiError>(&body).map(|e| e.to_string()).unwrap_or(body);
        Err(self.err(format!("{status}: {message}")))
    }
}

#[async_trait]
impl TargetNode for AgentClient {
    async fn info(&self) -> Result<TargetInfo, MigrateError> {
        let resp = self.check(self.http.get(format!("{}/v1/node", self.base)).send().await).await?;
        resp.json().await.map_err(|e| self.err(format!("bad /v1/node answer: {e}")))
    }

    async fn has_image(&self, reference: &str) -> Result<bool, MigrateError> {
        let resp = self
            .check(self.http.get(format!("{}/v1/images", self.base)).query(&[("reference", reference)]).send().await)
            .await?;
        let v: serde_json::Value = resp.json().await.map_err(|e| self.err(format!("bad /v1/images answer: {e}")))?;
        Ok(v["present"].as_bool().unwrap_or(false))
    }

    async fn commit(&self, transfer_id: &str) -> Result<(), MigrateError> {
        self.check(self.http.post(format!("{}/v1/transfers/{transfer_id}/commit", self.base)).send().await)
            .await
            .map(|_| ())
    }
}
