//! The other end of a migration, as the source sees it. The agent's HTTP client
//! implements it (`away_agent::client`); tests may use any other.

use async_trait::async_trait;
use away_model::NodeInfo;
use serde::{Deserialize, Serialize};

use crate::MigrateError;

/// What a target tells about itself before anything moves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub node: NodeInfo,
    /// `host:port` of its transfer receiver.
    pub transfer_addr: String,
}

#[async_trait]
pub trait TargetNode: Send + Sync {
    async fn info(&self) -> Result<TargetInfo, MigrateError>;
    /// Does the target's image store hold `reference`?
    async fn has_image(&self, reference: &str) -> Result<bool, MigrateError>;
    /// Put an image tar into the target's image store.
    async fn upload_image(&self, tar: &std::path::Path) -> Result<(), MigrateError>;
    /// Make a provisional incoming workload final.
    async fn commit(&self, transfer_id: &str) -> Result<(), MigrateError>;
    /// Remove a provisional incoming workload now (a lazy move whose lazy phase failed:
    /// the source runs again).
    async fn abort(&self, transfer_id: &str) -> Result<(), MigrateError>;
}
