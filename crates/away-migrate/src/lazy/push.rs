//! Pages a lazy move pushes with its payload instead of leaving them on the source:
//! the few the restore itself and the workload's first instructions touch. Each
//! thread's rseq area is written by the kernel while CRIU's restorer registers it, so
//! left lazy it is a page fault answered over the link *inside* the blackout (measured
//! at 0.31 s on a 73.6 ms path, with the page link's setup); the stack around the stack
//! pointer and the TLS block (the stack canary is read from it) are touched by the very
//! first instructions after the resume. Pushed, they are restored from the images like
//! any dumped page, and the first fault over the link comes from the workload's own work.
//!
//! The source reads them from the frozen process (`/proc/PID/mem`: the memory CRIU's
//! page server would serve) and rewrites the checkpoint's images: the pushed pages
//! leave their lazy entries and become present ones, their contents at their place in
//! the pages image (present pages in entry order, as CRIU reads them).

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::pagemap::{image_messages, message, Entry, Pagemap, Value, PE_LAZY, PE_PRESENT};
use super::prefetch::PAGE;
use super::LazyError;

/// Fields of CRIU's core image (images/core.proto, core-x86.proto, CRIU 4.x):
/// core_entry.thread_info = 2 (thread_info_x86: gpregs = 2, with sp = 20 and
/// fs_base = 22); core_entry.thread_core = 5 (thread_core_entry: rseq_entry = 15, whose
/// rseq_abi_pointer = 1).
const CORE_THREAD_INFO: u64 = 2;
const INFO_GPREGS: u64 = 2;
const REGS_SP: u64 = 20;
const REGS_FS_BASE: u64 = 22;
const CORE_THREAD_CORE: u64 = 5;
const THREAD_RSEQ: u64 = 15;
const RSEQ_POINTER: u64 = 1;

fn nested<'a>(fields: &[(u64, Value<'a>)], field: u64) -> Option<Vec<(u64, Value<'a>)>> {
    fields.iter().find_map(|(f, v)| match v {
        Value::Bytes(b) if *f == field => message(b),
        _ => None,
    })
}

