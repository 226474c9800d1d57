//! Running workloads on a node: the `Runtime` trait and its backends (containerd,
//! Docker, QEMU), the image store they import from, the container→VM fallback rule, and
//! host fingerprinting (what the node is and can run).
// The few `unsafe` blocks left (what rustix cannot cover) each say why they are sound.

pub mod containerd;
pub mod docker;
pub mod fallback;
pub mod host;
pub mod node;
pub mod qemu;
pub mod rootfs;
pub mod runtime;
pub mod steps;
pub mod store;
pub mod volume;

pub use fallback::{choose_runtime, NoRuntime};
pub use node::{LocalNode, NodeOptions, Started};
pub use runtime::{
    CheckpointArchive, CheckpointOptions, LazyCheckpointOptions, LazyDump, LazyPagesUp, LogStream, RestoreRequest,
    RunRequest, Runtime, RuntimeError, CRIU_PAGE_SERVER_ABORT, CRIU_WORK_DIR,
};
pub use store::{ImageStore, ImageSummary, ResolvedImage};
