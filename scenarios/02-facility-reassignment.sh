#!/usr/bin/env bash
# Case study 02 (MedLift Mobility): loaned medical devices move between facilities. Devices
# attest with certificates (individual X.509 enrollments), each facility is a linked hub, and
# the facility comes from the enrollment (which hub) and its initial twin (facility metadata).
# A logistics operator, with an access policy of its own that may write enrollments and nothing
# else, reassigns a device to another facility; the device re-provisions without new firmware;
# a retired device is disabled; an unenrolled device that tries to join is refused. The audit
# log shows who moved what and when, and the refused join.
#
#   bash scenarios/02-facility-reassignment.sh
source "$(dirname "$0")/lib.sh"

section "setup: facility hubs A and B (Mosquitto), dps, device certificates"
start_broker facility-a
start_broker facility-b
start_dps "$(hub_toml facility-a hub.facility-a)
$(hub_toml facility-b hub.facility-b)"
bash "$PKI" ca "$WORK/pki" medlift-ca "MedLift Device CA" ec >/dev/null
bash "$PKI" ca "$WORK/pki" rogue-ca "Unknown CA" ec >/dev/null
for d in pump-1 pump-2 pump-3; do bash "$PKI" leaf "$WORK/pki" "$d" "$d" ec medlift-ca >/dev/null; done
bash "$PKI" leaf "$WORK/pki" pump-99 pump-99 ec rogue-ca >/dev/null

section "enrollments: three infusion pumps at facility A"
for d in pump-1 pump-2 pump-3; do
  dps --output json enrollment create "$d" --attestation x509 --certificate-path "$WORK/pki/$d.pem" \
    --iot-hubs hub.facility-a --allocation-policy static --reprovision-policy reprovisionandresetdata \
    --initial-twin-tags '{"facility":"A","ward":"icu"}' >/dev/null
done
# The logistics team's own policy: enrollments (read, write) only.
ops_key=$(dps --output json access-policy add logistics-ops --rights EnrollmentRead,EnrollmentWrite |
  jq_ '["primary_key"]')
OPS_CS="HostName=localhost;SharedAccessKeyName=logistics-ops;SharedAccessKey=$ops_key"
say "  pump-1..3 enrolled for hub.facility-a; access policy logistics-ops (EnrollmentRead, EnrollmentWrite)"

reg() { register "$1" --cert "$WORK/pki/$1.chain.pem" --key-file "$WORK/pki/$1.key"; }
field() { jq_ "$1" 2>/dev/null || echo "-"; }

section "first boot at facility A"
for d in pump-1 pump-2 pump-3; do
  out=$(reg "$d")
  say "  $d: $(field '["status"]' <<<"$out") on $(field '["registrationState"]["assignedHub"]' <<<"$out")"
done
expect "all three pumps on hub.facility-a" test "$(broker_clients facility-a pump-)" -eq 3
t_move=$(date -u +%Y-%m-%dT%H:%M:%SZ)

section "pump-2 is loaned to facility B: the logistics operator changes its enrollment"
DPS_CONNECTION_STRING=$OPS_CS dps enrollment update pump-2 --iot-hubs hub.facility-b \
  --initial-twin-tags '{"facility":"B","ward":"surgery"}' >/dev/null
expect "the logistics policy cannot change linked hubs (least privilege)" \
  bash -c '! DPS_CONNECTION_STRING="$1" "$2" linked-hub list >/dev/null 2>&1' _ "$OPS_CS" "$DPS_BIN"
out=$(reg pump-2)
say "  pump-2 boots at facility B: $(field '["status"]' <<<"$out") on $(field '["registrationState"]["assignedHub"]' <<<"$out"), substatus $(field '["registrationState"]["substatus"]' <<<"$out")"
expect "pump-2 now provisioned to hub.facility-b" test "$(field '["registrationState"]["assignedHub"]' <<<"$out")" = hub.facility-b
expect "pump-2's identity left hub.facility-a" test "$(broker_clients facility-a pump-2)" -eq 0
expect "pump-2's identity is on hub.facility-b" test "$(broker_clients facility-b pump-2)" -eq 1
twin=$(broker_twin facility-b pump-2)
say "  pump-2's twin on hub.facility-b: $twin"
expect "pump-2's twin says facility B" python3 -c 'import json,sys; assert json.loads(sys.argv[1])["tags"]["facility"]=="B"' "$twin"

section "pump-3 is retired: its enrollment is disabled"
DPS_CONNECTION_STRING=$OPS_CS dps enrollment update pump-3 --disabled >/dev/null
out=$(reg pump-3)
say "  pump-3 tries to provision: $(field '["status"]' <<<"$out")"
expect "pump-3 is refused (disabled)" test "$(field '["status"]' <<<"$out")" = disabled
client=$(mosquitto_ctrl -p "$(broker_port facility-a)" -u admin -P "$BROKER_ADMIN_PW" dynsec getClient pump-3 2>/dev/null || true)
expect "pump-3's identity on hub.facility-a is disabled" grep -qi "disabled:.*true" <<<"$client"

section "an unenrolled device (certificate from an unknown CA) tries to join"
out=$(reg pump-99)
say "  pump-99: $(field '["status"]' <<<"$out") $(field '["errorCode"]' <<<"$out") $(field '["reason"]' <<<"$out")"
expect "pump-99 is refused" test "$(field '["status"]' <<<"$out")" != assigned
expect "pump-99 has no identity on any hub" test "$(($(broker_clients facility-a pump-99) + $(broker_clients facility-b pump-99)))" -eq 0

section "the audit trail since the move (dps audit list --since $t_move)"
dps --output json audit list --since "$t_move" --limit 50 >"$WORK/audit.json"
python3 - "$WORK/audit.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows.get("items", rows) if isinstance(rows, dict) else rows
for r in sorted(rows, key=lambda r: r["seq"]):
    what = ""
    if r["action"].startswith("enrollment.") and r.get("before") and r.get("after"):
        b, a = r["before"], r["after"]
        what = " ".join(f"{k}: {json.dumps(b.get(k))} -> {json.dumps(a.get(k))}"
                        for k in ("iotHubs", "initialTwin", "provisioningStatus") if b.get(k) != a.get(k))
    elif r.get("after") and isinstance(r["after"], dict):
        what = " ".join(f"{k}={r['after'][k]}" for k in ("status", "assignedHub", "reason", "errorCode") if k in r["after"])
    print(f"  {r['timestamp'][:19]}  {r['actor']:<24} {r['action']:<24} {r['targetId']:<8} {what}")
PY
expect "audit: the enrollment change of pump-2 names logistics-ops" \
  python3 -c 'import json,sys; rows=json.load(open(sys.argv[1])); rows=rows.get("items",rows) if isinstance(rows,dict) else rows; assert any(r["actor"]=="logistics-ops" and r["targetId"]=="pump-2" and r["action"]=="enrollment.update" for r in rows)' "$WORK/audit.json"
expect "audit: the refused join of pump-99 is recorded" \
  python3 -c 'import json,sys; rows=json.load(open(sys.argv[1])); rows=rows.get("items",rows) if isinstance(rows,dict) else rows; assert any(r["targetId"]=="pump-99" for r in rows)' "$WORK/audit.json"
finish
