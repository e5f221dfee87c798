//! The 12-bit codings of a model's BF16 matrices ([`super::bf16_coded`]) kept in a file between
//! runs, for a model whose codings replace its stored matrices in memory
//! ([`crate::Model::code_bf16_instead`]).
//!
//! Why: coding reads every stored byte once, and for such a model the page cache cannot keep
//! the checkpoint across runs, since the codings take the room it would need (Qwen2.5-7B: 15.2
//! GB of weights, 10.6 GB of codings, a 23 GB machine). Each run would read the checkpoint from
//! disk and code it: 11-30 s on a 2-core AMD EPYC Zen 5 (2026-12-05, ~1.8 GB/s from disk). With
//! the codings in a file, the first run codes and writes them; later runs map the file (which
//! the page cache does keep: it is all a run reads) and read neither the stored matrices nor
//! their bytes from disk.
//!
//! Where: the folder `LOCKSTEP_CODED_CACHE` names, else `$XDG_CACHE_HOME/lockstep/coded`, else
//! `~/.cache/lockstep/coded`; `LOCKSTEP_CODED_CACHE=off` keeps no file (each run codes in
//! memory). A file is named by the model folder's path and by the checkpoint it was coded from
//! (each file's path, size, modification time and inode, every coded matrix's shape, this
//! format's version): a checkpoint changed since gets a new file, and writing it removes the
//! folder's older one. Written whole or not at all (a temporary file in the same folder, synced,
//! then renamed), and not where the disk would keep less than [`FREE_AFTER`] free.
//!
//! Read back, every part is checked against the model's matrices and for what the kernels rely
//! on (`Bf16Coded::from_parts`); a file that does not fit is not used,
//! and the matrices are coded again. Like the checkpoint itself, the file is trusted for its
//! values: a byte changed on disk changes a weight (delete the file to code the matrices again).
//!
//! Layout (little-endian): [`MAGIC`], the identity's SHA-256, the matrix count and the file's
//! length (8 bytes each); per matrix [`RECORD`] bytes (`m`, `k`, where its groups lie and how
//! long they are, where its bands' starts, escape keys and escaped high bytes lie, how many
//! escapes: 8 bytes each; then its 16-byte table); then, from the first 2 MiB boundary, the
//! matrices' groups one after another, each at a multiple of 64 bytes and in the order a decode
//! step reads them (as [`super::bf16_coded::code_together`] lays them out in memory), the side
//! lists after them.

use super::bf16_coded::{code_together, Bf16Coded};
use super::page_cache::HUGE_PAGE;
use super::Tensor;
use sha2::{Digest, Sha256};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable naming the folder (or `off`).
pub const ENV: &str = "LOCKSTEP_CODED_CACHE";

/// The file's first bytes (the last one is the format's version).
pub const MAGIC: &[u8; 8] = b"LSCODED\x01";

/// Bytes of the header before the records.
const HEADER: usize = 8 + 32 + 8 + 8;

/// Bytes per matrix record.
pub const RECORD: usize = 8 * 8 + 16;

/// Free disk space the file must leave (1 GiB).
pub const FREE_AFTER: u64 = 1 << 30;

/// What became of the cache in a run: read, written, or why neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUse {
    /// The codings were read from this file.
    Read(PathBuf),
    /// The matrices were coded and written to this file, then read from it.
    Written(PathBuf),
    /// No file was used (the reason, one line): the matrices were coded in memory.
    Skipped(String),
}

/// The folder [`ENV`] asks for (`None`: `off`, or no home folder to put it under).
pub fn folder() -> Option<PathBuf> {
    match std::env::var_os(ENV) {
        Some(v) if v.eq_ignore_ascii_case("off") || v == "0" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .map(|c| c.join("lockstep").join("coded")),
    }
}

