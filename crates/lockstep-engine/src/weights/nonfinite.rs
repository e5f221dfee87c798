//! Non-finite values in stored tensors: counted straight from the stored bytes (every dtype's
//! exponent and mantissa bits), so the weights phase can name a tensor holding NaN or infinity
//! with its first index.

use super::{StoredDtype, Tensor};

/// Non-finite values of one tensor: NaN and infinity counts and the first one's flat index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct NonFiniteCount {
    nan: usize,
    inf: usize,
    first: Option<usize>,
}

impl NonFiniteCount {
    /// Adds the counts of a later part of the same tensor.
    fn merge(self, later: NonFiniteCount) -> NonFiniteCount {
        NonFiniteCount {
            nan: self.nan + later.nan,
            inf: self.inf + later.inf,
            first: self.first.or(later.first),
        }
    }
}

/// Counts NaN and infinities in little-endian IEEE values of `size` bytes (2, 4 or 8) whose
/// exponent field is `exp` and mantissa field `man` (bit masks on the value read as an integer);
/// `offset` is the flat index of the first value in `bytes`. Non-finite means all exponent bits
/// set; NaN when the mantissa is not zero. A branch-free pass first asks whether there is any
/// (the common case is none), so the scan runs at memory speed.
fn count_nonfinite(bytes: &[u8], size: usize, exp: u64, man: u64, offset: usize) -> NonFiniteCount {
    macro_rules! scan {
        ($t:ty, $n:expr) => {{
            let (exp, man) = (exp as $t, man as $t);
            let bits = |c: &[u8]| <$t>::from_le_bytes(c.try_into().expect("value size"));
            let any = bytes
                .chunks_exact($n)
                .fold(false, |acc, c| acc | (bits(c) & exp == exp));
            let mut c = NonFiniteCount::default();
            if any {
                for (i, v) in bytes.chunks_exact($n).map(bits).enumerate() {
                    if v & exp == exp {
                        if v & man != 0 {
                            c.nan += 1;
                        } else {
                            c.inf += 1;
                        }
                        c.first.get_or_insert(offset + i);
                    }
                }
            }
            c
        }};
    }
    match size {
        2 => scan!(u16, 2),
        4 => scan!(u32, 4),
        _ => scan!(u64, 8),
    }
}

/// A checkpoint tensor holding non-finite values
/// ([`Checkpoint::nonfinite_report`](super::Checkpoint::nonfinite_report)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFiniteTensor {
    /// The tensor's checkpoint name, e.g. `model.layers.1.mlp.down_proj.weight`.
    pub name: String,
    /// How many elements are NaN.
    pub nan: usize,
    /// How many elements are +∞ or −∞.
    pub inf: usize,
    /// Index of the first non-finite element (row-major) in the stored shape.
    pub first_index: Vec<usize>,
}

impl NonFiniteTensor {
    /// NaN plus infinities.
    pub fn count(&self) -> usize {
        self.nan + self.inf
    }
}

impl std::fmt::Display for NonFiniteTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = vec![];
        if self.nan > 0 {
            parts.push(format!("{} NaN", self.nan));
        }
        if self.inf > 0 {
            parts.push(format!("{} infinite", self.inf));
        }
        write!(
            f,
            "{} ({}, first at {:?})",
            self.name,
            parts.join(" and "),
            self.first_index
        )
    }
}

impl Tensor {
    /// NaN and infinities of this tensor: `(nan, inf, first flat index)`, `None` when every
    /// value is finite. Reads the stored bits (F32/BF16/F16/F64) without converting; large
    /// tensors are scanned in parallel.
    pub fn nonfinite(&self) -> Option<(usize, usize, usize)> {
        use rayon::prelude::*;
        if self.dtype.is_block() {
            return self.nonfinite_blocks();
        }
        // (exponent mask, mantissa mask) of each storage format.
        let (exp, man) = match self.dtype {
            StoredDtype::F32 => (0x7f80_0000, 0x007f_ffff),
            StoredDtype::BF16 => (0x7f80, 0x007f),
            StoredDtype::F16 => (0x7c00, 0x03ff),
            StoredDtype::F64 => (0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
            _ => unreachable!("block dtypes above"),
        };
        let size = self.dtype.size();
        const CHUNK: usize = 1 << 20;
        let c = self
            .bytes()
            .par_chunks(CHUNK * size)
            .enumerate()
            .map(|(i, b)| count_nonfinite(b, size, exp, man, i * CHUNK))
            .reduce(NonFiniteCount::default, NonFiniteCount::merge);
        c.first.map(|f| (c.nan, c.inf, f))
    }

    /// [`Self::nonfinite`] of a ggml block tensor: its blocks decoded to the float32 values the
    /// engine computes with, a piece of whole blocks at a time, in parallel.
    fn nonfinite_blocks(&self) -> Option<(usize, usize, usize)> {
        use rayon::prelude::*;
        let (per, bb) = crate::kernels::quant::block(self.dtype);
        const BLOCKS: usize = 4096;
        let c = self
            .bytes()
            .par_chunks(BLOCKS * bb)
            .enumerate()
            .map(|(i, b)| {
                let mut vals = vec![0f32; b.len() / bb * per];
                crate::kernels::quant::decode_blocks(self.dtype, b, &mut vals);
                let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
                count_nonfinite(&bytes, 4, 0x7f80_0000, 0x007f_ffff, i * BLOCKS * per)
            })
            .reduce(NonFiniteCount::default, NonFiniteCount::merge);
        c.first.map(|f| (c.nan, c.inf, f))
    }
}
