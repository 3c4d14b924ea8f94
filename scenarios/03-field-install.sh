#!/usr/bin/env bash
# Case study 03 (RailSense Analytics): track sensors installed where technicians cannot type hub
# connection strings. Each sensor boots with its attestation material (a key derived from its
# enrollment group's key), provisions itself, and the installer's check, before leaving the site,
# reads the registration result and the twin metadata: site complete, or the precise reason why
# not. One sensor is mis-flashed (a key of another batch) and must be caught on site.
#
#   bash scenarios/03-field-install.sh
source "$(dirname "$0")/lib.sh"

section "setup: two regional hubs (Mosquitto), dps, the sensor batch's enrollment group"
start_broker west
start_broker east
start_dps "$(hub_toml west hub-west.rail)
$(hub_toml east hub-east.rail)"
GK=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
WRONG=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
dps --output json enrollment-group create track-sensors-b7 --attestation symmetricKey --primary-key "$GK" \
  --initial-twin-tags '{"asset":"track-sensor","batch":"b7"}' \
  --initial-twin-properties '{"sampleRateHz":200,"uplink":"lte"}' >/dev/null
say "  group track-sensors-b7 (symmetric key), hubs hub-west.rail and hub-east.rail (hashed)"

# installer_check ID: what the installation app does before the technician leaves.
installer_check() {
  local id=$1 rec hub twin port
  if ! rec=$(dps --output json registration show "$id" 2>"$WORK/err"); then
    say "  [$id] NOT COMPLETE: no registration record ($(head -c 200 "$WORK/err"))"
    dps --output json audit list --limit 200 >"$WORK/audit.json"
    python3 - "$WORK/audit.json" "$id" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["targetId"] == sys.argv[2]]
for r in rows[-1:]:
    print(f"  [{sys.argv[2]}]   dps says: {r['action']}: {(r.get('after') or {}).get('reason', '-')}")
PY
    return 1
  fi
  hub=$(jq_ '["assignedHub"]' <<<"$rec")
  [[ $(jq_ '["status"]' <<<"$rec") == assigned ]] || { say "  [$id] NOT COMPLETE: status $(jq_ '["status"]' <<<"$rec")"; return 1; }
  case $hub in hub-west.rail) port=west ;; hub-east.rail) port=east ;; *) say "  [$id] unknown hub $hub"; return 1 ;; esac
  twin=$(broker_twin "$port" "$id")
  python3 -c 'import json,sys; t=json.loads(sys.argv[1]); assert t["properties"]["desired"]["sampleRateHz"]==200 and t["tags"]["batch"]=="b7"' "$twin" ||
    { say "  [$id] NOT COMPLETE: twin on $hub is $twin"; return 1; }
  say "  [$id] SITE COMPLETE: assigned to $hub as $(jq_ '["deviceId"]' <<<"$rec"), twin on the hub: batch b7, 200 Hz"
}

section "site km 112.4: sensor ts-1124 is installed and powered on"
out=$(register ts-1124 --group-key "$GK" --payload '{"site":"km-112.4","installer":"tech-7"}')
say "  device: $(jq_ '["status"]' <<<"$out") on $(jq_ '["registrationState"]["assignedHub"]' <<<"$out") in $(jq_ '["elapsedMs"]' <<<"$out") ms"
expect "ts-1124 provisioned without any hub configuration on site" test "$(jq_ '["status"]' <<<"$out")" = assigned
expect "installer check passes for ts-1124" installer_check ts-1124

section "site km 118.0: sensor ts-1180 was flashed with another batch's key"
out=$(register ts-1180 --group-key "$WRONG" --payload '{"site":"km-118.0","installer":"tech-7"}')
say "  device: $(jq_ '.get("status")' <<<"$out") $(jq_ '.get("errorCode")' <<<"$out")"
expect_not "installer check catches ts-1180 before the technician leaves" installer_check ts-1180

section "the technician re-flashes ts-1180 with the right batch key"
out=$(register ts-1180 --group-key "$GK" --payload '{"site":"km-118.0","installer":"tech-7"}')
expect "installer check passes for ts-1180 after the fix" installer_check ts-1180
finish
