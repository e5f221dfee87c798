//! Buffers whose first element starts a 64-byte cache line.
//!
//! The AMX matmul writes each token's outputs sixteen f32 (one line) at a time; into a buffer
//! that starts 16 bytes into a line (where the allocator puts a large `Vec`), every such store
//! straddles two lines. The 0.5B shape's gate product of 512 tokens took 6.1-6.5 ms into such a
//! buffer and 4.7-4.9 ms into an aligned one.

use std::ops::{Deref, DerefMut};

/// Bytes of a cache line.
const LINE: usize = 64;

/// `len` values, the first on a cache-line boundary (the `Vec` holds up to a line's worth of
/// values more, before the slice).
pub struct LineAligned<T> {
    v: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Send + Sync> LineAligned<T> {
    /// `len` copies of `fill`, written by the threads in chunks when there are many (a
    /// forward pass's buffers for 2048 tokens of the 0.5B shape are 110 MB, which one thread
    /// filled, faulting every page in, in ~2.5 ms of each layer's worth of time).
    pub fn new(len: usize, fill: T) -> Self {
        let pad = LINE.div_ceil(std::mem::size_of::<T>().max(1));
        let n = len + pad;
        let mut v = Vec::with_capacity(n);
        let spare = &mut v.spare_capacity_mut()[..n];
        let write = |c: &mut [std::mem::MaybeUninit<T>]| {
            for x in c {
                x.write(fill);
            }
        };
        if n >= 2 * FILL_CHUNK {
            crate::team::for_each_chunk_mut(spare, FILL_CHUNK, |_, c| write(c));
        } else {
            write(spare);
        }
        // SAFETY: the first `n` values, inside the capacity, were all written above.
        unsafe { v.set_len(n) };
        // `align_offset` may give up (`usize::MAX`); then the slice starts where it can.
        let start = v.as_ptr().align_offset(LINE).min(pad);
        LineAligned { v, start, len }
    }
}

/// Values per task of [`LineAligned::new`]'s fill on the thread pool.
const FILL_CHUNK: usize = 1 << 18;

impl<T> Deref for LineAligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v[self.start..self.start + self.len]
    }
}

impl<T> DerefMut for LineAligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_a_line_and_holds_len_values() {
        // Filled on one thread, then in chunks on the threads.
        for len in [0, 1, 15, 16, 17, 4864 * 512, 3 * FILL_CHUNK + 5] {
            let mut b = LineAligned::new(len, 1.5f32);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % LINE, 0, "len {len}");
            assert!(b.iter().all(|&v| v == 1.5));
            if let Some(last) = b.last_mut() {
                *last = 2.0;
            }
            assert_eq!(b.last().copied(), (len > 0).then_some(2.0));
        }
    }
}
