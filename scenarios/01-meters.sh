#!/usr/bin/env bash
# Case study 01 (HelioMeter Works): solar meters onboarded by X.509 CA enrollment groups based on
# manufacturing certificates, each routed to its regional hub, with an initial twin carrying the
# firmware channel and the site. Operators review linked hubs and enrollments with the CLI before
# the batch. Checks: every meter assigned, zero wrong-hub assignments (counted on the brokers
# themselves), the initial twin on the hub, and the time the batch took.
#
#   bash scenarios/01-meters.sh [--devices N] [--concurrency C] [--hubs mosquitto|registry]
#                                  (default 40 meters, 8 at once, two Mosquitto hubs)
#   bash scenarios/01-meters.sh --devices 50000 --concurrency 64 --hubs registry
#                                  (the case study's fleet)
# --hubs registry uses dps's built-in registry hubs (identities and twins in dps's store, written
# in the same transaction as the registration record) instead of Mosquitto: Mosquitto 2.0's
# dynamic-security plugin rewrites its whole JSON file per change, so 25,000 identities per
# broker take it hours (docs/benchmarks.md); the registry measures dps's side of a large fleet.
source "$(dirname "$0")/lib.sh"
DEVICES=40
CONC=8
HUBS=mosquitto
while (($#)); do
  case $1 in
    --devices) DEVICES=$2; shift 2 ;;
    --concurrency) CONC=$2; shift 2 ;;
    --hubs) HUBS=$2; shift 2 ;;
    *) echo "usage: $0 [--devices N] [--concurrency C] [--hubs mosquitto|registry]" >&2; exit 2 ;;
  esac
done
case $HUBS in mosquitto|registry) ;; *) echo "--hubs: mosquitto or registry" >&2; exit 2 ;; esac
NORTH=$((DEVICES / 2))
SOUTH=$((DEVICES - NORTH))

if [[ $HUBS == mosquitto ]]; then
  section "setup: two regional Mosquitto hubs, dps, the manufacturing PKI"
  start_broker north
  start_broker south
  start_dps "$(hub_toml north hub-north.meters 'options = { timeout_ms = 30000 }')
$(hub_toml south hub-south.meters 'options = { timeout_ms = 30000 }')"
else
  section "setup: two regional registry hubs (in dps's store), dps, the manufacturing PKI"
  start_dps "$(printf '[[instance.linked_hub]]\nhost = "%s"\n' hub-north.meters hub-south.meters)"
fi
# One manufacturing root; one intermediate per production line (north and south batches).
bash "$PKI" ca "$WORK/pki" mfg-root "HelioMeter Manufacturing Root" ec >/dev/null
bash "$PKI" ca "$WORK/pki" line-north "HelioMeter Line North" ec mfg-root >/dev/null
bash "$PKI" ca "$WORK/pki" line-south "HelioMeter Line South" ec mfg-root >/dev/null
if [[ $HUBS == mosquitto ]]; then
  say "  hubs: hub-north.meters (port $(broker_port north)), hub-south.meters (port $(broker_port south))"
fi
say "  ID scope $ID_SCOPE, device endpoint $ENDPOINT"

section "enrollment groups: one per production line, each routed to its region"
for region in north south; do
  dps --output json enrollment-group create "meters-$region" --attestation x509 \
    --certificate-path "$WORK/pki/line-$region.pem" --iot-hubs "hub-$region.meters" --allocation-policy static \
    --initial-twin-tags "{\"site\":\"solar-park-$region\",\"region\":\"$region\"}" \
    --initial-twin-properties '{"firmwareChannel":"stable","telemetryIntervalSeconds":300}' >/dev/null
done
say "  created meters-north and meters-south"

section "operator review before the batch (read-only CLI)"
dps linked-hub list | sed 's/^/  /'
dps enrollment-group list | sed 's/^/  /'

section "the batch: $DEVICES meters boot and provision ($CONC at once, fresh TLS each)"
t0=$SECONDS
bench() { # bench REGION N
  dps bench --json --attestation x509 --ca-cert "$WORK/pki/line-$1.pem" --ca-key "$WORK/pki/line-$1.key" \
    --prefix "meter-$1-" --devices "$2" --concurrency "$CONC" --global-endpoint "$ENDPOINT" \
    --poll-interval-ms 20 --no-handshake-baseline --timeout 600 >"$WORK/bench-$1.json" || true
}
bench north "$NORTH"
bench south "$SOUTH"
took=$((SECONDS - t0))
ok_n=$(jq_ '.get("successes",0)' <"$WORK/bench-north.json")
ok_s=$(jq_ '.get("successes",0)' <"$WORK/bench-south.json")
say "  north: $ok_n/$NORTH assigned, $(jq_ '.get("throughputPerSecond") or 0' <"$WORK/bench-north.json" | xargs printf '%.0f') meters/s"
say "  south: $ok_s/$SOUTH assigned, $(jq_ '.get("throughputPerSecond") or 0' <"$WORK/bench-south.json" | xargs printf '%.0f') meters/s"
say "  batch took ${took} s for $DEVICES meters"

section "checks"
expect "every meter assigned ($((ok_n + ok_s))/$DEVICES)" test "$((ok_n + ok_s))" -eq "$DEVICES"
if [[ $HUBS == mosquitto ]]; then
  # Counted on the brokers themselves.
  on_nn=$(broker_clients north meter-north-); on_ns=$(broker_clients north meter-south-)
  on_sn=$(broker_clients south meter-north-); on_ss=$(broker_clients south meter-south-)
else
  # Registry hubs: the identity and the record are one transaction; count the records' hubs.
  per_hub() { # per_hub GROUP HUB
    dps --output json registration list --group "$1" |
      python3 -c 'import json,sys; print(sum(1 for r in json.load(sys.stdin) if r.get("assignedHub")==sys.argv[1]))' "$2"
  }
  on_nn=$(per_hub meters-north hub-north.meters); on_ns=$(per_hub meters-south hub-north.meters)
  on_sn=$(per_hub meters-north hub-south.meters); on_ss=$(per_hub meters-south hub-south.meters)
fi
say "  identities on hub-north: $on_nn north meters, $on_ns south meters"
say "  identities on hub-south: $on_ss south meters, $on_sn north meters"
expect "each meter's identity is on its regional hub" test "$on_nn" -eq "$NORTH" -a "$on_ss" -eq "$SOUTH"
expect "wrong-hub assignments: $((on_ns + on_sn))" test "$((on_ns + on_sn))" -eq 0
# One meter of each line: its registration record and the twin on its hub.
for region in north south; do
  dps --output json registration list --group "meters-$region" --top 1 >"$WORK/list-$region.json"
  id=$(jq_ '[0]["registrationId"]' <"$WORK/list-$region.json")
  rec=$(dps --output json registration show "$id")
  hub=$(jq_ '["assignedHub"]' <<<"$rec")
  expect "$id: registration record says assigned to hub-$region.meters" test "$hub" = "hub-$region.meters"
  if [[ $HUBS == mosquitto ]]; then
    twin=$(broker_twin "$region" "$id")
  else
    twin=$(dps --output json hub device show "$id" --hub "hub-$region.meters" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(d.get("twin", d)))')
  fi
  say "  twin of $id on hub-$region.meters: $twin"
  expect "$id: initial twin on the hub has firmwareChannel and site" \
    python3 -c 'import json,sys; t=json.loads(sys.argv[1]); assert t["properties"]["desired"]["firmwareChannel"]=="stable" and t["tags"]["site"]==sys.argv[2]' \
    "$twin" "solar-park-$region"
done
finish
