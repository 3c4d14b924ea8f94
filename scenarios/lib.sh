# Shared helpers of the case-study scenarios (sourced, not run). Each scenario starts what it
# needs in a temporary folder: private Mosquitto brokers with the dynamic-security plugin as
# linked hubs, one dps server on free ports, and a throw-away PKI (interop/pki.sh). Everything
# is stopped and removed on exit. Needs mosquitto 2.x (dynamic security), openssl, python3, curl,
# and the dps binary (DPS_BIN, default target/release/dps).
set -euo pipefail

SCEN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DPS_BIN=${DPS_BIN:-$SCEN_ROOT/target/release/dps}
[[ -x $DPS_BIN ]] || { echo "no dps binary at $DPS_BIN: cargo build --release (or set DPS_BIN)" >&2; exit 1; }
PKI="$SCEN_ROOT/interop/pki.sh"
WORK=$(mktemp -d)
SCEN_PIDS=()
KEEP=${KEEP:-}
scen_cleanup() {
  local p
  for p in "${SCEN_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n $KEEP ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap scen_cleanup EXIT

FAILURES=0
T_START=$SECONDS
say() { printf '%s\n' "$*"; }
section() { printf '\n== %s\n' "$*"; }
expect() { # expect "WHAT" CONDITION-COMMAND...
  local what=$1; shift
  if "$@"; then printf '  [PASS] %s\n' "$what"; else printf '  [FAIL] %s\n' "$what"; FAILURES=$((FAILURES + 1)); fi
}
expect_not() { # expect_not "WHAT" COMMAND...: passes when the command fails
  local what=$1; shift
  if "$@"; then printf '  [FAIL] %s\n' "$what"; FAILURES=$((FAILURES + 1)); else printf '  [PASS] %s\n' "$what"; fi
}
finish() {
  section "result"
  say "  took $((SECONDS - T_START)) s"
  if ((FAILURES == 0)); then say "  all checks passed"; exit 0; fi
  say "  $FAILURES check(s) failed (logs: rerun with KEEP=1)"; exit 1
}
wait_for() { # wait_for SECONDS CMD...: polls CMD until it succeeds or the deadline passes
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.1; done
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
jq_() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(eval("v"+sys.argv[1]))' "$1"; }

# start_broker NAME: a private Mosquitto with dynamic security on a free port. Sets
# BROKER_PORT_<NAME> and writes $WORK/NAME.hub.toml (the linked_hub lines for dps).
BROKER_ADMIN_PW=scenario-admin-pw
start_broker() {
  local name=$1 plugin="" p port
  for p in /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so \
    /usr/local/lib/mosquitto_dynamic_security.so; do [[ -e $p ]] && { plugin=$p; break; }; done
  [[ -n $plugin ]] || { echo "mosquitto's dynamic-security plugin is not installed" >&2; exit 1; }
  port=$(free_port)
  mkdir -p "$WORK/$name"
  mosquitto_ctrl dynsec init "$WORK/$name/dynsec.json" admin "$BROKER_ADMIN_PW" >/dev/null
  cat >"$WORK/$name/mosquitto.conf" <<CONF
per_listener_settings false
user root
persistence false
allow_anonymous false
listener $port 127.0.0.1
plugin $plugin
plugin_opt_config_file $WORK/$name/dynsec.json
log_dest file $WORK/$name/mosquitto.log
CONF
  mosquitto -c "$WORK/$name/mosquitto.conf" >/dev/null 2>&1 &
  SCEN_PIDS+=($!)
  wait_for 15 mosquitto_pub -p "$port" -u admin -P "$BROKER_ADMIN_PW" -t ping -m x ||
    { echo "broker $name did not start" >&2; exit 1; }
  printf -v "BROKER_PORT_${name//-/_}" '%s' "$port"
}
broker_port() { local v="BROKER_PORT_${1//-/_}"; echo "${!v}"; }
# broker_clients NAME PREFIX: how many dynamic-security clients with that prefix the broker has
# (asked of the broker itself, not of dps).
broker_clients() {
  mosquitto_ctrl -p "$(broker_port "$1")" -u admin -P "$BROKER_ADMIN_PW" dynsec listClients 2>/dev/null |
    grep -c "^$2" || true
}
# broker_twin NAME DEVICE: the whole twin dps keeps retained on the broker (admins only).
broker_twin() {
  mosquitto_sub -p "$(broker_port "$1")" -u admin -P "$BROKER_ADMIN_PW" -t "dps/twins/$2" -C 1 -W 5 2>/dev/null
}
# hub_toml NAME HOST [extra lines]: a [[instance.linked_hub]] block for broker NAME.
hub_toml() {
  printf '[[instance.linked_hub]]\nhost = "%s"\nkind = "mosquitto"\nconnection_string = "mqtt://admin:%s@127.0.0.1:%s"\n%s\n' \
    "$2" "$BROKER_ADMIN_PW" "$(broker_port "$1")" "${3:-}"
}

# start_dps HUB_BLOCKS [INSTANCE_LINES]: one dps server on free ports with the given linked hubs.
# Exports DPS_CONNECTION_STRING, DPS_URL, DPS_CA_FILE for the CLI; sets ID_SCOPE, ENDPOINT, ADMIN.
start_dps() {
  cat >"$WORK/dps.toml" <<CONF
data_dir = "$WORK/dps-data"
[listen]
https = "127.0.0.1:0"
mqtt = "127.0.0.1:0"
amqp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[log]
level = "warn"
[outbound]
allow_private_addresses = true
[[instance]]
name = "default"
hostnames = ["localhost"]
${2:-}
$1
CONF
  "$DPS_BIN" serve --config "$WORK/dps.toml" >"$WORK/dps.log" 2>&1 &
  SCEN_PIDS+=($!)
  wait_for 60 test -s "$WORK/dps-data/run.json" || { cat "$WORK/dps.log"; echo "dps did not start" >&2; exit 1; }
  local run="$WORK/dps-data/run.json" https
  https=$(jq_ '["https"]' <"$run")
  ENDPOINT="localhost:${https##*:}"
  MQTT_ENDPOINT="localhost:$(jq_ '["mqtt"]' <"$run" | sed 's/.*://')"
  ADMIN=$(jq_ '["admin"]' <"$run")
  ID_SCOPE=$(jq_ '["instances"][0]["id_scope"]' <"$run")
  DPS_CONNECTION_STRING=$(jq_ '["instances"][0]["connection_string"]' <"$run")
  DPS_URL="https://$ENDPOINT"
  DPS_CA_FILE="$WORK/dps-data/ca.pem"
  export DPS_CONNECTION_STRING DPS_URL DPS_CA_FILE
}
dps() { "$DPS_BIN" "$@"; }
# register REG_ID [device register flags...]: registers as a device; the JSON answer on stdout.
register() {
  local id=$1; shift
  "$DPS_BIN" --output json device register --id-scope "$ID_SCOPE" --registration-id "$id" \
    --global-endpoint "$ENDPOINT" --ca-file "$DPS_CA_FILE" "$@" 2>/dev/null || true
}
