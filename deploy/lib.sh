# lib.sh - helpers shared by deploy/install.sh and deploy/services.sh (sourced, not run).
# Paths here are the ones `away doctor` and the runtime backends look at.
RUN_DIR=${AWAY_RUN_DIR:-/run/away}
APT_PRIV=/var/lib/away-apt              # private apt state (forky sources, backports); /etc/apt is never edited
CRIU_PREFIX=/opt/away-criu              # criu built from Debian testing's source with deploy/criu/*.patch
CRIU_LINK=/usr/local/sbin/criu          # -> $CRIU_PREFIX/sbin/criu
GUEST_DIR=/opt/away-guest               # guest kernel for QEMU (VM boot artifacts)
CTR_SOCK=/run/containerd/containerd.sock
DOCKER_SOCK=/run/docker.sock
# Runtime profiles (deploy/install.sh --profile, docs/runtimes.md): each is a directory
# $RUNTIMES_DIR/NAME with bin/ (containerd, containerd-shim-runc-v2, ctr, runc, dockerd,
# docker-proxy, docker-init, docker) and the daemons' flags; `active` links to the chosen
# one. away's binaries look there too (away_runtime::host::runtime_bin).
RUNTIMES_DIR=/opt/away-runtimes
RT_ACTIVE=$RUNTIMES_DIR/active
RT_BIN=$RT_ACTIVE/bin
DOCKER=$RT_BIN/docker                   # the profile's CLI, not whatever docker is first on PATH
# the profile's binaries first: containerd/dockerd/shims/runc inherit this PATH;
# then /usr/local/sbin, so that away's criu wins over any /usr/sbin/criu.
export PATH=$RT_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}
export DEBIAN_FRONTEND=noninteractive

log()  { printf '\033[1;34m[away-deploy]\033[0m %s\n' "$*"; }
warn() { printf '\033[1;33m[away-deploy] WARNING:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31m[away-deploy] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }
now()  { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

TIMINGS=()
step() {  # step NAME CMD... : run CMD with a banner and record its duration
  local name=$1; shift
  local t0; t0=$(now)
  log "==> [$name]"
  "$@"
  local dt; dt=$(elapsed "$t0")
  TIMINGS+=("$(printf '%-24s %7ss' "$name" "$dt")")
}
print_timings() {
  [ ${#TIMINGS[@]} -gt 0 ] || return 0
  log "timings:"
  printf '    %s\n' "${TIMINGS[@]}"
}

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

wait_for() {  # wait_for SECONDS CMD... : poll CMD every 0.5 s
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

# (ctr waits 10 s for a missing socket, hence the -S test and --connect-timeout)
containerd_up() { [ -S "$CTR_SOCK" ] && timeout 15 "$RT_BIN/ctr" --address "$CTR_SOCK" --connect-timeout 2s version >/dev/null 2>&1; }
dockerd_up()    { [ -S "$DOCKER_SOCK" ] && [ -x "$DOCKER" ] && timeout 15 "$DOCKER" -H "unix://$DOCKER_SOCK" version >/dev/null 2>&1; }

active_profile() { basename "$(readlink -f "$RT_ACTIVE" 2>/dev/null || echo none)"; }
# profile_flags DAEMON: that daemon's extra flags in the active profile (one per line)
profile_flags() { [ -f "$RT_ACTIVE/$1.flags" ] && grep -v '^#' "$RT_ACTIVE/$1.flags" || true; }
