#!/usr/bin/env bash
# Builds the Debian package of dps from the release binary, with dpkg-deb (Debian's own tool;
# no cargo plug-in to install):
#   cargo build --release && bash packaging/deb/build.sh     ->  target/debian/dps_<version>_<arch>.deb
# Contents: /usr/bin/dps, the systemd unit (own user, CAP_NET_BIND_SERVICE), /etc/dps/dps.toml
# (a conffile), man pages generated from the CLI definition (`dps man`), the docs and the
# complete example config. Install: dpkg -i target/debian/dps_*.deb. Test: packaging/deb/test.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/packaging/deb"
BIN=${DPS_BIN:-$ROOT/target/release/dps}
OUT=${DPS_DEB_OUT:-$ROOT/target/debian}

[[ -x $BIN ]] || { echo "no binary at $BIN: run cargo build --release first" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n 1)
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
PKG="$STAGE/dps"

install -d "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/lib/systemd/system" "$PKG/etc/dps" \
  "$PKG/usr/share/man/man1" "$PKG/usr/share/doc/dps" "$PKG/var/lib/dps"
install -m 0755 "$BIN" "$PKG/usr/bin/dps"
strip --strip-unneeded "$PKG/usr/bin/dps" 2>/dev/null || true
install -m 0644 "$HERE/dps.service" "$PKG/lib/systemd/system/dps.service"
install -m 0640 "$HERE/dps.toml" "$PKG/etc/dps/dps.toml"
install -m 0644 "$ROOT/config/dps.example.toml" "$PKG/usr/share/doc/dps/dps.example.toml"
install -m 0644 "$ROOT/README.md" "$PKG/usr/share/doc/dps/README.md"
for d in "$ROOT"/docs/*.md; do install -m 0644 "$d" "$PKG/usr/share/doc/dps/"; done
gzip -9n "$PKG/usr/share/doc/dps/"*.md
# Debian wants a copyright file; the licence is the workspace's.
printf '%s\n' \
  'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/' \
  'Upstream-Name: dps' \
  'Files: *' \
  'License: MIT OR Apache-2.0' >"$PKG/usr/share/doc/dps/copyright"

# Man pages: one per command, from the same clap definition as --help.
"$BIN" man --out "$PKG/usr/share/man/man1"
gzip -9n "$PKG/usr/share/man/man1/"*.1

install -m 0755 "$HERE/postinst" "$HERE/prerm" "$HERE/postrm" "$PKG/DEBIAN/"
echo /etc/dps/dps.toml >"$PKG/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
cat >"$PKG/DEBIAN/control" <<CONTROL
Package: dps
Version: $VERSION
Architecture: $ARCH
Maintainer: dps developers <dps@localhost>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), libgcc-s1, adduser
Section: net
Priority: optional
Description: open, Azure-compatible IoT Device Provisioning Service
 dps provisions IoT devices on the wire protocol of Azure IoT Hub Device
 Provisioning Service: Azure's device and service SDKs work against it
 unchanged. Devices prove their identity (symmetric key, X.509) against
 enrollments and are assigned to linked hubs (Azure IoT Hub, Mosquitto,
 broker-auth brokers, webhooks). Runs as the systemd service dps.
CONTROL

mkdir -p "$OUT"
DEB="$OUT/dps_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$DEB" >/dev/null
echo "$DEB"
