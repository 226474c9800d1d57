//! Build, write and read back images without a container runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use away_image::{build, build_to_dir, read_image_tar, write_vm_artifact, ArchiveFormat, BuildOptions, VmOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn quiet(_: &str) {}

/// A context with a few files, written in the given order with the given mtime.
fn context(dir: &Path, reverse: bool, mtime: u64) {
    let mut files =
        vec![("app.sh", "#!/bin/sh\necho app\n", 0o755), ("data/b.txt", "b\n", 0o600), ("data/a.txt", "a\n", 0o644)];
    if reverse {
        files.reverse();
    }
    for (name, body, mode) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime)).unwrap();
    }
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY app.sh /app/\nCOPY data /srv/data\nENV GREETING=\"hello world\"\nWORKDIR /srv\nUSER 1000:1000\nEXPOSE 8080\n\
         LABEL a=b\nENTRYPOINT [\"/app/app.sh\"]\nCMD [\"--flag\"]\n",
    )
    .unwrap();
}

#[test]
fn same_inputs_give_the_same_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (c1, c2) = (tmp.path().join("one/app"), tmp.path().join("two/app"));
    std::fs::create_dir_all(&c1).unwrap();
    std::fs::create_dir_all(&c2).unwrap();
    // Different creation order, mtimes and umask-ish modes (0600 vs 0644 both become 0644).
    context(&c1, false, 1_000_000);
    context(&c2, true, 2_000_000);
    let (_, p1, e1) = build_to_dir(&c1, &tmp.path().join("out1"), &BuildOptions::default(), &quiet).unwrap();
    let (_, p2, e2) = build_to_dir(&c2, &tmp.path().join("out2"), &BuildOptions::default(), &quiet).unwrap();
    assert_eq!(e1.manifest_digest, e2.manifest_digest);
    assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap(), "image tars differ byte for byte");
    // And building again in place gives the same again.
    let (_, _, e3) = build_to_dir(&c1, &tmp.path().join("out1"), &BuildOptions::default(), &quiet).unwrap();
    assert_eq!(e1.manifest_digest, e3.manifest_digest);
    // A changed file changes the digest.
    std::fs::write(c1.join("data/a.txt"), "changed\n").unwrap();
    let (_, _, e4) = build_to_dir(&c1, &tmp.path().join("out1"), &BuildOptions::default(), &quiet).unwrap();
    assert_ne!(e1.manifest_digest, e4.manifest_digest);
}

#[test]
fn written_image_reads_back_with_config_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("app");
    std::fs::create_dir_all(&ctx).unwrap();
    context(&ctx, false, 0);
    let (built, path, enc) = build_to_dir(&ctx, tmp.path(), &BuildOptions::default(), &quiet).unwrap();
    assert_eq!(path, tmp.path().join("app.tar"));
    let read = read_image_tar(&path).unwrap();
    assert_eq!(read.format, ArchiveFormat::OciAndDocker);
    assert_eq!(read.manifest_digest, enc.manifest_digest);
    assert_eq!(read.config_digest, enc.config_digest);
    assert_eq!(read.image.tags, vec!["docker.io/away/app:latest".to_string()]);
    let c = read.image.config.config().clone().unwrap();
    assert_eq!(c.entrypoint().clone().unwrap(), vec!["/app/app.sh"]);
    assert_eq!(c.cmd().clone().unwrap(), vec!["--flag"]);
    assert_eq!(c.working_dir().as_deref(), Some("/srv"));
    assert_eq!(c.user().as_deref(), Some("1000:1000"));
    assert_eq!(c.env().clone().unwrap(), vec!["GREETING=hello world"]);
    assert_eq!(c.exposed_ports().clone().unwrap(), vec!["8080/tcp"]);
    assert_eq!(read.image.layers.len(), 1);
    assert_eq!(read.image.layers[0].diff_id, built.image.layers[0].diff_id);
    let tree = away_image::vm::rootfs(&read.image).unwrap();
    let names: Vec<&str> = tree.entries.keys().map(String::as_str).collect();
    assert_eq!(names, vec!["app", "app/app.sh", "srv", "srv/data", "srv/data/a.txt", "srv/data/b.txt"]);
    match &tree.entries["app/app.sh"] {
        away_image::tree::Node::File { mode, .. } => assert_eq!(*mode, 0o755),
        n => panic!("{n:?}"),
    }

    // Also readable as a pure OCI layout (index.json only) and a pure docker-archive.
    for (drop, format) in [("manifest.json", ArchiveFormat::Oci), ("index.json", ArchiveFormat::Docker)] {
        let out = tmp.path().join(format!("without-{drop}.tar"));
        let mut a = tar::Archive::new(std::fs::File::open(&path).unwrap());
        let mut b = tar::Builder::new(std::fs::File::create(&out).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_str() != Some(drop) {
                let mut h = e.header().clone();
                let p = e.path().unwrap().into_owned();
                b.append_data(&mut h, p, &mut e).unwrap();
            }
        }
        b.finish().unwrap();
        let r = read_image_tar(&out).unwrap();
        assert_eq!(r.format, format);
        assert_eq!(r.image.layers[0].digest, read.image.layers[0].digest);
        assert_eq!(r.image.config.config().clone().unwrap().entrypoint().clone().unwrap(), vec!["/app/app.sh"]);
    }
}

