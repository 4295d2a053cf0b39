#!/bin/bash
# One-command, idempotent set-up of a stapfarm host (make up / make test call it).
#   - a Docker engine (Debian's docker.io when none; started via systemd, else in the
#     background with its log in /var/log/stapfarm/dockerd.log)
#   - the compose v2 plugin (from trixie's docker-compose package when missing)
#   - qemu-user-static with binfmt_misc mounted and the aarch64 handler enabled
#   - debootstrap (base images are bootstrapped when no registry is reachable)
#   - a virtualenv (.venv) with the package and its test extras
#   - the stap-server system user and group (the manual's default server user), and
#     stap-endpoint (the farm endpoint's unprivileged front door)
#   - the server images (rebuilt only when their inputs change)
# Environment: IMAGE_BUILD_FLAGS (passed to `stap-server images build`), SKIP_IMAGES=1.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
apt_updated=
apt_install() {
  is_root || die "missing $* and not root: install them (apt-get install $*) or rerun as root"
  if [ -z "$apt_updated" ]; then apt-get update -q >/dev/null; apt_updated=1; fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# --- Docker engine -------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    apt_install docker.io iptables
  fi
  is_root || die "the Docker engine is not running and starting it needs root"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    log "starting docker with systemd"
    systemctl start docker
  else
    mkdir -p /var/log/stapfarm
    log "starting dockerd in the background (log: /var/log/stapfarm/dockerd.log)"
    nohup dockerd >>/var/log/stapfarm/dockerd.log 2>&1 </dev/null &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || die "dockerd did not come up; see /var/log/stapfarm/dockerd.log"
fi
log "docker engine $(docker version -f '{{.Server.Version}}')"

# --- qemu-user for aarch64 -----------------------------------------------------------------
if [ "$(uname -m)" != aarch64 ]; then
  if [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] && ! command -v qemu-aarch64-static >/dev/null; then
    apt_install qemu-user-static binfmt-support
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    is_root || die "binfmt_misc is not mounted (mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    is_root || die "the qemu-aarch64 binfmt handler is not enabled"
    update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64
  fi
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 handler is disabled"
  log "qemu-aarch64 binfmt handler enabled"
fi

# --- debootstrap, gpgv ---------------------------------------------------------------------
command -v debootstrap >/dev/null || apt_install debootstrap
command -v gpgv >/dev/null || apt_install gpgv

# --- virtualenv ----------------------------------------------------------------------------
stamp=.venv/.stapfarm-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating .venv with the package and its test extras"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi

# --- compose v2 plugin ---------------------------------------------------------------------
if ! docker compose version >/dev/null 2>&1; then
  is_root || die "the docker compose v2 plugin is missing"
  .venv/bin/python -m farm.manual.hostsetup compose-plugin
fi
log "$(docker compose version)"

# --- server user ---------------------------------------------------------------------------
if ! getent passwd stap-server >/dev/null; then
  is_root || die "the stap-server user is missing (create it as root: make up)"
  # upstream's fixed ids (systemtap.spec) when free, so images and host agree on file owners
  getent group stap-server >/dev/null || { groupadd --system --gid 155 stap-server 2>/dev/null || groupadd --system stap-server; }
  useradd --system --uid 155 --gid stap-server --home-dir /var/lib/stap-server --create-home \
    --shell /usr/sbin/nologin --comment "Systemtap Compile Server" stap-server 2>/dev/null ||
  useradd --system --gid stap-server --home-dir /var/lib/stap-server --create-home \
    --shell /usr/sbin/nologin --comment "Systemtap Compile Server" stap-server
  log "created user stap-server (uid $(id -u stap-server))"
fi

# --- endpoint user ---------------------------------------------------------------------------
# The farm endpoint's front door (the port exposed to clients) runs as this unprivileged user;
# it owns the farm's identity (STATE_DIR/endpoint) and module cache, nothing else.
if ! getent passwd stap-endpoint >/dev/null; then
  is_root || die "the stap-endpoint user is missing (create it as root: make up)"
  getent group stap-endpoint >/dev/null || { groupadd --system --gid 156 stap-endpoint 2>/dev/null || groupadd --system stap-endpoint; }
  useradd --system --uid 156 --gid stap-endpoint --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "stapfarm endpoint" stap-endpoint 2>/dev/null ||
  useradd --system --gid stap-endpoint --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "stapfarm endpoint" stap-endpoint
  log "created user stap-endpoint (uid $(id -u stap-endpoint))"
fi

# --- the command on PATH, the systemd unit ([service] stap-server) ---------------------------
if is_root; then
  .venv/bin/python -m farm.manual.hostsetup service "$PWD/.venv/bin/stap-server"
fi

# --- images --------------------------------------------------------------------------------
if [ "${SKIP_IMAGES:-0}" != 1 ]; then
  # shellcheck disable=SC2086 # IMAGE_BUILD_FLAGS is a list of flags
  .venv/bin/stap-server images build ${IMAGE_BUILD_FLAGS:-}
fi
log "done"
