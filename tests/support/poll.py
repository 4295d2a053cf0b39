"""Waiting with a deadline: the one way tests wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def poll(what: str, check: Callable[[], Any], timeout: float, step: float = 0.2) -> Any:
    """CHECK's first truthy result, or fail the test (naming WHAT) after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(step)
