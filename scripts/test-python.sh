#!/usr/bin/env bash
# The Python package (ffi/python) over the C ABI: builds libtally (release), makes a virtual
# environment under the target directory, installs the package (editable), pytest and the pinned
# linters from PyPI, lints (ruff, mypy --strict) and runs the tests. On a fresh Debian machine it
# installs python3-venv and gcc (the struct layout test compiles a C program against the header)
# when they are missing.
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
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  install_packages "${missing[@]}"
fi

step "build libtally (release)"
cargo build -p tally-ffi --release
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
# The package finds the library under $CARGO_TARGET_DIR (or the repository's target/): test
# the one just built, not whatever $TALLY_LIBRARY may point at.
export CARGO_TARGET_DIR="$target"
unset TALLY_LIBRARY

step "virtual environment"
venv="$target/python-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian splits venv and ensurepip out of python3.
    rm -rf "$venv"
    install_packages python3-venv
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/python" --version

step "install tally (editable), pytest and the pinned linters"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ffi/python \
  "pytest>=7" "ruff==0.17.6" "mypy==2.4.1"

step "lint: ruff (check and format) and mypy --strict (settings in ffi/python/pyproject.toml)"
(cd ffi/python && "$venv/bin/ruff" check src tests && "$venv/bin/ruff" format --check src tests \
  && "$venv/bin/python" -m mypy src/tally)

step "pytest"
# A test still running after 5 minutes (each takes well under a second) has every thread's
# Python stack printed, so a hang says where it waits.
"$venv/bin/python" -m pytest ffi/python/tests -q -o faulthandler_timeout=300
