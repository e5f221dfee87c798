//! What the engine's fixture tests share.

use lockstep_engine::{Float, Model};
use std::path::PathBuf;

/// The random-weight fixture `fixtures/models/{name}`. A missing fixture fails the test.
pub fn fixture_model(name: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name);
    assert!(
        dir.join("config.json").exists(),
        "fixture {} is missing: run scripts/fixtures.sh",
        dir.display()
    );
    Model::load(&dir).unwrap()
}

/// Each value's bits (as f64, exact for every compute type).
pub fn bits<T: Float>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

/// Four prompts of 7, 1, 12 and 3 tokens (ids folded into `vocab`): rows of different lengths.
pub fn uneven_prompts(vocab: usize) -> Vec<Vec<u32>> {
    [7usize, 1, 12, 3]
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            (0..n)
                .map(|i| ((i * 131 + r * 977 + 5) % vocab) as u32)
                .collect()
        })
        .collect()
}
