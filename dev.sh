#!/usr/bin/env bash
# Strata's developer entry point.
#
#   ./dev.sh up [--nodes 3] [--shards 8] [--data-dir ./strata-data]   start a local cluster (Ctrl-C stops it)
#   ./dev.sh test                                                     run every test, then the chaos suite's CI matrix
#   ./dev.sh chaos ARGS...                                            run strata-jepsen (run, check, ci)
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
  # apt's and dpkg's progress goes to a log that is shown only when the install fails.
  local log
  log=$(mktemp)
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "dev.sh: apt-get install $* failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "dev.sh: installed $*" >&2
}

ensure_build_deps() {
  local missing=()
  if ! dpkg -s libclang-dev >/dev/null 2>&1; then missing+=(libclang-dev); fi
  if ! command -v c++ >/dev/null 2>&1; then missing+=(g++); fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]} with apt-get (needed to build RocksDB)" >&2
    apt_install "${missing[@]}"
  fi
}

build() {
  ensure_build_deps
  cargo build --release --locked -p strata-node -p strata-cluster
}

# The chaos suite's partition scenarios cut links with iptables inside a private network
# namespace (never the host's rules); its clock scenarios need libfaketime.
ensure_chaos_deps() {
  ensure_build_deps
  if ! command -v iptables >/dev/null 2>&1; then
    echo "dev.sh: installing iptables with apt-get (for the chaos suite's partition scenarios)" >&2
    apt_install iptables
  fi
  # The clock scenarios run a node's clock at another rate with libfaketime (LD_PRELOAD).
  if ! dpkg -s libfaketime >/dev/null 2>&1; then
    echo "dev.sh: installing libfaketime with apt-get (for the chaos suite's clock scenarios)" >&2
    apt_install libfaketime
  fi
}

# A cargo build that prints only its last line, or all of its output if it fails (and then stops
# the script), so a broken build is never reduced to "build failed".
cargo_build_quietly() {
  local log
  log=$(mktemp)
  if ! cargo build --release --locked "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "dev.sh: cargo build $* failed (output above)" >&2
    exit 1
  fi
  tail -1 "$log"
  rm -f "$log"
}

# The node with the test-only planted bugs, as a separate binary (strata-node-planted), for the
# chaos suite's must-fail scenarios. Only strata-node is rebuilt for it, not RocksDB.
build_planted() {
  if [ ! -x "$CARGO_TARGET_DIR/release/strata-node-planted" ]; then
    echo "dev.sh: building strata-node (compiling RocksDB, if not built yet, takes 15 to 30 minutes on 2 cores)" >&2
  fi
  cargo_build_quietly -p strata-node --features planted-bugs
  cp "$CARGO_TARGET_DIR/release/strata-node" "$CARGO_TARGET_DIR/release/strata-node-planted"
  cargo_build_quietly -p strata-node -p strata-jepsen
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  up)
    build
    exec "$CARGO_TARGET_DIR/release/strata" dev up "$@"
    ;;
  test)
    ensure_chaos_deps
    build_planted
    log=$(mktemp)
    set +e
    # --no-fail-fast: a failing test binary must not hide the results of the ones after it.
    cargo test --release --locked --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    # The chaos suite's short matrix on real clusters (about 8 minutes), planted bugs included.
    cargo_build_quietly -p strata-node -p strata-jepsen
    chaos_out=$(mktemp -d)
    "$CARGO_TARGET_DIR/release/strata-jepsen" ci --out "$chaos_out" \
      --planted-bin "$CARGO_TARGET_DIR/release/strata-node-planted" 2>&1 | tee -a "$log"
    chaos=${PIPESTATUS[0]}
    set -e
    rm -rf "$chaos_out"
    # One closing line over every test binary and chaos scenario.
    awk '/^test result:/ {p += $4; f += $6}
         /^[0-9]+ passed, [0-9]+ failed$/ {p += $1; f += $3}
         END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
    rm -f "$log"
    [ "$status" = 0 ] && [ "$chaos" = 0 ]
    ;;
  chaos)
    ensure_chaos_deps
    build_planted
    exec "$CARGO_TARGET_DIR/release/strata-jepsen" "$@"
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
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2
    ;;
esac
