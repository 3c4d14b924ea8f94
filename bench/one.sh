#!/usr/bin/env bash
# One `dps bench` run against a fresh `dps serve` (same server settings as bench/run.sh), with the
# CPU time of both processes and their peak memory. Needs `cargo build --release`.
#
#   bash bench/one.sh [sqlite|postgres] <dps bench arguments...>
#   bash bench/one.sh sqlite --devices 1000000 --concurrency 2000 --storm --timeout 900
#
# INFLIGHT=N sets max_inflight_registrations (default 2000); EXTRA_LIMITS="key = value" adds a
# line to [limits], e.g. EXTRA_LIMITS="max_pending_handshakes = 4096".
#
# The endpoint (--global-endpoint) is added: the HTTPS one, or the MQTT (AMQP) one when the
# arguments say `--transport mqtt` (`--transport amqp`).
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-sqlite}
shift || true
source bench/server.sh
start_server "$engine"
ep=$H; [[ " $* " == *" mqtt "* ]] && ep=$M; [[ " $* " == *" amqp "* ]] && ep=$A
/usr/bin/time -f "client: %U user %S sys %e wall %M KB" "$bin" bench "${common[@]}" --global-endpoint "$ep" "$@" >"$dir/last.json"
python3 - "$dir/last.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r.pop("serverMetrics", {})
r.pop("assignedByHub", None)
print(json.dumps(r))
print(json.dumps({k: v for k, v in m.items() if "handshakes" in k or "4xx" in k or "5xx" in k or "assigning" in k}))
PY
awk '{printf "server: %.2f user %.2f sys (CPU seconds)\n", $14/100, $15/100}' /proc/$pid/stat
echo "server peak memory: $(grep VmHWM /proc/$pid/status)"
