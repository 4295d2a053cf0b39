"""`stap-server compose`: compose files generated from the specs `stap-server start` uses,
for the configured servers (farm/manual/compose_farm.py) or the lab farm
(farm/manual/compose_lab.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from farm.core.arch import Arch
from farm.core.errors import EXIT_OK, FarmError, UsageError
from farm.manual.compose_farm import farm_files
from farm.manual.compose_lab import FILES, lab_files
from farm.manual.config import load_global
from farm.manual.host import Host
from farm.manual.plan import Action
from farm.manual.resolver import Resolver
from farm.manual.subcommand import Parser


def compose_action(argv: list[str], environ: Mapping[str, str], out: TextIO,
                   err: TextIO) -> int:
    """stap-server compose [-c FILE]... [--lab] [-o DIR [--force]]: compose files"""
    p = Parser(prog="stap-server compose",
                description="Compose files generated from the specs `stap-server start` uses: "
                            "the configured servers (CONFIG_PATH/*.conf, else the default "
                            "server), or with --lab the repository's lab farm (default: "
                            "compose.yaml on stdout).")
    p.add_argument("-c", dest="config", action="append", help="global configuration file")
    p.add_argument("--lab", action="store_true",
                   help="the lab farm, with the `build` sections of a checkout (images/), as "
                        "checked in (the same on every host: no configuration is read)")
    p.add_argument("-o", dest="output", metavar="DIR", help=f"write {' and '.join(FILES)}")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    try:
        ns = p.parse_args(argv)
        if ns.force and ns.output is None:
            raise UsageError("--force is only for -o DIR")
        if ns.lab:
            if ns.config:
                raise UsageError("--lab reads no configuration: drop -c")
            files = lab_files(build=True)
        else:
            gcfg = load_global(ns.config or [], environ)
            resolver = Resolver(Action.START, gcfg, Host.current(), [])
            files = farm_files(resolver.defaults(), gcfg, Arch.host())
        if ns.output is None:
            out.write(files[FILES[0]])
            return EXIT_OK
        if not Path(ns.output).is_dir():
            raise FarmError(f"{ns.output} is not a directory")
        paths = {Path(ns.output, name): text for name, text in files.items()}
        existing = [str(path) for path in paths if path.exists()]
        if existing and not ns.force:
            raise FarmError(f"{' and '.join(existing)} already there",
                            hint="add --force to overwrite")
        for path, text in paths.items():
            tmp = path.with_name(f".{path.name}.tmp")
            try:  # atomically: a reader sees the old file or the new one
                tmp.write_text(text)
                tmp.replace(path)
            except OSError as e:
                raise FarmError(f"cannot write {path}: {e.strerror}") from e
            print(f"wrote {path}", file=out)
        return EXIT_OK
    except FarmError as e:
        print(f"stap-server: {e}", file=err)
        return e.exit_code
