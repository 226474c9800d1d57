# Count on from the last count in $DISKCOUNTER_FILE, appending one line a second
# ("count N boot B"), synced to the disk before the next one. Each start is a boot:
# "boot B" counts them, so a reader sees the count went on across reboots.
B=/.away/busybox
f=${DISKCOUNTER_FILE:-/data/count.log}
n=0
boot=1
if [ -s "$f" ]; then
  last=$($B tail -n 1 "$f")
  n=$(echo "$last" | $B awk '{print $2}')
  boot=$(($(echo "$last" | $B awk '{print $4}') + 1))
fi
echo "diskcounter: boot $boot, counting on from $n in $f"
while true; do
  n=$((n + 1))
  echo "count $n boot $boot" >>"$f" && $B sync
  echo "diskcounter: count $n boot $boot"
  $B sleep "${DISKCOUNTER_INTERVAL:-1}"
done
