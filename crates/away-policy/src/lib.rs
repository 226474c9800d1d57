//! Away's policy decisions as pure functions of node fingerprints and specs, apart from
//! the runtimes and the migration machinery so that the broker can decide without
//! linking either:
//!
//! * [`runtime`]: the container→VM fallback rule ([`choose_runtime`]);
//! * [`compat`]: may a workload move from one node to another, and how;
//! * [`mode`]: the container migration mode a user asks for ([`ContainerMode`]).
//!
//! `away_runtime` and `away_migrate` re-export these at their old paths.

pub mod compat;
pub mod mode;
pub mod runtime;

pub use compat::{
    check_container, check_vm, missing_isa_flags, with_connections, Compatibility, Rule, CONNECTIONS_RULE,
    USER_ISA_FLAGS,
};
pub use mode::ContainerMode;
pub use runtime::{choose_runtime, NoRuntime, VM_GUEST_ARCH};
