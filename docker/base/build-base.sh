#!/bin/sh
# Build a Debian bookworm base image with Python 3.11 from Debian's own packages, for
# machines that reach a Debian mirror but no image registry (nothing is pulled):
#
#   sudo docker/base/build-base.sh [IMAGE]        # default IMAGE: gptload-base:bookworm
#   DOCKER_BUILDKIT=0 docker build --network host \
#       --build-arg BASE_IMAGE=gptload-base:bookworm -f docker/Dockerfile -t gptload .
#
# Everyone else builds on the official python:3.11-slim-bookworm (the Dockerfile's default)
# and never needs this. The image holds what both of the Dockerfile's stages install
# (Python with its headers and venv, a C toolchain and the MariaDB client headers for
# mysqlclient, tzdata, CA certificates), so the build makes no apt call on it. It is made
# once: run again, it does nothing while IMAGE exists (FORCE=1 rebuilds it).
#
# Needs root, debootstrap (apt-get install debootstrap) and a running Docker engine.
# DEBIAN_MIRROR overrides the mirror, which is otherwise the first Debian one apt uses here.
set -eu

IMAGE=${1:-gptload-base:bookworm}
SUITE=bookworm
PACKAGES=python3.11,python3.11-venv,python3-venv,python3.11-dev,build-essential,pkg-config,default-libmysqlclient-dev,libmariadb3,tzdata,ca-certificates

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE exists (FORCE=1 rebuilds it)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "error: debootstrap needs root" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "error: debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
fi

# The mirror apt already uses (deb822 .sources files first, then sources.list lines).
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')
fi
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list 2>/dev/null \
        | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }')
fi
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/gptload-base.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $SUITE from $mirror into $rootfs ..."
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror"

# Slim it down: no package lists, caches or docs in the image.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
# Containers get their own name resolution from the engine.
: > "$rootfs/etc/resolv.conf"
: > "$rootfs/etc/hostname"

echo "importing $rootfs as $IMAGE ..."
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "Debian $SUITE with Python 3.11 from $mirror (docker/base/build-base.sh)" \
    - "$IMAGE"
echo "base image $IMAGE ready"
