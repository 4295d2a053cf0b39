"""mDNS records as upstream stap-serverd publishes them, byte for byte (stap-protocol.md §4)."""

from __future__ import annotations

import pytest

from farm.core.errors import ConfigError
from farm.discovery import mdns
from farm.discovery.mdns import ObservedServer, Service

CROSS = ObservedServer(server_id="farm-aarch64-1", host="farmhost", port=40001, arch="arm64",
                       releases=("6.12.48+tst13-arm64",),
                       optinfo="-BCROSS_COMPILE=aarch64-linux-gnu-", version="5.6",
                       certinfo="00:cc:23:fd:50")
NATIVE = ObservedServer(server_id="farm-x86_64-1", host="farmhost", port=40000, arch="x86_64",
                        releases=("6.12.48+tst13-amd64", "6.12.41+tst13-amd64"), optinfo="",
                        version="5.6", certinfo="00:cc:23:fd:50")


def test_txt_strings_in_upstream_order_byte_for_byte() -> None:
    [svc] = mdns.services([CROSS])
    assert svc.strings == (b"sysinfo=6.12.48+tst13-arm64 arm64",
                           b"optinfo=-BCROSS_COMPILE=aarch64-linux-gnu-",
                           b"version=5.6",
                           b"certinfo=00:cc:23:fd:50")
    assert svc.txt == (b"\x21sysinfo=6.12.48+tst13-arm64 arm64"
                       b"\x2aoptinfo=-BCROSS_COMPILE=aarch64-linux-gnu-"
                       b"\x0bversion=5.6"
                       b"\x17certinfo=00:cc:23:fd:50")
    assert svc.port == 40001 and svc.key == ("farm-aarch64-1", "6.12.48+tst13-arm64")


def test_empty_optinfo_and_mok_info_strings_last() -> None:
    strings = mdns.txt_strings("6.1.0-1-amd64", "x86_64", "", "5.6", "01:02:03:04:05",
                               ["aa:bb", "cc:dd"])
    assert strings == (b"sysinfo=6.1.0-1-amd64 x86_64", b"optinfo=", b"version=5.6",
                       b"certinfo=01:02:03:04:05", b"mok_info=aa:bb", b"mok_info=cc:dd")
    assert Service(key=("s", "r"), host="h", port=1, strings=strings).txt.startswith(
        b"\x1csysinfo=6.1.0-1-amd64 x86_64\x08optinfo=\x0bversion=5.6")


def test_optinfo_from_the_daemons_command_line_in_upstream_order() -> None:
    argv = ["-a", "arm64", "-r", "6.12.48+tst13-arm64", "-B", "V=1", "-B",
            "CROSS_COMPILE=aarch64-linux-gnu-", "-I", "/opt/tap", "-D", "FOO=1", "-R", "/x",
            "--log=/var/log/stapfarm/server.log", "--port", "40001", "--max-threads", "4"]
    args = mdns.parse_daemon_args(argv)
    assert args.arch == "arm64"
    assert args.releases == ("6.12.48+tst13-arm64",)
    assert args.optinfo == "-R/x -BV=1 -BCROSS_COMPILE=aarch64-linux-gnu- -DFOO=1 -I/opt/tap"
    assert mdns.parse_daemon_args(["-ax86_64", "-r/srv/tree", "-DX"]).optinfo == "-DX"
    assert mdns.parse_daemon_args(["-a", "x86_64", "--port", "5000"]).optinfo == ""


def test_stap_version_from_stap_dash_v() -> None:
    text = ("Systemtap translator/driver (version 5.6/0.194, Debian version 5.6-1)\n"
            "Copyright (C) 2005-2025 Red Hat, Inc. and others\n")
    assert mdns.parse_stap_version(text) == "5.6"
    with pytest.raises(ValueError):
        mdns.parse_stap_version("stap: command not found")


def test_one_service_per_server_and_release_named_as_avahi_would() -> None:
    named = mdns.assign_names(mdns.services([CROSS, NATIVE]))
    assert [(s.name, s.port, s.strings[0]) for s in named] == [
        ("Systemtap Compile Server on farmhost", 40000, b"sysinfo=6.12.48+tst13-amd64 x86_64"),
        ("Systemtap Compile Server on farmhost #2", 40000,
         b"sysinfo=6.12.41+tst13-amd64 x86_64"),
        ("Systemtap Compile Server on farmhost #3", 40001, b"sysinfo=6.12.48+tst13-arm64 arm64"),
    ]
    assert named[0].fullname == "Systemtap Compile Server on farmhost._stap._tcp.local."
    # the same servers observed in another order give the same names
    assert mdns.assign_names(mdns.services([NATIVE, CROSS])) == named


