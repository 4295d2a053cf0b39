#!/bin/bash
# Bootstrap a minimal Debian base image from packages when no registry can provide one.
#
#   bootstrap-base.sh SUITE DEBARCH TAG MIRROR
#
# MIRROR is the farm's DEBIAN_MIRROR (farm/images.py passes it; there is no default).
#
# SUITE may be a codename debootstrap has no script for (forky): the "sid" script is used,
# which handles every current testing/unstable suite. The result is loaded with the classic
# builder from a FROM-scratch Dockerfile, because `docker import --platform` on engine 20.10
# records the host architecture instead of DEBARCH (see field notes).
set -euo pipefail
if [ $# -ne 4 ] || [ -z "$4" ]; then
  echo "bootstrap-base: usage: bootstrap-base.sh SUITE DEBARCH TAG MIRROR (no Debian mirror given:" \
    "set DEBIAN_MIRROR=<URL> in /etc/sysconfig/stap-server)" >&2
  exit 2
fi
suite=$1 debarch=$2 tag=$3 mirror=$4
case $debarch in
  amd64) platform=linux/amd64 ;;
  arm64) platform=linux/arm64 ;;
  *) echo "bootstrap-base: unsupported Debian architecture '$debarch' (amd64, arm64)" >&2; exit 2 ;;
esac
script=/usr/share/debootstrap/scripts/$suite
[ -e "$script" ] || script=/usr/share/debootstrap/scripts/sid
work=$(mktemp -d /var/tmp/stapfarm-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "bootstrap-base: debootstrap --variant=minbase --arch=$debarch $suite ($mirror)"
debootstrap --variant=minbase --arch="$debarch" "$suite" "$work/rootfs" "$mirror" "$script" \
  > "$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .
rm -rf "$work/rootfs"
cat > "$work/Dockerfile" <<DOCKERFILE
FROM scratch
ADD rootfs.tar /
CMD ["/bin/bash"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q --platform "$platform" \
  --label org.stapfarm.base.suite="$suite" --label org.stapfarm.base.arch="$debarch" \
  -t "$tag" "$work" >/dev/null
echo "bootstrap-base: loaded $tag ($(docker image inspect -f '{{.Architecture}}' "$tag"))"
