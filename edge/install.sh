#!/bin/sh
# Install the iotpipe edge agent @VERSION@ from this bundle, with no network.
#
#   sudo ./install.sh                 # /opt/iotpipe-edge/venv, /etc/iotpipe, systemd service
#   ./install.sh --prefix /tmp/x --no-systemd    # anywhere, as anyone (tests, chroots)
#
# Options (and the environment variables that set the same):
#   --prefix DIR     IOTPIPE_PREFIX    where the venv goes            [/opt/iotpipe-edge]
#   --python EXE     IOTPIPE_PYTHON    the interpreter for the venv   [python3]
#   --etc DIR        IOTPIPE_ETC       the agent's config directory   [/etc/iotpipe]
#   --boot DIR       IOTPIPE_BOOT      the Pi's boot partition        [/boot/firmware]
#   --no-systemd                       do not install or start the service
#
# Secrets that `iotpipe edge flash` left on the boot partition are moved (the FAT partition is
# readable by anyone with the card) to the root-only files the unit loads:
#   <boot>/iotpipe/secrets/edge.toml      -> <etc>/edge.toml                   (0600)
#   <boot>/iotpipe/secrets/mqtt-password  -> <etc>/credentials/mqtt-password   (0600)
#   <boot>/iotpipe/secrets/mqtt-client.crt, mqtt-client.key, mqtt-ca.crt -> <etc>/credentials/
# A different file already there is kept as *.bak. Client certificate files the unit loads but
# nobody provided are created empty (no certificate), so an upgraded unit still starts.
set -eu

VERSION="@VERSION@"
PYTHONS="@PYTHONS@"
SERVICE=iotpipe-edge.service
DEFAULT_PREFIX=/opt/iotpipe-edge

PREFIX="${IOTPIPE_PREFIX:-$DEFAULT_PREFIX}"
PYTHON="${IOTPIPE_PYTHON:-python3}"
ETC="${IOTPIPE_ETC:-/etc/iotpipe}"
BOOT="${IOTPIPE_BOOT:-/boot/firmware}"
SYSTEMD=1

say() { echo "iotpipe-edge: $*"; }
die() { echo "iotpipe-edge: error: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an executable}"; shift 2 ;;
        --etc) ETC="${2:?--etc needs a directory}"; shift 2 ;;
        --boot) BOOT="${2:?--boot needs a directory}"; shift 2 ;;
        --no-systemd) SYSTEMD=0; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"

if [ "$SYSTEMD" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "installing the service needs root: sudo $0 (or --no-systemd with --prefix)"
fi

say "checking the bundle (SHA256SUMS)"
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"
sha256sum --quiet --check SHA256SUMS || die "the bundle is damaged: files above do not match SHA256SUMS"

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install python3 and python3-venv"
HAVE="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case " $PYTHONS " in
    *" $HAVE "*) ;;
    *) die "$PYTHON is CPython $HAVE; this bundle has wheels for CPython $PYTHONS only" ;;
esac

say "creating $PREFIX/venv with $PYTHON ($HAVE)"
mkdir -p "$PREFIX"
# --clear: an upgrade starts from an empty venv, so no package of an older bundle lingers.
"$PYTHON" -m venv --clear "$PREFIX/venv" || die "cannot create a venv: install python3-venv"

# --isolated: no pip.conf or PIP_* variable may add an index; --no-index: never the network.
pip_install() {
    "$PREFIX/venv/bin/python" -m pip --isolated --disable-pip-version-check \
        install --quiet --no-index --find-links "$HERE/wheels" "$@"
}
say "installing the dependencies (offline)"
pip_install -r requirements.txt || die "pip could not install requirements.txt from wheels/"
say "installing iotpipe $VERSION (offline)"
# --no-deps: iotpipe declares the whole pipeline's dependencies; the agent needs only the above.
pip_install --no-deps "iotpipe==$VERSION" || die "pip could not install iotpipe $VERSION"
cp VERSION "$PREFIX/VERSION"
"$PREFIX/venv/bin/iotpipe" --version >/dev/null || die "$PREFIX/venv/bin/iotpipe does not start"

# Secrets left on the boot partition (FAT: readable by anyone with the card) become root-only.
# The flashing's firstboot.sh moves them before running this script; a bundle installed by
# hand may find them here.
move_in() {  # <boot file> <destination>
    if [ ! -f "$1" ]; then return 0; fi
    if [ -f "$2" ] && ! cmp -s "$1" "$2"; then mv "$2" "$2.bak"; fi
    say "moving $1 to $2"
    (umask 077 && cp "$1" "$2.new")
    mv "$2.new" "$2"
    rm -f "$1"
}
mkdir -p "$ETC"
(umask 077 && mkdir -p "$ETC/credentials")
move_in "$BOOT/iotpipe/secrets/edge.toml" "$ETC/edge.toml"
move_in "$BOOT/iotpipe/secrets/mqtt-password" "$ETC/credentials/mqtt-password"
for name in mqtt-client.crt mqtt-client.key mqtt-ca.crt; do
    move_in "$BOOT/iotpipe/secrets/$name" "$ETC/credentials/$name"
    if [ ! -f "$ETC/credentials/$name" ]; then (umask 077 && : >"$ETC/credentials/$name"); fi
done

if [ "$SYSTEMD" = 0 ]; then
    say "installed $VERSION in $PREFIX (no systemd service: --no-systemd)"
    exit 0
fi
if [ ! -f "$SERVICE" ]; then
    say "installed $VERSION in $PREFIX; this bundle has no $SERVICE, so no service was set up"
    exit 0
fi
command -v systemctl >/dev/null || die "systemctl not found: use --no-systemd"

# The unit's SupplementaryGroups= (the owners of /dev/i2c-* and /dev/gpiochip* on Pi OS): a
# root without them (plain Debian, or Pi OS provisioned by firstrun.sh) would refuse to start it.
for group in i2c gpio; do
    getent group "$group" >/dev/null || groupadd --system "$group" || die "cannot create group $group"
done

UNIT=/etc/systemd/system/$SERVICE
# The unit names the default prefix and config directory; point it at these.
sed -e "s|$DEFAULT_PREFIX|$PREFIX|g" -e "s|/etc/iotpipe|$ETC|g" "$SERVICE" >"$UNIT"
chmod 0644 "$UNIT"
systemctl daemon-reload
systemctl enable "$SERVICE"
if [ ! -f "$ETC/credentials/mqtt-password" ]; then
    say "note: $ETC/credentials/mqtt-password is missing; the unit loads it (empty if no password)"
fi
if [ -f "$ETC/edge.toml" ]; then
    # --no-block: at first boot (systemd.run=) waiting for network.target could hang here.
    systemctl restart --no-block "$SERVICE"
    say "installed $VERSION; $SERVICE enabled and starting (journalctl -u $SERVICE)"
else
    say "installed $VERSION; $SERVICE enabled, not started: write $ETC/edge.toml first"
fi
