#!/usr/bin/env bash
# Runs the three case-study scenarios at their small (CI) size, one after the other; fails if any
# check of any scenario fails. Needs `cargo build --release` (or DPS_BIN).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rc=0
for s in 01-meters.sh 02-facility-reassignment.sh 03-field-install.sh; do
  printf '\n######## %s\n' "$s"
  bash "$here/$s" || rc=1
done
exit $rc
