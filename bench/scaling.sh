#!/usr/bin/env bash
# Efficiency of one node vs two nodes on one PostgreSQL (issue #19). On a 2-core machine CPU is
# the ceiling, so this reports registrations per CPU-second rather than a speed-up: the same
# offered load (`dps bench --rate`) through an HAProxy TCP balancer (`mode tcp`, round robin, used
# for one node too so both runs pay the same proxy cost) in front of 1, then 2 `dps serve`
# processes (HTTPS only, two built-in registry hubs, `register_response = "immediate"`, the same
# TLS certificate and CA on every node), each time on a freshly created database `dps_scaling`.
# Two runs per node count: a fresh TLS connection per device, then `--keep-alive`.
# Builds nothing: needs target/release/dps (`cargo build --release -p dps`; DPS_BENCH_BIN=path
# for another binary), `haproxy` and the
# local PostgreSQL (127.0.0.1:5432, user postgres, trust).
#
#   nice -n 10 bash bench/scaling.sh
#   DEVICES=2000 RATE=300 bash bench/scaling.sh
#   DEVICES=12000 RATE=600 ROUNDS=4 bash bench/scaling.sh
#
# DEVICES (20000) devices per run, RATE (600) devices started per second, CONCURRENCY (64).
# CPU time (user + sys, /proc/PID/stat) is taken before and after each run: of every `dps serve`
# process, of PostgreSQL (every `postgres` process, plus what the postmaster reaped from backends
# that ended during the run; other clients of that server count too), of haproxy, and of the
# load generator (`dps bench`, reported apart). The handshake baseline of `dps bench` is skipped
# (--no-handshake-baseline): it would add handshakes to the nodes' CPU time. One line per run,
# then the efficiency of 2 nodes relative to 1 (the goal: a loss below 15 %).
#
# ROUNDS (1) repeats 1 node then 2 nodes that many times, alternating, so that a host getting
# faster or slower during the runs weighs on both alike; the loss is then given per round and
# as the mean over the rounds (on the 2-core test host one round's loss spreads over ±10 points).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${DPS_BENCH_BIN:-target/release/dps}
DEVICES=${DEVICES:-20000}
RATE=${RATE:-600}
CONCURRENCY=${CONCURRENCY:-64}
ROUNDS=${ROUNDS:-1}
db=dps_scaling
store="postgres://postgres@127.0.0.1:5432/$db"
[[ -x $bin ]] || { echo "no $bin: run cargo build --release -p dps" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "haproxy is not installed" >&2; exit 1; }
tck=$(getconf CLK_TCK)
dir=$(mktemp -d)
pids=()
lb_pid=""