/// The codings of `groups` (each a list of matrices coded together: a layer's, then the LM
/// head), in order, for the checkpoint at `dir` mapped from `files`, kept in `folder`
/// ([`folder`]): read from the cache file, or coded (each matrix's stored pages dropped from
/// the mapping once coded) and written to it first. `Err` (the reason, one line) where no file
/// could be used; the caller codes in memory.
pub fn codings(
    folder: &Path,
    dir: &Path,
    files: &[PathBuf],
    groups: &[Vec<&Tensor>],
) -> Result<(Vec<Bf16Coded>, CacheUse), String> {
    let shapes: Vec<(usize, usize)> = (groups.iter().flatten())
        .map(|t| match t.shape.as_slice() {
            &[m, k] => Ok((m, k)),
            s => Err(format!("a matrix of shape {s:?}")),
        })
        .collect::<Result<_, _>>()?;
    let (id, path) = name(dir, files, &shapes, folder)?;
    if let Some(c) = open(&path, &id, &shapes, files) {
        return Ok((c, CacheUse::Read(path)));
    }
    write(&path, &id, groups)?;
    let c = open(&path, &id, &shapes, files).ok_or("the file just written does not read back")?;
    Ok((c, CacheUse::Written(path)))
}

/// The identity hash of the checkpoint and the cache file's path: `<folder hash>-<identity
/// hash>.coded`, 16 hex digits each.
fn name(
    dir: &Path,
    files: &[PathBuf],
    shapes: &[(usize, usize)],
    folder: &Path,
) -> Result<([u8; 32], PathBuf), String> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut id = Sha256::new();
    id.update(MAGIC);
    for f in files {
        let path = std::fs::canonicalize(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let m = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        id.update(path.as_os_str().as_encoded_bytes());
        for v in [m.len(), m.mtime() as u64, m.mtime_nsec() as u64, m.ino()] {
            id.update(v.to_le_bytes());
        }
    }
    for &(m, k) in shapes {
        id.update((m as u64).to_le_bytes());
        id.update((k as u64).to_le_bytes());
    }
    let id: [u8; 32] = id.finalize().into();
    let file = format!("{}-{}.coded", prefix(&dir), hex16(&id));
    Ok((id, folder.join(file)))
}

/// The folder hash that starts the name of every cache file of the model at `dir`.
fn prefix(dir: &Path) -> String {
    hex16(&Sha256::digest(dir.as_os_str().as_encoded_bytes()))
}

