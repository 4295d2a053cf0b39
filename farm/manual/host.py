"""The machine and its users, as the defaults and the `-u` check see them (injectable)."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field
from typing import Protocol

from farm.core.arch import Arch
from farm.manual.config_lines import shown

SERVER_GROUP = "stap-server"  # stap-server(8): servers run as users of this group


@dataclass(frozen=True)
class Account:
    """A user as the host's user database knows it."""

    name: str
    gid: int  # primary group


@dataclass(frozen=True)
class Group:
    """A group as the host's group database knows it."""

    name: str
    gid: int
    members: tuple[str, ...]  # supplementary members


class Accounts(Protocol):
    """The host's users and groups (injectable: unit tests do not read /etc/passwd)."""

    def user(self, name: str) -> Account | None:
        """The user NAME, or None when there is none."""
        ...

    def group(self, name: str) -> Group | None:
        """The group NAME, or None when there is none."""
        ...


class SystemAccounts:
    """`Accounts` from the host's databases (pwd, grp: NSS)."""

    def user(self, name: str) -> Account | None:
        try:
            pw = pwd.getpwnam(name)
        except (KeyError, ValueError):  # ValueError: an embedded NUL
            return None
        return Account(pw.pw_name, pw.pw_gid)

    def group(self, name: str) -> Group | None:
        try:
            gr = grp.getgrnam(name)
        except (KeyError, ValueError):
            return None
        return Group(gr.gr_name, gr.gr_gid, tuple(gr.gr_mem))


def server_user_problem(name: str, accounts: Accounts) -> str | None:
    """Why user NAME cannot run compile servers, or None: stap-server(8) wants an existing
    user in the `stap-server` group (as its primary or a supplementary group)."""
    user = accounts.user(name)
    if user is None:
        return f"-u {shown(name)}: no such user"
    group = accounts.group(SERVER_GROUP)
    if group is None:
        return (f"-u {shown(name)}: there is no '{SERVER_GROUP}' group on this host "
                "(scripts/setup.sh creates it)")
    if user.gid != group.gid and user.name not in group.members:
        return (f"-u {shown(name)}: user '{shown(name)}' is not a member of the "
                f"'{SERVER_GROUP}' group (usermod -a -G {SERVER_GROUP} {shown(name)})")
    return None


@dataclass(frozen=True)
class Host:
    """What the defaults depend on: the machine and the invoking user (injectable in tests)."""

    arch: str  # stap name
    release: str  # uname -r
    euid: int
    user: str  # the invoking user's name
    cwd: str  # "" when the working directory no longer exists
    accounts: Accounts = field(default_factory=SystemAccounts, compare=False, repr=False)

    @classmethod
    def current(cls) -> Host:
        """The real machine and user."""
        euid = os.geteuid()
        try:
            user = pwd.getpwuid(euid).pw_name
        except KeyError:
            user = str(euid)
        try:
            cwd = os.getcwd()
        except OSError:  # run from a deleted directory: only relative paths need it
            cwd = ""
        return cls(arch=Arch.host().stap, release=os.uname().release, euid=euid, user=user,
                   cwd=cwd)
