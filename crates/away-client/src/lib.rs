//! A typed client of the away broker's HTTP API: the calls `away demo` (and a future
//! CLI) make, with the request and answer types the broker itself serves (away-model).
//! Every non-2xx answer becomes [`ClientError::Api`] with the broker's error body.

use std::time::Duration;

use away_model::{
    ErrorBody, Heartbeat, HeartbeatResponse, JoinTokenCreated, JoinTokenRequest, JoinTokenView, MigrationAccepted,
    MigrationRecord, MigrationRequest, NodeView, RegisterRequest, RegisterResponse, SubmitAnswer, UserTokenCreated,
    UserTokenRequest, UserTokenView, WorkloadSpec, WorkloadView,
};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker was not reached, or the answer was cut off.
    #[error("{method} {url}: the broker did not answer")]
    Http {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The broker answered with an error body (`code`, `message`, `field`, and for 409/422
    /// the placement, compatibility or migration that explains it).
    #[error("{method} {url}: {status}: {}", body.error)]
    Api { method: Method, url: String, status: u16, body: Box<ErrorBody> },
    /// The broker answered something that is not the documented body.
    #[error("{method} {url}: {status}: unexpected answer {text:?}")]
    Unexpected { method: Method, url: String, status: u16, text: String },
    /// A 2xx answer whose JSON does not fit the documented type.
    #[error("{method} {url}: the answer does not fit the API's types")]
    Decode {
        method: Method,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status of an answered call (none when the broker was not reached).
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => Some(*status),
            ClientError::Http { .. } | ClientError::Decode { .. } => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the broker's CA certificate")]
    Ca(#[source] away_identity::IdentityError),
    #[error("the HTTP client")]
    Http(#[source] reqwest::Error),
}

/// A broker at `base_url` (`https://host:port`, or `http://` for one started with
/// `--insecure-loopback`), called with one user token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// A client of a plain-HTTP broker (`--insecure-loopback`) with a 30 s timeout per
    /// call; an `https://` URL fails (nothing is trusted): see [`Client::with_ca`].
    pub fn new(base_url: impl Into<String>, user_token: impl Into<String>) -> Result<Client, reqwest::Error> {
        let http = away_identity::http::client_builder(None).timeout(Duration::from_secs(30)).build()?;
        Ok(Client::with_http(http, base_url, user_token))
    }

    /// A client that trusts only the CA certificate `ca_pem` (the broker's `ca.pem`),
    /// with a 30 s timeout per call. None: [`Client::new`].
    pub fn with_ca(
        base_url: impl Into<String>,
        user_token: impl Into<String>,
        ca_pem: Option<&str>,
    ) -> Result<Client, ConnectError> {
        let http = http_client(ca_pem)?;
        Ok(Client::with_http(http, base_url, user_token))
    }

    /// A client on an existing reqwest client (its timeouts, its connection pool).
    pub fn with_http(http: reqwest::Client, base_url: impl Into<String>, user_token: impl Into<String>) -> Client {
        let base = base_url.into().trim_end_matches('/').to_string();
        Client { http, base, token: user_token.into() }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /v1/nodes`
    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.call(Method::GET, "/v1/nodes".into(), None::<&()>).await
    }

    /// `GET /v1/nodes/{name}`
    pub async fn node(&self, name: &str) -> Result<NodeView> {
        self.call(Method::GET, format!("/v1/nodes/{}", segment(name)), None::<&()>).await
    }

    /// `POST /v1/nodes/{name}/revoke`: the node, revoked (its certificates on the CA's
    /// revocation list, its token and key forgotten).
    pub async fn revoke_node(&self, name: &str) -> Result<NodeView> {
        self.call(Method::POST, format!("/v1/nodes/{}/revoke", segment(name)), None::<&()>).await
    }

    /// `POST /v1/workloads`: place and store a workload (201).
    pub async fn submit(&self, spec: &WorkloadSpec) -> Result<SubmitAnswer> {
        self.call(Method::POST, "/v1/workloads".into(), Some(spec)).await
    }

    /// `POST /v1/workloads?dry_run=true`: where it would go; nothing is stored.
    pub async fn dry_run(&self, spec: &WorkloadSpec) -> Result<SubmitAnswer> {
        self.call(Method::POST, "/v1/workloads?dry_run=true".into(), Some(spec)).await
    }

    /// `GET /v1/workloads`
    pub async fn workloads(&self) -> Result<Vec<WorkloadView>> {
        self.call(Method::GET, "/v1/workloads".into(), None::<&()>).await
    }

    /// `GET /v1/workloads/{name}`
    pub async fn workload(&self, name: &str) -> Result<WorkloadView> {
        self.call(Method::GET, format!("/v1/workloads/{}", segment(name)), None::<&()>).await
    }

    /// `DELETE /v1/workloads/{name}` (202: removed once its node reports it gone).
    pub async fn delete_workload(&self, name: &str) -> Result<WorkloadView> {
        self.call(Method::DELETE, format!("/v1/workloads/{}", segment(name)), None::<&()>).await
    }

    /// `POST /v1/migrations` (202): the recorded migration.
    pub async fn migrate(&self, req: &MigrationRequest) -> Result<MigrationRecord> {
        let accepted: MigrationAccepted = self.call(Method::POST, "/v1/migrations".into(), Some(req)).await?;
        Ok(accepted.migration)
    }

    /// `GET /v1/migrations`
    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>> {
        self.call(Method::GET, "/v1/migrations".into(), None::<&()>).await
    }

    /// `GET /v1/migrations/{id}`
    pub async fn migration(&self, id: &str) -> Result<MigrationRecord> {
        self.call(Method::GET, format!("/v1/migrations/{}", segment(id)), None::<&()>).await
    }

    /// `DELETE /v1/migrations/{id}`: the migration, `cancelled`. A 409 ([`ClientError::Api`])
    /// when its online source has started it or it has ended.
    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationRecord> {
        self.call(Method::DELETE, format!("/v1/migrations/{}", segment(id)), None::<&()>).await
    }

    /// `POST /v1/join-tokens` (201): a new join token, its secret in this answer only.
    pub async fn create_join_token(&self, req: &JoinTokenRequest) -> Result<JoinTokenCreated> {
        self.call(Method::POST, "/v1/join-tokens".into(), Some(req)).await
    }

    /// `GET /v1/join-tokens`: without their secrets.
    pub async fn join_tokens(&self) -> Result<Vec<JoinTokenView>> {
        self.call(Method::GET, "/v1/join-tokens".into(), None::<&()>).await
    }

    /// `DELETE /v1/join-tokens/{id}`: the token, revoked.
    pub async fn revoke_join_token(&self, id: &str) -> Result<JoinTokenView> {
        self.call(Method::DELETE, format!("/v1/join-tokens/{}", segment(id)), None::<&()>).await
    }

    /// `POST /v1/user-tokens` (201): a new token for a user, its secret in this answer only
    /// (an admin token's call).
    pub async fn create_user_token(&self, req: &UserTokenRequest) -> Result<UserTokenCreated> {
        self.call(Method::POST, "/v1/user-tokens".into(), Some(req)).await
    }

    /// `GET /v1/user-tokens`: without their secrets.
    pub async fn user_tokens(&self) -> Result<Vec<UserTokenView>> {
        self.call(Method::GET, "/v1/user-tokens".into(), None::<&()>).await
    }

    /// `DELETE /v1/user-tokens/{id}`: the token, revoked.
    pub async fn revoke_user_token(&self, id: &str) -> Result<UserTokenView> {
        self.call(Method::DELETE, format!("/v1/user-tokens/{}", segment(id)), None::<&()>).await
    }

    /// `POST /v1/agents/register` with the cluster's join token (not the user token).
    pub async fn register(&self, join_token: &str, req: &RegisterRequest) -> Result<RegisterResponse> {
        let url = format!("{}/v1/agents/register", self.base);
        self.send(Method::POST, url, join_token, Some(req)).await
    }

    /// `POST /v1/agents/{name}/heartbeat` with the node's agent token.
    pub async fn heartbeat(&self, node: &str, agent_token: &str, hb: &Heartbeat) -> Result<HeartbeatResponse> {
        let url = format!("{}/v1/agents/{}/heartbeat", self.base, segment(node));
        self.send(Method::POST, url, agent_token, Some(hb)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        self.send(method, url, &self.token, body).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        url: String,
        token: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let mut req: RequestBuilder = self.http.request(method.clone(), &url).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let sent = req.send().await;
        let resp: Response = match sent {
            Ok(r) => r,
            Err(source) => return Err(ClientError::Http { method, url, source }),
        };
        let status = resp.status().as_u16();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(source) => return Err(ClientError::Http { method, url, source }),
        };
        decode(method, url, status, &text)
    }
}

/// Turn an answer into `T`, or into the error the broker sent.
fn decode<T: DeserializeOwned>(method: Method, url: String, status: u16, text: &str) -> Result<T> {
    if (200..300).contains(&status) {
        return serde_json::from_str(text).map_err(|source| ClientError::Decode { method, url, source });
    }
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(body) => Err(ClientError::Api { method, url, status, body: Box::new(body) }),
        Err(_) => Err(ClientError::Unexpected { method, url, status, text: text.to_string() }),
    }
}

/// A name as one URL path segment (names are plain, but ids and node names come from outside).
fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A reqwest client (30 s per call) that trusts only the CA certificate `ca_pem`, or
/// plain HTTP only when None.
pub fn http_client(ca_pem: Option<&str>) -> Result<reqwest::Client, ConnectError> {
    let tls = ca_pem.map(away_identity::trusting_client_config).transpose().map_err(ConnectError::Ca)?;
    away_identity::http::client_builder(tls).timeout(Duration::from_secs(30)).build().map_err(ConnectError::Http)
}

#[cfg(test)]
mod tests {
    use super::*;
    use away_model::ErrorCode;

    #[test]
    fn error_bodies_keep_code_field_and_explanation() {
        let text = r#"{"code": "incompatible", "message": "no node fits", "placement": {"workload": "w",
            "chosen": null, "runtime": null, "scores": [], "filtered": [], "feasible_count": 0,
            "filtered_count": 0, "why": "no node fits"}}"#;
        let e = decode::<NodeView>(Method::POST, "http://b/v1/workloads".into(), 422, text).unwrap_err();
        assert_eq!(e.status(), Some(422));
        let ClientError::Api { body, .. } = &e else { panic!("{e:?}") };
        assert_eq!(body.error.code, ErrorCode::Incompatible);
        assert_eq!(body.placement.as_ref().map(|p| p.why.as_str()), Some("no node fits"));
        assert_eq!(e.to_string(), "POST http://b/v1/workloads: 422: no node fits");
    }

    #[test]
    fn non_json_errors_and_bad_bodies_are_reported() {
        let e = decode::<NodeView>(Method::GET, "u".into(), 502, "bad gateway").unwrap_err();
        assert!(matches!(e, ClientError::Unexpected { status: 502, .. }), "{e:?}");
        let e = decode::<NodeView>(Method::GET, "u".into(), 200, "{}").unwrap_err();
        assert!(matches!(e, ClientError::Decode { .. }), "{e:?}");
        assert_eq!(e.to_string(), "GET u: the answer does not fit the API's types");
    }

    #[test]
    fn names_are_one_path_segment() {
        assert_eq!(segment("labdesk"), "labdesk");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_an_http_error() {
        let c = Client::new("http://127.0.0.1:9/", "t").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:9");
        let e = c.nodes().await.unwrap_err();
        assert!(matches!(e, ClientError::Http { .. }), "{e:?}");
        assert_eq!(e.status(), None);
        assert_eq!(e.to_string(), "GET http://127.0.0.1:9/v1/nodes: the broker did not answer");
    }
}
