//! Weights put in 2 MiB pages at load (`LOCKSTEP_HUGE_PAGES`) change no value: a traced forward
//! pass gives bit for bit the same tensors through the page cache, through the copy, and with
//! neither, in f32 and bf16. A file the page cache holds in 4 KiB pages is read again in 2 MiB
//! pages where the kernel can, and copied where it cannot. `lockstep bench` says how many of the
//! weights a decode step reads were copied, and how much the kernel holds in such pages; a bad
//! value of the variable is a one-line error.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use support::*;

const MODEL: &str = "qwen2-default-bf16";

fn with_huge_pages(mode: &str, args: &[&str]) -> Output {
    lockstep_with_env(&[("LOCKSTEP_HUGE_PAGES", mode)], args)
}

fn ok(mode: &str, args: &[&str]) -> String {
    lockstep_ok_with("LOCKSTEP_HUGE_PAGES", mode, args)
}

fn model() -> String {
    fixture_folder(MODEL)
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn huge_pages_change_no_value() {
    let m = model();
    let dir = scratch("huge-pages-traces");
    for dtype in ["f32", "bf16"] {
        let out = |mode: &str| dir.join(format!("{dtype}-{mode}.safetensors"));
        for mode in ["on", "off", "copy"] {
            ok(
                mode,
                &[
                    "trace",
                    "--model",
                    &m,
                    "--tokens",
                    "9,1000,77,5,31000,2,640,11",
                    "--dtype",
                    dtype,
                    "--out",
                    out(mode).to_str().unwrap(),
                ],
            );
        }
        assert_same_bits(&out("on"), &out("off"), "with the weights in huge pages");
        assert_same_bits(&out("copy"), &out("off"), "with the weights copied");
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn bench_reports_the_weights_in_huge_pages() {
    let m = model();
    let (copy, off) = (bench(&m, "copy"), bench(&m, "off"));
    let weights = copy["decode_weight_bytes"].as_u64().unwrap();
    assert!(weights > 8 << 20, "{weights}");
    assert_eq!(copy["copied_weight_bytes"].as_u64(), Some(weights));
    assert_eq!(off["copied_weight_bytes"].as_u64(), Some(0));
    // Where the kernel offers huge pages, it reports holding most of the copy in them.
    if thp_offered() {
        let held = copy["anon_huge_page_bytes"].as_u64().unwrap();
        assert!(
            held >= weights / 2,
            "{held} of {weights} bytes in huge pages"
        );
    }
}

/// `lockstep bench --json` of a short bf16 run on model `m` with `LOCKSTEP_HUGE_PAGES=mode`.
fn bench(m: &str, mode: &str) -> Value {
    let args = "--dtype bf16 --prompt-tokens 4 --new-tokens 3 --repeat 1 --json";
    let mut all = vec!["bench", "--model", m];
    all.extend(args.split(' '));
    let out = ok(mode, &all);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn thp_offered() -> bool {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    thp.contains("[always]") || thp.contains("[madvise]")
}

const HUGE: usize = 2 << 20;

/// Drops `path` from the page cache and reads it back 4 KiB at a time in a scrambled order with
/// readahead off, which leaves it cached in 4 KiB pages.
fn cache_in_small_pages(path: &Path) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: a valid descriptor; advice changes no byte.
    unsafe {
        assert_eq!(libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED), 0);
        assert_eq!(libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM), 0);
    }
    let pages = f.metadata().unwrap().len().div_ceil(4096);
    // A stride coprime with the page count visits every page once, far from its neighbours.
    let stride = (0..)
        .map(|k| 7919 + 2 * k)
        .find(|s| gcd(*s, pages) == 1)
        .unwrap();
    let mut b = [0u8; 1];
    for i in 0..pages {
        f.read_at(&mut b, (i * stride % pages) * 4096).unwrap();
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Bytes of `path` a fresh mapping of it maps in 2 MiB pages after one byte per 2 MiB is read,
/// advised `MADV_HUGEPAGE` (the kernel's `FilePmdMapped`), with its page cache dropped first
/// when `cold`: this test's own look at what the kernel does, apart from lockstep's.
fn kernel_maps_in_huge_pages(path: &Path, cold: bool) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a private read-only mapping of a file this test owns; checked and unmapped below.
    unsafe {
        if cold {
            assert_eq!(
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED),
                0
            );
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        libc::madvise(p, len, libc::MADV_HUGEPAGE);
        let mut sum = 0u8;
        for at in (0..len / HUGE * HUGE).step_by(HUGE) {
            sum ^= std::ptr::read_volatile((p as *const u8).add(at));
        }
        std::hint::black_box(sum);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{:x}-", p as usize);
        let kb = smaps
            .split_once(&head)
            .and_then(|(_, rest)| rest.lines().find(|l| l.starts_with("FilePmdMapped:")))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .expect("FilePmdMapped for the mapping");
        libc::munmap(p, len);
        kb * 1024
    }
}

/// A model whose file the page cache holds in 4 KiB pages: where the kernel can cache the file
/// in 2 MiB pages, lockstep's `auto` reads it again so (and copies nothing); where it cannot, it
/// copies the weights (a model this small always fits).
#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_file_cached_in_small_pages_is_read_again_in_huge_pages() {
    let src = PathBuf::from(model());
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        let to = dir.path().join(f.file_name().unwrap());
        std::fs::copy(&f, &to).unwrap();
        // On disk, so that the page cache can drop the copy's pages.
        std::fs::File::open(&to).unwrap().sync_all().unwrap();
    }
    let weights = dir.path().join("model.safetensors");
    let whole = std::fs::metadata(&weights).unwrap().len() / HUGE as u64 * HUGE as u64;
    assert!(whole >= 8 * HUGE as u64, "{whole}");
    // What the kernel does for this file, found by this test alone: a cold read in 2 MiB pages?
    let kernel_can = thp_offered() && kernel_maps_in_huge_pages(&weights, true) >= whole / 2;
    cache_in_small_pages(&weights);
    let small = kernel_maps_in_huge_pages(&weights, false);
    assert_eq!(small, 0, "the file should be cached in 4 KiB pages now");

    let v = bench(dir.path().to_str().unwrap(), "auto");
    let (copied, in_cache) = (
        v["copied_weight_bytes"].as_u64().unwrap(),
        v["file_huge_page_bytes"].as_u64().unwrap(),
    );
    let read = v["decode_weight_bytes"].as_u64().unwrap();
    if kernel_can {
        // What a decode step reads is mapped in 2 MiB pages (only the regions the run touched are
        // mapped at all), but for the first 2 MiB, whose header pages lockstep reads before it
        // asks for 2 MiB pages: they stay mapped in 4 KiB pages.
        assert!(
            in_cache >= read - HUGE as u64,
            "{in_cache} bytes in 2 MiB pages; a decode step reads {read}"
        );
        assert_eq!(copied, 0);
        // The page cache now holds the file so for any later reader.
        assert!(kernel_maps_in_huge_pages(&weights, false) >= whole - HUGE as u64);
    } else {
        assert_eq!(copied, read);
    }
}

#[test]
#[cfg_attr(
    not(feature = "reference-tests"),
    ignore = "needs the reference environment and fixtures: bash scripts/test.sh"
)]
fn a_bad_value_is_one_line() {
    let m = model();
    let o = with_huge_pages("sometimes", &["generate", "--model", &m, "--tokens", "1"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("LOCKSTEP_HUGE_PAGES") && err.trim().lines().count() == 1,
        "{err}"
    );
}
