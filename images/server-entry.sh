#!/bin/sh
# PID 2 of a farm server (tini is PID 1): prepare the server user's home, then become
# stap-serverd. HOME is a persistent per-user directory mounted by the farm.
set -eu
umask 077
mkdir -p "$HOME/.systemtap/ssl/server" "$HOME/.systemtap/ssl/client" "$HOME/.systemtap/cache"
# stap >= 5.1 creates these 0777 (create_dir ignores its mode, PR30321): fix them up front.
chmod 0700 "$HOME/.systemtap" "$HOME/.systemtap/ssl" "$HOME/.systemtap/ssl/server" \
  "$HOME/.systemtap/ssl/client"
[ -e "$HOME/.systemtap/rc" ] || cp /etc/stapfarm/rc "$HOME/.systemtap/rc"
export TMPDIR="${TMPDIR:-/tmp}"
exec /usr/lib/systemtap/stap-serverd "$@"
