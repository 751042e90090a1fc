"""The slow-link harness: two network namespaces joined by a shaped veth pair really carry the
rate they claim (a timed transfer), and every failure is a one-line error."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from edit_jax import slow_link
from edit_jax.errors import UserError

RATE_MBIT = 20.0
PAYLOAD = 5_000_000  # 2.0 s at 20 Mbit/s

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
    reason="network namespaces need root and iproute2 (CI and developers have both)")

RECEIVER = textwrap.dedent("""
    import socket, sys
    server = socket.create_server((sys.argv[1], 5599))
    print("ready", flush=True)
    conn, _ = server.accept()
    got = 0
    while got < int(sys.argv[2]):
        got += len(conn.recv(1 << 20))
    conn.sendall(b"k")
""")
SENDER = textwrap.dedent("""
    import socket, sys, time
    conn = socket.create_connection((sys.argv[1], 5599))
    start = time.perf_counter()
    conn.sendall(b"x" * int(sys.argv[2]))
    conn.recv(1)
    print(time.perf_counter() - start)
""")


@needs_root
def test_link_carries_the_rate_it_claims_and_is_removed():
    with slow_link.SlowLink(RATE_MBIT) as link:
        receiver = subprocess.Popen(
            link.command(1, [sys.executable, "-c", RECEIVER, link.address(1), str(PAYLOAD)]),
            stdout=subprocess.PIPE, text=True)
        assert receiver.stdout.readline().strip() == "ready"
        sent = subprocess.run(
            link.command(0, [sys.executable, "-c", SENDER, link.address(1), str(PAYLOAD)]),
            capture_output=True, text=True, timeout=60, check=True)
        assert receiver.wait(timeout=60) == 0
        seconds = float(sent.stdout)
        assert link.sent_bytes(0) >= PAYLOAD  # the bytes went over the veth, not loopback
        namespaces = link.namespaces
    goodput_mbit = PAYLOAD * 8 / seconds / 1e6
    # TCP/IP headers take about 4% of a full-size packet's bytes on the shaped link.
    assert 0.85 * RATE_MBIT < goodput_mbit < 1.02 * RATE_MBIT, goodput_mbit
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)
    assert not any((slow_link.NETNS_ETC / ns).exists() for ns in namespaces)


def test_bad_link_settings_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match="--link-mbit must be positive, got 0"):
        slow_link.SlowLink(0)
    monkeypatch.setattr(slow_link.os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="needs root"):
        slow_link.check_available()


def test_only_two_processes_share_a_link(capsys):
    from edit_jax.cli import main

    assert main(["launch", "--processes", "4", "--link-mbit", "10"]) == 2
    assert "--link-mbit joins exactly 2 processes" in capsys.readouterr().err
