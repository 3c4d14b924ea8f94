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
source bench/server.sh
start_server "$engine"
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