def test_names_stay_put_when_another_server_goes() -> None:
    first = mdns.assign_names(mdns.services([CROSS, NATIVE]))
    previous = {s.key: s.name for s in first}
    after = mdns.assign_names(mdns.services([CROSS]), previous)
    assert [s.name for s in after] == ["Systemtap Compile Server on farmhost #3"]
    # a new server takes the lowest free number
    again = mdns.assign_names(mdns.services([CROSS, NATIVE]),
                              {s.key: s.name for s in after})
    assert [s.name for s in again] == ["Systemtap Compile Server on farmhost",
                                       "Systemtap Compile Server on farmhost #2",
                                       "Systemtap Compile Server on farmhost #3"]


def test_collision_with_another_hosts_name_takes_the_next_number() -> None:
    taken = ["systemtap compile server on FARMHOST", "Systemtap Compile Server on farmhost #3"]
    named = mdns.assign_names(mdns.services([CROSS, NATIVE]), taken=taken)
    assert [s.name for s in named] == ["Systemtap Compile Server on farmhost #2",
                                       "Systemtap Compile Server on farmhost #4",
                                       "Systemtap Compile Server on farmhost #5"]


def test_long_host_names_are_cut_to_one_dns_label() -> None:
    host = "h" * 80
    assert mdns.instance_name(host) == ("Systemtap Compile Server on " + host)[:63]
    second = mdns.instance_name(host, 2)
    assert len(second.encode()) == 63 and second.endswith("h #2")
    assert mdns.instance_name("é" * 40).encode("utf-8").decode("utf-8")  # no split character


def test_diff_adds_removes_updates_and_renames() -> None:
    old = mdns.assign_names(mdns.services([CROSS, NATIVE]))
    changed = ObservedServer(**{**CROSS.__dict__, "certinfo": "00:11:22:33:44"})
    new = mdns.assign_names(mdns.services([changed]), {s.key: s.name for s in old})
    changes = mdns.diff(old, new)
    assert [s.name for s in changes.remove] == ["Systemtap Compile Server on farmhost",
                                               "Systemtap Compile Server on farmhost #2"]
    assert changes.add == ()
    assert [s.strings[3] for s in changes.update] == [b"certinfo=00:11:22:33:44"]
    assert not mdns.diff(new, new)
    renamed = [Service(key=s.key, host=s.host, port=s.port, strings=s.strings, name="other")
               for s in new]
    changes = mdns.diff(new, renamed)
    assert changes.remove == tuple(new) and changes.add == tuple(renamed)


IFACES = {"lo": ["127.0.0.1"], "eth0": ["192.0.2.2"], "br-test": ["172.23.0.1"],
          "wlan0": ["169.254.3.3", "10.0.0.5"], "tun0": []}


def test_interfaces_by_name_or_address() -> None:
    assert mdns.choose_addresses(["172.23.0.1"], IFACES) == ["172.23.0.1"]
    assert mdns.choose_addresses(["eth0", "br-test", "192.0.2.2"], IFACES) == [
        "192.0.2.2", "172.23.0.1"]


def test_default_is_every_lan_interface_but_loopback() -> None:
    assert mdns.choose_addresses([], IFACES) == ["192.0.2.2", "172.23.0.1", "10.0.0.5"]
    with pytest.raises(ConfigError):
        mdns.choose_addresses([], {"lo": ["127.0.0.1"]})


def test_unknown_interfaces_are_reported_together() -> None:
    with pytest.raises(ConfigError) as e:
        mdns.choose_addresses(["eth9", "10.9.9.9", "tun0", "::1"], IFACES)
    assert len(e.value.problems) == 4
    assert "no interface 'eth9'" in e.value.problems[0]
    assert "eth0" in e.value.problems[0]  # the message lists what exists


def test_none_disables_advertising() -> None:
    assert mdns.disabled(["none"]) and mdns.disabled(["NONE"])
    assert not mdns.disabled([]) and not mdns.disabled(["eth0"])
