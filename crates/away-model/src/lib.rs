//! Plain serde types shared by every `away` crate and spoken on the wire between the
//! CLI, the broker and the agents: workload specs, node fingerprints, wire errors.
//! No I/O beyond parsing text: the types stay easy to test and to reuse.

mod api;
mod chain;
mod cluster;
#[doc(hidden)]
pub mod fuzzing;
mod node;
mod overlay;
mod predict;
mod size;
mod spec;
pub mod whole;
mod wire;
mod workload;

pub use chain::{error_chain, ErrorChain};
#[cfg(feature = "openapi")]
pub mod openapi;

pub use api::{
    is_user_name, BrokerEvent, Compatibility, ErrorBody, Filtered, JoinTokenCreated, JoinTokenRequest, JoinTokenView,
    MigrationAccepted, MigrationPlanAnswer, MigrationRecord, MigrationRequest, MigrationState, NodeScore, NodeView,
    Optimize, PlacementDecision, Rule, SubmitAnswer, TokenState, UserTokenCreated, UserTokenRequest, UserTokenView,
    WorkloadView, ADMIN_USER, DEFAULT_MIGRATION_DEADLINE_S, MAX_JOIN_TOKEN_LIFETIME_S, MAX_MIGRATION_DEADLINE_S,
    MAX_USER_TOKEN_LIFETIME_S, USER_NAME_PATTERN,
};
pub use cluster::{
    AgentEvent, Assignment, Desired, Heartbeat, HeartbeatResponse, MigrationOrder, NodeLoad, RegisterRequest,
    RegisterResponse,
};
pub use node::{Accel, Arch, CpuInfo, CpuVendor, HypervisorInfo, LinkInfo, NodeInfo, RuntimeInfo, Tier};
pub use overlay::{format_mac, NetworkFollow, NodeOverlay, OverlayAddress, RemoteWorkload, DEFAULT_NETWORK};
pub use predict::{MoveKind, MovePlan, MovePrediction, PhaseCosts, PredictionInputs};
pub use size::{ByteSize, ByteSizeError};
pub use spec::{
    capability_name, Capabilities, DiskSpec, FieldError, PlacementConstraints, PortMapping, Resources, RuntimeKind,
    Seccomp, SpecError, SpecFormat, VolumeSpec, WorkloadKind, WorkloadSpec, ALL_CAPABILITIES, DEFAULT_CAPABILITIES,
};
pub use wire::{ApiError, ErrorCode};
pub use workload::{
    MigrationMode, MigrationPhase, MigrationReport, RuntimeDecision, RuntimeVerdict, VolumeTransfer, WorkloadState,
    WorkloadStatus,
};
