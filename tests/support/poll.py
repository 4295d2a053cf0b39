"""Waiting with a deadline: the one way tests and their support code wait for something.

    poll("server back", check, 120)     # CHECK's first truthy result, or the test fails
    wait_until(check, 60)               # the same, returning the last falsy result instead
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, step: float = 0.2) -> T:
    """CHECK's first truthy result within TIMEOUT seconds, else its last (falsy) result."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


def poll(what: str, check: Callable[[], T], timeout: float, step: float = 0.2) -> T:
    """CHECK's first truthy result, or fail the test (naming WHAT) after TIMEOUT seconds."""
    got = wait_until(check, timeout, step)
    if not got:
        pytest.fail(f"{what}: not reached within {timeout:.0f} s", pytrace=False)
    return got
