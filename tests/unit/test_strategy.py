"""Build strategies: which image builds for which target, for every combination."""

from __future__ import annotations

import itertools

import pytest

from farm.core import strategy as strategy_mod
from farm.core.arch import ALL, ARM64, X86_64, Arch
from farm.core.spec import Strategy
from farm.core.strategy import resolve

N, C, E = Strategy.NATIVE, Strategy.CROSS, Strategy.EMULATED

# (asked, target, host) -> (strategy, image arch)
EXPECTED = {
    (Strategy.AUTO, X86_64, X86_64): (N, X86_64),
    (Strategy.AUTO, ARM64, ARM64): (N, ARM64),
    (Strategy.AUTO, ARM64, X86_64): (C, X86_64),
    (Strategy.AUTO, X86_64, ARM64): (C, ARM64),
    (N, X86_64, X86_64): (N, X86_64),
    (N, ARM64, ARM64): (N, ARM64),
    (N, ARM64, X86_64): (E, ARM64),  # "native" for a foreign target: its own image, emulated
    (N, X86_64, ARM64): (E, X86_64),
    (C, X86_64, X86_64): (N, X86_64),  # cross to oneself is native
    (C, ARM64, ARM64): (N, ARM64),
    (C, ARM64, X86_64): (C, X86_64),
    (C, X86_64, ARM64): (C, ARM64),
    (E, X86_64, X86_64): (N, X86_64),  # nothing to emulate
    (E, ARM64, ARM64): (N, ARM64),
    (E, ARM64, X86_64): (E, ARM64),
    (E, X86_64, ARM64): (E, X86_64),
}


def test_table_covers_every_combination() -> None:
    assert set(EXPECTED) == set(itertools.product(Strategy, ALL, ALL))


@pytest.mark.parametrize("asked, target, host", sorted(
    EXPECTED, key=lambda k: (k[0].value, k[1].stap, k[2].stap)),
    ids=lambda v: v.value if isinstance(v, Strategy) else str(v))
def test_resolve(asked: Strategy, target: Arch, host: Arch) -> None:
    plan = resolve(asked, target, host)
    want_strategy, want_image = EXPECTED[(asked, target, host)]
    assert plan.strategy is want_strategy
    assert plan.image_arch is want_image
    assert plan.target is target
    if plan.strategy is C:
        assert plan.image_arch == host != target
        assert plan.cross_compile == target.cross_compile
    else:
        assert plan.image_arch == target
        assert plan.cross_compile == ""


def test_auto_without_a_cross_toolchain_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(strategy_mod.CROSS_TARGETS, "x86_64", frozenset())
    plan = resolve(Strategy.AUTO, ARM64, X86_64)
    assert (plan.strategy, plan.image_arch) == (E, ARM64)
    assert plan.cross_compile == ""


def test_cross_prefixes() -> None:
    assert resolve(C, ARM64, X86_64).cross_compile == "aarch64-linux-gnu-"
    assert resolve(C, X86_64, ARM64).cross_compile == "x86_64-linux-gnu-"


def test_every_image_carries_a_cross_compiler_for_the_other_arch() -> None:
    for image_arch in ALL:
        others = {a.stap for a in ALL if a != image_arch}
        assert strategy_mod.CROSS_TARGETS[image_arch.stap] == others
