#!/usr/bin/env bash
# Runs Azure's real SDKs (Node and Python) against a freshly started dps server.
#
#   bash interop/run.sh                 # everything: node tests, then pytest
#   bash interop/run.sh node [ARGS...]  # node tests only; ARGS go to `node --test` (cwd interop/node),
#                                       #   e.g. device-http.test.mjs --test-name-pattern="wrong key"
#   bash interop/run.sh python [ARGS...]# pytest only; ARGS go to pytest, e.g. -k "websockets and group"
#   bash interop/run.sh serve           # start the server, print how to run single tests, wait (Ctrl-C)
#
# Needs: target/release/dps (built beforehand; override with DPS_BIN), root (ports 443, 8883, 5671),
# `npm ci --prefix interop/node`, `pip install -r interop/python/requirements.txt`.
# Env: DPS_INTEROP_KEEP_DATA=1 keeps the temporary data dir; DPS_INTEROP_START_TIMEOUT (s, default 60).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
DPS_BIN=${DPS_BIN:-$ROOT/target/release/dps}
CONFIG=$HERE/dps.toml
START_TIMEOUT=${DPS_INTEROP_START_TIMEOUT:-60}
SUITE_TIMEOUT=${DPS_INTEROP_SUITE_TIMEOUT:-900}

MODE=${1:-all}
if [[ $# -gt 0 ]]; then shift; fi
case "$MODE" in
  all|node|python|serve) ;;
  -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "usage: $0 [all|node|python|serve] [args...]" >&2; exit 2 ;;
esac

log() { printf '[interop] %s\n' "$*" >&2; }

if [[ ! -x $DPS_BIN ]]; then
  log "server binary $DPS_BIN not found: run 'cargo build --release' first"
  exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
  log "warning: not root; binding ports 443/8883/5671 will probably fail"
fi

DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dps-interop.XXXXXX")
export DPS_DATA_DIR=$DATA_DIR  # also passed as --data-dir below
export NO_COLOR=1             # plain server log
export DPS_RUN_JSON=$DATA_DIR/run.json
SERVER_LOG=$DATA_DIR/server.log
SERVER_PID=
FAILED=0

stop_server() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      log "server did not stop on SIGTERM; killing it"
      kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}

print_server_log() {
  if [[ -s $SERVER_LOG ]]; then
    log "---- server log ($SERVER_LOG, last 400 lines) ----"
    tail -n 400 "$SERVER_LOG" >&2 || true
    log "---- end of server log ----"
  fi
}

on_exit() {
  local rc=$?
  stop_server
  if [[ $rc -ne 0 || $FAILED -ne 0 ]]; then print_server_log; fi
  if [[ ${DPS_INTEROP_KEEP_DATA:-0} == 1 ]]; then
    log "data dir kept: $DATA_DIR"
  else
    rm -rf "$DATA_DIR"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- start the server and wait until it is ready (run.json + /healthz), with a deadline ----
log "starting $DPS_BIN serve --config $CONFIG --data-dir $DATA_DIR"
"$DPS_BIN" serve --config "$CONFIG" --data-dir "$DATA_DIR" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

healthz() {
  # $1 = admin address (host:port); IPv6 literals come bracketed already
  python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}/healthz", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

deadline=$((SECONDS + START_TIMEOUT))
ADMIN=
while :; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    wait "$SERVER_PID" && rc=0 || rc=$?
    SERVER_PID=
    log "server exited during start-up (exit code $rc)"
    FAILED=1
    exit 1
  fi
  if [[ -s $DPS_RUN_JSON ]]; then
    ADMIN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$DPS_RUN_JSON" 2>/dev/null || true)
    if [[ -n $ADMIN ]] && healthz "$ADMIN"; then break; fi
  fi
  if ((SECONDS >= deadline)); then
    log "server not ready after ${START_TIMEOUT}s (run.json: $( [[ -s $DPS_RUN_JSON ]] && echo present || echo missing ))"
    FAILED=1
    exit 1
  fi
  sleep 0.2
done
CA=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ca"])' "$DPS_RUN_JSON")
log "server ready: $(tr -d '\n' <"$DPS_RUN_JSON")"
export NODE_EXTRA_CA_CERTS=$CA

# ---- suites ---------------------------------------------------------------------------------
declare -a RESULTS=()

run_node() {
  local -a args=("$@")
  if [[ ${#args[@]} -eq 0 ]]; then
    args=(service.test.mjs device-http.test.mjs device-mqtt.test.mjs device-amqp.test.mjs device-x509.test.mjs device-tpm.test.mjs)
  fi
  if [[ ! -d $HERE/node/node_modules ]]; then
    log "interop/node/node_modules missing: run 'npm ci --prefix interop/node'"
    return 1
  fi
  # node stops reading options at the first file name: options first, then the files
  local -a opts=() files=()
  local a
  for a in "${args[@]}"; do
    if [[ $a == -* ]]; then opts+=("$a"); else files+=("$a"); fi
  done
  if [[ ${#files[@]} -eq 0 ]]; then
    files=(service.test.mjs device-http.test.mjs device-mqtt.test.mjs device-amqp.test.mjs device-x509.test.mjs device-tpm.test.mjs)
  fi
  log "node --test ${opts[*]} ${files[*]}"
  (cd "$HERE/node" && timeout --foreground "$SUITE_TIMEOUT" \
    node --test --test-concurrency=1 --test-force-exit --test-reporter=spec "${opts[@]}" "${files[@]}")
}

run_python() {
  # Test files: the default set unless the arguments name one (e.g. test_x509.py or a ::node id).
  local -a files=(test_provisioning.py test_x509.py test_mosquitto.py test_faults.py)
  local a
  for a in "$@"; do
    if [[ $a == *.py || $a == *.py::* ]]; then files=(); break; fi
  done
  log "pytest interop/python $* ${files[*]}"
  local rc=0
  (cd "$HERE/python" && timeout --foreground "$SUITE_TIMEOUT" \
    python3 -m pytest -v -p no:cacheprovider -rfE "$@" "${files[@]}") || rc=$?
  if [[ $rc -eq 5 ]]; then
    log "pytest collected no tests (exit code 5): counted as a failure"
  fi
  return "$rc"
}

suite() {
  local name=$1; shift
  local start=$SECONDS rc=0
  "$@" || rc=$?
  RESULTS+=("$(printf '%-8s %s (%ss)' "$name" "$([[ $rc -eq 0 ]] && echo PASS || echo "FAIL rc=$rc")" $((SECONDS - start)))")
  if [[ $rc -ne 0 ]]; then FAILED=1; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the $name suite"
    FAILED=1
  fi
}

case "$MODE" in
  serve)
    cat >&2 <<EOF
[interop] server running (pid $SERVER_PID); in another shell:
  export DPS_RUN_JSON=$DPS_RUN_JSON NODE_EXTRA_CA_CERTS=$CA
  cd $HERE/node && node --test device-http.test.mjs --test-name-pattern='wrong key'
  cd $HERE/python && python3 -m pytest -v -k 'websockets and group' test_provisioning.py
[interop] Ctrl-C stops the server. Log: $SERVER_LOG
EOF
    wait "$SERVER_PID" || true
    SERVER_PID=
    log "server exited"
    FAILED=1
    exit 1
    ;;
  node) suite node run_node "$@" ;;
  python) suite python run_python "$@" ;;
  all)
    suite node run_node
    suite python run_python
    ;;
esac

log "summary:"
for r in "${RESULTS[@]}"; do log "  $r"; done
if [[ $FAILED -ne 0 ]]; then
  log "FAILED"
  exit 1
fi
log "all interop suites passed"
