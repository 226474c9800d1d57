//! OpenAPI schemas that derive cannot write: types with hand-written serde, and
//! string fields whose accepted values are checked by parsing rather than by their type.

use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::node::CpuVendor;
use crate::size::ByteSize;

/// Sizes of at least 4Mi that fit in 64 bits, in the canonical forms (an integer and a
/// unit). `ByteSize` also parses fractions ("0.5Gi"); the schema lists the integer forms
/// only, which is what the broker answers with, so that every size it allows is accepted.
pub const MEMORY_PATTERN: &str = concat!(
    r"^(",
    r"([5-9][0-9]{6}|[1-9][0-9]{7,18})B",
    // 4Mi is 4096Ki: 4000Ki–4095Ki are too small
    r"|(409[6-9]|4[1-9][0-9]{2}|[5-9][0-9]{3}|[1-9][0-9]{4,15})(Ki|KiB)",
    r"|([5-9][0-9]{3}|[1-9][0-9]{4,15})(k|K|kB|KB)",
    r"|([4-9]|[1-9][0-9]{1,12})(Mi|MiB)",
    r"|([5-9]|[1-9][0-9]{1,12})(M|MB)",
    r"|[1-9][0-9]{0,9}(Gi|GiB|G|GB)",
    r"|[1-9][0-9]{0,6}(Ti|TiB|T|TB)",
    r")$"
);

impl PartialSchema for ByteSize {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(MEMORY_PATTERN))
            .description(Some(
                "A size with a unit: binary (Ki, Mi, Gi, Ti, also KiB…) or decimal (k, M, G, T, also kB…) or B; \
                 at least 4Mi; a bare number is refused",
            ))
            .examples(["256Mi"])
            .into()
    }
}

impl ToSchema for ByteSize {}

impl PartialSchema for CpuVendor {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("intel, amd, hygon or arm; any other CPUID vendor string as /proc/cpuinfo reports it"))
            .examples(["amd"])
            .into()
    }
}

impl ToSchema for CpuVendor {}

/// `env` of a spec: names non-empty, without '=' or NUL.
pub fn env_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[^=\u{0}]+$"))))
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
        .into()
}

/// The container migration modes a request may name (`ContainerMode`'s names and aliases).
pub fn container_mode_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(string_or_null())
        .enum_values(Some([
            Some("auto"),
            Some("stop-copy"),
            Some("stop-and-copy"),
            Some("staged"),
            Some("stop-copy-staged"),
            Some("lazy"),
            Some("post-copy"),
            None,
        ]))
        .description(Some("Containers: stop-copy, staged, lazy or auto (omitted or null: auto)"))
        .into()
}

/// The spec's one rule across fields (`WorkloadSpec::validate`): kind vm runs on qemu only,
/// kind container never on qemu; `placement.runtime` absent or null leaves the choice open.
pub fn kind_runtime_rule() -> Schema {
    use utoipa::openapi::schema::AnyOfBuilder;
    let runtime_for = |kind: &str, runtimes: &[&str]| -> Schema {
        let mut allowed: Vec<Option<&str>> = runtimes.iter().copied().map(Some).collect();
        allowed.push(None);
        ObjectBuilder::new()
            .property("kind", ObjectBuilder::new().schema_type(Type::String).enum_values(Some([kind])))
            .property(
                "placement",
                ObjectBuilder::new()
                    .property("runtime", ObjectBuilder::new().schema_type(string_or_null()).enum_values(Some(allowed))),
            )
            .into()
    };
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .property("kind", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["auto"]))),
        )
        .item(runtime_for("vm", &["qemu"]))
        .item(runtime_for("container", &["containerd", "docker"]))
        .description(Some("kind vm needs runtime qemu; kind container cannot run on qemu"))
        .into()
}

/// The spec's rule across `disk` and `kind` (`WorkloadSpec::validate`): a workload with a
/// disk is a VM, and says so (`kind: vm`; the default `auto` is refused).
pub fn disk_kind_rule() -> Schema {
    use utoipa::openapi::schema::AnyOfBuilder;
    AnyOfBuilder::new()
        .item(ObjectBuilder::new().property("disk", ObjectBuilder::new().schema_type(Type::Null)))
        .item(
            ObjectBuilder::new()
                .property("kind", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["vm"])))
                .required("kind"),
        )
        .description(Some("a workload with a disk needs kind vm"))
        .into()
}

/// The spec's rule across `volumes` and `kind`: volumes are for containers (`kind: vm`
/// with a volume is refused).
pub fn volumes_kind_rule() -> Schema {
    use utoipa::openapi::schema::AnyOfBuilder;
    AnyOfBuilder::new()
        .item(ObjectBuilder::new().property("volumes", utoipa::openapi::schema::ArrayBuilder::new().max_items(Some(0))))
        .item(
            ObjectBuilder::new().property(
                "kind",
                ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["auto", "container"])),
            ),
        )
        .description(Some("volumes are for containers: kind vm has none"))
        .into()
}

/// `volumes` of a spec: the same volume twice mounts a path twice. (Two volumes of one
/// name or onto one path are refused too, which JSON Schema cannot say.)
pub fn volumes_schema() -> Schema {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(utoipa::openapi::Ref::from_schema_name("VolumeSpec"))
        .unique_items(true)
        .description(Some("Named volumes of a container (containerd only): directories of the node, mounted read-write at their paths, that move with the workload; each name and path at most once"))
        .into()
}

/// `ports` of a spec: the same mapping twice publishes a host port twice. (Two different
/// mappings onto one host port are refused too, which JSON Schema cannot say.)
pub fn ports_schema() -> Schema {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(utoipa::openapi::Ref::from_schema_name("PortMapping"))
        .unique_items(true)
        .description(Some("Ports to publish; each host port at most once"))
        .into()
}

fn string_or_null() -> utoipa::openapi::schema::SchemaType {
    utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null])
}

/// `capabilities.add` / `.drop`: Linux capability names with or without `CAP_`, in upper
/// or lower case, or `ALL` (the spec also takes mixed case, as Docker does).
pub fn capability_list_schema() -> Schema {
    let mut names: Vec<String> = vec!["ALL".into(), "all".into()];
    for cap in crate::spec::ALL_CAPABILITIES {
        let bare = &cap[4..];
        names.extend([cap.to_string(), bare.to_string(), cap.to_ascii_lowercase(), bare.to_ascii_lowercase()]);
    }
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(names)))
        .examples([serde_json::json!(["NET_ADMIN"])])
        .into()
}
