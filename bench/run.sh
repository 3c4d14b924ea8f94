#!/usr/bin/env bash
# Reproduces the numbers in docs/benchmarks.md. Needs `cargo build --release`, an idle machine,
# and (for the PostgreSQL rows) PostgreSQL on 127.0.0.1:5432 with trust auth.
#
#   bash bench/run.sh [sqlite|postgres] [devices] [storm_devices]
#
# Starts `dps serve` as its own process (so the load generator and the server are separate
# processes sharing the machine), then runs `dps bench` in each mode and prints one JSON report
# per run, plus the server's peak memory (VmHWM) after the storm.
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
max_inflight_registrations = 2000
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
run() {
  echo "== $engine: $*"
  "$bin" bench "${common[@]}" "$@" >"$dir/last.json"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: r[k] for k in r if k not in ("serverMetrics", "group", "setupSeconds")}))' "$dir/last.json"
}
run --devices "$devices" --concurrency 64 --global-endpoint "$H"
# Half of the saturation just measured, for the latency percentiles at half load (below).
half=${HALF_RATE:-$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["throughputPerSecond"] / 2))' "$dir/last.json")}
# Kept-alive: 64 connections (each waits for its group commit: latency-bound) and 256 (CPU-bound).
run --devices "$((devices * 4))" --concurrency 64 --global-endpoint "$H" --keep-alive
run --devices "$((devices * 8))" --concurrency 256 --global-endpoint "$H" --keep-alive
run --devices "$devices" --concurrency 64 --global-endpoint "$M" --transport mqtt
run --devices "$((devices / 2))" --concurrency 64 --global-endpoint "$H" --attestation x509
run --devices "$((devices / 2))" --concurrency 64 --global-endpoint "$M" --transport mqtt --attestation x509
# Half of saturation: the same as the first run at a fixed rate (half of the first run's rate,
# or HALF_RATE), for the latency percentiles.
run --devices "$devices" --concurrency 64 --global-endpoint "$H" --rate "$half"
run --devices "$storm" --concurrency 2000 --global-endpoint "$H" --storm --timeout 600
echo "server peak memory: $(grep VmHWM /proc/$pid/status)"
