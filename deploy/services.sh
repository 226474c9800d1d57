#!/usr/bin/env bash
# services.sh - start, stop or show the daemons away needs, on machines where no init
# system runs them.
#
#   services.sh start    start containerd and dockerd (--experimental, for checkpoints) of
#                        the active runtime profile (/opt/away-runtimes/active, chosen by
#                        deploy/install.sh --profile) unless something already answers on
#                        their sockets; waits until both answer. A no-op when they already run.
#   services.sh stop     stop only what `start` started (by pidfile, never by name)
#   services.sh restart  stop, then start: how a new active profile takes over
#   services.sh status   one line per daemon with its version; exit 1 if one is down or
#                        is not the active profile's version
#
# Pidfiles and logs: /run/away/{containerd,dockerd}.{pid,log} (AWAY_RUN_DIR overrides).
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=lib.sh
. "$HERE/lib.sh"

ssd_start() {  # ssd_start NAME EXEC ARGS...
  local name=$1 exe; exe=$(readlink -f "$2"); shift 2
  # the binary is remembered: after a profile switch, stop must find the old one
  echo "$exe" >"$RUN_DIR/$name.exe"
  start-stop-daemon --start --quiet --oknodo --background --make-pidfile \
    --pidfile "$RUN_DIR/$name.pid" --output "$RUN_DIR/$name.log" --exec "$exe" -- "$@"
}

# the version a daemon answers with, and the one the active profile has
running_version() {
  case $1 in
    containerd) "$RT_BIN/ctr" --address "$CTR_SOCK" version 2>/dev/null | awk '/^Server:/ {s=1} s && /Version:/ {print $2; exit}' ;;
    dockerd) "$DOCKER" -H "unix://$DOCKER_SOCK" version -f '{{.Server.Version}}' 2>/dev/null ;;
  esac
}
profile_version() { "$RT_BIN/$1" --version 2>/dev/null | awk '{print $3}' | tr -d ,; }
profile_matches() {  # profile_matches DAEMON: the running one is the active profile's (else MISMATCH says why)
  local have want; have=$(running_version "$1"); want=$(profile_version "$1")
  MISMATCH="$1 $have runs, but the active profile $(active_profile) has $want"
  [ -n "$have" ] && [ "${have%%+*}" = "${want%%+*}" ]
}

need_profile() {
  [ -x "$RT_BIN/containerd" ] && [ -x "$RT_BIN/dockerd" ] ||
    die "no runtime profile is installed in $RT_ACTIVE (run: deploy/install.sh)"
}

start_containerd() {
  if containerd_up; then
    log "containerd already answers on $CTR_SOCK"
    profile_matches containerd || warn "$MISMATCH (deploy/services.sh restart switches)"
    return 0
  fi
  need_profile
  mkdir -p "$RUN_DIR"
  local flags=(); mapfile -t flags < <(profile_flags containerd)
  ssd_start containerd "$RT_BIN/containerd" "${flags[@]}"
  wait_for 30 containerd_up || { tail -n 30 "$RUN_DIR/containerd.log" >&2; die "containerd did not answer on $CTR_SOCK within 30 s (log: $RUN_DIR/containerd.log)"; }
  log "containerd up: pid $(cat "$RUN_DIR/containerd.pid"), $("$RT_BIN/containerd" --version) (profile $(active_profile))"
}

start_dockerd() {
  if dockerd_up; then
    log "dockerd already answers on $DOCKER_SOCK"
    [ "$("$DOCKER" version -f '{{.Server.Experimental}}' 2>/dev/null)" = true ] ||
      warn "the running dockerd is not --experimental: docker checkpoints will not work"
    profile_matches dockerd || warn "$MISMATCH (deploy/services.sh restart switches)"
    return 0
  fi
  need_profile
  mkdir -p "$RUN_DIR"
  local flags=(); mapfile -t flags < <(profile_flags dockerd)
  ssd_start dockerd "$RT_BIN/dockerd" --experimental --containerd "$CTR_SOCK" \
    --host "unix://$DOCKER_SOCK" --pidfile "$RUN_DIR/dockerd.self.pid" "${flags[@]}"
  wait_for 60 dockerd_up || { tail -n 30 "$RUN_DIR/dockerd.log" >&2; die "dockerd did not answer on $DOCKER_SOCK within 60 s (log: $RUN_DIR/dockerd.log)"; }
  log "dockerd up: pid $(cat "$RUN_DIR/dockerd.pid"), $("$DOCKER" version -f 'server {{.Server.Version}} experimental={{.Server.Experimental}}')"
}

# CRIU's lazy page server needs pipes larger than the default 1 MiB, and root here may lack
# CAP_SYS_RESOURCE to grow them itself (see docs: lazy pages).
tune_kernel() {
  local want=4194304 cur
  cur=$(cat /proc/sys/fs/pipe-max-size 2>/dev/null || echo 0)
  if [ "$cur" -lt "$want" ]; then
    echo "$want" >/proc/sys/fs/pipe-max-size 2>/dev/null && log "fs.pipe-max-size: $cur -> $want" ||
      warn "could not raise fs.pipe-max-size to $want (lazy-pages migration will fail)"
  fi
}

stop_one() {  # stop_one NAME
  local name=$1 pf=$RUN_DIR/$1.pid exe
  exe=$(cat "$RUN_DIR/$name.exe" 2>/dev/null || readlink -f "$RT_BIN/$name")
  if [ ! -f "$pf" ]; then log "$name: not started by away - left alone"; return 0; fi
  local pid; pid=$(cat "$pf")
  if ! kill -0 "$pid" 2>/dev/null; then
    log "$name: pid $pid not running - removing stale pidfile"; rm -f "$pf"; return 0
  fi
  log "stopping $name (pid $pid)"
  start-stop-daemon --stop --quiet --oknodo --pidfile "$pf" --exec "$exe" --retry TERM/30/KILL/5 --remove-pidfile
  rm -f "$pf" "$RUN_DIR/$name.exe"
}

status() {
  local rc=0
  log "active runtime profile: $(active_profile)"
  if containerd_up; then
    log "containerd: up on $CTR_SOCK ($(running_version containerd))"
    profile_matches containerd || { warn "$MISMATCH: deploy/services.sh restart"; rc=1; }
  else log "containerd: DOWN"; rc=1; fi
  if dockerd_up; then
    log "dockerd: up on $DOCKER_SOCK ($(running_version dockerd), experimental=$("$DOCKER" version -f '{{.Server.Experimental}}'))"
    profile_matches dockerd || { warn "$MISMATCH: deploy/services.sh restart"; rc=1; }
  else log "dockerd: DOWN"; rc=1; fi
  return $rc
}

need_root
case ${1:-} in
  start) tune_kernel; step containerd start_containerd; step dockerd start_dockerd ;;
  stop) stop_one dockerd; stop_one containerd ;;
  restart) stop_one dockerd; stop_one containerd; tune_kernel; step containerd start_containerd; step dockerd start_dockerd ;;
  status) status ;;
  -h|--help|help) sed -n '2,15p' "$0" ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
