//! Running workloads on a node: host fingerprinting (what the node is and can run) and,
//! beside it, the `Runtime` trait with its containerd, Docker and QEMU backends.

pub mod host;
