//! The C allocator's thresholds, set once for the forward pass's buffers.
//!
//! Every forward pass allocates its buffers afresh: the scratch of the activations (28 MB for
//! 512 tokens of the 0.5B shape), the activations packed for each matmul, the attention's
//! temporaries. glibc's malloc serves a large allocation with a fresh `mmap` and unmaps it when it
//! is freed (above a threshold it raises as such blocks come and go), so each pass touched ~40 MB
//! of new pages: ~9,800 page faults, each page zeroed by the kernel. Kept in malloc's heap instead,
//! the next pass reuses the same pages. Measured with `prefill_profile` (0.5B shape, bf16, 512
//! tokens, 2 cores, AMX; three alternating pairs, 2026-12-02): 512-546 ms per pass with glibc's
//! defaults, 498-519 ms with these thresholds (then 64 and 256 MiB); 68,530 page faults per run
//! against 13,441.

/// Allocations below this come from malloc's heap, not from their own `mmap`: every buffer of a
/// pass of up to ~1,700 tokens at the 0.5B shape, a few hundred at 7B (there the MLP's
/// intermediate outputs of 286 tokens are 22 MB each). Larger ones are still mapped and
/// returned to the system when freed. This is the most glibc's own sliding threshold reaches;
/// at 64 MiB the float64 trace tensors of the verifier's 7B plan (up to 39 MB each) stayed in
/// the heap after use, and its peak RSS went from 16.0 to 22.4 GB.
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of the heap that malloc keeps instead of returning it to the system
/// (twice the mapping threshold, as glibc's sliding value).
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Sets glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` once per process (`MMAP_THRESHOLD`,
/// `TRIM_THRESHOLD`); elsewhere (another C library, another OS) it does nothing. Called when a
/// model is loaded.
pub fn keep_buffers_in_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes malloc's tuning parameters; any value is valid.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        });
    }
}

/// Hands the heap pages freed since the last call back to the OS (glibc otherwise keeps free
/// chunks inside its heaps resident). Called where large transient data has just been freed:
/// a whole trace judged, a tokenizer built from a GGUF's metadata.
pub fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
