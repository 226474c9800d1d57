//! CRIU's pagemap image, read and rewritten: which pages a checkpoint has, where their
//! contents are (the pages image, in entry order) and which ones a lazy dump left on
//! the source.
//!
//! Format (criu/images/pagemap.proto): two u32 magics, then entries of (u32 length,
//! protobuf message); the first is the head (`pages_id` = 1: the pages image's
//! number), the others `pagemap_entry` (vaddr = 1, nr_pages = 2, in_parent = 3,
//! flags = 4; CRIU 4 may add a 64-bit page count as 5). Every field is a varint, so
//! a few lines decode and encode them; no crate reads CRIU images. The image framing
//! and the protobuf reader here also serve [`super::push`], which reads core images.

use std::path::{Path, PathBuf};

use away_runtime::host::beneath::{Beneath, BeneathError};

/// An image of a checkpoint directory, read beneath that directory (never through a
/// link a peer put there).
pub fn read_image(image: &Path) -> Result<Vec<u8>, BeneathError> {
    let (dir, name) = split(image)?;
    dir.read(name)
}

/// `image`'s directory, opened, and its file name.
fn split(image: &Path) -> Result<(Beneath, &std::ffi::OsStr), BeneathError> {
    let dir = Beneath::open(image.parent().unwrap_or(Path::new(".")))?;
    let name = image.file_name().ok_or_else(|| BeneathError {
        op: "open",
        dir: dir.path().to_path_buf(),
        name: image.to_path_buf(),
        reason: "not a file name".into(),
    })?;
    Ok((dir, name))
}

/// Entry flags (criu/include/pagemap.h).
pub const PE_PARENT: u64 = 1 << 0;
pub const PE_LAZY: u64 = 1 << 1;
pub const PE_PRESENT: u64 = 1 << 2;

const FIELD_VADDR: u64 = 1;
const FIELD_PAGES: u64 = 2;
const FIELD_PAGES64: u64 = 5;
const FIELD_FLAGS: u64 = 4;
const FIELD_PAGES_ID: u64 = 1;

/// One `pagemap_entry`, its fields kept in order (so that rewriting one keeps the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    fields: Vec<(u64, u64)>,
}

impl Entry {
    pub fn new(vaddr: u64, pages: u64, flags: u64) -> Entry {
        Entry { fields: vec![(FIELD_VADDR, vaddr), (FIELD_PAGES, pages), (FIELD_FLAGS, flags)] }
    }

    fn get(&self, field: u64) -> Option<u64> {
        self.fields.iter().find(|(k, _)| *k == field).map(|(_, v)| *v)
    }

    pub fn vaddr(&self) -> u64 {
        self.get(FIELD_VADDR).unwrap_or(0)
    }

    pub fn pages(&self) -> u64 {
        self.get(FIELD_PAGES64).filter(|n| *n > 0).or(self.get(FIELD_PAGES)).unwrap_or(0)
    }

    pub fn flags(&self) -> u64 {
        self.get(FIELD_FLAGS).unwrap_or(0)
    }

    /// Pages left on the source by a lazy dump (not in the pages image).
    pub fn is_lazy_only(&self) -> bool {
        self.flags() & PE_LAZY != 0 && self.flags() & PE_PRESENT == 0
    }

    /// This entry's fields (flags, in_parent …) for another range of its pages.
    pub fn with_range(&self, vaddr: u64, pages: u64) -> Entry {
        let mut e = self.clone();
        let wide = e.get(FIELD_PAGES64).is_some();
        for f in e.fields.iter_mut() {
            match f.0 {
                FIELD_VADDR => f.1 = vaddr,
                FIELD_PAGES64 => f.1 = pages,
                FIELD_PAGES if !wide => f.1 = pages,
                _ => {}
            }
        }
        e
    }

    pub fn set_flags(&mut self, flags: u64) {
        match self.fields.iter_mut().find(|(k, _)| *k == FIELD_FLAGS) {
            Some(f) => f.1 = flags,
            None => self.fields.push((FIELD_FLAGS, flags)),
        }
    }
}

/// A decoded pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    magic: [u8; 8],
    head: Vec<(u64, u64)>,
    pub entries: Vec<Entry>,
}

impl Pagemap {
    pub fn parse(img: &[u8]) -> Option<Pagemap> {
        let (magic, messages) = image_messages(img)?;
        let mut messages = messages.into_iter().map(fields).collect::<Option<Vec<_>>>()?.into_iter();
        let head = messages.next()?;
        Some(Pagemap { magic, head, entries: messages.map(|fields| Entry { fields }).collect() })
    }

    /// Write this pagemap to `image`, through a temporary file renamed over it, both
    /// beneath the image's directory (a received checkpoint: never through a link).
    pub fn store(&self, image: &Path) -> Result<(), BeneathError> {
        let (dir, name) = split(image)?;
        let tmp = Path::new(name).with_extension("img.new");
        dir.write(&tmp, &self.encode())?;
        dir.rename(&tmp, name)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        for msg in std::iter::once(&self.head).chain(self.entries.iter().map(|e| &e.fields)) {
            let mut body = Vec::new();
            for &(k, v) in msg {
                put_varint(&mut body, k << 3);
                put_varint(&mut body, v);
            }
            out.extend((body.len() as u32).to_le_bytes());
            out.extend(body);
        }
        out
    }

