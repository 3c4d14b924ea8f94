#!/usr/bin/env bash
# Reproduces the broker-auth numbers in docs/benchmarks.md ("Brokers that ask dps"). Needs
# `cargo build --release` and, for comparable numbers, an idle machine.
#
#   bash bench/broker_auth.sh [devices] [seconds]
#
# Starts `dps serve` as its own process with one `broker-auth` hub, registers `devices` devices
# of one symmetric-key group onto it (`dps bench`, kept-alive HTTPS), then runs
# `dps bench-broker-auth` against the hub's RabbitMQ and EMQX endpoints for `seconds` each:
# closed loop over 8 and 64 keep-alive connections, then an offered 10,000 checks/s over 64 and
# 256 connections. One JSON report per run.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-10000}
secs=${2:-10}
bin=${BIN:-target/release/dps}
dir=$(mktemp -d)
secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
gk=$(head -c 32 /dev/urandom | base64)
cat >"$dir/dps.toml" <<TOML
data_dir = "$dir/data"
[listen]
https = "127.0.0.1:0"
mqtt = ""
amqp = ""
admin = "127.0.0.1:0"
[log]
level = "warn"
[[instance]]
name = "default"
hostnames = ["localhost"]
register_response = "immediate"
[[instance.linked_hub]]
host = "mqtt.bench"
kind = "broker-auth"
options = { auth_secret = "$secret" }
TOML
"$bin" serve --config "$dir/dps.toml" >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 200); do [[ -s $dir/data/run.json ]] && break; sleep 0.1; done
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(eval("v"+sys.argv[2]))' "$dir/data/run.json" "$1"; }
https=$(field '["https"]')
DPS_CONNECTION_STRING=$(field '["instances"][0]["connection_string"]')
export DPS_CONNECTION_STRING DPS_URL="https://localhost:${https##*:}" DPS_CA_FILE="$dir/data/ca.pem"
"$bin" enrollment-group create ba-bench --attestation symmetricKey --primary-key "$gk" --secondary-key "$gk" >/dev/null
"$bin" bench --devices "$devices" --concurrency 64 --keep-alive --group-key "$gk" --prefix ba- \
  --no-handshake-baseline --global-endpoint "localhost:${https##*:}" --json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print("registered", r["successes"], "of", r["total"], "devices onto", r["assignedByHub"])'
run() {
  echo "== $*"
  "$bin" --output json bench-broker-auth --hub mqtt.bench --secret "$secret" --group-key "$gk" \
    --prefix ba- --devices "$devices" --duration "$secs" "$@" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))'
}
run --connections 8
run --connections 64
run --connections 64 --rate 10000
run --connections 256 --rate 10000
run --connections 64 --rate 10000 --check connect
run --connections 64 --rate 10000 --flavour emqx
echo "server peak memory: $(grep VmHWM /proc/$pid/status)"
