"""Servers as Docker containers: the Backend the command line drives (labels are the truth)."""

from __future__ import annotations

import os
import pwd
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from farm.core import labels
from farm.core.arch import Arch
from farm.core.backend import RunningServer
from farm.core.errors import KernelTreeError, ServerError
from farm.core.spec import GlobalConfig, ServerConfig, Strategy
from farm.core.strategy import BuildPlan, resolve
from farm.engine import images
from farm.engine.docker import Engine, still_running
from farm.engine.specs import DAEMON, HOME, Placement, config_from_json, server_spec
from farm.engine.trees import TreeStore
from farm.kernels.trees import MANIFESTS, volume_name
from farm.kernels.trees import MOUNT as KERNELS_MOUNT
from farm.trust import tls as tlsprobe

RENEW_DAYS = 7  # renew a certificate this close to expiry; status warns 30 days ahead
WARN_DAYS = 30
READY_TIMEOUT = {Strategy.NATIVE: 90.0, Strategy.CROSS: 90.0, Strategy.EMULATED: 300.0}
CERT_DIR = ".systemtap/ssl/server"
# How long observing a server waits for the daemon of a container that is (re)starting.
SETTLE_TIMEOUT = 15.0


@dataclass
class DockerBackend:
    """Runs each ServerConfig as one container of the farm's server image."""

    engine: Engine
    gcfg: GlobalConfig
    hostname: str = ""
    extra_labels: dict[str, str] = field(default_factory=dict)  # e.g. the endpoint's mark
    # A compose farm's named volumes for HOME and the log (its init service made the
    # certificate database there): servers started for it (the endpoint's provisioning) use
    # them instead of STATE_DIR paths, as user STAPFARM_SERVER_UID:GID.
    home_volume: str = ""
    log_volume: str = ""
    server_ids: tuple[int, int] = (155, 155)
    # Lines `status` adds after the servers (the advertiser's and the endpoint's state):
    # given by the command line, which composes the farm's parts.
    extra_notices: Callable[[], list[str]] = list
    # Called after each start (the advertiser follows every farm server): given by the
    # command line too.
    on_started: Callable[[], None] | None = None

    @property
    def prefix(self) -> str:
        return self.engine.prefix

    @classmethod
    def of(cls, engine: Engine, gcfg: GlobalConfig) -> DockerBackend:
        """The backend of GCFG's farm (its prefix, host name, volumes, ids) on ENGINE."""
        return cls(engine=engine, gcfg=gcfg, hostname=gcfg.hostname or socket.gethostname(),
                   home_volume=gcfg.home_volume, log_volume=gcfg.log_volume,
                   server_ids=gcfg.server_ids)

    @classmethod
    def from_env(cls, gcfg: GlobalConfig, environ: Mapping[str, str]) -> DockerBackend:
        """The backend of GCFG's farm on the engine ENVIRON names (DOCKER_HOST).

        Raises:
            DockerUnavailable: no engine.
        """
        return cls.of(Engine.connect(environ, gcfg.prefix, gcfg.test_label), gcfg)

    # ------------------------------------------------------------------ observe
    def _containers(self) -> list[Any]:
        return self.engine.containers("server")

    def list_servers(self) -> list[RunningServer]:
        return [self._observe(c) for c in self._containers()]

    def _observe(self, c: Any) -> RunningServer:
        cfg = config_from_json(c.labels[labels.CONFIG])
        deadline = time.monotonic() + SETTLE_TIMEOUT
        pid = 0
        # The restart policy brings a crashed daemon back: the container restarts, then its
        # entry script becomes the daemon. Wait (bounded) for the daemon of a container that
        # is on its way up rather than calling it stale.
        while True:
            if c.status == "running":
                pid = self._daemon_pid(c)
            if pid or c.status not in ("restarting", "running", "created"):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
            c.reload()
        settling = not pid and c.status in ("restarting", "running", "created")
        return RunningServer(config=cfg, pid=pid, port=int(c.labels.get(labels.PORT, "0")),
                             container=c.id, running=pid > 0, settling=settling,
                             problems=self._tree_problems(c, cfg) if pid > 0 else ())

    def _tree_problems(self, c: Any, cfg: ServerConfig) -> tuple[str, ...]:
        """A line per release whose kernel tree is gone from the volume the running server
        mounts (`kernels remove` under it): its requests for that release fail until the
        tree is added again. Looked at from inside the server, so it is what stap sees."""
        wanted = [r for r in cfg.releases if not r.startswith("/")]
        if not wanted:
            return ()
        plan = self.plan_for(cfg)
        try:
            code, out = self.engine.exec(c, ["sh", "-c", TREE_CHECK, "tree-check", *wanted])
        except ServerError:  # a container that just went away: nothing to say
            return ()
        if code != 0:
            return ()
        gone = out.split()
        return tuple(tree_problem(r, plan) for r in wanted if r in gone)

    def _daemon_pid(self, c: Any) -> int:
        """The daemon's PID on the host (docker top reports host PIDs)."""
        pids = self.engine.top_pids(c, DAEMON)
        return pids[0] if pids else 0

    def notices(self) -> list[str]:
        """EXTRA_NOTICES (the advertiser, the endpoint), then certificates close to expiry
        (30 days ahead)."""
        lines = self.extra_notices()
        dbs = set()
        for c in self._containers():  # the configurations are enough: no PID or tree checks
            cfg = config_from_json(c.labels[labels.CONFIG])
            dbs.add(cfg.ssl or os.path.join(self.gcfg.state_dir, "home", cfg.user, CERT_DIR))
        for db in sorted(dbs):
            cert = os.path.join(db, "stap.cert")
            try:
                left = cert_days_left(cert)
            except (OSError, ValueError):
                continue
            if left < WARN_DAYS:
                lines.append(f"warning: the certificate in {db} expires in {max(left, 0):.0f} "
                             f"days; it is renewed at the next start within {RENEW_DAYS} days "
                             "of expiry, and clients must then trust the new one")
        return lines

    # ------------------------------------------------------------------ start
    def plan_for(self, cfg: ServerConfig) -> BuildPlan:
        strategy = cfg.strategy if cfg.strategy is not Strategy.AUTO else self.gcfg.strategy
        return resolve(strategy, Arch.parse(cfg.arch), Arch.host())

    def start(self, config: ServerConfig) -> RunningServer:
        plan = self.plan_for(config)
        image = images.require(self.engine, self.gcfg, plan.image_arch)
        self._check_trees(config, plan, image)
        if self.home_volume:  # a compose farm: its volumes, its init service's certificate
            uid, gid = self.server_ids
            home, log_file = self.home_volume, self.log_volume or self.home_volume
        else:
            uid, gid = self._server_user(config.user)
            home = self._prepare_home(config.user, uid, gid)
            log_file = self._prepare_log(config.log, uid, gid)
            self.ensure_cert_db(config.ssl or os.path.join(home, CERT_DIR), uid, gid)
        port = config.port or _free_port(self.gcfg.listen_address)
        where = Placement(image=image, kernels_volume=volume_name(self.prefix, plan.image_arch),
                          uid=uid, gid=gid, home_dir=home, log_file=log_file, port=port,
                          hostname=self.hostname, prefix=self.prefix,
                          test_label=self.engine.test_label)
        spec = server_spec(config, plan, where, self.gcfg)
        spec["labels"].update(self.extra_labels)
        self.engine.remove_named(spec["name"])  # a stale twin of the same spec (a crash)
        container = self.engine.run(spec, f"the server on port {port}")
        try:
            self._wait_ready(container, port, READY_TIMEOUT[plan.strategy], log_file)
        except ServerError:
            self.engine.remove_named(spec["name"])
            raise
        container.reload()
        if self.on_started is not None:
            self.on_started()
        return self._observe(container)

    def _check_trees(self, cfg: ServerConfig, plan: BuildPlan, image: str) -> None:
        wanted = [r for r in cfg.releases if not r.startswith("/")]
        for path in (r for r in cfg.releases if r.startswith("/")):
            if not os.path.isfile(os.path.join(path, "include/config/kernel.release")):
                raise KernelTreeError(f"{path} is not a kernel build tree (no "
                                      "include/config/kernel.release)")
        if not wanted:
            return
        store = TreeStore(self.engine, plan.image_arch, image)
        have = {t.release: t for t in store.list()}
        for rel in wanted:
            tree = have.get(rel)
            if tree is None or tree.arch != plan.target.stap:
                raise KernelTreeError(
                    f"no kernel tree for release {rel} ({plan.target}) for the "
                    f"{plan.image_arch.machine} image",
                    hint=f"add it with `{add_tree_command(rel, plan)}`")

    @staticmethod
    def _server_user(user: str) -> tuple[int, int]:
        try:
            pw = pwd.getpwnam(user)
        except KeyError as e:
            raise ServerError(f"server user '{user}' does not exist on this host",
                              hint="create it (make up creates stap-server) or pass -u") from e
        if pw.pw_uid == 0:
            raise ServerError("servers never run as root", hint="use -u with another user")
        return pw.pw_uid, pw.pw_gid

    def _prepare_home(self, user: str, uid: int, gid: int) -> str:
        """The per-user persistent home: certificate database, stap cache, rlimits."""
        home = os.path.join(self.gcfg.state_dir, "home", user)
        os.makedirs(os.path.join(self.gcfg.state_dir, "home"), mode=0o755, exist_ok=True)
        path = home
        for part in ("", ".systemtap", "ssl"):
            path = os.path.join(path, part) if part else home
            os.makedirs(path, mode=0o700, exist_ok=True)
            _own(path, uid, gid)
            os.chmod(path, 0o700)
        return home

    @staticmethod
    def _prepare_log(log: str, uid: int, gid: int) -> str:
        try:
            os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.close(fd)
            if os.stat(log).st_uid != uid:
                _own(log, uid, gid)
        except OSError as e:
            raise ServerError(f"cannot prepare log file {log}: {e.strerror}",
                              hint="choose a writable --log") from e
        return os.path.abspath(log)

    def ensure_cert_db(self, db: str, uid: int, gid: int) -> None:
        """Create (or renew) the certificate database DB before a server uses it, as
        upstream's stap-server does, naming the host as clients will (host, host.local,
        CERT_NAMES); refuse one whose ownership or permissions are unsafe.

        Raises:
            ServerError: unsafe database, or stap-gen-cert failed.
        """
        cert = os.path.join(db, "stap.cert")
        if os.path.exists(cert):
            check_cert_db(db, uid)
            left = cert_days_left(cert)
            if left > RENEW_DAYS:
                return
            # stap-serverd would regenerate an expired certificate itself, with the
            # container's names; renew it here first, keeping the old one beside it.
            os.replace(db, f"{db}.expired-{int(time.time())}")
        host_image = images.require(self.engine, self.gcfg, Arch.host())
        names = [self.hostname, f"{self.hostname}.local", *self.gcfg.cert_names]
        script = ('set -e; umask 077; mkdir -p "$DB"; '
                  'exec /usr/lib/systemtap/stap-gen-cert "$DB" "$@"')
        # stap-gen-cert removes and re-creates DB itself, so it gets DB's parent, which must
        # belong to the server user.
        parent = os.path.dirname(os.path.abspath(db))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)
            _own(parent, uid, gid)
        if os.stat(parent).st_uid != uid:
            raise ServerError(f"cannot create the certificate database {db}: its parent "
                              f"directory is not owned by the server user (uid {uid})",
                              hint=f"create {db} with `stap-gen-cert` as that user, or "
                                   f"chown {uid} {parent}")
        self.engine.job(host_image, names, what=f"creating the certificate database {db}",
                        entrypoint=["/bin/sh", "-c", script, "gen-cert"],
                        user=f"{uid}:{gid}", hostname=self.hostname,
                        environment={"HOME": HOME, "DB": f"/parent/{os.path.basename(db)}"},
                        volumes={parent: {"bind": "/parent", "mode": "rw"}},
                        working_dir="/parent", network_mode="none")
        # stap-gen-cert (>= 5.1, PR30321) creates the directory 0777 and the certificate 0666
        # whatever the umask: the database must be private, the certificate readable.
        os.chmod(db, 0o700)
        for name in os.listdir(db):
            os.chmod(os.path.join(db, name), 0o644 if name == "stap.cert" else 0o600)

    def _wait_ready(self, container: Any, port: int, timeout: float, log_file: str) -> None:
        """Return once the server completes a TLS handshake on its published port."""
        last = tlsprobe.wait_answering(self.gcfg.probe_address, port, timeout,
                                       lambda: still_running(container))
        if not last:
            return
        logs = self.engine.logs(container)
        tail = _tail(log_file, 15)
        raise ServerError(
            f"server did not answer TLS on port {port} ({container.status}; {last})"
            + (f"\n--- container output:\n{logs}" if logs else "")
            + (f"\n--- {log_file} (tail):\n{tail}" if tail else ""))

    # ------------------------------------------------------------------ stop
    def stop(self, server: RunningServer) -> None:
        c = self.engine.container(server.container)
        if c is not None:
            self.engine.remove(c)


