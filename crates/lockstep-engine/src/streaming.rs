//! Whether a forward pass streams the decoder layers through the page cache: the choice made at
//! load ([`crate::model::Model::stream_layers`]) and by the memory estimate
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

use crate::error::{EngineError, Result};

/// The environment variable that forces streaming on or off.
pub const ENV: &str = "LOCKSTEP_STREAM_LAYERS";

/// In `auto` mode, streaming starts when the mapped weights exceed this fraction of the memory
/// available: beyond it the file, the KV cache and the activations would crowd the page cache.
/// Below it the whole file stays mapped, since streaming a file the page cache holds anyway only
/// costs time (every layer's pages mapped again per forward pass: about half the decode speed on
/// the 0.5B-shape fixture).
pub const AUTO_FRACTION: f64 = 0.8;

/// How the choice is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    /// Stream when the weights are large against the memory available.
    Auto,
    /// Always stream.
    On,
    /// Never stream.
    Off,
}

impl StreamMode {
    /// The mode `LOCKSTEP_STREAM_LAYERS` asks for; a value other than `auto`, `1`, `on`, `0`,
    /// `off` (or unset / empty) is a one-line error.
    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(ENV).ok().as_deref().unwrap_or(""))
    }

    /// Parses a value of `LOCKSTEP_STREAM_LAYERS`.
    pub fn parse(v: &str) -> Result<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(StreamMode::Auto),
            "1" | "on" | "true" => Ok(StreamMode::On),
            "0" | "off" | "false" => Ok(StreamMode::Off),
            _ => Err(EngineError::Input(format!(
                "{ENV}={v:?} is not one of auto, on (1), off (0)"
            ))),
        }
    }

    /// Whether to stream `mapped` bytes of weights with `available` bytes of memory (`None`:
    /// unknown, and `auto` does not stream).
    pub fn decide(self, mapped: u64, available: Option<u64>) -> bool {
        match self {
            StreamMode::On => true,
            StreamMode::Off => false,
            StreamMode::Auto => available.is_some_and(|a| mapped as f64 > AUTO_FRACTION * a as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_decide() {
        assert_eq!(StreamMode::parse("").unwrap(), StreamMode::Auto);
        assert_eq!(StreamMode::parse(" ON ").unwrap(), StreamMode::On);
        assert_eq!(StreamMode::parse("0").unwrap(), StreamMode::Off);
        let e = StreamMode::parse("yes please").unwrap_err().to_string();
        assert!(e.contains(ENV) && !e.contains('\n'), "{e}");
        let gib = 1u64 << 30;
        assert!(StreamMode::Auto.decide(9 * gib, Some(10 * gib)));
        assert!(!StreamMode::Auto.decide(7 * gib, Some(10 * gib)));
        assert!(!StreamMode::Auto.decide(u64::MAX, None));
        assert!(StreamMode::On.decide(1, Some(u64::MAX)));
        assert!(!StreamMode::Off.decide(u64::MAX, Some(1)));
    }
}
