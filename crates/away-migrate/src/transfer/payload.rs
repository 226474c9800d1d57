//! The payload as bytes: a deterministic tar of the checkpoint directory, cut into chunks that
//! are hashed and compressed one by one; and the way back (verify, unpack safely).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use away_runtime::host::beneath::Beneath;

use sha2::{Digest, Sha256};

use super::wire::{ChunkFrame, CODEC_GZIP, CODEC_NONE, CODEC_ZSTD};
use super::{Compression, TransferError};

/// Counts and hashes everything written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `dir` as a tar to `out`: entries sorted by name, owner 0, so the same tree always gives
/// the same bytes; the `exclude`d paths (relative to `dir`) are left out. Returns the stream
/// length and its SHA-256.
pub(crate) fn pack_dir(dir: &Path, exclude: &[PathBuf], out: &mut File) -> Result<(u64, [u8; 32]), TransferError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Io { path, source }
    };
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() {
        return Err(TransferError::NotADirectory { path: dir.to_path_buf() });
    }
    let writer = HashingWriter { inner: BufWriter::with_capacity(1 << 20, &mut *out), hasher: Sha256::new(), count: 0 };
    let mut builder = tar::Builder::new(writer);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&abs)
            .map_err(io_err(&abs))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(&abs))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel_path = rel.join(&name);
            if exclude.contains(&rel_path) {
                continue;
            }
            let path = dir.join(&rel_path);
            let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let mut header = tar::Header::new_gnu();
            header.set_mode(md.mode() & 0o7777);
            header.set_mtime(md.mtime().max(0) as u64);
            header.set_uid(0);
            header.set_gid(0);
            let ft = md.file_type();
            let result = if ft.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                subdirs.push(rel_path.clone());
                builder.append_data(&mut header, &rel_path, io::empty())
            } else if ft.is_file() {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(md.len());
                let file = File::open(&path).map_err(io_err(&path))?;
                // take(): a file growing while we read must not corrupt the stream.
                builder.append_data(&mut header, &rel_path, file.take(md.len()))
            } else {
                // the receiver takes files and directories only (see `unpack`)
                return Err(TransferError::UnsupportedFile { path });
            };
            result.map_err(io_err(&path))?;
        }
        // Reverse so the stack pops them in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    let writer = builder.into_inner().map_err(io_err(dir))?;
    let HashingWriter { inner, hasher, count } = writer;
    // No fsync: the spool is a temporary file that dies with this process anyway.
    inner.into_inner().map_err(|e| TransferError::Io { path: dir.to_path_buf(), source: e.into_error() })?;
    Ok((count, hasher.finalize().into()))
}

