#!/usr/bin/env bash
# One `dps bench` run against a fresh `dps serve` (same server settings as bench/run.sh), with the
# CPU time of both processes and their peak memory. Needs `cargo build --release`.
#
#   bash bench/one.sh [sqlite|postgres] - - <dps bench arguments...>
#   bash bench/one.sh sqlite - - --devices 1000000 --concurrency 2000 --storm --timeout 900
#
# The endpoint (--global-endpoint) is added: the HTTPS one, or the MQTT one when the arguments
# say `--transport mqtt`.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:-sqlite}
devices=${2:-5000}
storm=${3:-100000}
bin=target/release/dps
dir=$(mktemp -d)
store=""
if [[ $engine == postgres ]]; then
  psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists dps_bench" >/dev/null
  psql -h 127.0.0.1 -U postgres -d postgres -qc "create database dps_bench" >/dev/null
  store="postgres://postgres@127.0.0.1:5432/dps_bench"
fi
cat >"$dir/dps.toml" <<EOF
data_dir = "$dir/data"
store = "$store"
[listen]
https = "127.0.0.1:0"
mqtt = "127.0.0.1:0"
admin = "127.0.0.1:0"
[log]
level = "warn"
[limits]
max_inflight_registrations = ${INFLIGHT:-2000}
${EXTRA_LIMITS:-}
[[instance]]
name = "default"
hostnames = ["localhost"]
register_response = "immediate"
[[instance.linked_hub]]
host = "hub-1.bench"
[[instance.linked_hub]]
host = "hub-2.bench"
EOF
"$bin" serve --config "$dir/dps.toml" >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 200); do [[ -s $dir/data/run.json ]] && break; sleep 0.1; done
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(eval("v"+sys.argv[2]))' "$dir/data/run.json" "$1"; }
https=$(field '["https"]'); mqtt=$(field '["mqtt"]'); admin=$(field '["admin"]')
export DPS_CONNECTION_STRING=$(field '["instances"][0]["connection_string"]')
export DPS_URL="https://localhost:${https##*:}" DPS_CA_FILE="$dir/data/ca.pem"
H="localhost:${https##*:}"; M="localhost:${mqtt##*:}"
common=(--json --create-group --admin-url "http://$admin" --poll-interval-ms 10)
shift 3 || true
ep=$H; [[ " $* " == *" mqtt "* ]] && ep=$M
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