/// The first 8 bytes as 16 hex digits.
fn hex16(b: &[u8]) -> String {
    b[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a file of `count` matrices' codings puts their data: past the header and the records,
/// on the next 2 MiB boundary (the bytes between are a hole).
fn data_start(count: usize) -> usize {
    (HEADER + count * RECORD).next_multiple_of(HUGE_PAGE)
}

/// Reads a little-endian u64 at `at` of `b`, `None` past its end.
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The codings in the file at `path`, when it is whole, has identity `id` and codes matrices of
/// `shapes`; `None` otherwise. `checkpoint`: the files whose matrices the codings replace.
fn open(
    path: &Path,
    id: &[u8; 32],
    shapes: &[(usize, usize)],
    checkpoint: &[PathBuf],
) -> Option<Vec<Bf16Coded>> {
    // A file partly pushed out of the page cache (another process read 15 GB meanwhile: PyTorch
    // loading the same checkpoint, say) comes back from disk in 2 MiB pages only where the
    // kernel finds free 2 MiB blocks, and a memory full of cached pages has few: after such a
    // run, 8.56 of the 7B's 10.67 GB came back in them, and that decode read 78% of the
    // bandwidth (90-92% in whole pages). The checkpoint's cached pages (its matrices, which
    // this process never reads again once coded) are dropped first to make room; pages another
    // process maps stay.
    // (The data's pages only: the file has a hole between its records and the data.)
    let data = data_start(shapes.len());
    if super::page_cache::cached_fraction(path, data).is_some_and(|f| f < 1.0) {
        for f in checkpoint {
            let _ = super::page_cache::drop_cached(f);
        }
    }
    // Brought into the page cache in 2 MiB pages where the kernel can, as the checkpoints are.
    let _ = super::page_cache::in_huge_pages(path);
    let map = Arc::new(super::safetensors_files::map_readonly(path).ok()?);
    let _ = map.advise(memmap2::Advice::HugePage);
    let b: &[u8] = &map;
    let whole = b.get(..8)? == MAGIC
        && b.get(8..40)? == id
        && u64_at(b, 40)? == shapes.len() as u64
        && u64_at(b, 48)? == b.len() as u64;
    if !whole {
        return None;
    }
    let mut out = Vec::with_capacity(shapes.len());
    for (i, &(m, k)) in shapes.iter().enumerate() {
        let r = HEADER.checked_add(i.checked_mul(RECORD)?)?;
        let f: Vec<usize> = (0..8)
            .map(|j| u64_at(b, r + 8 * j).and_then(|v| usize::try_from(v).ok()))
            .collect::<Option<_>>()?;
        let table: [u8; 16] = b.get(r + 64..r + 80)?.try_into().ok()?;
        let (fm, fk, at, len, bands_at, keys_at, highs_at, escapes) =
            (f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]);
        if (fm, fk) != (m, k) {
            return None;
        }
        let bands = m
            .div_ceil(super::bf16_coded::TILE_ROWS)
            .checked_mul(k.div_ceil(super::bf16_coded::GROUP))?
            .checked_add(1)?;
        let slice = |at: usize, n: usize| b.get(at..at.checked_add(n)?);
        let band_start = (slice(bands_at, bands.checked_mul(4)?)?.chunks_exact(4))
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let escape_keys = (slice(keys_at, escapes.checked_mul(2)?)?.chunks_exact(2))
            .map(|c| u16::from_le_bytes(c.try_into().expect("2 bytes")))
            .collect();
        let escaped_high = slice(highs_at, escapes)?.to_vec();
        let region = Arc::clone(&map);
        let end = at.checked_add(len)?;
        out.push(Bf16Coded::from_parts(
            (m, k),
            table,
            region,
            at..end,
            band_start,
            escape_keys,
            escaped_high,
        )?);
    }
    Some(out)
}

/// Codes `groups` a group at a time and writes the file at `path` (see the module docs): a
/// temporary file beside it, synced and renamed, the model folder's older files removed after.
fn write(path: &Path, id: &[u8; 32], groups: &[Vec<&Tensor>]) -> Result<(), String> {
    let folder = path.parent().ok_or("no folder")?;
    std::fs::create_dir_all(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    // The groups' bytes: each row of 64 values in 96 bytes.
    let count: usize = groups.iter().map(Vec::len).sum();
    let groups_bytes: u64 = (groups.iter().flatten())
        .map(|t| (t.shape.iter().product::<usize>() as u64).div_ceil(64) * 96 + 64)
        .sum();
    let free = free_bytes(folder).ok_or("the disk's free space is unknown")?;
    if free < groups_bytes + FREE_AFTER {
        return Err(format!(
            "{:.1} GB free on the disk of {}, the codings need {:.1} GB and {} GiB to spare",
            free as f64 / 1e9,
            folder.display(),
            groups_bytes as f64 / 1e9,
            FREE_AFTER >> 30
        ));
    }
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let written = write_to(&tmp, id, groups, count);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    // The same model's older files (another checkpoint under the same folder path).
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let start = name.split('-').next().unwrap_or(name);
    if let Ok(entries) = std::fs::read_dir(folder) {
        for e in entries.flatten() {
            let other = e.file_name();
            let other = other.to_string_lossy();
            if other != name && other.starts_with(start) && other.ends_with(".coded") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// [`write`]'s work on the temporary file.
fn write_to(
    tmp: &Path,
    id: &[u8; 32],
    groups: &[Vec<&Tensor>],
    count: usize,
) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::other(what.to_string());
    let mut f = std::fs::File::create(tmp)?;
    let mut at = data_start(count) as u64;
    f.seek(SeekFrom::Start(at))?;
    let mut records = Vec::with_capacity(count * RECORD);
    // Side lists, written after the groups: (bands' starts, keys, high bytes) per matrix.
    let mut sides: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = Vec::with_capacity(count);
    let mut metas = Vec::with_capacity(count);
    for group in groups {
        let codings = code_together(group);
        for (t, c) in group.iter().zip(codings) {
            let c = c.ok_or_else(|| bad("a matrix could not be coded"))?;
            let (bytes, bands, keys, highs) = c.parts();
            let pad = at.next_multiple_of(64) - at;
            f.write_all(&vec![0u8; pad as usize])?;
            at += pad;
            f.write_all(bytes)?;
            metas.push((c.m, c.k, at, bytes.len() as u64, c.table, keys.len()));
            at += bytes.len() as u64;
            sides.push((
                bands.iter().flat_map(|v| v.to_le_bytes()).collect(),
                keys.iter().flat_map(|v| v.to_le_bytes()).collect(),
                highs.to_vec(),
            ));
            drop(c);
            // The stored bytes were read to code them: out of the mapping.
            t.advise(super::PageAdvice::DontNeed);
        }
    }
    for ((m, k, gat, glen, table, escapes), (bands, keys, highs)) in metas.into_iter().zip(&sides) {
        let mut place = |b: &[u8]| -> std::io::Result<u64> {
            let here = at;
            f.write_all(b)?;
            at += b.len() as u64;
            Ok(here)
        };
        let (b_at, k_at, h_at) = (place(bands)?, place(keys)?, place(highs)?);
        for v in [
            m as u64,
            k as u64,
            gat,
            glen,
            b_at,
            k_at,
            h_at,
            escapes as u64,
        ] {
            records.extend_from_slice(&v.to_le_bytes());
        }
        records.extend_from_slice(&table);
    }
    let mut head = Vec::with_capacity(HEADER);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(id);
    head.extend_from_slice(&(count as u64).to_le_bytes());
    head.extend_from_slice(&at.to_le_bytes());
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&head)?;
    f.write_all(&records)?;
    f.sync_all()
}

/// Free bytes on the file system holding `folder` (for an unprivileged user).
fn free_bytes(folder: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(folder.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a NUL-terminated path; `s` is written by statvfs before it is read.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut s) == 0)
            .then(|| (s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::StoredDtype;

    /// A `[m, k]` BF16 matrix of values in a few binades, some far outside them (escapes).
    fn matrix(m: usize, k: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let bytes = (0..m * k)
            .flat_map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let r = (s >> 33) as u32;
                let v = if i % 97 == 0 {
                    2f32.powi((r % 60) as i32 - 30)
                } else {
                    (r as f32 / u32::MAX as f32 - 0.5) * 0.1
                };
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect();
        Tensor::from_bytes(StoredDtype::BF16, vec![m, k], bytes)
    }

    /// Opening a cache file the page cache holds whole leaves the checkpoint's cached pages be;
    /// opening one partly pushed out of it drops them first (room for its 2 MiB pages).
    #[test]
    fn a_partly_evicted_file_makes_room_from_the_checkpoint() {
        use crate::weights::page_cache::{cached_fraction, drop_cached};
        // Under the crate, on the disk the build runs from: a tmpfs `/tmp` never drops pages.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let weights = model.join("model.safetensors");
        std::fs::write(&weights, vec![5u8; 1 << 20]).unwrap();
        std::fs::File::open(&weights).unwrap().sync_all().unwrap();
        let cache = dir.path().join("cache");
        let ts = [matrix(64, 512, 4)];
        let groups = vec![vec![&ts[0]]];
        let files = vec![weights.clone()];
        let (_, how) = codings(&cache, &model, &files, &groups).unwrap();
        let CacheUse::Written(path) = how else {
            panic!("{how:?}")
        };
        let data = data_start(1);
        assert_eq!(cached_fraction(&path, data), Some(1.0));
        assert_eq!(cached_fraction(&weights, 0), Some(1.0));
        let (_, how) = codings(&cache, &model, &files, &groups).unwrap();
        assert_eq!(how, CacheUse::Read(path.clone()));
        assert_eq!(
            cached_fraction(&weights, 0),
            Some(1.0),
            "nothing to make room for"
        );
        drop_cached(&path).unwrap();
        assert!(cached_fraction(&path, data).unwrap() < 1.0);
        let (again, how) = codings(&cache, &model, &files, &groups).unwrap();
        assert_eq!(how, CacheUse::Read(path));
        assert!(
            cached_fraction(&weights, 0).unwrap() < 1.0,
            "the checkpoint made room"
        );
        assert_eq!(again[0].decode_row(3).len(), 512);
    }

    /// Written, then read back: every matrix's rows decode to the stored bits; a second read
    /// finds the file; another identity, a changed shape, a cut or damaged header are not used;
    /// writing another checkpoint's file for the same folder removes the first.
    #[test]
    fn the_codings_come_back_from_the_file_as_they_were_coded() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        let weights = model.join("model.safetensors");
        std::fs::write(&weights, b"stand-in").unwrap();
        let cache = dir.path().join("cache");
        let ts = [matrix(40, 1000, 1), matrix(9, 130, 2), matrix(17, 64, 3)];
        let groups = vec![vec![&ts[0], &ts[1]], vec![&ts[2]]];
        let files = vec![weights.clone()];
        let (first, how) = codings(&cache, &model, &files, &groups).unwrap();
        let CacheUse::Written(path) = how else {
            panic!("{how:?}")
        };
        let (again, how) = codings(&cache, &model, &files, &groups).unwrap();
        assert_eq!(how, CacheUse::Read(path.clone()));
        for (t, (a, b)) in ts.iter().zip(first.iter().zip(&again)) {
            let bits: Vec<u16> = (t.bytes().chunks_exact(2))
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let k = t.shape[1];
            for r in 0..t.shape[0] {
                assert_eq!(a.decode_row(r), bits[r * k..(r + 1) * k], "row {r}");
                assert_eq!(b.decode_row(r), bits[r * k..(r + 1) * k], "row {r}");
            }
            assert_eq!(a.group_ptr(0, 0) as usize % 64, 0);
        }
        assert!(first.iter().any(|c| c.escapes() > 0));
        // Shapes or identity not the file's: not used.
        let shapes: Vec<(usize, usize)> = ts.iter().map(|t| (t.shape[0], t.shape[1])).collect();
        let (id, named) = name(&model, &files, &shapes, &cache).unwrap();
        assert_eq!(named, path);
        assert!(open(&path, &id, &shapes, &[]).is_some());
        assert!(open(&path, &[0; 32], &shapes, &[]).is_none());
        assert!(open(&path, &id, &shapes[..2], &[]).is_none());
        let mut other = shapes.clone();
        other[1] = (9, 131);
        assert!(open(&path, &id, &other, &[]).is_none());
        // Cut short, or a record pointing past the end: not used.
        let whole = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.coded");
        std::fs::write(&cut, &whole[..whole.len() - 1]).unwrap();
        assert!(open(&cut, &id, &shapes, &[]).is_none());
        let mut damaged = whole.clone();
        damaged[HEADER + 16..HEADER + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&cut, &damaged).unwrap();
        assert!(open(&cut, &id, &shapes, &[]).is_none());
        // The checkpoint changes (its modification time): a new file, the old one removed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&weights, b"stand-in, changed").unwrap();
        let (_, how) = codings(&cache, &model, &files, &groups).unwrap();
        let CacheUse::Written(new) = how else {
            panic!("{how:?}")
        };
        assert_ne!(new, path);
        assert!(new.exists() && !path.exists());
    }
}
