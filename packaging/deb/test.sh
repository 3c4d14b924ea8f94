#!/usr/bin/env bash
# End-to-end check of the Debian package (CI runs it as root after the release build):
# build it, dpkg -i it, start the unit's own ExecStart as the unit's User with only the unit's
# ambient capability (what systemd does; CI has no running systemd), so the service binds 443
# and 8883 unprivileged; create an enrollment and register a device through it; stop it;
# purge the package and check that nothing is left behind.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[[ $(id -u) -eq 0 ]] || { echo "run as root (dpkg -i)" >&2; exit 1; }
if dpkg -s dps >/dev/null 2>&1; then echo "a dps package is installed already; purge it first" >&2; exit 1; fi

fail() { echo "FAIL: $*" >&2; exit 1; }
wait_for() { # wait_for SECONDS CMD...: polls CMD until it succeeds or the deadline passes
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
}

DEB=$(bash "$ROOT/packaging/deb/build.sh")
echo "built $DEB ($(du -h "$DEB" | cut -f1))"
dpkg-deb --info "$DEB" | sed -n '/Package:/,/Depends:/p'

SERVER_PID=""
cleanup() {
  [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null || true
  dpkg --purge dps >/dev/null 2>&1 || true
}
trap cleanup EXIT

dpkg -i "$DEB"
# What the package put in place.
[[ -x /usr/bin/dps ]] || fail "/usr/bin/dps missing"
getent passwd dps >/dev/null || fail "no dps user"
[[ $(stat -c %U:%a /var/lib/dps) == dps:750 ]] || fail "/var/lib/dps: $(stat -c %U:%a /var/lib/dps)"
[[ $(stat -c %U:%G:%a /etc/dps/dps.toml) == root:dps:640 ]] || fail "/etc/dps/dps.toml: $(stat -c %U:%G:%a /etc/dps/dps.toml)"
zcat /usr/share/man/man1/dps.1.gz | grep -q '^\.TH dps 1' || fail "man page dps.1"
zcat /usr/share/man/man1/dps-enrollment-create.1.gz | grep -q -- 'attestation' || fail "man page dps-enrollment-create.1"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify /lib/systemd/system/dps.service || fail "systemd-analyze verify"
fi

# The unit's command, user and capability, read from the installed unit.
UNIT=/lib/systemd/system/dps.service
EXEC=$(sed -n 's/^ExecStart=//p' "$UNIT")
USER_=$(sed -n 's/^User=//p' "$UNIT")
CAPS=$(sed -n 's/^AmbientCapabilities=CAP_//p' "$UNIT" | tr 'A-Z' 'a-z')
[[ $USER_ == dps && $CAPS == net_bind_service ]] || fail "unit: User=$USER_ caps=$CAPS"
cd /var/lib/dps
# shellcheck disable=SC2086 # ExecStart is a command line
setpriv --reuid "$USER_" --regid "$USER_" --init-groups \
  --inh-caps "+$CAPS" --ambient-caps "+$CAPS" --bounding-set "+$CAPS" --no-new-privs \
  $EXEC >/tmp/dps-deb-server.log 2>&1 &
SERVER_PID=$!
cd "$ROOT"
wait_for 60 test -s /var/lib/dps/run.json || { cat /tmp/dps-deb-server.log; fail "no run.json"; }
wait_for 30 bash -c '(exec 3<>/dev/tcp/127.0.0.1/443)' || { cat /tmp/dps-deb-server.log; fail "not listening on 443"; }
[[ $(stat -c %U /var/lib/dps/run.json) == dps ]] || fail "run.json not written by the dps user"
ps -o user= -p "$SERVER_PID" | grep -qx dps || fail "server not running as dps"

CS=$(python3 -c 'import json; print(json.load(open("/var/lib/dps/run.json"))["instances"][0]["connection_string"])')
SCOPE=$(python3 -c 'import json; print(json.load(open("/var/lib/dps/run.json"))["instances"][0]["id_scope"])')
export DPS_CONNECTION_STRING=$CS DPS_CA_FILE=/var/lib/dps/ca.pem
KEY=$(dps --output json enrollment create deb-device-1 --attestation symmetricKey |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
OUTPUT=$(dps --output json device register --id-scope "$SCOPE" --registration-id deb-device-1 --key "$KEY" \
  --global-endpoint localhost --ca-file /var/lib/dps/ca.pem)
echo "$OUTPUT"
echo "$OUTPUT" | grep -q '"assigned"' || fail "device not assigned"
dps --output json registration show deb-device-1 | grep -q '"assigned"' || fail "registration record"
unset DPS_CONNECTION_STRING DPS_CA_FILE

kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""

dpkg --purge dps
[[ ! -e /usr/bin/dps ]] || fail "/usr/bin/dps left behind"
[[ ! -e /var/lib/dps ]] || fail "/var/lib/dps left behind"
[[ ! -e /etc/dps ]] || fail "/etc/dps left behind"
[[ ! -e $UNIT ]] || fail "unit left behind"
! getent passwd dps >/dev/null || fail "dps user left behind"
! getent group dps >/dev/null || fail "dps group left behind"
echo "debian package: installed, served a registration as user dps on 443, purged cleanly"
