//! Broker events: what happened in the cluster, for `GET /v1/events` (Server-Sent
//! Events, one JSON object per `data:` line) and the log. Sent on a broadcast channel;
//! a subscriber too slow to keep up is told how many it missed.

// the API body lives in away-model, shared with away-client
pub use away_model::BrokerEvent;

/// An event before it gets its sequence number.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub kind: &'static str,
    pub node: Option<String>,
    pub workload: Option<String>,
    pub migration: Option<String>,
    pub message: String,
    pub by: Option<String>,
}

impl Pending {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Pending {
        Pending { kind, message: message.into(), ..Default::default() }
    }
    pub fn node(mut self, node: &str) -> Pending {
        self.node = Some(node.to_string());
        self
    }
    pub fn workload(mut self, workload: &str) -> Pending {
        self.workload = Some(workload.to_string());
        self
    }
    pub fn migration(mut self, id: &str) -> Pending {
        self.migration = Some(id.to_string());
        self
    }
    /// Whose request it follows ([`crate::broker::Caller::name`]).
    pub fn by(mut self, user: &str) -> Pending {
        self.by = Some(user.to_string());
        self
    }
}