/// Unpacks a payload tar into `dst`, which must not exist yet. Only regular files and
/// directories at plain paths below `dst`: no absolute paths, no `..`, and no symlinks, hard
/// links, devices or fifos, which CRIU's images never are (a real containerd or Docker
/// checkpoint holds image files, a rootfs-diff tar and the manifest; the CRIU work
/// directory with its logs stays behind) and which would let a later step of the restore,
/// run as root, write or read outside `dst`. Everything is owner-only, since checkpoints
/// hold process memory.
pub(crate) fn unpack(tar_path: &Path, dst: &Path, transfer_id: &str) -> Result<(), TransferError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Io { path, source }
    };
    fs::DirBuilder::new().mode(0o700).create(dst).map_err(io_err(dst))?;
    let root = Beneath::open(dst)?;
    let file = File::open(tar_path).map_err(io_err(tar_path))?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
    for entry in archive.entries().map_err(io_err(tar_path))? {
        let mut entry = entry.map_err(io_err(tar_path))?;
        let raw_path = entry.path().map_err(io_err(tar_path))?.into_owned();
        let escape = || TransferError::PathTraversal { entry: raw_path.clone(), transfer_id: transfer_id.to_string() };
        let mut rel = PathBuf::new();
        for component in raw_path.components() {
            match component {
                Component::Normal(part) => rel.push(part),
                Component::CurDir => {}
                _ => return Err(escape()),
            }
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => root.create_dir_all(&rel, 0o700)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                    root.create_dir_all(parent, 0o700)?;
                }
                let exec = entry.header().mode().unwrap_or(0) & 0o100;
                // new, beneath `dst`, never through a link: nothing an earlier entry put there
                let mut file = root.create_new(&rel, 0o600 | exec)?;
                io::copy(&mut entry, &mut file).map_err(io_err(&dst.join(&rel)))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            _ => {
                return Err(TransferError::UnsupportedEntry {
                    entry: raw_path.clone(),
                    kind: format!("{kind:?}"),
                    transfer_id: transfer_id.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Hashes and compresses one raw chunk into a complete chunk frame. Chunks that do not shrink
/// (random pages, already compressed data) go raw: no wire or CPU cost on the receiver.
pub(crate) fn encode_chunk(index: u64, raw: &[u8], compression: Compression) -> io::Result<Vec<u8>> {
    let sha: [u8; 32] = Sha256::digest(raw).into();
    let compressed = match compression {
        Compression::None => None,
        Compression::Zstd { level } => Some((CODEC_ZSTD, zstd::bulk::compress(raw, level)?)),
        Compression::Gzip { level } => {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::with_capacity(raw.len() / 2), flate2::Compression::new(level));
            enc.write_all(raw)?;
            Some((CODEC_GZIP, enc.finish()?))
        }
    };
    let raw_len = raw.len() as u32;
    Ok(match compressed {
        Some((codec, data)) if data.len() < raw.len() => super::wire::encode_chunk(index, raw_len, codec, &sha, &data),
        _ => super::wire::encode_chunk(index, raw_len, CODEC_NONE, &sha, raw),
    })
}

/// Decompresses and verifies a chunk; `Err` says what is wrong with it.
pub(crate) fn decode_chunk(chunk: &ChunkFrame, expected_len: u64) -> Result<Vec<u8>, String> {
    if u64::from(chunk.raw_len) != expected_len {
        return Err(format!("raw length {} where {} was expected", chunk.raw_len, expected_len));
    }
    let want = chunk.raw_len as usize;
    let raw = match chunk.codec {
        CODEC_NONE => chunk.data.clone(),
        // Capacity-bounded: a hostile frame cannot make us allocate more than one chunk.
        CODEC_ZSTD => zstd::bulk::decompress(&chunk.data, want).map_err(|e| format!("zstd: {e}"))?,
        CODEC_GZIP => {
            let mut out = Vec::with_capacity(want);
            flate2::read::GzDecoder::new(&chunk.data[..])
                .take(want as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip: {e}"))?;
            out
        }
        other => return Err(format!("unknown codec {other}")),
    };
    if raw.len() != want {
        return Err(format!("decompressed to {} bytes instead of {want}", raw.len()));
    }
    let sha: [u8; 32] = Sha256::digest(&raw).into();
    if sha != chunk.sha256 {
        return Err(format!("sha256 mismatch (got {}, sender said {})", hex(&sha), hex(&chunk.sha256)));
    }
    Ok(raw)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_of(frame: &[u8]) -> ChunkFrame {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        match rt.block_on(super::super::wire::read_frame(&mut &frame[..], 1 << 20)).unwrap().0 {
            super::super::wire::Frame::Chunk(c) => c,
            _ => unreachable!(),
        }
    }

    #[test]
    fn excluded_paths_stay_behind() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("checkpoint/work")).unwrap();
        std::fs::write(src.path().join("checkpoint/core-1.img"), b"core").unwrap();
        std::fs::write(src.path().join("checkpoint/work/dump.log"), b"log").unwrap();
        let mut out = tempfile::tempfile().unwrap();
        pack_dir(src.path(), &[PathBuf::from("checkpoint/work")], &mut out).unwrap();
        std::io::Seek::rewind(&mut out).unwrap();
        let names: Vec<String> = tar::Archive::new(out)
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["checkpoint", "checkpoint/core-1.img"]);
    }

    #[test]
    fn chunks_round_trip_with_every_codec() {
        let text: Vec<u8> = b"page table entry ".iter().cycle().take(100_000).copied().collect();
        for compression in [Compression::None, Compression::Zstd { level: 3 }, Compression::Gzip { level: 1 }] {
            let chunk = chunk_of(&encode_chunk(4, &text, compression).unwrap());
            assert_eq!(decode_chunk(&chunk, text.len() as u64).unwrap(), text, "{compression}");
        }
    }

    #[test]
    fn flipped_byte_is_detected() {
        let text = vec![7u8; 4096];
        let mut frame = encode_chunk(0, &text, Compression::None).unwrap();
        frame[super::super::wire::CHUNK_DATA_OFFSET + 10] ^= 1;
        let err = decode_chunk(&chunk_of(&frame), 4096).unwrap_err();
        assert!(err.contains("sha256 mismatch"), "{err}");
    }

    fn tar_with_raw_name(name: &[u8], kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        let mut out = header.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    #[test]
    fn unpack_refuses_path_traversal() {
        let tmp = tempfile::tempdir().unwrap();
        let cases: Vec<Vec<u8>> = vec![
            tar_with_raw_name(b"../evil", tar::EntryType::Regular, None, b"x"),
            tar_with_raw_name(b"/etc/evil", tar::EntryType::Regular, None, b"x"),
        ];
        for (i, mut bytes) in cases.into_iter().enumerate() {
            bytes.extend_from_slice(&[0u8; 1024]);
            let tar_path = tmp.path().join(format!("case{i}.tar"));
            fs::write(&tar_path, &bytes).unwrap();
            let dst = tmp.path().join(format!("out{i}"));
            let err = unpack(&tar_path, &dst, "t1").unwrap_err();
            assert!(matches!(err, TransferError::PathTraversal { .. }), "case {i}: {err}");
            assert!(err.to_string().contains("escapes"), "{err}");
        }
        assert!(!Path::new("/tmp/evil").exists());
    }

    /// Entries that are not files or directories, each after a harmless file: refused, named.
    #[test]
    fn unpack_refuses_links_devices_and_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let victim_name = victim.to_str().unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("core-1.img", tar_with_raw_name(b"core-1.img", tar::EntryType::Symlink, Some(victim_name), b"")),
            (
                "link/evil",
                [
                    tar_with_raw_name(b"link", tar::EntryType::Symlink, Some("/tmp"), b""),
                    tar_with_raw_name(b"link/evil", tar::EntryType::Regular, None, b"x"),
                ]
                .concat(),
            ),
            ("hard", tar_with_raw_name(b"hard", tar::EntryType::Link, Some(victim_name), b"")),
            ("dev", tar_with_raw_name(b"dev", tar::EntryType::Char, None, b"")),
            ("blk", tar_with_raw_name(b"blk", tar::EntryType::Block, None, b"")),
            ("fifo", tar_with_raw_name(b"fifo", tar::EntryType::Fifo, None, b"")),
        ];
        for (i, (name, entry)) in cases.into_iter().enumerate() {
            let mut bytes = tar_with_raw_name(b"pages-1.img", tar::EntryType::Regular, None, b"pages");
            bytes.extend_from_slice(&entry);
            bytes.extend_from_slice(&[0u8; 1024]);
            let tar_path = tmp.path().join(format!("case{i}.tar"));
            fs::write(&tar_path, &bytes).unwrap();
            let err = unpack(&tar_path, &tmp.path().join(format!("out{i}")), "t2").unwrap_err();
            assert!(matches!(err, TransferError::UnsupportedEntry { .. }), "{name}: {err}");
            let first = name.split('/').next().unwrap();
            assert!(err.to_string().contains(first), "the entry is named: {err}");
            assert!(!tmp.path().join(format!("out{i}")).join(first).exists(), "{name} was not created");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(!Path::new("/tmp/evil").exists());
    }

    #[test]
    fn files_and_directories_unpack_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = tar_with_raw_name(b"checkpoint/", tar::EntryType::Directory, None, b"");
        bytes.extend(tar_with_raw_name(b"checkpoint/pages-1.img", tar::EntryType::Regular, None, b"pages"));
        bytes.extend(tar_with_raw_name(b"deep/er/manifest.json", tar::EntryType::Regular, None, b"{}"));
        bytes.extend_from_slice(&[0u8; 1024]);
        let tar_path = tmp.path().join("ok.tar");
        fs::write(&tar_path, &bytes).unwrap();
        let out = tmp.path().join("out");
        unpack(&tar_path, &out, "t3").unwrap();
        let pages = out.join("checkpoint/pages-1.img");
        assert_eq!(fs::read(&pages).unwrap(), b"pages");
        assert_eq!(fs::metadata(&pages).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(out.join("deep/er")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::read(out.join("deep/er/manifest.json")).unwrap(), b"{}");
    }
}
