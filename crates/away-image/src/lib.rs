//! Build and read OCI images for lab apps, and boot artifacts for VMs, from one recipe.
//!
//! Data flow: `images/<app>/Containerfile` ([`recipe`]) -> [`build`] (layers from
//! the context, static Rust binaries from its Cargo.toml) -> an image tar that is
//! both an OCI layout and a docker-archive ([`archive`]) -> optionally a VM
//! initramfs + kernel + boot spec from the same root filesystem ([`vm`]). Image tars
//! other tools made (`docker save`, podman, skopeo) are read by [`read`].

pub mod archive;
pub mod build;
pub mod disk;
pub mod read;
pub mod recipe;
pub mod tree;
pub mod vm;

pub use archive::{read_image_tar, ArchiveError, ArchiveFormat, Image, ReadImage};
pub use build::{build, build_to_dir, BuildError, BuildOptions, Built};
pub use disk::{write_blank_disk_image, write_disk_image, DiskImage};
pub use recipe::{Recipe, RecipeError};
pub use vm::{
    overrides_cpio, overrides_cpio_with_disk, write_vm_artifact, BootSpec, GuestDisk, VmArtifact, VmError, VmOptions,
};