    /// The number in the pages image's name (`pages-<id>.img`).
    pub fn pages_id(&self) -> u64 {
        self.head.iter().find(|(k, _)| *k == FIELD_PAGES_ID).map(|(_, v)| *v).unwrap_or(0)
    }

    /// The ranges (vaddr, pages) a lazy dump left on the source, in image order.
    pub fn lazy_ranges(&self) -> Vec<(u64, u64)> {
        self.entries.iter().filter(|e| e.is_lazy_only() && e.pages() > 0).map(|e| (e.vaddr(), e.pages())).collect()
    }
}

/// The one process's pagemap image of a checkpoint and the process's id in it (None
/// when there is not exactly one).
pub fn single_image(checkpoint: &Path) -> Option<(PathBuf, u64)> {
    let mut images = std::fs::read_dir(checkpoint)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("pagemap-") && n.ends_with(".img") && !n.contains("shmem"));
    let (Some(one), None) = (images.next(), images.next()) else { return None };
    let pid = one.strip_prefix("pagemap-")?.strip_suffix(".img")?.parse().ok()?;
    Some((checkpoint.join(one), pid))
}

/// A lazy dump that left every page in the images (more than 1 MiB of them) and none
/// on the source.
pub fn nothing_left_lazy(checkpoint: &Path) -> bool {
    let Some((image, _)) = single_image(checkpoint) else { return false };
    let Some(map) = read_image(&image).ok().and_then(|b| Pagemap::parse(&b)) else { return false };
    let written = std::fs::metadata(checkpoint.join(format!("pages-{}.img", map.pages_id()))).map(|m| m.len());
    map.lazy_ranges().is_empty() && written.unwrap_or(0) > 1 << 20
}

/// A CRIU image's magics and its messages (each after a u32 length); None when a
/// length runs past the end.
pub(super) fn image_messages(img: &[u8]) -> Option<([u8; 8], Vec<&[u8]>)> {
    let magic: [u8; 8] = img.get(..8)?.try_into().ok()?;
    let mut at = 8;
    let mut messages = Vec::new();
    while at + 4 <= img.len() {
        let len = u32::from_le_bytes(img[at..at + 4].try_into().ok()?) as usize;
        at += 4;
        messages.push(img.get(at..at + len)?);
        at += len;
    }
    Some((magic, messages))
}

/// A protobuf field's value: what CRIU's images use (varints and nested messages).
pub(super) enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one protobuf message; None when it does not decode.
pub(super) fn message(msg: &[u8]) -> Option<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        let (key, n) = varint(&msg[i..])?;
        i += n;
        let value = match key & 7 {
            0 => {
                let (v, n) = varint(&msg[i..])?;
                i += n;
                Value::Varint(v)
            }
            2 => {
                let (len, n) = varint(&msg[i..])?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?)?;
                let b = msg.get(i..end)?;
                i = end;
                Value::Bytes(b)
            }
            1 => {
                i += 8;
                Value::Fixed
            }
            5 => {
                i += 4;
                Value::Fixed
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    (i == msg.len()).then_some(out)
}

/// A message's (field, value) pairs; None if any field is not a varint.
fn fields(msg: &[u8]) -> Option<Vec<(u64, u64)>> {
    message(msg)?
        .into_iter()
        .map(|(k, v)| match v {
            Value::Varint(n) => Some((k, n)),
            _ => None,
        })
        .collect()
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_encode_round_trip() {
        let map = Pagemap {
            magic: *b"\x01\x02\x03\x04\x05\x06\x07\x08",
            head: vec![(FIELD_PAGES_ID, 3)],
            entries: vec![
                Entry::new(0x5555_0000_0000, 2, PE_PRESENT),
                Entry::new(0x7f00_0000_0000, 300, PE_LAZY),
                Entry { fields: vec![(FIELD_VADDR, 0x7fff_0000_0000), (FIELD_PAGES, 1), (3, 0), (FIELD_FLAGS, 6)] },
            ],
        };
        let parsed = Pagemap::parse(&map.encode()).unwrap();
        assert_eq!(parsed, map);
        assert_eq!(parsed.pages_id(), 3);
        assert_eq!(parsed.lazy_ranges(), vec![(0x7f00_0000_0000, 300)]);
        let mut e = parsed.entries[1].clone();
        e.set_flags(PE_LAZY | PE_PRESENT);
        assert!(!e.is_lazy_only());
        assert_eq!((e.vaddr(), e.pages()), (0x7f00_0000_0000, 300));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Pagemap::parse(b"short").is_none());
        // a length that runs past the end
        assert!(Pagemap::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 8]).is_none());
    }
}
