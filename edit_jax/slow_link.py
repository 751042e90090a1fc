"""A real slow link between two local processes (`edit-jax launch --link-mbit RATE`).

Each process runs in its own network namespace; the two are joined by a veth pair whose egress
on both ends is shaped by a token bucket (`tc qdisc ... tbf`), so every byte the processes
exchange, JAX's coordination traffic and gloo's collectives alike, crosses a link of that rate
in each direction. gloo listens on the address the host name resolves to, and `ip netns exec`
reads `/etc/netns/<namespace>/hosts` as `/etc/hosts`: there the host name resolves to the
namespace's veth address. Needs Linux, root, and iproute2's `ip` and `tc`.

Only the rate is shaped: added delay needs the netem qdisc (`sch_netem`), which not every kernel
has (this project's CI machines lack it), so the link has the veth's own sub-millisecond latency.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from edit_jax.errors import UserError

NETNS_ETC = Path("/etc/netns")


def check_available() -> None:
    """Raise UserError unless namespaces and traffic shaping can be set up here."""
    if not os.uname().sysname == "Linux":
        raise UserError("a slow link needs Linux network namespaces; run without --link-mbit")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"a slow link needs iproute2 ({' and '.join(missing)} not found); "
                        "install iproute2 or run without --link-mbit")
    if os.geteuid() != 0:
        raise UserError("a slow link needs root (it creates network namespaces); run as root "
                        "or without --link-mbit")


def _run(*command: str) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"`{' '.join(command)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


class SlowLink:
    """Context manager: two namespaces joined by a veth pair shaped to `rate_mbit` Mbit/s each
    way. `command(i, argv)` runs argv in namespace i, reachable at `address(i)`; everything is
    removed on exit."""

    def __init__(self, rate_mbit: float):
        if not rate_mbit > 0:
            raise UserError(f"--link-mbit must be positive, got {rate_mbit}")
        self.rate_mbit = rate_mbit
        tag = os.getpid() % 100000
        self.namespaces = [f"edit-jax-{tag}-{i}" for i in range(2)]
        self.devices = [f"ej{tag}v{i}" for i in range(2)]
        self.addresses = [f"10.213.{tag % 250}.{i + 1}" for i in range(2)]

    def __enter__(self) -> SlowLink:
        check_available()
        try:
            self._create()
        except BaseException:
            self._remove()
            raise
        return self

    def _create(self) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(65536, int(rate_bytes / 100))  # at least 10 ms of traffic per token bucket
        for ns in self.namespaces:
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", self.devices[0], "type", "veth", "peer", "name",
             self.devices[1])
        for ns, dev, addr in zip(self.namespaces, self.devices, self.addresses):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                 "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "100ms")
            hosts = NETNS_ETC / ns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(f"127.0.0.1 localhost\n{addr} {socket.gethostname()}\n")

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)

    def address(self, i: int) -> str:
        return self.addresses[i]

    def command(self, i: int, argv: list[str]) -> list[str]:
        """argv run inside namespace i (`ip netns exec` execs it: same process, same signals)."""
        return ["ip", "netns", "exec", self.namespaces[i], *argv]

    def sent_bytes(self, i: int) -> int:
        """Bytes namespace i has sent over the link so far (the veth's tx counter)."""
        stats = json.loads(_run("ip", "-n", self.namespaces[i], "-s", "-j", "link", "show",
                                "dev", self.devices[i]))
        return int(stats[0]["stats64"]["tx"]["bytes"])
