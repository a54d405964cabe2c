#!/usr/bin/env bash
# The cargo-fuzz targets under fuzz/ (c_abi, engine_ops, policy_document, log_damage): replays
# each target's checked-in corpus (fuzz/corpus/TARGET), then fuzzes each briefly from a temporary
# copy of it, so nothing new is written into the checkout (except fuzz/target and, on a crash,
# fuzz/artifacts/TARGET/, both git-ignored). Exits non-zero on any crash, leak or timeout.
#
# Stable Rust with RUSTC_BOOTSTRAP=1 (no nightly needed); AddressSanitizer by default.
# Installs cargo-fuzz when it is missing (about 80 s).
#
# Environment: TALLY_FUZZ_C_ABI_SECONDS (default 30) and TALLY_FUZZ_SECONDS (default 15, the
# other targets) set how long each target fuzzes, TALLY_FUZZ_LOG_DAMAGE_SECONDS (default 5) how
# long log_damage does (each input opens a database: about 20 a second); 0 only replays the
# corpora.
# TALLY_FUZZ_SANITIZER (default address) is passed to `cargo fuzz --sanitizer`.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
C_ABI_SECONDS=${TALLY_FUZZ_C_ABI_SECONDS:-30}
OTHER_SECONDS=${TALLY_FUZZ_SECONDS:-15}
LOG_DAMAGE_SECONDS=${TALLY_FUZZ_LOG_DAMAGE_SECONDS:-5}
SANITIZER=${TALLY_FUZZ_SANITIZER:-address}

step() { printf '\n==> %s\n' "$*"; }

# libfuzzer-sys compiles libFuzzer (C++) when a target is built.
if ! command -v c++ >/dev/null 2>&1; then
  step "installing g++"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "missing g++; install it (not root, and no sudo)" >&2
      exit 1
    fi
  fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  step "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
cargo fuzz --version

# cargo-fuzz passes -Zsanitizer and other unstable flags: allowed on stable with this.
export RUSTC_BOOTSTRAP=1

work=$(mktemp -d "${TMPDIR:-/tmp}/tally-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

# target seconds [libFuzzer options for the timed run...]
fuzz_target() {
  local target=$1 seconds=$2
  shift 2
  local corpus="fuzz/corpus/$target"
  mkdir -p "$corpus"

  step "fuzz $target: build ($SANITIZER sanitizer)"
  cargo fuzz build --sanitizer "$SANITIZER" "$target"

  step "fuzz $target: replay $(find "$corpus" -type f | wc -l) checked-in inputs"
  # -runs=0: run every input of the corpus once, then stop.
  cargo fuzz run --sanitizer "$SANITIZER" "$target" "$corpus" -- -runs=0 -timeout=30

  if [ "$seconds" -gt 0 ]; then
    step "fuzz $target: ${seconds} s from a copy of the corpus"
    cp -R "$corpus" "$work/$target"
    cargo fuzz run --sanitizer "$SANITIZER" "$target" "$work/$target" -- \
      -max_total_time="$seconds" -timeout=30 -print_final_stats=1 -print_funcs=0 "$@"
  fi
}

# c_abi: inputs are sequences of operations; start at full length instead of growing slowly.
fuzz_target c_abi "$C_ABI_SECONDS" -max_len=2048 -len_control=0
fuzz_target engine_ops "$OTHER_SECONDS"
fuzz_target policy_document "$OTHER_SECONDS"
# log_damage: a leading byte and 6-byte operations; whole inputs from the start.
fuzz_target log_damage "$LOG_DAMAGE_SECONDS" -max_len=49 -len_control=0

step "fuzz: no crash"
