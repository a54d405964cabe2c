#!/usr/bin/env bash
# The Go package and gateway over the C ABI: builds libtally (release, honouring
# CARGO_TARGET_DIR), then runs go vet and go test -race in ffi/go against it. On a machine
# without Go or a C compiler, installs golang-go and gcc (Debian packages); Go 1.19 or newer
# works (ffi/go/go.mod says go 1.19).
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

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="$PATH:/usr/local/go/bin"
fi
missing=()
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  install_packages "${missing[@]}"
fi
go version

step "build libtally (release)"
cargo build -p tally-ffi --release
target="${CARGO_TARGET_DIR:-target}"
library_dir="$(cd "$target/release" && pwd)"

# The package's #cgo directives link ../../target/release/libtally.a (the default target
# dir); CGO_LDFLAGS comes first on the link line, so this points the linker at the library
# just built wherever CARGO_TARGET_DIR put it.
export CGO_ENABLED=1
export CGO_LDFLAGS="-L$library_dir${CGO_LDFLAGS:+ $CGO_LDFLAGS}"
cd ffi/go

step "go vet"
go vet ./...

step "go test -race (cgocheck on, the default)"
# -count=1: the linker reads libtally.a, which Go's test cache does not track.
go test -race -count=1 ./...
