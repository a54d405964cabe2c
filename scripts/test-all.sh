#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine with Rust installed: installs what
# else it needs (the C, Go and Python steps' packages, cbindgen, cargo-fuzz), then runs the
# formatting and lint checks, every Rust test, the loom models, the racing tests under load, the
# C, Go and Python tests of the C ABI, the fuzz targets, the benchmarks in quick test mode and
# the main job once. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's header says when it started (seconds into the run: how long each took) and how much
# disk was free then, so a run that fills the disk says which step did.
target_dir="${CARGO_TARGET_DIR:-target}"
free_gib() {
  { df -Pk "$target_dir" 2>/dev/null || df -Pk .; } | awk 'NR == 2 { printf "%.1f", $4 / 1048576 }'
}
step() { printf '\n==> %s (at %d s, %s GiB free)\n' "$*" "$SECONDS" "$(free_gib)"; }

# The suite builds the workspace five ways (debug tests, loom, release, fuzz, benchmarks): kept
# small, so a machine with little disk runs it. It builds once, so incremental caches would only
# take space, and its debug builds carry line tables only, enough for a panic's or a hung run's
# backtrace to name files and lines. Measured: target/debug after the tests was 5.2 GiB with
# both (1.3 GiB of it incremental caches), 1.7 GiB without. Cargo.toml's profiles stay as they
# are for local work.
export CARGO_INCREMENTAL=0
export CARGO_PROFILE_DEV_DEBUG=line-tables-only

# On CI (CI=true, a fresh clone run once), a build no later step needs is removed when its last
# step is done: the loom build after the loom models, the debug build after the C test, the
# fuzz build after the fuzz targets. Elsewhere they are kept, so the next run reuses them.
# Measured on a clean clone: the builds took 7.7 GiB at the end of a run before, and at most
# about 2.5 GiB at once now.
drop_build() {
  if [ "${CI:-}" = "true" ]; then
    echo "removing $1 (no later step needs it)"
    rm -rf "${1:?}"
  fi
}
# cargo fuzz builds into fuzz/target, or under CARGO_TARGET_DIR when that is set.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  fuzz_build="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu"
else
  fuzz_build=fuzz/target
fi

# A failed run ends with what the disk held, the likeliest cause after a test's own failure.
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    printf '\n==> failed (exit %d, at %d s, %s GiB free)\n' "$status" "$SECONDS" "$(free_gib)"
    du -sh "$target_dir"/* "$fuzz_build" 2>/dev/null || true
  fi
}
trap on_exit EXIT

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
drop_build "$target_dir/loom"

step "stress: the racing tests over and over for three minutes, every core kept busy"
bash scripts/stress.sh 180

step "C ABI: the C test (plain and under Valgrind) and the generated header"
bash scripts/test-c.sh
drop_build "$target_dir/debug"

step "Go: the package and the gateway (go vet, go test -race)"
bash scripts/test-go.sh

step "Python: the package and the ASGI middleware (pytest)"
bash scripts/test-python.sh

step "fuzz: replay the corpora of the cargo-fuzz targets, then fuzz each briefly"
bash scripts/test-fuzz.sh
drop_build "$fuzz_build"

step "benchmark in quick test mode"
cargo bench --bench admission -- --test
cargo bench --bench durability -- --test

step "main job: tally simulate"
cargo run --quiet --release -- simulate --keys 500 --days 2 >/dev/null
echo "simulate ran"
echo "all steps passed in $SECONDS s"
