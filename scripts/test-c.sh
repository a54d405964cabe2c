#!/usr/bin/env bash
# The C ABI from C: builds libtally (debug), compiles ffi/tests/c/test_tally.c against the
# checked-in header with -Wall -Wextra -Werror -std=c11, runs it plainly and under Valgrind, and
# checks that the header matches the code. Installs gcc and valgrind (Debian packages) and the
# pinned cbindgen if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

install_packages() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "missing $*; install them (not root, and no sudo)" >&2
      exit 1
    fi
  fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  install_packages "${missing[@]}"
fi

step "build libtally"
cargo build -p tally-ffi
target="${CARGO_TARGET_DIR:-target}"
target="$(cd "$target" && pwd)"
library_dir="$target/debug"

step "compile the C test (-Wall -Wextra -Werror -std=c11)"
out_dir="$target/c-test"
mkdir -p "$out_dir"
gcc -Wall -Wextra -Werror -std=c11 -pedantic -g \
  -I ffi/include ffi/tests/c/test_tally.c \
  -L "$library_dir" -Wl,-rpath,"$library_dir" -ltally -lpthread \
  -o "$out_dir/test_tally"

step "run the C test"
"$out_dir/test_tally"

step "run the C test under Valgrind"
valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
  --suppressions=ffi/tests/c/valgrind.supp \
  --show-leak-kinds=definite \
  "$out_dir/test_tally"

step "header"
bash scripts/check-header.sh
