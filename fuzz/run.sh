#!/usr/bin/env bash
# Build every fuzz target and run each for a fixed time; exit non-zero on the first crash.
#   fuzz/run.sh SECONDS [TARGET...]      (no TARGET: all of them, one after the other)
#
# Plain stable cargo, no cargo-fuzz needed: the coverage instrumentation libFuzzer feeds on
# (SanitizerCoverage) is enabled with stable -C flags, the same ones `cargo fuzz build
# --sanitizer none` passes. `--target` keeps them off build scripts and proc macros.
# The targets are ordinary libfuzzer-sys targets, so `cargo fuzz run TARGET` (nightly, or
# RUSTC_BOOTSTRAP=1) works as well and adds AddressSanitizer; see fuzz/README.md.
# Environment: FUZZ_JOBS (targets run in parallel, default 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
if [[ $# -eq 0 ]]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^dps-fuzz$')
else
  targets=("$@")
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# One build of every target (one cargo invocation), then each run reuses it.
cargo build --release --locked --target "$triple" --bins
bin="target/$triple/release"

mkdir -p logs
run_one() {
  local t=$1 log="logs/$1.log" seeds="seeds/$1"
  mkdir -p "corpus/$t" "artifacts/$t"
  local dirs=("corpus/$t")
  [[ -d $seeds ]] && dirs+=("$seeds")
  if "$bin/$t" "${dirs[@]}" -artifact_prefix="artifacts/$t/" -max_total_time="$secs" \
      -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
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
