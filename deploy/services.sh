#!/usr/bin/env bash
# services.sh - start, stop or show the daemons away needs, on machines where no init
# system runs them.
#
#   services.sh start    start containerd and dockerd (--experimental, for checkpoints)
#                        unless something already answers on their sockets; waits until
#                        both answer. A no-op when they already run.
#   services.sh stop     stop only what `start` started (by pidfile, never by name)
#   services.sh status   one line per daemon; exit 1 if one is down
#
# Pidfiles and logs: /run/away/{containerd,dockerd}.{pid,log} (AWAY_RUN_DIR overrides).
set -euo pipefail
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=lib.sh
. "$HERE/lib.sh"

ssd_start() {  # ssd_start NAME EXEC ARGS...
  local name=$1 exe=$2; shift 2
  start-stop-daemon --start --quiet --oknodo --background --make-pidfile \
    --pidfile "$RUN_DIR/$name.pid" --output "$RUN_DIR/$name.log" --exec "$exe" -- "$@"
}

start_containerd() {
  if containerd_up; then log "containerd already answers on $CTR_SOCK"; return 0; fi
  [ -x /usr/bin/containerd ] || die "containerd is not installed (run: deploy/install.sh)"
  mkdir -p "$RUN_DIR"
  local cfg=()
  [ -f /etc/containerd/config.toml ] && cfg=(--config /etc/containerd/config.toml)
  ssd_start containerd /usr/bin/containerd "${cfg[@]}"
  wait_for 30 containerd_up || { tail -n 30 "$RUN_DIR/containerd.log" >&2; die "containerd did not answer on $CTR_SOCK within 30 s (log: $RUN_DIR/containerd.log)"; }
  log "containerd up: pid $(cat "$RUN_DIR/containerd.pid"), $(containerd --version)"
}

start_dockerd() {
  if dockerd_up; then
    log "dockerd already answers on $DOCKER_SOCK"
    [ "$("$DOCKER" version -f '{{.Server.Experimental}}' 2>/dev/null)" = true ] ||
      warn "the running dockerd is not --experimental: docker checkpoints will not work"
    return 0
  fi
  [ -x /usr/sbin/dockerd ] || die "dockerd is not installed (run: deploy/install.sh)"
  mkdir -p "$RUN_DIR"
  ssd_start dockerd /usr/sbin/dockerd --experimental --containerd "$CTR_SOCK" \
    --host "unix://$DOCKER_SOCK" --pidfile "$RUN_DIR/dockerd.self.pid"
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

stop_one() {  # stop_one NAME EXEC
  local name=$1 exe=$2 pf=$RUN_DIR/$1.pid
  if [ ! -f "$pf" ]; then log "$name: not started by away - left alone"; return 0; fi
  local pid; pid=$(cat "$pf")
  if ! kill -0 "$pid" 2>/dev/null; then
    log "$name: pid $pid not running - removing stale pidfile"; rm -f "$pf"; return 0
  fi
  log "stopping $name (pid $pid)"
  start-stop-daemon --stop --quiet --oknodo --pidfile "$pf" --exec "$exe" --retry TERM/30/KILL/5 --remove-pidfile
  rm -f "$pf"
}

status() {
  local rc=0
  if containerd_up; then log "containerd: up on $CTR_SOCK"; else log "containerd: DOWN"; rc=1; fi
  if dockerd_up; then log "dockerd: up on $DOCKER_SOCK (experimental=$("$DOCKER" version -f '{{.Server.Experimental}}'))"; else log "dockerd: DOWN"; rc=1; fi
  return $rc
}

need_root
case ${1:-} in
  start) tune_kernel; step containerd start_containerd; step dockerd start_dockerd ;;
  stop) stop_one dockerd /usr/sbin/dockerd; stop_one containerd /usr/bin/containerd ;;
  status) status ;;
  -h|--help|help) sed -n '2,12p' "$0" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
