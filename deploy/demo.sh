#!/usr/bin/env bash
# demo.sh - README's first command: install everything away needs (idempotent), start
# the daemons, build away, check the host (away doctor) and run the main demo (away demo).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
t0=$(date +%s)
./deploy/install.sh
./deploy/services.sh start
echo "==> building away"
# (a debug build: the tests reuse its dependencies; `cargo build --release -p away` for daily use)
cargo build --quiet -p away
echo "==> away doctor"
# doctor exits 1 when something away needs is missing: that fails the demo too.
./target/debug/away doctor
echo "==> away demo"
./target/debug/away demo
echo "==> done in $(( $(date +%s) - t0 )) s"
