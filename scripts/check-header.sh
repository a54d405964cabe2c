#!/usr/bin/env bash
# Regenerates the C header ffi/include/tally.h with the pinned cbindgen into a temporary file
# and fails on any difference from the checked-in one. `--write` updates the checked-in header
# instead. Installs the pinned cbindgen (cargo install, from crates.io) if it is not on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

CBINDGEN_VERSION=0.29.4
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(cbindgen --version 2>/dev/null || true)" != "cbindgen $CBINDGEN_VERSION" ]; then
  echo "installing cbindgen $CBINDGEN_VERSION"
  cargo install cbindgen --locked --version "$CBINDGEN_VERSION"
fi

generated="$(mktemp)"
trap 'rm -f "$generated"' EXIT
(cd ffi && cbindgen --quiet --config cbindgen.toml --crate tally-ffi --output "$generated")

if [ "${1:-}" = "--write" ]; then
  cp "$generated" ffi/include/tally.h
  echo "wrote ffi/include/tally.h"
  exit 0
fi
if ! diff -u ffi/include/tally.h "$generated"; then
  echo "ffi/include/tally.h is out of date: run scripts/check-header.sh --write and commit it" >&2
  exit 1
fi
echo "ffi/include/tally.h matches the code"
