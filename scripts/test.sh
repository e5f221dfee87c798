#!/usr/bin/env bash
# Runs every test: unit tests and the parity tests against the live PyTorch reference.
# Sets up the reference environment and fixtures first when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LOCKSTEP_REQUIRE_REFERENCE=1
cargo test --release --workspace -- --test-threads=1
