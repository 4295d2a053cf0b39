"""Architecture names: every spelling users write, normalised once to one Arch."""

from __future__ import annotations

import pytest

from farm.core import arch as arch_mod
from farm.core.arch import ALL, ARM64, X86_64, Arch
from farm.core.errors import ArchError, FarmError


@pytest.mark.parametrize("name, expected", [
    ("x86_64", X86_64), ("amd64", X86_64), ("x86-64", X86_64), ("x64", X86_64),
    ("linux/amd64", X86_64), ("X86_64", X86_64), (" amd64\n", X86_64),
    ("aarch64", ARM64), ("arm64", ARM64), ("armv8", ARM64), ("linux/arm64", ARM64),
    ("AArch64", ARM64), ("Linux/ARM64", ARM64), ("  arm64 ", ARM64),
])
def test_users_spellings_normalise_to_one_arch(name: str, expected: Arch) -> None:
    assert Arch.parse(name) is expected


@pytest.mark.parametrize("arch, stap, debian, machine, platform, cross, elf", [
    (X86_64, "x86_64", "amd64", "x86_64", "linux/amd64", "x86_64-linux-gnu-", 62),
    (ARM64, "arm64", "arm64", "aarch64", "linux/arm64", "aarch64-linux-gnu-", 183),
])
def test_every_name_of_an_arch(arch: Arch, stap: str, debian: str, machine: str,
                               platform: str, cross: str, elf: int) -> None:
    assert (arch.stap, arch.debian, arch.machine) == (stap, debian, machine)
    assert arch.docker_platform == platform
    assert arch.cross_compile == cross
    assert arch.elf_machine == elf
    assert str(arch) == stap
    # every name of an arch parses back to it
    for name in (stap, debian, machine, platform, arch.gnu.split("-")[0]):
        assert Arch.parse(name) is arch


def test_all_lists_each_arch_once() -> None:
    assert ALL == (X86_64, ARM64)
    assert len({a.stap for a in ALL}) == len(ALL)


@pytest.mark.parametrize("typo, suggestion", [
    ("aarch46", "aarch64"), ("amd46", "amd64"), ("arm46", "arm64"), ("x86_46", "x86_64"),
])
def test_unknown_arch_suggests_the_closest_name(typo: str, suggestion: str) -> None:
    with pytest.raises(ArchError) as info:
        Arch.parse(typo)
    err = info.value
    assert isinstance(err, FarmError)
    assert f"unknown architecture '{typo}'" in err.message
    assert "arm64" in err.message and "x86_64" in err.message  # what is supported
    assert err.hint == f"did you mean '{suggestion}'?"
    assert "\n" not in str(err)


@pytest.mark.parametrize("name", ["sparc", "ppc64el", "riscv64", "", "linux/"])
def test_unknown_arch_without_a_close_name_has_no_hint(name: str) -> None:
    with pytest.raises(ArchError) as info:
        Arch.parse(name)
    assert info.value.hint is None
    assert "supported: arm64, x86_64" in str(info.value)


@pytest.mark.parametrize("machine, expected", [("x86_64", X86_64), ("aarch64", ARM64),
                                               ("arm64", ARM64)])
def test_host_arch_from_uname(monkeypatch: pytest.MonkeyPatch, machine: str,
                              expected: Arch) -> None:
    monkeypatch.setattr(arch_mod.platform, "machine", lambda: machine)
    assert Arch.host() is expected


def test_arch_is_a_value() -> None:
    assert Arch.parse("aarch64") == Arch.parse("arm64")
    assert hash(Arch.parse("amd64")) == hash(X86_64)
    with pytest.raises(AttributeError):
        X86_64.stap = "i386"  # type: ignore[misc]
