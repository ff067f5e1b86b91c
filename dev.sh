#!/usr/bin/env bash
# Strata's developer entry point.
#
#   ./dev.sh up [--nodes 3] [--shards 8] [--data-dir ./strata-data]   start a local cluster (Ctrl-C stops it)
#   ./dev.sh test                                                     run every test
#   ./dev.sh strata ARGS...                                           run the strata CLI (status, put, get, bench, ...)
#   ./dev.sh deps                                                     only install the system packages the build needs
#
# On a fresh Debian machine with only the Rust toolchain, this script installs what the build
# needs (libclang-dev for the RocksDB bindings, a C++ compiler) with apt-get, and says so.
# Everything is built once in the release profile, into ${CARGO_TARGET_DIR:-~/.cache/strata-target}.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strata-target}"

apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "dev.sh: installing $* with apt-get (needed to build RocksDB)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

ensure_build_deps() {
  local missing=()
  if ! dpkg -s libclang-dev >/dev/null 2>&1; then missing+=(libclang-dev); fi
  if ! command -v c++ >/dev/null 2>&1; then missing+=(g++); fi
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

build() {
  ensure_build_deps
  cargo build --release --locked -p strata-node -p strata-cluster
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  up)
    build
    exec "$CARGO_TARGET_DIR/release/strata" dev up "$@"
    ;;
  test)
    ensure_build_deps
    log=$(mktemp)
    set +e
    cargo test --release --locked --workspace "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    # One closing line over every test binary.
    awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
    rm -f "$log"
    exit "$status"
    ;;
  strata)
    if [ ! -x "$CARGO_TARGET_DIR/release/strata" ]; then build; fi
    exec "$CARGO_TARGET_DIR/release/strata" "$@"
    ;;
  build)
    build
    ;;
  deps)
    ensure_build_deps
    ;;
  *)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2
    ;;
esac
