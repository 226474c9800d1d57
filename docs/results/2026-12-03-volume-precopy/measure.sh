#!/bin/bash
# Downtime of container moves with a 4.6 MB volume, with and without the volume pre-copy
# (AWAY_FAULT_VOLUME_PRECOPY=off), debug build with fault-injection, both nodes on this host.
set -u
AWAY=${AWAY:-/work/target-voldelta/debug/away}
TAR=/work/wt/voldelta/target/away-e2e-images/counter.tar
T=/tmp/vdm/run; rm -rf $T; mkdir -p $T
export AWAY_AGENT_TOKEN=$(cat /proc/sys/kernel/random/uuid)
read P1 P2 < <(python3 -c 'import socket
a=socket.socket();a.bind(("127.0.0.1",0));b=socket.socket();b.bind(("127.0.0.1",0))
print(a.getsockname()[1],b.getsockname()[1])')
API=127.0.0.1:$P1
tgt() { AWAY_NAMESPACE=away-vdm-target AWAY_STATE_DIR=$T/target/state AWAY_RUN_DIR=$T/target/run "$AWAY" "$@"; }
src() { AWAY_NAMESPACE=away-vdm-source AWAY_STATE_DIR=$T/source/state AWAY_RUN_DIR=$T/source/run "$AWAY" "$@"; }
AWAY_NAMESPACE=away-vdm-target AWAY_STATE_DIR=$T/target/state AWAY_RUN_DIR=$T/target/run "$AWAY" agent --name target --listen $API --transfer-listen 127.0.0.1:$P2 --insecure-plaintext-channels 2>$T/agent.log &
AGENT=$!
sleep 3
echo "mode precopy run downtime_ms total_ms raw_B wire_B precopy_raw_B frozen_B frozen_files load"
for mode in staged stop-copy lazy; do
  for pc in on off; do
    for i in 1 2; do
      n=vdm-$mode-$pc-$i
      src run $TAR --name $n --runtime containerd -v data:/data -e COUNTER_PORT=0 -e COUNTER_VOLUME=/data -e COUNTER_VOLUME_PRELOAD_KIB=4096 >/dev/null 2>$T/run.err || { echo "run failed"; cat $T/run.err; }
      sleep 3
      if [ $pc = off ]; then export AWAY_FAULT_VOLUME_PRECOPY=off; else unset AWAY_FAULT_VOLUME_PRECOPY; fi
      src migrate $n --to $API --json --source-name source --mode $mode >$T/r.json 2>$T/m.err || { echo "$n failed"; tail -3 $T/m.err; }
      unset AWAY_FAULT_VOLUME_PRECOPY
      python3 - $mode $pc $i "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import json,sys
r=json.load(open('/tmp/vdm/run/r.json')); v=r.get('volumes') or {}
print(*sys.argv[1:4], r['downtime_millis'], r['total_millis'], r['bytes_raw'], r['bytes_wire'], v.get('precopy_bytes_raw',0), v.get('frozen_bytes_raw',0), v.get('frozen_files',0), sys.argv[4])
PY
      tgt rm --force $n >/dev/null 2>&1; src rm --force $n >/dev/null 2>&1
    done
  done
done
kill $AGENT; wait $AGENT 2>/dev/null
