#!/usr/bin/env bash
# Fuzz the broker's HTTP API with schemathesis against the OpenAPI document it serves:
# starts `away broker` on 127.0.0.1 (fresh database, random tokens passed in the
# environment), registers one node that keeps heartbeating (so that workloads can be
# placed), runs a bounded number of examples per operation, stops everything by PID.
# Any failed check fails the script.
#   AWAY_BIN                   the away binary (default: $CARGO_TARGET_DIR or target, /debug/away)
#   SCHEMATHESIS_MAX_EXAMPLES  examples per operation (default 100)
#   SCHEMATHESIS               the schemathesis command (default: deploy/install.sh's venv)
#   SCHEMATHESIS_SEED          a seed, to replay a run
set -euo pipefail
cd "$(dirname "$0")/.."

away=${AWAY_BIN:-${CARGO_TARGET_DIR:-target}/debug/away}
max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-100}
schemathesis=${SCHEMATHESIS:-/opt/away-schemathesis/bin/schemathesis}
[ -x "$schemathesis" ] || { echo "schemathesis is not installed at $schemathesis (deploy/install.sh installs it)" >&2; exit 1; }
[ -x "$away" ] || { echo "no away binary at $away: build it (cargo build -p away) or set AWAY_BIN" >&2; exit 1; }

work=$(mktemp -d)
broker_pid=
beat_pid=
agent_pid=
cleanup() {
    local status=$?
    for pid in $beat_pid $agent_pid $broker_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

token() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
export AWAY_USER_TOKEN AWAY_JOIN_TOKEN
AWAY_USER_TOKEN=$(token)
AWAY_JOIN_TOKEN=$(token)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"

# --insecure-loopback: the script plays the node with a hand-made registration and
# heartbeats (no CSR, no certificate), so this broker serves plain HTTP on loopback;
# the TLS side of the API is tested in tests/tests/identity.rs and cluster.rs
AWAY_BROKER_DB="$work/broker.db" "$away" broker --insecure-loopback --listen "127.0.0.1:$port" >"$work/broker.log" 2>&1 &
broker_pid=$!
for _ in $(seq 100); do
    curl -fsS -o /dev/null "$base/v1/openapi.json" 2>/dev/null && break
    kill -0 "$broker_pid" 2>/dev/null || { cat "$work/broker.log" >&2; exit 1; }
    sleep 0.1
done

agent_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# one node, online for the whole run: its agent token is read from the registration answer
node='{"name": "fuzz-node", "tier": "edge", "arch": "amd64", "memory_bytes": 68719476736, "kernel": "6.1.0",
  "cpu": {"vendor": "amd", "model": "fuzz", "cores": 64, "flags": ["sse4_2", "avx2"]},
  "runtimes": [{"kind": "containerd", "version": "2.0", "healthy": true, "checkpoint": true},
               {"kind": "qemu", "version": "10.0", "healthy": true, "checkpoint": true}],
  "hypervisor": {"qemu_version": "10.0.2", "accel": "tcg", "reason": "fuzz"},
  "link": {"rate_mbit": 1000, "latency_ms": 1}}'
curl -fsS -H "Authorization: Bearer $AWAY_JOIN_TOKEN" -H 'Content-Type: application/json' \
    -d "{\"node\": $node, \"api_addr\": \"127.0.0.1:$agent_port\", \"transfer_addr\": \"127.0.0.1:9\"}" \
    "$base/v1/agents/register" >"$work/registered.json"
# its agent's API answers every GET with a log line (the broker proxies workload logs to
# it) and, like a real agent, only when the cluster token comes with it (from the
# registration answer, passed in the environment)
export AWAY_FUZZ_CLUSTER_TOKEN
AWAY_FUZZ_CLUSTER_TOKEN=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["cluster_token"])' "$work/registered.json")
python3 -c '
import http.server, os, sys
want = "Bearer " + os.environ["AWAY_FUZZ_CLUSTER_TOKEN"]
class Agent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("Authorization") == want
        body = b"fuzz: a log line\n" if ok else b"missing or wrong cluster token\n"
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Agent).serve_forever()
' "$agent_port" &
agent_pid=$!

agent_token=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["agent_token"])' "$work/registered.json")
printf '{"node": %s, "load": {"cpu_percent": 1, "memory_used_bytes": 0, "workloads": 0}, "workloads": [], "events": []}' \
    "$node" >"$work/heartbeat.json"
printf 'header = "Authorization: Bearer %s"\n' "$agent_token" >"$work/agent.curl"
register() {
    curl -fsS -H "Authorization: Bearer $AWAY_JOIN_TOKEN" -H 'Content-Type: application/json' \
        -d "{\"node\": $node, \"api_addr\": \"127.0.0.1:$agent_port\", \"transfer_addr\": \"127.0.0.1:9\"}" \
        "$base/v1/agents/register" >"$work/registered.json"
    printf 'header = "Authorization: Bearer %s"\n' \
        "$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["agent_token"])' "$work/registered.json")" \
        >"$work/agent.curl"
}
(
    while sleep 1; do
        code=$(curl -sS -o /dev/null -w '%{http_code}' -K "$work/agent.curl" -H 'Content-Type: application/json' \
            --data-binary @"$work/heartbeat.json" "$base/v1/agents/fuzz-node/heartbeat") || true
        # the fuzzing may revoke the node (POST /v1/nodes/fuzz-node/revoke): like an agent of
        # a broker without a CA, it joins again with the join token
        [ "$code" = 401 ] && { register || true; }
    done
) &
beat_pid=$!

# /v1/events is an endless stream: schemathesis would wait on it until its timeout
args=(--config-file tests/schemathesis.toml run "$base/v1/openapi.json" --max-examples "$max_examples"
    --exclude-path /v1/events --request-timeout 10 --no-color)
[ -n "${SCHEMATHESIS_SEED:-}" ] && args+=(--seed "$SCHEMATHESIS_SEED")
status=0
SCHEMATHESIS_HOOKS=tests/schemathesis_hooks.py "$schemathesis" "${args[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    echo "==> broker log (last 50 lines)" >&2
    tail -n 50 "$work/broker.log" >&2
fi
exit "$status"
