//! Docker engine backend (bollard). Being written.