# Prints each release ("$@") whose tree is not complete in the kernel volume: its manifest
# (written last by `kernels add`, removed first by `kernels remove`) or its build tree gone.
TREE_CHECK = (f'for r; do [ -f "{KERNELS_MOUNT}/{MANIFESTS}/$r.json" ] && '
              f'[ -e "{KERNELS_MOUNT}/usr/lib/modules/$r/build/Makefile" ] || echo "$r"; done')


def add_tree_command(release: str, plan: BuildPlan) -> str:
    """The command that adds RELEASE's tree to the volume PLAN's image uses."""
    emulated = " --strategy emulated" if plan.strategy is Strategy.EMULATED else ""
    return f"stap-server kernels add -a {plan.target.machine} -r {release}{emulated}"


def tree_problem(release: str, plan: BuildPlan) -> str:
    """What `status` says about a running server whose tree for RELEASE is gone."""
    return f"kernel tree {release} ({plan.target}) missing: {add_tree_command(release, plan)}"


def cert_days_left(cert_path: str) -> float:
    """Days until the certificate at CERT_PATH (DER, stap.cert) expires."""
    with open(cert_path, "rb") as f:
        cert = x509.load_der_x509_certificate(f.read())
    left = cert.not_valid_after_utc.timestamp() - time.time()
    return left / 86400


