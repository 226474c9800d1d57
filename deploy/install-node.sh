#!/usr/bin/env bash
# install-node.sh - put the release build of away on this node, the way a node should carry it.
#
#   usage: install-node.sh [--prefix DIR]   (default /usr/local: the binary goes to DIR/bin/away)
#
# Builds `cargo build --release -p away --bin away` (no fault injection: what users run),
# checks that the binary carries no DWARF (the release profile strips debug info and keeps
# the symbols, so a panic's backtrace still names its functions), installs it with mode
# 0755 and prints its size (46 MB on 2026-12-03, 10 MB of it symbols). Client nodes are
# students' laptops. The system dependencies come from deploy/install.sh (run it first);
# a second run rebuilds nothing and reinstalls only a changed binary.
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=lib.sh
. "$HERE/lib.sh"

PREFIX=/usr/local
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a rustup toolchain (1.80+), then run deploy/install.sh"

cd "$HERE/.."
t0=$(now)
log "==> building away (release: optimized, no debug info)"
# The same command as the release benchmarks' (tests/src/lib.rs away_bin): one artifact.
cargo build --quiet --release -p away --bin away
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/away
[ -x "$BIN" ] || die "cargo built no $BIN"
if command -v readelf >/dev/null 2>&1; then
  if readelf --section-headers --wide "$BIN" | grep -q '\.debug_info'; then
    die "$BIN carries DWARF (.debug_info): the release profile in Cargo.toml must keep strip = \"debuginfo\""
  fi
else
  warn "readelf not found (binutils): not checking that debug info is stripped"
fi

DEST=$PREFIX/bin/away
if [ -f "$DEST" ] && cmp -s "$BIN" "$DEST"; then
  log "$DEST is already this build"
else
  install -D -m 0755 "$BIN" "$DEST"
fi
size=$(stat -c %s "$DEST")
log "installed $DEST: $("$DEST" --version), $(awk -v s="$size" 'BEGIN{printf "%.1f MB", s/1e6}') ($size bytes), debug info stripped, in $(elapsed "$t0") s"
