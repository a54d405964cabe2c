#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine with Rust installed: installs what
# else it needs (the C, Go and Python steps' packages, cbindgen, cargo-fuzz), then runs the
# formatting and lint checks, every Rust test, the loom models, the racing tests under load, the
# C, Go and Python tests of the C ABI, the fuzz targets, the benchmarks in quick test mode and
# the main job once. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's header says when it started (seconds into the run): how long each took.
step() { printf '\n==> %s (at %d s)\n' "$*" "$SECONDS"; }

step "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (stable) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo --version

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets -- -D warnings

step "tests (debug, with debug assertions on the hot path)"
cargo test --workspace --no-fail-fast

step "loom: the lock-free windows model-checked under every interleaving of their models"
bash scripts/test-loom.sh

step "stress: the racing tests over and over for three minutes, every core kept busy"
bash scripts/stress.sh 180

step "C ABI: the C test (plain and under Valgrind) and the generated header"
bash scripts/test-c.sh

step "Go: the package and the gateway (go vet, go test -race)"
bash scripts/test-go.sh

step "Python: the package and the ASGI middleware (pytest)"
bash scripts/test-python.sh

step "fuzz: replay the corpora of the cargo-fuzz targets, then fuzz each briefly"
bash scripts/test-fuzz.sh

step "benchmark in quick test mode"
cargo bench --bench admission -- --test
cargo bench --bench durability -- --test

step "main job: tally simulate"
cargo run --quiet --release -- simulate --keys 500 --days 2 >/dev/null
echo "simulate ran"
echo "all steps passed in $SECONDS s"