#[test]
fn reads_a_docker_save_tar() {
    let read = read_image_tar(&fixture("docker-save.tar")).unwrap();
    assert_eq!(read.format, ArchiveFormat::Docker);
    assert_eq!(read.image.tags, vec!["away-fixture:1".to_string()]);
    let c = read.image.config.config().clone().unwrap();
    assert_eq!(c.cmd().clone().unwrap(), vec!["/bin/hi"]);
    assert!(c.env().clone().unwrap().contains(&"FIXTURE=1".to_string()));
    assert_eq!(read.image.layers.len(), 1);
    assert_eq!(
        read.image.layers[0].compression,
        away_image::tree::Compression::None,
        "docker save layers are plain tars"
    );
    let diff_ids = read.image.config.rootfs().diff_ids().clone();
    assert_eq!(diff_ids, vec![read.image.layers[0].diff_id.clone()], "diff ids must match the layer bytes");
    let tree = away_image::vm::rootfs(&read.image).unwrap();
    match &tree.entries["etc/greeting"] {
        away_image::tree::Node::File { data, .. } => assert_eq!(data, b"hello from docker\n"),
        n => panic!("{n:?}"),
    }
}

#[test]
fn from_a_local_image_tar_keeps_its_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("derived");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(fixture("docker-save.tar"), ctx.join("base.tar")).unwrap();
    std::fs::write(ctx.join("extra.txt"), "extra\n").unwrap();
    std::fs::write(ctx.join("Containerfile"), "FROM base.tar\nCOPY extra.txt /etc/\nENV MORE=2\n").unwrap();
    let built = build(&ctx, &BuildOptions::default(), &quiet).unwrap();
    assert_eq!(built.image.layers.len(), 2);
    let c = built.image.config.config().clone().unwrap();
    let env = c.env().clone().unwrap();
    assert!(env.contains(&"FIXTURE=1".into()) && env.contains(&"MORE=2".into()), "{env:?}");
    assert_eq!(c.cmd().clone().unwrap(), vec!["/bin/hi"], "CMD is inherited from the base");
    let tree = away_image::vm::rootfs(&built.image).unwrap();
    assert!(tree.entries.contains_key("etc/greeting") && tree.entries.contains_key("etc/extra.txt"));
}

#[test]
fn errors_name_the_file_and_line_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("bad");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY missing.txt /x\n").unwrap();
    let out = tmp.path().join("out");
    let err = build_to_dir(&ctx, &out, &BuildOptions::default(), &quiet).unwrap_err().to_string();
    assert!(err.contains("Containerfile:2: cannot read") && err.contains("missing.txt"), "{err}");
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "nothing half-written");

    std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY --from=cargo app /app\n").unwrap();
    let err = build_to_dir(&ctx, &out, &BuildOptions::default(), &quiet).unwrap_err().to_string();
    assert!(err.contains("needs a Cargo.toml"), "{err}");

    let err = read_image_tar(&ctx.join("Containerfile")).unwrap_err().to_string();
    assert!(err.contains("Containerfile"), "{err}");
}

#[test]
fn vm_initramfs_has_console_init_and_rootfs() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("app");
    std::fs::create_dir_all(&ctx).unwrap();
    context(&ctx, false, 0);
    let built = build(&ctx, &BuildOptions::default(), &quiet).unwrap();
    // Fake kernel and module tree, so the test needs neither /opt/away-guest nor busybox.
    let guest = tmp.path().join("guest");
    std::fs::create_dir_all(guest.join("kernel/net")).unwrap();
    std::fs::write(guest.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(guest.join("kernel/net/base.ko"), b"\0license=GPL\0depends=\0").unwrap();
    std::fs::write(guest.join("kernel/net/nic.ko"), b"\0depends=base\0name=nic\0").unwrap();
    std::fs::write(guest.join("busybox"), b"#!fake").unwrap();
    let opts = VmOptions {
        kernel: guest.join("vmlinuz"),
        modules_dir: guest.clone(),
        modules: vec!["nic".into()],
        busybox: guest.join("busybox"),
        ..VmOptions::default()
    };
    let out = tmp.path().join("out");
    let art = write_vm_artifact(&built.image, "app", &out, &opts, &quiet).unwrap();
    assert_eq!(art.spec.modules, vec!["base", "nic"], "dependencies load first");
    assert_eq!(art.spec.guest_port, Some(8080));
    assert!(art.spec.cmdline.contains("away.ip=10.0.2.15/24"));
    let gz = std::fs::read(&art.initrd).unwrap();
    let mut r = flate2::read::GzDecoder::new(gz.as_slice());
    let mut entries = std::collections::BTreeMap::new();
    loop {
        let reader = cpio::NewcReader::new(r).unwrap();
        if reader.entry().is_trailer() {
            break;
        }
        let e = reader.entry();
        let (name, mode, rdev) = (e.name().to_string(), e.mode(), (e.rdev_major(), e.rdev_minor()));
        let mut data = Vec::new();
        let mut reader = reader;
        std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
        entries.insert(name, (mode, rdev, data));
        r = reader.finish().unwrap();
    }
    let (mode, rdev, _) = &entries["dev/console"];
    assert_eq!((mode & 0o170000, *rdev), (0o020000, (5, 1)), "char device 5:1");
    let init = String::from_utf8(entries["init"].2.clone()).unwrap();
    assert!(init.contains("insmod /.away/modules/base.ko") && init.contains("insmod /.away/modules/nic.ko"));
    assert!(init.contains("export GREETING='hello world'"), "{init}");
    assert!(init.contains("cd '/srv'"), "{init}");
    assert!(init.contains("setpriv --reuid='1000' --regid='1000'"), "{init}");
    assert!(init.contains("'/app/app.sh' '--flag'"), "{init}");
    assert!(entries.contains_key("app/app.sh") && entries.contains_key(".away/busybox"));
    assert_eq!(entries["init"].0 & 0o777, 0o755);
}
