#!/usr/bin/env bash
# The multi-node chaos run (issue #19): three `dps serve` nodes on one PostgreSQL (a fresh schema
# of $DPS_TEST_POSTGRES_URL) behind a TCP load balancer started by the test; a burst of 10,000
# devices through it while one node is killed with `kill -9` (at a quarter) and restarted, and
# one linked hub answers 503 for 60 s (from the half). Then it checks: every registration a device
# saw `assigned` is still assigned to the same hub and device id; every device has exactly one
# identity, on its record's hub; no record stays `assigning`; every device that did not finish
# succeeds when it registers again. Figures in docs/benchmarks.md.
#
#   DPS_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/dps bench/chaos_multinode.sh
#
# Sizes: DPS_CHAOS_NODES (3), DPS_CHAOS_DEVICES (10000), DPS_CHAOS_CONCURRENCY (64),
# DPS_CHAOS_OUTAGE_SECS (60). PROFILE=release builds optimized (default: the test profile).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DPS_TEST_POSTGRES_URL:?set DPS_TEST_POSTGRES_URL to a PostgreSQL database the run may create a schema in}"
args=()
if [[ ${PROFILE:-} == release ]]; then args+=(--release); fi
ulimit -n 20000 2>/dev/null || true
exec cargo test "${args[@]}" -p dps --test it multinode::chaos_run -- --ignored --nocapture
