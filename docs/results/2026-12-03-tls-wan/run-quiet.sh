#!/bin/bash
# WAN lazy blackout on a quiet host, mutual TLS vs plaintext, alternating, same build
cd /work/main
export PATH=/opt/away-runtimes/current/bin:$PATH
for round in 1 2; do
  for ch in tls plaintext; do
    echo "=== round $round $ch $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /work/ci2/target/release/away lab compare --links wan --loads idle --paths container-lazy \
      --app-ram 256MiB --repetitions 2 --channels $ch --out /tmp/tlsq/$ch-$round 2>&1 | tail -1
  done
done
echo ALLDONE
