#!/usr/bin/env bash
# Model-checks the lock-free windows with loom (`engine/src/window.rs`, `loom_models`): every
# interleaving of each model's threads, debug assertions on. A build of its own (`--cfg
# tally_loom` swaps the window's atomics for loom's), in its own target directory so the
# regular build's cache stays valid; optimised, as loom explores thousands of executions.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}/loom"
RUSTFLAGS="--cfg tally_loom" CARGO_TARGET_DIR="$target" \
  CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo test --release -q -p tally-engine --lib window::loom_models -- --test-threads=2
