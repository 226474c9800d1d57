//! The container→VM fallback rule lives in `away_policy::runtime` (the broker uses it
//! without linking the runtimes); re-exported here for the runtime's callers.

pub use away_policy::runtime::{choose_runtime, NoRuntime, VM_GUEST_ARCH};
