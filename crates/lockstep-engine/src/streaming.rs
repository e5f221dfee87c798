//! Whether a forward pass streams the decoder layers through the page cache: the choice made at
//! load ([`crate::model::Model::stream_layers`], [`stream_layers`]) and by the memory estimate
//! ([`crate::resources::held_weight_bytes`]).
//!
//! Streaming is for a checkpoint too large to keep resident: before layer `i` runs, the kernel is
//! told to read layer `i + 1`'s weights ahead; after it, layer `i`'s pages are dropped from the
//! mapping ([`crate::weights::PageAdvice`]). The process then holds about the embeddings, the LM
//! head and two or three layers of mapped weights instead of the whole file, at the price of
//! reading each layer again (from the page cache, or from disk when the file does not fit) on
//! every forward pass. Values never change: results are bit for bit the same either way.
//!
//! `LOCKSTEP_STREAM_LAYERS` chooses: `auto` (the default, also when unset or empty) streams when
//! the mapped weights exceed [`AUTO_FRACTION`] of `MemAvailable`; `1` / `on` always streams; `0` /
//! `off` never does.

use crate::error::Result;
use crate::switch::Switch;

/// The environment variable that forces streaming on or off.
pub const ENV: &str = "LOCKSTEP_STREAM_LAYERS";

/// In `auto` mode, streaming starts when the mapped weights exceed this fraction of the memory
/// available: beyond it the file, the KV cache and the activations would crowd the page cache.
/// Below it the whole file stays mapped, since streaming a file the page cache holds anyway only
/// costs time (every layer's pages mapped again per forward pass: about half the decode speed on
/// the 0.5B-shape fixture).
pub const AUTO_FRACTION: f64 = 0.8;

/// Whether to stream `mapped` bytes of weights with `available` bytes of memory, as
/// `LOCKSTEP_STREAM_LAYERS` asks ([`auto`] when it does not); a bad value is a one-line error.
pub fn stream_layers(mapped: u64, available: Option<u64>) -> Result<bool> {
    Ok(Switch::from_env(ENV)?.is_on(|| auto(mapped, available)))
}

/// Whether to stream for a single forward pass (`lockstep trace`): it reads each layer once
/// either way, so `auto` streams whatever the model's size; `off` keeps the file mapped.
pub fn stream_layers_for_one_pass() -> Result<bool> {
    Ok(Switch::from_env(ENV)?.is_on(|| true))
}

/// The `auto` rule: stream when `mapped` exceeds [`AUTO_FRACTION`] of `available` (`None`:
/// unknown, and it does not stream).
pub fn auto(mapped: u64, available: Option<u64>) -> bool {
    available.is_some_and(|a| mapped as f64 > AUTO_FRACTION * a as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_streams_beyond_the_fraction() {
        let gib = 1u64 << 30;
        assert!(auto(9 * gib, Some(10 * gib)));
        assert!(!auto(7 * gib, Some(10 * gib)));
        assert!(!auto(u64::MAX, None));
    }
}
