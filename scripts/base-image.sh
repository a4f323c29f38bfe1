#!/bin/sh
# Make a local Debian bookworm base image for the Dockerfile (`make image BASE=localhost/nlistral-base`) where no
# image registry is reachable: debootstrap builds it from Debian's own packages, `podman import` (or docker) loads it.
# What a base must provide (python:3.11-slim does too): Python 3.11 with the venv module and its bundled pip
# (ensurepip), `python` on PATH, and apt-get with a working package source (the Dockerfile installs git, make, gcc).
# Run as root (debootstrap needs it); about 2 minutes, a 176 MB image.
#   scripts/base-image.sh [TAG (default $BASE, else localhost/nlistral-base)] [MIRROR]
set -eu
tag=${1:-${BASE:-localhost/nlistral-base}}
# The mirror this machine's apt uses, else Debian's CDN.
mirror=${2:-$( (sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources
    awk '$1 == "deb" && $2 ~ /\/debian$/ {print $2}' /etc/apt/sources.list) 2>/dev/null | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}
# ENGINE: the container command with its global flags (here: podman --runtime runc --cgroup-manager=cgroupfs).
engine=${ENGINE:-$(command -v podman || command -v docker)} \
    || { echo "base-image.sh: neither podman nor docker is installed" >&2; exit 2; }
command -v debootstrap >/dev/null \
    || { echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
# python3-venv brings ensurepip's pip wheel; python-is-python3 puts `python` on PATH.
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | $engine import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$tag"
echo "base-image.sh: made $tag"
