#!/usr/bin/env bash
# Provisions a fleet onto a self-hosted broker hub and then replays it as a reboot storm:
# the numbers of docs/benchmarks.md, "Fleets onto self-hosted brokers". Needs
# `cargo build --release`, mosquitto 2.x with the dynamic-security plugin, and an idle machine.
#
#   bash bench/broker_fleet.sh [mosquitto|broker-auth] [devices] [concurrency]
#
# mosquitto:   a private Mosquitto (dynamic security, persistence off) on a free port is the only
#              linked hub; every first registration writes the device's client to the broker.
# broker-auth: the only linked hub is of kind broker-auth (the broker asks dps; nothing is
#              written to a broker while provisioning).
#
# Two runs of the same devices (one symmetric-key group, fresh TLS per device, HTTPS):
#   1. first registrations, `--concurrency` at a time;
#   2. a reboot storm of the same devices (all at once, honouring Retry-After).
# For each: devices/s from `dps bench`, the dynamic-security control messages the broker received
# (counted in the broker's own log: its "Received PUBLISH ... '$CONTROL/dynamic-security/v1'" lines,
# so independent of dps's own metrics), dps's hub write counters, and the CPU seconds of dps and of the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-mosquitto}
devices=${2:-10000}
concurrency=${3:-64}
bin=target/release/dps
[[ -x $bin ]] || { echo "build first: cargo build --release" >&2; exit 1; }
dir=$(mktemp -d)
pids=()
failed=0
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat"; }

admin_pw=bench-admin-pw
hub_toml=""
if [[ $kind == mosquitto ]]; then
  plugin=""
  for p in /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
    /usr/local/lib/mosquitto_dynamic_security.so; do [[ -e $p ]] && { plugin=$p; break; }; done
  [[ -n $plugin ]] || { echo "mosquitto's dynamic-security plugin is not installed" >&2; exit 1; }
  bport=$(free_port)
  mosquitto_ctrl dynsec init "$dir/dynsec.json" admin "$admin_pw" >/dev/null
  cat >"$dir/mosquitto.conf" <<EOF
per_listener_settings false
user root
persistence false
allow_anonymous false
listener $bport 127.0.0.1
plugin $plugin
plugin_opt_config_file $dir/dynsec.json
log_dest file $dir/mosquitto.log
log_type all
EOF
  mosquitto -c "$dir/mosquitto.conf" >/dev/null 2>&1 &
  bpid=$!; pids+=("$bpid")
  for _ in $(seq 100); do mosquitto_pub -p "$bport" -u admin -P "$admin_pw" -t ping -m x 2>/dev/null && break; sleep 0.1; done
  # timeout_ms: a call's commands wait behind the batches before them, and on 2.0.x every command
  # costs the broker a save of the whole file (~0.1 s at 5,000 devices): with 64 registrations
  # in flight the default 5 s is exceeded from a few thousand devices on (retryable 503s).
  hub_toml="kind = \"mosquitto\"
connection_string = \"mqtt://admin:$admin_pw@127.0.0.1:$bport\"
options = { timeout_ms = ${MOSQUITTO_TIMEOUT_MS:-30000} }"
elif [[ $kind == broker-auth ]]; then
  hub_toml="kind = \"broker-auth\"
options = { auth_secret = \"bench-broker-secret-0123456789\" }"
else
  echo "unknown kind '$kind' (mosquitto | broker-auth)" >&2; exit 2
fi

cat >"$dir/dps.toml" <<EOF
data_dir = "$dir/data"
[listen]
https = "127.0.0.1:0"
mqtt = "127.0.0.1:0"
amqp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[log]
level = "warn"
[outbound]
allow_private_addresses = true
[limits]
max_inflight_registrations = 2000
[[instance]]
name = "default"
hostnames = ["localhost"]
register_response = "immediate"
[[instance.linked_hub]]
host = "broker.bench"
$hub_toml
EOF
"$bin" serve --config "$dir/dps.toml" >"$dir/server.log" 2>&1 &
dpid=$!; pids+=("$dpid")
for _ in $(seq 200); do [[ -s $dir/data/run.json ]] && break; sleep 0.1; done
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(eval("v"+sys.argv[2]))' "$dir/data/run.json" "$1"; }
https=$(field '["https"]'); admin=$(field '["admin"]')
DPS_CONNECTION_STRING=$(field '["instances"][0]["connection_string"]')
export DPS_CONNECTION_STRING DPS_URL="https://localhost:${https##*:}" DPS_CA_FILE="$dir/data/ca.pem"
gk=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
"$bin" enrollment-group create fleet --attestation symmetricKey --primary-key "$gk" >/dev/null

control_messages() { # dynamic-security control messages the broker has received
  if [[ -f $dir/mosquitto.log ]]; then
    grep -c "Received PUBLISH .*'\$CONTROL/dynamic-security/v1'" "$dir/mosquitto.log" || true
  else echo 0; fi
}
metric() { # sum of a metric's samples on dps's admin listener
  curl -s "http://$admin/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s+=$2} END {printf "%d", s}'
}
run() {
  local label=$1; shift
  local c0 w0 s0 dc0 bc0 t0
  c0=$(control_messages)
  w0=$(metric dps_hub_writes_total); s0=$(metric dps_hub_writes_skipped_total)
  dc0=$(cpu "$dpid"); bc0=$( [[ -n ${bpid:-} ]] && cpu "$bpid" || echo 0)
  "$bin" bench --json --group-key "$gk" --prefix fleet- --devices "$devices" \
    --global-endpoint "localhost:${https##*:}" --admin-url "http://$admin" --poll-interval-ms 10 \
    --no-handshake-baseline --timeout 1200 "$@" >"$dir/last.json" || { echo "dps bench failed:"; cat "$dir/last.json"; tail -5 "$dir/server.log"; failed=1; }
  # The broker may still be logging the last messages: wait until the count is stable.
  local c1 prev=-1
  for _ in $(seq 50); do c1=$(control_messages); [[ $c1 == "$prev" ]] && break; prev=$c1; sleep 0.2; done
  python3 - "$dir/last.json" "$label" "$kind" "$devices" "$((c1 - c0))" \
    "$(( $(metric dps_hub_writes_total) - w0 ))" "$(( $(metric dps_hub_writes_skipped_total) - s0 ))" \
    "$(python3 -c "print(round($(cpu "$dpid") - $dc0, 2))")" \
    "$( [[ -n ${bpid:-} ]] && python3 -c "print(round($(cpu "$bpid") - $bc0, 2))" || echo 0)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
label, kind, n, control, writes, skipped, dps_cpu, broker_cpu = sys.argv[2:]
print(json.dumps({
    "run": label, "hub": kind, "devices": int(n),
    "successes": r.get("successes"), "failures": r.get("failures"), "failuresByReason": r.get("failuresByReason"),
    "seconds": r.get("wallSeconds"), "devicesPerSecond": r.get("throughputPerSecond"),
    "latencyMs": r.get("latencyMs"),
    "brokerControlMessages": int(control), "hubWrites": int(writes), "hubWritesSkipped": int(skipped),
    "dpsCpuSeconds": float(dps_cpu), "brokerCpuSeconds": float(broker_cpu),
}))
PY
}
run first --concurrency "$concurrency"
run storm --concurrency "$(( devices < 2000 ? devices : 2000 ))" --storm
if [[ $kind == mosquitto ]]; then
  echo "{\"dynsecJsonBytes\": $(stat -c %s "$dir/dynsec.json")}"
fi
exit "$failed"
