"""The farm's own actions beside the manual's: `images`, `kernels`, `trust`, `mdns`, `endpoint`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from farm.core import labels
from farm.core.arch import ALL, Arch
from farm.core.errors import EXIT_NOT_RUNNING, EXIT_OK, FarmError, UsageError
from farm.core.spec import GlobalConfig, ServerConfig, Strategy
from farm.core.strategy import resolve
from farm.discovery import advertiser
from farm.discovery.service import advertiser_state, ensure_advertiser
from farm.endpoint import containers as endpoint_containers
from farm.endpoint import service as endpoint_service
from farm.endpoint.routing import Target
from farm.engine import images
from farm.engine.docker import Engine
from farm.engine.servers import DockerBackend
from farm.engine.trees import TreeStore
from farm.kernels import trees as kernels
from farm.kernels.debian import Mirror
from farm.manual.compose_cli import compose_action
from farm.manual.config import global_file, load_global
from farm.manual.host import Host
from farm.manual.server_config import ServerDraft, resolve_server
from farm.manual.subcommand import Parser
from farm.trust import store as trust

Action = Callable[[list[str], Mapping[str, str], TextIO, TextIO], int]




def _global(paths: list[str], environ: Mapping[str, str]) -> GlobalConfig:
    return load_global(paths, environ)


def _engine(gcfg: GlobalConfig, environ: Mapping[str, str]) -> Engine:
    """The engine, for the farm ENVIRON names (its prefix and test label).

    Raises:
        DockerUnavailable: no engine.
    """
    return Engine.connect(environ, gcfg.prefix, gcfg.test_label)


def _arches(values: list[str] | None) -> list[Arch]:
    return [Arch.parse(v) for v in values] if values else list(ALL)


def _run(fn: Callable[[argparse.Namespace, GlobalConfig, Mapping[str, str], TextIO, TextIO],
                      int], parser: argparse.ArgumentParser, argv: list[str],
         environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    try:
        ns = parser.parse_args(argv)
        gcfg = _global(ns.config or [], environ)
        return fn(ns, gcfg, environ, out, err)
    except FarmError as e:
        print(f"stap-server: {e}", file=err)
        return e.exit_code


def _say(stream: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(line, file=stream, flush=True)
    return say


def images_action(argv: list[str], environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """stap-server images {build|list} [-a ARCH]... [--force] [--allow-expired-release]"""
    p = Parser(prog="stap-server images", description="Build or list the farm's server images.")
    p.add_argument("command", choices=["build", "list"])
    p.add_argument("-a", dest="arch", action="append", help="x86_64 or aarch64 (default: all)")
    p.add_argument("-c", dest="config", action="append", help="global configuration file")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--allow-expired-release", action="store_true",
                   help="accept a testing Release file past its Valid-Until (mirror snapshots)")

    def run(ns: argparse.Namespace, gcfg: GlobalConfig, env: Mapping[str, str], o: TextIO,
            e: TextIO) -> int:
        engine = _engine(gcfg, env)
        if ns.allow_expired_release:
            gcfg = replace(gcfg, apt_allow_expired=True)
        specs = [images.server_image(gcfg, arch) for arch in _arches(ns.arch)]
        if not ns.arch:  # everything: the service image too (advertiser, endpoint)
            specs.append(images.service_image(gcfg, allow_expired=gcfg.apt_allow_expired))
        for spec in specs:
            if ns.command == "build":
                images.build(engine, gcfg, spec, _say(o), force=ns.force)
            else:
                print(f"{spec.tag}\t{images.status(engine, spec)}", file=o)
        return EXIT_OK

    return _run(run, p, argv, environ, out, err)


def _store(engine: Engine, gcfg: GlobalConfig, target: Arch, strategy: Strategy
           ) -> TreeStore:
    plan = resolve(strategy, target, Arch.host())
    return TreeStore(engine, plan.image_arch, images.image_tag(gcfg, plan.image_arch))


def _mirror(gcfg: GlobalConfig) -> Mirror:
    return Mirror.from_config(gcfg, kernels.cache_dir(gcfg.state_dir))


def kernels_action(argv: list[str], environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """stap-server kernels {available|add|list|remove} [-a ARCH] [-r RELEASE] [--debuginfo]"""
    p = Parser(prog="stap-server kernels",
                description="Kernel devel trees by release, from the Debian mirror.")
    p.add_argument("command", choices=["available", "add", "list", "remove"])
    p.add_argument("-a", dest="arch", action="append", help="target architecture")
    p.add_argument("-r", dest="release", action="append", help="kernel release")
    p.add_argument("-c", dest="config", action="append", help="global configuration file")
    p.add_argument("--strategy", type=Strategy, choices=list(Strategy), default=None,
                   help="which image uses the tree (default: the global STRATEGY)")
    p.add_argument("--debuginfo", action="store_true",
                   help="also vmlinux and System.map from linux-image-<release>-dbg (DWARF probes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(ns: argparse.Namespace, gcfg: GlobalConfig, env: Mapping[str, str], o: TextIO,
            e: TextIO) -> int:
        strategy = ns.strategy or gcfg.strategy
        if ns.command == "available":
            result = {a.stap: kernels.available(_mirror(gcfg), gcfg.kernel_suites, a)
                      for a in _arches(ns.arch)}
            if ns.json:
                print(json.dumps(result, indent=1), file=o)
            else:
                for arch, rels in result.items():
                    for rel in rels:
                        print(f"{arch}\t{rel}", file=o)
            return EXIT_OK
        engine = _engine(gcfg, env)
        if ns.command == "list":
            trees = []
            for image_arch in ALL:
                if engine.image(images.image_tag(gcfg, image_arch)) is not None:
                    store = TreeStore(engine, image_arch, images.image_tag(gcfg, image_arch))
                    trees += store.list()
            if ns.json:
                print(json.dumps([t.__dict__ for t in trees], indent=1), file=o)
            else:
                for t in trees:
                    extra = " debuginfo" if t.debuginfo else ""
                    print(f"{t.release}\t{t.arch}\timage {t.image_arch}{extra}", file=o)
            return EXIT_OK
        if not ns.arch or not ns.release:
            raise UsageError(f"kernels {ns.command} needs -a ARCH and -r RELEASE")
        for a in ns.arch:
            target = Arch.parse(a)
            store = _store(engine, gcfg, target, strategy)
            for rel in ns.release:
                if ns.command == "add":
                    store.add(_mirror(gcfg), gcfg.kernel_suites, target, rel,
                              debuginfo=ns.debuginfo, say=_say(o))
                elif not store.remove(rel):
                    print(f"no kernel tree {rel} for the {store.image_arch} image", file=o)
                else:
                    print(f"removed kernel tree {rel} ({store.image_arch} image)", file=o)
                    users = [c.labels.get(labels.NICKNAME) or c.name
                             for c in engine.containers("server", running=True)
                             if rel in c.labels.get(labels.RELEASES, "").split()
                             and c.labels.get(labels.IMAGE_ARCH, "") in (
                                 store.image_arch.debian, store.image_arch.stap)]
                    if users:
                        print(f"stap-server: warning: running servers still use it "
                              f"({', '.join(sorted(users))}): their requests for {rel} fail "
                              f"until `stap-server kernels add -a {target.machine} -r {rel}`",
                              file=e)
        return EXIT_OK

    return _run(run, p, argv, environ, out, err)


def trust_action(argv: list[str], environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """stap-server trust [-n NICK|-p PID]... [--all-users|--signer] [--revoke] [--export DIR]"""
    p = Parser(prog="stap-server trust",
                description="Trust the farm's servers: install their certificates where stap "
                            "clients (or staprun) look, revoke them, or export them.")
    p.add_argument("-n", dest="nickname", action="append", default=[], help="server nickname")
    p.add_argument("-p", dest="pid", action="append", default=[], type=int, help="server PID")
    p.add_argument("-c", dest="config", action="append", help="global configuration file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--all-users", action="store_true",
                       help=f"the global client database ({trust.GLOBAL_CLIENT_DB})")
    where.add_argument("--signer", action="store_true",
                       help=f"the module-signer database staprun checks ({trust.SIGNER_DB})")
    where.add_argument("--export", metavar="DIR",
                       help="write the certificates and a trust script for remote clients")
    p.add_argument("--revoke", action="store_true", help="remove the certificates instead")

    def run(ns: argparse.Namespace, gcfg: GlobalConfig, env: Mapping[str, str], o: TextIO,
            e: TextIO) -> int:
        backend = DockerBackend.from_env(gcfg, env)
        servers = [s for s in backend.list_servers() if s.running]
        if ns.nickname or ns.pid:
            chosen = []
            for nick in ns.nickname:
                match = [s for s in servers if s.nickname == nick]
                if not match:
                    raise FarmError(f"no running server with the nickname '{nick}'")
                chosen += match
            for pid in ns.pid:
                match = [s for s in servers if s.pid == pid]
                if not match:
                    raise FarmError(f"No stap-server running as pid {pid}")
                chosen += match
            servers = chosen
        address = gcfg.probe_address
        # With the farm endpoint running, the farm's identity is what clients trust: the
        # servers behind it have keys any compile on them can read (README, Security), so
        # they are trusted only when named (-n/-p).
        endpoint = None if ns.nickname or ns.pid else trust.endpoint_cert(backend.engine,
                                                                          address)
        certs = [endpoint] if endpoint is not None else trust.collect(servers, address)
        if not certs:
            raise FarmError("no running farm server or endpoint to trust",
                            hint="start one with `stap-server start` or `stap-server "
                                 "endpoint start`")
        host = gcfg.hostname or socket.gethostname()
        for c in certs:
            print(f"certinfo {c.certinfo}: {', '.join(c.servers)}", file=o)
        if ns.export:
            for path in trust.export(certs, Path(ns.export), host):
                print(f"wrote {path}", file=o)
            return EXIT_OK
        if ns.all_users or ns.signer:
            db = trust.GLOBAL_CLIENT_DB if ns.all_users else trust.SIGNER_DB
            uid = gid = 0
        else:
            home = env.get("HOME") or os.path.expanduser("~")
            db = os.path.join(home, ".systemtap", "ssl", "client")
            uid, gid = os.getuid(), os.getgid()
        image = images.require(backend.engine, gcfg, Arch.host())
        print(trust.apply(backend.engine, image, certs, db, revoke=ns.revoke, uid=uid,
                          gid=gid, host=host).rstrip(), file=o)
        return EXIT_OK

    return _run(run, p, argv, environ, out, err)


def mdns_action(argv: list[str], environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """stap-server mdns [-c FILE]... [--interface X]...: the advertiser in the foreground"""
    p = Parser(prog="stap-server mdns",
                description="Advertise the farm's servers over mDNS in the foreground "
                            "(what the advertiser container runs), until interrupted.")
    p.add_argument("-c", dest="config", action="append", help="global configuration file")
    p.add_argument("--interface", action="append", default=[],
                   help="interface name or IPv4 address (default: MDNS_INTERFACES, else "
                        "every LAN interface)")

    def run(ns: argparse.Namespace, gcfg: GlobalConfig, env: Mapping[str, str], o: TextIO,
            e: TextIO) -> int:
        advertiser.configure_logging(e)
        adv = advertiser.Advertiser(lambda: _engine(gcfg, env), gcfg.prefix,
                                    ns.interface or gcfg.mdns_interfaces, gcfg.probe_address)
        advertiser.run_foreground(adv)
        return EXIT_OK

    return _run(run, p, argv, environ, out, err)


def endpoint_action(argv: list[str], environ: Mapping[str, str], out: TextIO,
                    err: TextIO) -> int:
    """stap-server endpoint {start|stop|status|run|broker} [-c FILE]... [--provision|...]"""
    p = Parser(prog="stap-server endpoint",
                description="The farm endpoint: one TLS address for every target (ENDPOINT_PORT), "
                            "routed by the request, validated, answered from a module cache.")
    p.add_argument("command", choices=["start", "stop", "status", "run", "broker"],
                   help="run: the front door in the foreground (its container's command); "
                        "broker: the Docker side in the foreground (its container's command)")
    p.add_argument("-c", dest="config", action="append", help="global configuration file")
    p.add_argument("--provision", dest="provision", action="store_true", default=None,
                   help="start a server for a target nobody serves (default: ENDPOINT_PROVISION)")
    p.add_argument("--no-provision", dest="provision", action="store_false")
    p.add_argument("--endpoint-ids", default="", help=argparse.SUPPRESS)

    def run(ns: argparse.Namespace, gcfg: GlobalConfig, env: Mapping[str, str], o: TextIO,
            e: TextIO) -> int:
        svc = endpoint_service
        provision = gcfg.endpoint_provision if ns.provision is None else ns.provision
        if ns.command in ("run", "broker"):
            logging.basicConfig(stream=e, level=logging.INFO,
                                format="%(asctime)s %(name)s: %(message)s")
            if ns.command == "run":
                svc.run_frontdoor(gcfg, provision=provision)
            else:
                ids = (svc.parse_ids(ns.endpoint_ids) if ns.endpoint_ids
                       else endpoint_containers.endpoint_ids(gcfg))
                svc.run_broker(gcfg, env, provision=provision, ids=ids,
                               resolve=lambda t: provisioned_config(t, gcfg))
            return EXIT_OK
        engine = _engine(gcfg, env)
        if ns.command == "start":
            c = endpoint_containers.ensure_endpoint(
                engine, gcfg, provision=provision, config_files=list(ns.config or []),
                default_file=global_file(env), say=_say(o))
            print(f"farm endpoint: running on port {gcfg.endpoint_port} ({c.name}; "
                  f"provisioning {'on' if provision else 'off'})", file=o)
            return EXIT_OK
        if ns.command == "stop":
            ran, servers = endpoint_containers.stop_endpoint(engine)
            print("farm endpoint: stopped" if ran else "farm endpoint: not running", file=o)
            if servers:
                print(f"farm endpoint: removed {servers} server(s) it had provisioned", file=o)
            return EXIT_OK
        line = endpoint_containers.endpoint_state(engine, gcfg)
        print(line or "farm endpoint: not running", file=o)
        return EXIT_OK if line.startswith("farm endpoint: running") else EXIT_NOT_RUNNING

    return _run(run, p, argv, environ, out, err)


ACTIONS: dict[str, Action] = {
    "compose": compose_action,
    "endpoint": endpoint_action,
    "images": images_action,
    "kernels": kernels_action,
    "mdns": mdns_action,
    "trust": trust_action,
}


def provisioned_config(target: Target, gcfg: GlobalConfig) -> ServerConfig:
    """The configuration of a server the endpoint provisions for TARGET: the resolver's,
    as for `stap-server start -a ARCH -r RELEASE -n auto-ARCH-RELEASE` run by root."""
    arch = Arch.parse(target.arch)
    host = Host(arch=Arch.host().stap, release=os.uname().release, euid=0, user="root",
                cwd="/")
    return resolve_server(ServerDraft(arch=arch.stap, releases=[target.release],
                                      nickname=f"auto-{arch.machine}-{target.release}",
                                      source="endpoint"), gcfg, host)


def farm_backend(gcfg: GlobalConfig, environ: Mapping[str, str]) -> DockerBackend:
    """The Backend the manual's actions drive, with the farm's parts composed in: after a
    start the advertiser is made sure of, and `status` reports it and the endpoint.

    Raises:
        DockerUnavailable: no engine.
    """
    backend = DockerBackend.from_env(gcfg, environ)
    engine = backend.engine

    def lines() -> list[str]:
        state = endpoint_containers.endpoint_state(engine, gcfg)
        return [advertiser_state(engine)] + ([state] if state else [])

    def advertise() -> None:
        try:
            ensure_advertiser(engine, gcfg)
        except FarmError as e:  # the server is up; it is only not advertised
            print(f"stap-server: warning: the server is not advertised over mDNS: {e}",
                  file=sys.stderr)

    backend.extra_notices = lines
    backend.on_started = advertise
    return backend
