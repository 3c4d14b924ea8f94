#!/usr/bin/env bash
# A/B of two dps binaries on the same machine, runs alternating (A, B, A, B ...), so that a
# machine that gets slower or faster during the session affects both alike. For each engine and
# mode: throughput, p99, and CPU seconds of the server and of PostgreSQL per 1,000 registrations.
#
#   bash bench/ab.sh OLD_BINARY NEW_BINARY [rounds] [devices]
#   ENGINES="sqlite postgres" MODES="keepalive fresh" bash bench/ab.sh /tmp/dps-old target/release/dps 2 20000
#
# Fresh-TLS runs use a quarter of the devices. Uses bench/server.sh (one server per run). Each
# engine and mode starts with a run that is not reported (WARMUP=0 skips it): on the test host
# the first run after a pause was up to a third slower on PostgreSQL (its CPU per registration
# up to 60 % higher; its profile showed page faults and ext4 block reads, the cause not
# established), which biased every A/B against its first binary.
#
# SPLIT=1 gives the database a core of its own, as in a deployment where PostgreSQL runs on
# another machine: dps and the load generator run on CPU 0 (both engines), every PostgreSQL
# process on CPU 1 (SQLite's runs leave CPU 1 idle). The local PostgreSQL's affinity is put
# back to every CPU when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 rounds=${3:-2} devices=${4:-20000}
pin=()
if [[ ${SPLIT:-0} == 1 ]]; then
  all=$(taskset -pc $$ | awk '{print $NF}')
  postgres_on() { for p in $(pgrep -x postgres || true); do taskset -a -p -c "$1" "$p" >/dev/null || true; done; }
  postgres_on 1
  trap 'postgres_on "$all"' EXIT
  pin=(taskset -c 0)
fi
pg_ticks() {
  # CPU ticks of every PostgreSQL process, including ended backends (the postmaster's children).
  local total=0
  for p in $(pgrep -x postgres || true); do
    total=$((total + $(awk '{print $14+$15+$16+$17}' /proc/$p/stat 2>/dev/null || echo 0)))
  done
  echo $total
}
one() {
  local bin=$1 engine=$2 mode=$3 n=$devices extra=(--keep-alive)
  if [[ $mode == fresh ]]; then n=$((devices / 4)); extra=(--no-handshake-baseline); fi
  (
    DPS_BENCH_BIN=$bin
    source bench/server.sh
    start_server "$engine"
    [[ ${#pin[@]} -gt 0 ]] && taskset -a -p -c 0 "$pid" >/dev/null
    local pg0; pg0=$(pg_ticks)
    "${pin[@]}" "$bin" bench "${common[@]}" --global-endpoint "$H" --devices "$n" --concurrency 64 "${extra[@]}" >"$dir/last.json"
    local pg1; pg1=$(pg_ticks)
    local srv; srv=$(awk '{print $14+$15}' /proc/$pid/stat)
    python3 - "$dir/last.json" "$bin" "$engine" "$mode" "$srv" "$((pg1 - pg0))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
n = r["successes"]
srv, pg = int(sys.argv[5]) / 100, int(sys.argv[6]) / 100
if sys.argv[3] != "postgres":
    pg = 0.0
print(f'{sys.argv[2]:<28} {sys.argv[3]:<9} {sys.argv[4]:<10} {r["throughputPerSecond"]:>9.1f}/s  p99 {r["latencyMs"]["p99"]:>7.1f} ms  '
      f'server {1000 * srv / n:6.3f} CPU-s/1k  postgres {1000 * pg / n:6.3f} CPU-s/1k  failures {r["failures"]}')
PY
  )
}
for engine in ${ENGINES:-sqlite postgres}; do
  for mode in ${MODES:-keepalive fresh}; do
    [[ ${WARMUP:-1} == 1 ]] && one "$a" "$engine" "$mode" >/dev/null
    for _ in $(seq "$rounds"); do
      one "$a" "$engine" "$mode"
      one "$b" "$engine" "$mode"
    done
  done
done
