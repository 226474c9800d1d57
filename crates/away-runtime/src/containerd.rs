//! containerd backend (containerd-client over tonic). Being written.
