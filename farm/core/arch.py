"""Architecture names, normalised once: users' spellings to stap, Debian, Docker and GNU names."""

from __future__ import annotations

import difflib
import platform
from dataclasses import dataclass

from farm.core.errors import ArchError


@dataclass(frozen=True)
class Arch:
    """One target architecture under every name the farm's tools use for it."""

    stap: str  # stap's normalize_machine(): what `-a` means and what mDNS sysinfo carries
    debian: str  # dpkg architecture, also the kernel flavour suffix of Debian releases
    machine: str  # uname -m
    gnu: str  # GNU triplet, the CROSS_COMPILE prefix without its trailing dash
    elf_machine: int  # ELF e_machine of modules built for it

    @property
    def docker_platform(self) -> str:
        return f"linux/{self.debian}"

    @property
    def cross_compile(self) -> str:
        return f"{self.gnu}-"

    @classmethod
    def parse(cls, name: str) -> Arch:
        """Return the architecture a user means by NAME (`aarch64`, `arm64`, `amd64`, ...).

        Raises:
            ArchError: NAME is no architecture the farm supports.
        """
        key = name.strip().lower()
        key = key.removeprefix("linux/")
        arch = _ALIASES.get(key)
        if arch is None:
            close = difflib.get_close_matches(key, sorted(_ALIASES), n=1, cutoff=0.75)
            hint = f"did you mean '{close[0]}'?" if close else None
            supported = ", ".join(sorted({a.stap for a in _ALIASES.values()}))
            raise ArchError(
                f"unknown architecture '{name}' (supported: {supported})", hint=hint
            )
        return arch

    @classmethod
    def host(cls) -> Arch:
        """The architecture of the machine running this process."""
        return cls.parse(platform.machine())

    def __str__(self) -> str:
        return self.stap


X86_64 = Arch(stap="x86_64", debian="amd64", machine="x86_64", gnu="x86_64-linux-gnu",
              elf_machine=62)
ARM64 = Arch(stap="arm64", debian="arm64", machine="aarch64", gnu="aarch64-linux-gnu",
             elf_machine=183)

ALL = (X86_64, ARM64)

_ALIASES: dict[str, Arch] = {
    "x86_64": X86_64,
    "amd64": X86_64,
    "x86-64": X86_64,
    "x64": X86_64,
    "arm64": ARM64,
    "aarch64": ARM64,
    "armv8": ARM64,
}
