"""ENDPOINT_POLICY (farm/endpoint/policy.py): what the endpoint refuses from the network."""

from __future__ import annotations

import pytest

from farm.endpoint.policy import ALLOW_ABSOLUTE, ALLOW_GURU, Policy
from farm.manual.config import ENDPOINT_POLICY_WORDS

STRICT = Policy()

# What the real stap 5.1 client sends (stap-protocol.md §3.3): every one must pass.
CLIENT_ARGV = [
    ["-p4", "-ehello"],
    ["script/tmp/work/hello.stp", "-I", "tapset/tmp/work/tapdir", "-v", "-p4",
     "-DMAXACTION=1000", "--", "world", "/etc/passwd"],
    ["-p4", "-mhello", "--privilege=stapusr", "-e// a comment\nprobe begin { exit() }"],
    ["-p4", "-c/bin/ls", "-o/tmp/out.txt", "-x1234", "-e probe begin {}"],
    ["-p4", "-r6.12.9+tst13-amd64", "-aarm64", "-e probe begin {}"],
]


@pytest.mark.parametrize("argv", CLIENT_ARGV)
def test_what_a_real_client_sends_passes(argv: list[str]) -> None:
    assert STRICT.refusal(argv) == ""


@pytest.mark.parametrize("argv,word", [
    (["-p4", "-g", "-e probe begin {}"], "guru mode"),
    (["--guru-mode", "-p4"], "guru mode"),
    (["-vg", "-p4"], "guru mode"),
    (["-p4", "-I/etc", "-e x"], "'-I/etc'"),
    (["-p4", "-I", "/home/stap-server/.systemtap", "-e x"], "-I /home/stap-server"),
    (["/home/stap-server/.systemtap/ssl/server/key4.db", "-p4"], "key4.db"),
    (["-p4", "-R/usr/share/systemtap/runtime"], "-R/usr"),
    (["-p4", "--tmpdir=/home/stap-server"], "--tmpdir"),
    (["-p4", "--sysroot", "/"], "--sysroot /"),
    (["-p4", "-r/lib/modules/x/build"], "-r/lib"),
])
def test_guru_mode_and_server_paths_are_refused_by_default(argv: list[str], word: str) -> None:
    refusal = STRICT.refusal(argv)
    assert word in refusal and "ENDPOINT_POLICY" in refusal


def test_script_arguments_after_the_separator_are_not_options() -> None:
    assert STRICT.refusal(["-p4", "-e x", "--", "-g", "/etc/shadow", "-I/etc"]) == ""


def test_an_e_script_with_g_in_it_is_not_guru_mode() -> None:
    assert STRICT.refusal(["-eprobe begin { log(\"-g\") }", "-p4"]) == ""
    assert STRICT.refusal(["-veg"]) == ""  # -e takes "g" as its script


def test_the_operator_can_allow_each() -> None:
    guru = Policy.parse([ALLOW_GURU])
    assert guru.refusal(["-g", "-p4"]) == ""
    assert guru.refusal(["-I/etc"]) != ""
    paths = Policy.parse([ALLOW_ABSOLUTE])
    assert paths.refusal(["-I/etc"]) == ""
    assert paths.refusal(["-g"]) != ""
    both = Policy.parse(ENDPOINT_POLICY_WORDS)
    assert both.refusal(["-g", "-I/etc", "/x.stp"]) == ""