fn number(fields: &[(u64, Value<'_>)], field: u64) -> Option<u64> {
    fields.iter().find_map(|(f, v)| match v {
        Value::Varint(n) if *f == field => Some(*n),
        _ => None,
    })
}

/// The addresses one thread's restore and first steps touch, from its core image
/// (two magics, then one length-prefixed core_entry): its rseq area, the stack around
/// its stack pointer and its TLS block around the thread pointer.
pub fn touched_at_resume(core_image: &[u8]) -> Vec<u64> {
    let Some(core) = image_messages(core_image).and_then(|(_, m)| m.first().copied()).and_then(message) else {
        return Vec::new();
    };
    let mut at = Vec::new();
    if let Some(regs) = nested(&core, CORE_THREAD_INFO).and_then(|i| nested(&i, INFO_GPREGS)) {
        if let Some(sp) = number(&regs, REGS_SP).filter(|sp| *sp > PAGE) {
            // the frames above, and the calls about to be made below
            at.extend([sp + PAGE, sp, sp - PAGE]);
        }
        if let Some(tp) = number(&regs, REGS_FS_BASE).filter(|tp| *tp > PAGE) {
            // x86-64 TLS: the thread's block below the thread pointer, its control block at it
            at.extend([tp, tp - 1]);
        }
    }
    if let Some(rseq) = nested(&core, CORE_THREAD_CORE)
        .and_then(|t| nested(&t, THREAD_RSEQ))
        .and_then(|r| number(&r, RSEQ_POINTER))
        .filter(|p| *p != 0)
    {
        at.push(rseq);
    }
    at
}

/// Push the pages every thread of the checkpoint in `dir` touches at its resume that
/// the lazy dump left on the source, reading them from process `pid` (frozen); returns
/// how many pages moved into the images. Nothing is changed when anything fails.
pub fn push_resume_pages(dir: &Path, pid: u32) -> Result<u64, LazyError> {
    let Some((image, _)) = super::pagemap::single_image(dir) else { return Ok(0) };
    let mut wanted = BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(LazyError::file("read", dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("core-") && name.ends_with(".img") {
            let core = std::fs::read(entry.path()).map_err(LazyError::file("read", entry.path()))?;
            wanted.extend(touched_at_resume(&core).into_iter().map(|a| a & !(PAGE - 1)));
        }
    }
    let mut map = Pagemap::parse(&std::fs::read(&image).map_err(LazyError::file("read", &image))?)
        .ok_or_else(|| LazyError::NotPagemap { path: image.clone() })?;
    let pages_image = dir.join(format!("pages-{}.img", map.pages_id()));
    let old = std::fs::read(&pages_image).unwrap_or_default();
    let mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).map_err(LazyError::file("open", format!("/proc/{pid}/mem")))?;
    let read = |at: u64, pages: u64| -> Result<Vec<u8>, LazyError> {
        let mut b = vec![0u8; (pages * PAGE) as usize];
        mem.read_exact_at(&mut b, at)
            .map_err(LazyError::io(format!("read {pages} pages at {at:#x} of process {pid}")))?;
        Ok(b)
    };
    let Some((entries, pages, pushed)) = split(&map.entries, &wanted, &old, read)? else { return Ok(0) };
    map.entries = entries;
    let write = || -> std::io::Result<()> {
        let tmp_pages = pages_image.with_extension("img.pushing");
        std::fs::write(&tmp_pages, &pages)?;
        std::fs::rename(&tmp_pages, &pages_image)?;
        map.store(&image).map_err(std::io::Error::other)
    };
    write().map_err(LazyError::file("rewrite the images in", dir))?;
    Ok(pushed)
}

type Split = (Vec<Entry>, Vec<u8>, u64);

/// The pagemap `entries` with the `wanted` pages taken out of lazy entries into present
/// ones, and the pages image that goes with them (`old`: the present pages so far;
/// `read`: a wanted run's contents). None when no wanted page is lazy.
fn split(
    entries: &[Entry],
    wanted: &BTreeSet<u64>,
    old: &[u8],
    read: impl Fn(u64, u64) -> Result<Vec<u8>, LazyError>,
) -> Result<Option<Split>, LazyError> {
    let (mut out, mut pages, mut old_at, mut pushed) = (Vec::new(), Vec::new(), 0usize, 0u64);
    for e in entries {
        let (start, end) = (e.vaddr(), e.vaddr() + e.pages() * PAGE);
        if !e.is_lazy_only() {
            if e.flags() & PE_PRESENT != 0 {
                let len = (e.pages() * PAGE) as usize;
                let content = old.get(old_at..old_at + len).ok_or(LazyError::ShortPagesImage)?;
                pages.extend_from_slice(content);
                old_at += len;
            }
            out.push(e.clone());
            continue;
        }
        // runs of consecutive wanted pages inside this entry
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &p in wanted.range(start..end) {
            match runs.last_mut() {
                Some((s, n)) if *s + *n * PAGE == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        let mut at = start;
        for (s, n) in runs {
            if s > at {
                out.push(e.with_range(at, (s - at) / PAGE));
            }
            pages.extend(read(s, n)?);
            let mut present = e.with_range(s, n);
            present.set_flags((e.flags() & !PE_LAZY) | PE_PRESENT);
            out.push(present);
            pushed += n;
            at = s + n * PAGE;
        }
        if at < end {
            out.push(e.with_range(at, (end - at) / PAGE));
        }
    }
    Ok((pushed > 0).then_some((out, pages, pushed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
        put(out, field << 3);
        put(out, v);
    }

    fn message_field(out: &mut Vec<u8>, field: u64, body: &[u8]) {
        put(out, (field << 3) | 2);
        put(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    /// A core image shaped like CRIU's: regs with sp and fs_base, an rseq entry, and
    /// fields of other wire types around them.
    fn core_image(sp: u64, tp: u64, rseq: u64) -> Vec<u8> {
        let mut regs = Vec::new();
        for f in 1..=27 {
            varint_field(
                &mut regs,
                f,
                if f == REGS_SP {
                    sp
                } else if f == REGS_FS_BASE {
                    tp
                } else {
                    f
                },
            );
        }
        let mut info = Vec::new();
        varint_field(&mut info, 1, 0x1234);
        message_field(&mut info, INFO_GPREGS, &regs);
        info.extend([(9 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]); // a fixed64
        let mut r = Vec::new();
        varint_field(&mut r, RSEQ_POINTER, rseq);
        varint_field(&mut r, 2, 0x20);
        varint_field(&mut r, 3, 0x5305_3053);
        let mut thread = Vec::new();
        varint_field(&mut thread, 1, 0x5555_0000_06e0);
        message_field(&mut thread, 7, &[8, 1]);
        message_field(&mut thread, THREAD_RSEQ, &r);
        let mut core = Vec::new();
        varint_field(&mut core, 1, 1);
        message_field(&mut core, CORE_THREAD_INFO, &info);
        message_field(&mut core, CORE_THREAD_CORE, &thread);
        let mut img = vec![0u8; 8];
        img.extend((core.len() as u32).to_le_bytes());
        img.extend(core);
        img
    }

    #[test]
    fn the_core_image_names_stack_tls_and_rseq() {
        let at = touched_at_resume(&core_image(0x7ffe_6ce7_9a38, 0x5555_6a5f_e400, 0x5555_6a5f_ed20));
        assert!(at.contains(&0x7ffe_6ce7_9a38) && at.contains(&(0x7ffe_6ce7_9a38 - PAGE)));
        assert!(at.contains(&0x5555_6a5f_e400) && at.contains(&0x5555_6a5f_ed20));
        assert!(touched_at_resume(b"garbage").is_empty());
    }

    #[test]
    fn wanted_pages_leave_lazy_entries_with_their_contents_in_place() {
        let base = 0x7f00_0000_0000u64;
        let entries = vec![
            Entry::new(0x1000, 1, PE_PRESENT),
            Entry::new(base, 10, PE_LAZY),
            Entry::new(0x7fff_0000_0000, 2, PE_PRESENT),
        ];
        let old: Vec<u8> = [vec![1u8; PAGE as usize], vec![3u8; 2 * PAGE as usize]].concat();
        // pages 0, 4 and 5 of the lazy entry, and one outside any lazy entry
        let wanted = BTreeSet::from([base, base + 4 * PAGE, base + 5 * PAGE, 0x7fff_0000_0000]);
        let read = |at: u64, n: u64| Ok(vec![((at - base) / PAGE + 10) as u8; (n * PAGE) as usize]);
        let (out, pages, pushed) = split(&entries, &wanted, &old, read).unwrap().unwrap();
        assert_eq!(pushed, 3);
        let shape: Vec<_> = out.iter().map(|e| ((e.vaddr() - 0x1000) / PAGE, e.pages(), e.flags())).collect();
        let at = |p: u64| (base - 0x1000) / PAGE + p;
        assert_eq!(
            shape,
            vec![
                (0, 1, PE_PRESENT),
                (at(0), 1, PE_PRESENT),
                (at(1), 3, PE_LAZY),
                (at(4), 2, PE_PRESENT),
                (at(6), 4, PE_LAZY),
                ((0x7fff_0000_0000 - 0x1000) / PAGE, 2, PE_PRESENT),
            ]
        );
        // present pages in entry order: the old first page, the pushed ones, the old last two
        let page = |i: usize| pages[i * PAGE as usize];
        assert_eq!((page(0), page(1), page(2), page(3), page(4), page(5)), (1, 10, 14, 14, 3, 3));
        assert_eq!(pages.len(), 6 * PAGE as usize);
        // nothing wanted is lazy: nothing to rewrite
        assert!(split(&entries, &BTreeSet::from([0x1000]), &old, read).unwrap().is_none());
    }
}
