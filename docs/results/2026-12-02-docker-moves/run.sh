#!/bin/bash
# Docker and containerd moves of memload (128 MiB, half of each page random) between a
# source node and a target agent on this host over loopback, each path N times; one
# `away migrate --json` report per line in reports.jsonl. Root, the daemons running.
#   run.sh AWAY_BIN OUT_DIR [N]
set -euo pipefail
bin=$1 out=$2 n=${3:-3}
mkdir -p "$out"
root=$(cd "$(dirname "$0")/../../.." && pwd)
tar=/var/tmp/away-docker-moves/memload.tar
mkdir -p /var/tmp/away-docker-moves
[ -f "$tar" ] || "$bin" image build "$root/images/memload" -o /var/tmp/away-docker-moves >/dev/null
node() { # role run -- away args
  local role=$1 run=$2; shift 2
  AWAY_STATE_DIR=/var/tmp/away-docker-moves/$role-$run/state AWAY_RUN_DIR=/var/tmp/away-docker-moves/$role-$run/run \
    AWAY_NAMESPACE=away-dm-$role "$bin" "$@"
}
run=0
# runtime:mode:compression
for path in ${PATHS:-docker:staged:zstd:1 docker:stop-copy:zstd:1 containerd:stop-copy:zstd:1 containerd:staged:zstd:1}; do
  IFS=: read -r runtime mode comp level <<<"$path"
  for i in $(seq 1 "$n"); do
    run=$((run + 1))
    api=$((21000 + run)) transfer=$((22000 + run))
    node target $run agent --name target --listen 127.0.0.1:$api --transfer-listen 127.0.0.1:$transfer \
      2>"$out/agent-$run.log" &
    agent=$!
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$api) 2>/dev/null && break; sleep 0.2; done
    name=dm-memload-$$-$run
    node source $run run "$tar" --name $name --runtime $runtime --memory 400Mi -e MEMLOAD_SIZE=128Mi \
      -e MEMLOAD_PORT=0 >/dev/null
    for _ in $(seq 1 300); do node source $run logs $name 2>/dev/null | grep -q "pages resident" && break; sleep 0.2; done
    node source $run migrate $name --to 127.0.0.1:$api --compression $comp:$level --mode $mode --json \
      --reconnect-timeout 60 | jq -c --arg path "$runtime-$mode" '. + {path: $path}' >>"$out/reports.jsonl" || true
    node target $run rm --force $name >/dev/null 2>&1 || true
    node source $run rm --force $name >/dev/null 2>&1 || true
    kill $agent; wait $agent 2>/dev/null || true
    tail -1 "$out/reports.jsonl" | jq -r '"\(.path) downtime \(.downtime_millis) total \(.total_millis) " + ([.phases[] | "\(.name) \(.millis)"] | join(", "))'
  done
done