stop_all() {
  local p
  for p in "${pids[@]}" $lb_pid; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}" $lb_pid; do wait "$p" 2>/dev/null || true; done
  pids=(); lb_pid=""
}
cleanup() {
  stop_all
  sql "drop database if exists $db" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(eval("v"+sys.argv[2]))' "$1" "$2"; }
# CPU ticks (user + sys) of the given pids; the fields after the command name `(...)`.
ticks() {
  local p sum=0 t
  for p in "$@"; do
    t=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)
    sum=$((sum + ${t:-0}))
  done
  echo "$sum"
}
# PostgreSQL: every live `postgres` process, plus the postmaster's reaped children (cutime +
# cstime), so a backend that ends during a run still counts.
pg_ticks() {
  local live master reaped=0
  live=$(ticks $(pgrep -x postgres || true))
  master=$(pgrep -x -o postgres || true)
  if [[ -n $master ]]; then
    reaped=$(awk '{sub(/.*\) /, ""); print $14 + $15}' "/proc/$master/stat" 2>/dev/null || echo 0)
  fi
  echo $((live + reaped))
}
sql() { PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -U postgres -d postgres -qc "$1" >/dev/null; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Start `dps serve` node $1 (1-based); node 1 generates the TLS material, the others copy it.
start_node() {
  local i=$1 d="$dir/node$1"
  mkdir -p "$d/data"
  # The run.json of the previous round (another database, other instance keys) must not be
  # taken for this start's.
  rm -f "$d/data/run.json"
  if ((i > 1)); then
    cp "$dir/node1/data/"{ca.pem,ca.key,server.pem,server.key} "$d/data/"
  fi
  cat >"$d/dps.toml" <<EOF
data_dir = "$d/data"
store = "$store"
[listen]
https = "127.0.0.1:0"
mqtt = ""
amqp = ""
admin = "127.0.0.1:0"
[log]
level = "warn"
[cluster]
node_name = "node$i"
[[instance]]
name = "default"
hostnames = ["localhost"]
register_response = "immediate"
[[instance.linked_hub]]
host = "hub-1.bench"
[[instance.linked_hub]]
host = "hub-2.bench"
EOF
  "$bin" serve --config "$d/dps.toml" >"$d/server.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do [[ -s $d/data/run.json ]] && return 0; sleep 0.1; done
  echo "node $i did not start:" >&2; cat "$d/server.log" >&2; exit 1
}

# HAProxy in TCP mode, round robin, in front of the nodes' HTTPS listeners.
start_balancer() {
  local n=$1 i https
  lb_port=$(free_port)
  {
    printf 'global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 5s\n'
    printf '    timeout client 10m\n    timeout server 10m\n'
    printf 'frontend https\n    bind 127.0.0.1:%s\n    default_backend dps_https\n' "$lb_port"
    printf 'backend dps_https\n    balance roundrobin\n'
    for i in $(seq "$n"); do
      https=$(field "$dir/node$i/data/run.json" '["https"]')
      printf '    server node%s %s\n' "$i" "$https"
    done
  } >"$dir/haproxy.cfg"
  haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
  lb_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$lb_port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "haproxy did not start:" >&2; cat "$dir/haproxy.log" >&2; exit 1
}

declare -A eff
printf '%-5s %-5s %-10s %7s %8s %8s %8s %8s %9s %8s %9s %8s %9s\n' round nodes mode offered achieved p50_ms p99_ms dps_cpu reg/dps_s pg_cpu reg/dps+pg lb_cpu bench_cpu
for round in $(seq "$ROUNDS"); do
for n in 1 2; do
  sql "drop database if exists $db"
  sql "create database $db"
  for i in $(seq "$n"); do start_node "$i"; done
  start_balancer "$n"
  run1="$dir/node1/data/run.json"
  admin=$(field "$run1" '["admin"]')
  DPS_CONNECTION_STRING=$(field "$run1" '["instances"][0]["connection_string"]')
  export DPS_CONNECTION_STRING DPS_URL="https://localhost:$lb_port" DPS_CA_FILE="$dir/node1/data/ca.pem"
  for mode in fresh keepalive; do
    extra=(--no-handshake-baseline)
    [[ $mode == keepalive ]] && extra=(--keep-alive)
    out="$dir/n$n-$mode.json"
    d0=$(ticks "${pids[@]}"); p0=$(pg_ticks); l0=$(ticks "$lb_pid")
    /usr/bin/time -f "%U %S" -o "$dir/bench.time" "$bin" bench --json --create-group \
      --admin-url "http://$admin" --poll-interval-ms 10 --global-endpoint "localhost:$lb_port" \
      --devices "$DEVICES" --rate "$RATE" --concurrency "$CONCURRENCY" "${extra[@]}" >"$out"
    d1=$(ticks "${pids[@]}"); p1=$(pg_ticks); l1=$(ticks "$lb_pid")
    line=$(python3 - "$out" "$round" "$n" "$mode" "$RATE" $((d1 - d0)) $((p1 - p0)) $((l1 - l0)) "$tck" "$dir/bench.time" <<'PY'
import json, sys
out, rnd, n, mode, rate, dps, pg, lb, tck, btime = sys.argv[1:]
r = json.load(open(out))
tck = float(tck)
dps, pg, lb = int(dps) / tck, int(pg) / tck, int(lb) / tck
bench = sum(float(x) for x in open(btime).read().split()[-2:])
ok = r["successes"]
per_dps = ok / dps if dps else 0.0
per_all = ok / (dps + pg) if dps + pg else 0.0
lat = r["latencyMs"]
print(f'{rnd:<5} {n:<5} {mode:<10} {float(rate):7.0f} {r["throughputPerSecond"]:8.1f} {lat["p50"]:8.1f} {lat["p99"]:8.1f} '
      f'{dps:8.2f} {per_dps:9.1f} {pg:8.2f} {per_all:10.1f} {lb:8.2f} {bench:9.2f}'
      + (f'  ({r["failures"]} failed: {r["failuresByReason"]})' if r["failures"] else ''))
print(f'{per_dps} {per_all}')
PY
    )
    head -1 <<<"$line"
    eff[$round-$n-$mode]=$(tail -1 <<<"$line")
  done
  # How the balancer spread the work: devices assigned by each node over both runs.
  split=""
  for i in $(seq "$n"); do
    a=$(field "$dir/node$i/data/run.json" '["admin"]')
    split+=" node$i=$(python3 - "http://$a/metrics" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("DeviceAssignments{"))))
PY
)"
  done
  echo "            (devices assigned by each node, both runs:$split)"
  stop_all
done
done

echo
for mode in fresh keepalive; do
  args=()
  for round in $(seq "$ROUNDS"); do args+=(${eff[$round-1-$mode]} ${eff[$round-2-$mode]}); done
  python3 - "$mode" "${args[@]}" <<'PY'
import sys
mode, v = sys.argv[1], list(map(float, sys.argv[2:]))
r = lambda two, one: two / one if one else float("nan")
rounds = [(r(v[i + 2], v[i]), r(v[i + 3], v[i + 1])) for i in range(0, len(v), 4)]
for k, (d, a) in enumerate(rounds, 1):
    print(f'{mode:<10} round {k}: 2 nodes vs 1: per dps CPU-second {d:.3f} (loss {100 * (1 - d):.1f} %), '
          f'per dps+PostgreSQL CPU-second {a:.3f} (loss {100 * (1 - a):.1f} %)')
if len(rounds) > 1:
    d = sum(x for x, _ in rounds) / len(rounds)
    a = sum(y for _, y in rounds) / len(rounds)
    print(f'{mode:<10} mean of {len(rounds)} rounds: loss {100 * (1 - d):.1f} % per dps CPU-second, '
          f'{100 * (1 - a):.1f} % per dps+PostgreSQL CPU-second')
PY
done
