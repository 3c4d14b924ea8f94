#!/usr/bin/env bash
# Instructions the server executes per registration (kept alive; SQLite, or ENGINE=postgres for
# the local PostgreSQL, whose own processes are not counted), counted by valgrind's
# callgrind: the same count for the same binary whatever else the machine is doing, so an A/B of
# two binaries needs one run each, not rounds (wall-clock throughput on this host moves ±20 %).
# User space only: the kernel's share (network, WAL writes, fsync) is not counted.
#
#   bash bench/instructions.sh [BINARY] [DEVICES]
#   bash bench/instructions.sh /tmp/dps-old 2000; bash bench/instructions.sh target/release/dps 2000
#
# The server runs under callgrind (about 50 times slower); 300 registrations warm it up, the
# counters are zeroed, DEVICES registrations (default 2000) run over 16 kept-alive connections,
# and the counters are dumped. Needs valgrind. Under valgrind, SHA-256 runs in software (no
# SHA-NI): the HMACs are about 80,000 of the count per registration (the devices try two groups:
# the warm-up's, then their own), about a microsecond natively.
# OUT=dir keeps the callgrind dump there (callgrind_annotate reads it).
# EXTRA_GROUPS=N adds N symmetric-key enrollment groups that sort before the devices' group (so
# every fresh device's registration tries them all first). REREGISTER=1 measures re-registrations:
# the warm-up registers the DEVICES devices of a group with a known key, the measured run
# registers them again. RESTART=1 (with REREGISTER=1) restarts the server between the two, so
# that it remembers no device's group (as a node the devices come back through after another).
set -euo pipefail
cd "$(dirname "$0")/.."
export DPS_BENCH_BIN=${1:-target/release/dps}
n=${2:-2000}
out=${OUT:-$(mktemp -d)}
command -v valgrind >/dev/null || { echo "valgrind is needed"; exit 1; }
source bench/server.sh
real=$bin
wrap=$(mktemp)
cat >"$wrap" <<EOF
#!/bin/sh
if [ "\$1" = serve ]; then exec valgrind --tool=callgrind --callgrind-out-file=$out/callgrind.%p "$real" "\$@"; fi
exec "$real" "\$@"
EOF
chmod +x "$wrap"
bin=$wrap
start_server "${ENGINE:-sqlite}"
bin=$real
for i in $(seq -f %03g 1 "${EXTRA_GROUPS:-0}"); do
  "$bin" enrollment-group create "aaa-extra-$i" --attestation symmetricKey >/dev/null
done
if [[ ${REREGISTER:-0} == 1 ]]; then
  key=$(python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())')
  "$bin" enrollment-group create zzz-bench --attestation symmetricKey --primary-key "$key" --secondary-key "$key" >/dev/null
  common=(--json --group-key "$key" --prefix re- --poll-interval-ms 10)
  warm=$n
fi
"$bin" bench "${common[@]}" --global-endpoint "$H" --devices "${warm:-300}" --concurrency 16 --keep-alive >/dev/null
if [[ ${RESTART:-0} == 1 ]]; then
  keep=("${common[@]}")
  bin=$wrap
  restart_server
  bin=$real
  common=("${keep[@]}")
fi
callgrind_control -z "$pid" >/dev/null 2>&1
"$bin" bench "${common[@]}" --global-endpoint "$H" --devices "$n" --concurrency 16 --keep-alive >"$dir/last.json"
callgrind_control -d "$pid" >/dev/null 2>&1
python3 - "$dir/last.json" "$n" "$out" "$DPS_BENCH_BIN" <<'PY'
import glob, json, sys
r = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
if r["successes"] != n:
    sys.exit(f"only {r['successes']} of {n} registrations succeeded: {r['failuresByReason']}")
total = 0
for f in glob.glob(sys.argv[3] + "/callgrind.*.1"):
    for line in open(f):
        if line.startswith("summary:"):
            total += int(line.split()[1])
            break
if total == 0:
    sys.exit("no callgrind dump found")
print(f"{sys.argv[4]}: {total / n:,.0f} instructions per registration (server, user space, {n} registrations)")
PY
rm -f "$wrap"
[[ -n ${OUT:-} ]] || rm -rf "$out"
