# Sourced by bench/run.sh and bench/one.sh: start `dps serve` on ephemeral ports as its own
# process (an instance answering `register` with 200 when done in time, two built-in registry
# hubs, `max_inflight_registrations` = $INFLIGHT or 2000, any other `[limits]` lines in
# $EXTRA_LIMITS) on SQLite or on the local PostgreSQL (database dps_bench, recreated).
# restart_server stops the server (SIGTERM) and starts it again on the same data (new ports).
# Sets: bin, dir, pid, H (HTTPS endpoint), M (MQTT endpoint), A (AMQP endpoint), admin, common (dps bench flags);
# exports the CLI's connection string, URL and CA file. The server stops when the script exits.
bin=${DPS_BENCH_BIN:-target/release/dps}
start_server() {
  local engine=$1 store=""
  dir=$(mktemp -d)
  if [[ $engine == postgres ]]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists dps_bench" >/dev/null
    psql -h 127.0.0.1 -U postgres -d postgres -qc "create database dps_bench" >/dev/null
    # The dropped database's pages written out now, not by a checkpoint during the run.
    psql -h 127.0.0.1 -U postgres -d postgres -qc "checkpoint" >/dev/null
    store="postgres://postgres@127.0.0.1:5432/dps_bench"
  fi
  cat >"$dir/dps.toml" <<EOF
data_dir = "$dir/data"
store = "$store"
[listen]
https = "127.0.0.1:0"
mqtt = "127.0.0.1:0"
amqp = "127.0.0.1:0"
admin = "127.0.0.1:0"
[log]
level = "warn"
[limits]
max_inflight_registrations = ${INFLIGHT:-2000}
${EXTRA_LIMITS:-}
[[instance]]
name = "default"
hostnames = ["localhost"]
register_response = "immediate"
[[instance.linked_hub]]
host = "hub-1.bench"
[[instance.linked_hub]]
host = "hub-2.bench"
EOF
  trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
  launch_server
}
# Start `dps serve` on the configuration in $dir and read its endpoints (ephemeral ports).
launch_server() {
  rm -f "$dir/data/run.json"
  "$bin" serve --config "$dir/dps.toml" >>"$dir/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [[ -s $dir/data/run.json ]] && break; sleep 0.1; done
  local https mqtt amqp
  https=$(field '["https"]'); mqtt=$(field '["mqtt"]'); amqp=$(field '["amqp"]'); admin=$(field '["admin"]')
  DPS_CONNECTION_STRING=$(field '["instances"][0]["connection_string"]')
  export DPS_CONNECTION_STRING DPS_URL="https://localhost:${https##*:}" DPS_CA_FILE="$dir/data/ca.pem"
  H="localhost:${https##*:}"; M="localhost:${mqtt##*:}"; A="localhost:${amqp##*:}"
  common=(--json --create-group --admin-url "http://$admin" --poll-interval-ms 10)
}
restart_server() {
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  launch_server
}
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(eval("v"+sys.argv[2]))' "$dir/data/run.json" "$1"; }