def check_cert_db(db: str, uid: int) -> None:
    """Refuse a certificate database another user could read or that the server user does
    not own (upstream's NSS would use it regardless).

    Raises:
        ServerError: wrong owner or permissions, with the command that fixes it.
    """
    st = os.stat(db)
    if st.st_uid != uid or st.st_mode & 0o077:
        raise ServerError(
            f"certificate database {db} is owned by uid {st.st_uid} with mode "
            f"{st.st_mode & 0o777:o}; it must be 700 and owned by uid {uid}",
            hint=f"chown -R {uid} {db} && chmod 700 {db} && chmod 600 {db}/*.db")
    for name in ("key4.db", "cert9.db", "key3.db", "cert8.db"):
        path = os.path.join(db, name)
        if os.path.exists(path):
            fst = os.stat(path)
            if fst.st_uid != uid or fst.st_mode & 0o077:
                raise ServerError(
                    f"certificate database file {path} has mode {fst.st_mode & 0o777:o} "
                    f"(owner uid {fst.st_uid}); key material must be 600 and owned by uid "
                    f"{uid}", hint=f"chown {uid} {path} && chmod 600 {path}")


def _own(path: str, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address if address not in ("", "::") else "0.0.0.0", 0))
        return int(s.getsockname()[1])


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return ""


