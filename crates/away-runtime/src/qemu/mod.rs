//! QEMU backend (QMP). Being written.
