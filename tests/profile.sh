#!/usr/bin/env bash
# profile.sh PROFILE - run the runtime and migration end-to-end tests against another
# runtime profile (docs/runtimes.md), then switch back to the one that was active.
#
#   tests/profile.sh debian12     containerd 1.6, Docker 20.10 (Debian 12's packages)
#   tests/profile.sh current      containerd 2.1, Docker 28
#
# It installs the profile if needed (deploy/install.sh --profile), restarts the daemons
# away started (deploy/services.sh restart) and runs the subset below. CI runs it for
# debian12 after the whole suite on the default profile.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 1 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
WANT=$1
BEFORE=$(basename "$(readlink -f /opt/away-runtimes/active 2>/dev/null || echo current)")
switch() {
    ./deploy/install.sh --profile "$1" >/dev/null
    ./deploy/services.sh restart
    ./deploy/services.sh status
}
back() { echo "==> back to profile $BEFORE"; switch "$BEFORE"; }
trap back EXIT
echo "==> profile $WANT"
switch "$WANT"
# the runtimes, the moves through them, the images on them (away's own and foreign ones)
# and the container contract; the lazy moves (containerd only, long) run on `current`
cargo test --no-fail-fast -p away-e2e --test runtime_containerd --test runtime_docker --test migrate_container \
    --test images --test foreign_images --test contract
