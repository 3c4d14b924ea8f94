#!/usr/bin/env bash
# Build every fuzz target and run each for a fixed time; exit non-zero on the first crash.
#   fuzz/run.sh SECONDS [TARGET...]      (no TARGET: all of them, one after the other)
# Needs cargo-fuzz (`cargo install cargo-fuzz --version 0.13.2 --locked`). The pinned stable
# toolchain runs it with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only -Z flags).
# Environment: FUZZ_JOBS (parallel targets, default 1), FUZZ_SANITIZER (default none: the code
# has no `unsafe`, so AddressSanitizer adds build time and little signal; `address` works too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
export RUSTC_BOOTSTRAP=1
san=${FUZZ_SANITIZER:-none}
if [[ $# -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list)
else
  targets=("$@")
fi
# One build of every target (one cargo invocation), then each run reuses it.
cargo fuzz build -O --sanitizer "$san"

mkdir -p logs
run_one() {
  local t=$1 log="logs/$1.log" seeds="seeds/$1"
  mkdir -p "corpus/$t"
  local dirs=("corpus/$t")
  [[ -d $seeds ]] && dirs+=("$seeds")
  if cargo fuzz run -O --sanitizer "$san" "$t" "${dirs[@]}" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    local runs cov
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -n 1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | grep -oE '[0-9]+')
    printf 'fuzz %-14s ok      %10s runs in %ss, coverage %s\n' "$t" "${runs:-?}" "$secs" "${cov:-?}"
  else
    printf 'fuzz %-14s CRASHED (log: fuzz/%s; artifacts in fuzz/artifacts/%s)\n' "$t" "$log" "$t"
    tail -n 40 "$log"
    return 1
  fi
}

jobs=${FUZZ_JOBS:-1}
rc=0
if [[ $jobs -le 1 ]]; then
  for t in "${targets[@]}"; do run_one "$t" || rc=1; done
else
  pids=()
  for t in "${targets[@]}"; do
    run_one "$t" & pids+=($!)
    if [[ ${#pids[@]} -ge $jobs ]]; then wait "${pids[0]}" || rc=1; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
fi
exit $rc
