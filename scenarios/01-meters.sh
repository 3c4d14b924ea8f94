#!/usr/bin/env bash
# Case study 01 (HelioMeter Works): solar meters onboarded by X.509 CA enrollment groups based on
# manufacturing certificates, each routed to its regional hub, with an initial twin carrying the
# firmware channel and the site. Operators review linked hubs and enrollments with the CLI before
# the batch. Checks: every meter assigned, zero wrong-hub assignments (counted on the brokers
# themselves), the initial twin on the hub, and the time the batch took.
#
#   bash scenarios/01-meters.sh [--devices N] [--concurrency C]     (default 40 meters, 8 at once)
#   bash scenarios/01-meters.sh --devices 50000 --concurrency 64   (the case study's fleet)
source "$(dirname "$0")/lib.sh"
DEVICES=40
CONC=8
while (($#)); do
  case $1 in
    --devices) DEVICES=$2; shift 2 ;;
    --concurrency) CONC=$2; shift 2 ;;
    *) echo "usage: $0 [--devices N] [--concurrency C]" >&2; exit 2 ;;
  esac
done
NORTH=$((DEVICES / 2))
SOUTH=$((DEVICES - NORTH))

section "setup: two regional Mosquitto hubs, dps, the manufacturing PKI"
start_broker north
start_broker south
start_dps "$(hub_toml north hub-north.meters 'options = { timeout_ms = 30000 }')
$(hub_toml south hub-south.meters 'options = { timeout_ms = 30000 }')"
# One manufacturing root; one intermediate per production line (north and south batches).
bash "$PKI" ca "$WORK/pki" mfg-root "HelioMeter Manufacturing Root" ec >/dev/null
bash "$PKI" ca "$WORK/pki" line-north "HelioMeter Line North" ec mfg-root >/dev/null
bash "$PKI" ca "$WORK/pki" line-south "HelioMeter Line South" ec mfg-root >/dev/null
say "  hubs: hub-north.meters (port $(broker_port north)), hub-south.meters (port $(broker_port south))"
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
on_nn=$(broker_clients north meter-north-); on_ns=$(broker_clients north meter-south-)
on_sn=$(broker_clients south meter-north-); on_ss=$(broker_clients south meter-south-)
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
  twin=$(broker_twin "$region" "$id")
  say "  twin of $id on hub-$region.meters: $twin"
  expect "$id: initial twin on the hub has firmwareChannel and site" \
    python3 -c 'import json,sys; t=json.loads(sys.argv[1]); assert t["properties"]["desired"]["firmwareChannel"]=="stable" and t["tags"]["site"]==sys.argv[2]' \
    "$twin" "solar-park-$region"
done
finish
