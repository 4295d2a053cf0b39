#!/bin/sh
# PID 2 of a farm server (tini is PID 1): prepare the server user's home, then become
# stap-serverd. HOME is a persistent per-user directory mounted by the farm.
set -eu
umask 077
mkdir -p "$HOME/.systemtap/ssl/server" "$HOME/.systemtap/ssl/client" "$HOME/.systemtap/cache"
# stap >= 5.1 creates these 0777 (create_dir ignores its mode, PR30321): fix them up front.
chmod 0700 "$HOME/.systemtap" "$HOME/.systemtap/ssl" "$HOME/.systemtap/ssl/server" \
  "$HOME/.systemtap/ssl/client"
# Upstream's per-request limits (stap-server(8) SECURITY; the Fedora RPM's
# ~stap-server/.systemtap/rc, which every stap the server spawns applies), with one deliberate
# difference: --rlimit-nproc. The RPM writes 30 x CPUs, but stap runs kbuild in parallel
# (make -j CPUs+1) only when RLIMIT_NPROC is *more* than 30 x CPUs, so upstream's value makes
# every compile serial (measured: cold `probe begin` 22 s instead of 12 s on 2 CPUs; see
# docs/reliability.md). RLIMIT_NPROC also counts every process of the server user on the
# whole host, and all the farm's servers share that user: 30 x CPUs for each of up to 8
# servers. Each server container's own bound is its pids limit (PIDS_LIMIT).
ncpu=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
rc="$HOME/.systemtap/rc"
# upstream's limits around the process limit, in upstream's order
head="--rlimit-as=4294967296 --rlimit-cpu=60"
tail="--rlimit-stack=1024000 --rlimit-fsize=51200000"
limits="$head --rlimit-nproc=$((240 * ncpu)) $tail"
# An rc is the user's to edit and is kept, except the one earlier farm images wrote (exactly
# upstream's values, process limit <= 30 x CPUs, i.e. serial kbuild): that one is replaced.
write_rc=no
if [ ! -e "$rc" ]; then
  write_rc=yes
elif [ "$(wc -l <"$rc")" -le 1 ]; then
  n=$(sed -n "s/^$head --rlimit-nproc=\([0-9]*\) $tail\$/\1/p" "$rc")
  if [ -n "$n" ] && [ "$n" -le $((30 * ncpu)) ]; then
    write_rc=yes
    echo "stapfarm: $rc: --rlimit-nproc=$n made every compile serial; now $((240 * ncpu))" >&2
  fi
fi
if [ "$write_rc" = yes ]; then
  printf '%s\n' "$limits" >"$rc.$$" && mv -f "$rc.$$" "$rc"
fi
export TMPDIR="${TMPDIR:-/tmp}"
exec /usr/lib/systemtap/stap-serverd "$@"
