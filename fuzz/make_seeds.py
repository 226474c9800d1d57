#!/usr/bin/env python3
"""Writes the seed corpora in corpus/<target>/ (small, real-shaped inputs). Run from fuzz/.
Image tars of away's own build and `docker save` are copied from their sources; the rest is
made here, byte for byte as away writes it (crates/away-migrate/src/transfer/wire.rs)."""
import gzip, hashlib, io, json, os, shutil, struct, subprocess, tarfile

def out(target, name, data):
    with open(f"corpus/{target}/{name}", "wb") as f:
        f.write(data)

# --- transfer frames: [u8 kind][u32 len BE][payload]; chunk: [u64 index][u32 raw_len][u8 codec][32 sha][data]
def frame(kind, payload):
    return bytes([kind]) + struct.pack(">I", len(payload)) + payload

def chunk(index, raw, codec):
    data = {0: raw, 1: subprocess.run(["zstd", "-q", "-c", "-1"], input=raw, capture_output=True, check=True).stdout,
            2: gzip.compress(raw, 1)}[codec]
    return frame(3, struct.pack(">QIB", index, len(raw), codec) + hashlib.sha256(raw).digest() + data)

raw = b"pages of a counter " * 40
hello = {"version": 1, "transfer_id": "t-1", "total_bytes": 3 * len(raw), "chunk_size": len(raw), "chunk_count": 3,
         "compression": "zstd:1", "sha256": hashlib.sha256(raw * 3).hexdigest(), "meta": {"workload": "counter"}}
j = lambda v: json.dumps(v).encode()
out("transfer_frames", "sender-stream", frame(7, bytes(16)) + frame(1, j(hello)) + chunk(0, raw, 0) + chunk(1, raw, 1)
    + chunk(2, raw, 2) + frame(4, b""))
out("transfer_frames", "receiver-stream", frame(7, b"") + frame(2, j({"have": 1}))
    + frame(6, j({"message": "chunk 1: sha256 mismatch", "resume_from": 1})) + frame(5, j({"ok": True, "message": "restored", "detail": {"pid": 7}})))
out("transfer_frames", "chunk-zstd", chunk(5, bytes(4096), 1))
out("transfer_frames", "chunk-gzip", chunk(6, bytes(range(256)) * 4, 2))

# --- payload tars: what pack_dir writes (GNU tar, sorted, dirs then files), one symlink
def payload(entries, name):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for path, kind, data in entries:
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, data
                t.addfile(info)
            else:
                info.size, info.mode = len(data), (0o755 if kind == "exec" else 0o644)
                t.addfile(info, io.BytesIO(data))
    out("payload_unpack", name, buf.getvalue())

payload([("manifest.json", "file", j({"workload": {"name": "counter", "image": "away/counter:latest"}})),
         ("checkpoint", "dir", None), ("checkpoint/inventory.img", "file", b"\x54\x56\x34\x58" + bytes(60)),
         ("checkpoint/pages-1.img", "file", bytes(4096)), ("checkpoint/pagemap-1.img", "file", bytes(48)),
         ("rootfs-diff", "dir", None), ("rootfs-diff/app", "exec", b"\x7fELF"), ], "checkpoint")
payload([("checkpoint", "dir", None), ("checkpoint/stats-dump", "file", b"\x01" * 32),
         ("checkpoint/current", "link", "stats-dump")], "with-symlink")

# --- image tars: away's own (the test build of images/counter is too big; a tiny one here) and docker save
shutil.copy("../crates/away-image/tests/fixtures/docker-save.tar", "corpus/image_tar/docker-20.10-save.tar")

def tar_of(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()
layer = tar_of([("app", b"#!/bin/sh\necho hi\n")])
def oci_image(layer_blob, layer_type, with_docker):
    cfg = j({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/app"]},
             "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}})
    manifest = j({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
                  "layers": [{"mediaType": layer_type, "digest": sha(layer_blob), "size": len(layer_blob)}]})
    index = j({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
               "digest": sha(manifest), "size": len(manifest),
               "annotations": {"io.containerd.image.name": "docker.io/away/seed:1", "org.opencontainers.image.ref.name": "1"}}]})
    files = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
    if with_docker:
        files.append(("manifest.json", j([{"Config": "blobs/" + sha(cfg).replace(":", "/"), "RepoTags": ["away/seed:1"],
                                          "Layers": ["blobs/" + sha(layer_blob).replace(":", "/")]}])))
    for b in (cfg, manifest, layer_blob):
        files.append(("blobs/" + sha(b).replace(":", "/"), b))
    return tar_of(files)

out("image_tar", "away-oci-and-docker.tar", oci_image(gzip.compress(layer, 6, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip", True))
zstd_layer = subprocess.run(["zstd", "-q", "-c"], input=layer, capture_output=True, check=True).stdout
out("image_tar", "podman-oci-zstd.tar", oci_image(zstd_layer, "application/vnd.oci.image.layer.v1.tar+zstd", False))
out("image_tar", "gzipped-save.tar.gz", gzip.compress(oci_image(layer, "application/vnd.oci.image.layer.v1.tar", True), 6, mtime=0))

# --- specs: the examples, and one with every section
for name in os.listdir("../examples"):
    if name.endswith((".yaml", ".json")):
        shutil.copy(f"../examples/{name}", f"corpus/workload_spec/{name}")
