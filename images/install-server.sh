#!/bin/sh
# Install a farm server image's contents. Shared by Dockerfile.x86_64 and Dockerfile.aarch64.
#   install-server.sh "<extra packages>"
# Environment (from the Dockerfile's ARGs): SUITE, DEBIAN_MIRROR, APT_ALLOW_EXPIRED, SERVER_UID.
set -eu
extra=$1
apt_opts=""
if [ "${APT_ALLOW_EXPIRED:-no}" = yes ]; then
  # Mirror snapshots serve testing with a Release file past its Valid-Until; only with the
  # explicit build option (stap-server images build --allow-expired-release).
  apt_opts="-o Acquire::Check-Valid-Until=false"
fi
echo "deb $DEBIAN_MIRROR $SUITE main" > /etc/apt/sources.list
rm -f /etc/apt/sources.list.d/*
# The server user exists before the packages, so systemtap-server's maintainer scripts reuse
# it: the same uid as the host's stap-server user created by the farm's set-up.
groupadd --system --gid "$SERVER_UID" stap-server
useradd --system --uid "$SERVER_UID" --gid stap-server --home-dir /home/stap-server \
  --create-home --shell /usr/sbin/nologin --comment "Systemtap Compile Server" stap-server
apt-get $apt_opts update
DEBIAN_FRONTEND=noninteractive apt-get $apt_opts install -y --no-install-recommends \
  systemtap systemtap-server systemtap-client gcc make libc6-dev zip unzip openssl \
  libnss3-tools tini dwarves ca-certificates $extra
apt-get clean
rm -rf /var/lib/apt/lists/*
# No kernel headers are baked in: trees live in the farm's kernel volume, mounted read-only at
# /srv/stapfarm/kernels with the usual paths pointing into it.
rm -rf /usr/src /usr/lib/modules /usr/lib/debug /boot
mkdir -p /srv/stapfarm/kernels
ln -s /srv/stapfarm/kernels/usr/src /usr/src
ln -s /srv/stapfarm/kernels/usr/lib/modules /usr/lib/modules
ln -s /srv/stapfarm/kernels/usr/lib/debug /usr/lib/debug
ln -s /srv/stapfarm/kernels/boot /boot
install -d -o stap-server -g stap-server -m 0700 /home/stap-server/.systemtap
# ~/.systemtap/rc (upstream's per-request rlimits) is written by server-entry.sh at start:
# its process limit depends on the CPUs of the machine the server runs on.
stap -V 2>&1 | head -n 1
