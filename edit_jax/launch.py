"""`edit-jax launch`: N local `edit-jax train` processes joined by `jax.distributed`.

For running and testing multi-process training on one machine: each process gets D fake CPU
devices, so a mesh with `replica` = N puts one replica in each process, as on a cluster with one
replica per host. A cluster runs `edit-jax train` once per host instead. The launcher relays the
processes' output line by line with a `[p<i>] ` prefix, stops the others as soon as one fails
(nothing is left running or hanging), and passes Ctrl-C / SIGTERM on to all of them. With
`--link-mbit`, two processes talk only over a rate-limited link (slow_link.py).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import BinaryIO, Sequence

import portpicker

from edit_jax.config import MeshConfig
from edit_jax.errors import UserError
from edit_jax.mesh import resolve_mesh_shape
from edit_jax.slow_link import SlowLink

GRACE_S = 5.0  # how long a process may take to exit after SIGTERM before it is killed
POLL_S = 0.1
LINK_PORT = 12321  # process 0's coordinator port inside its own, empty, network namespace
_LINE_START = re.compile(rb"(?:^|(?<=[\r\n]))(?=[^\r\n])")  # where a non-empty line begins
_PR_SET_PDEATHSIG = 1  # prctl option (Linux): a signal the kernel sends when the parent dies
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def devices_per_process(mesh_cfg: MeshConfig, processes: int, requested: int | None) -> int:
    """D: `requested`, or mesh.num_cpu_devices / N; the mesh must fit N * D devices."""
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}")
    if requested is None:
        if mesh_cfg.num_cpu_devices % processes:
            raise UserError(f"--processes {processes} does not divide mesh.num_cpu_devices="
                            f"{mesh_cfg.num_cpu_devices}; use a divisor or set "
                            "--devices-per-process")
        requested = mesh_cfg.num_cpu_devices // processes
    if requested < 1:
        raise UserError(f"--devices-per-process must be at least 1, got {requested}")
    resolve_mesh_shape(mesh_cfg, processes * requested)  # a one-line error before any start
    return requested


def train_commands(train_args: Sequence[str], processes: int, devices: int,
                   coordinator: str) -> list[list[str]]:
    """The `edit-jax train` command line of each process; process 0 serves at `coordinator`
    (HOST:PORT)."""
    return [[sys.executable, "-m", "edit_jax.cli", "train",
             "--coordinator-address", coordinator, "--num-processes", str(processes),
             "--process-id", str(i), *train_args, f"mesh.num_cpu_devices={devices}"]
            for i in range(processes)]


def launch(train_args: Sequence[str], processes: int, devices: int,
           link_mbit: float | None = None) -> int:
    """Run the N processes to the end; returns the exit status (130 after Ctrl-C).

    With `link_mbit`, the two processes run in network namespaces joined by a link of that
    many Mbit/s each way (slow_link.py), so all their traffic crosses it.
    """
    if link_mbit is None:
        port = portpicker.pick_unused_port()
        return run_processes(train_commands(train_args, processes, devices, f"localhost:{port}"))
    if processes != 2:
        raise UserError(f"--link-mbit joins exactly 2 processes, got --processes {processes}")
    with SlowLink(link_mbit) as link:
        commands = train_commands(train_args, processes, devices,
                                  f"{link.address(0)}:{LINK_PORT}")
        return run_processes([link.command(i, c) for i, c in enumerate(commands)])


def run_processes(commands: Sequence[Sequence[str]]) -> int:
    """Start the commands, relay their output, wait for all; the first failure stops the rest.

    Returns 0, the first non-zero exit status (128 + n for a process killed by signal n), or
    130 if this process got SIGINT or SIGTERM, which it passes on to every process (the third
    time, it kills them instead).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    # Each process in its own session, so a terminal's Ctrl-C reaches it once, from here.
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                              start_new_session=True,
                              preexec_fn=_die_with_launcher if _LIBC else None)
             for command in commands]
    for i, proc in enumerate(procs):
        _write(sys.stderr.buffer, f"[launch] process {i} of {len(procs)}: pid {proc.pid}\n".encode())
    relays = [threading.Thread(target=_relay, args=(pipe, sink, f"[p{i}] ".encode()), daemon=True)
              for i, proc in enumerate(procs)
              for pipe, sink in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer))]
    for relay in relays:
        relay.start()
    interrupts = 0

    def forward(signum, frame):
        nonlocal interrupts
        interrupts += 1
        _signal_running(procs, signal.SIGKILL if interrupts > 2 else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed, status = _wait_for_all(procs)
        if failed is not None and not interrupts:
            _write(sys.stderr.buffer, f"[launch] process {failed} exited with status {status}; "
                                      "stopping the others\n".encode())
    finally:
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for relay in relays:
            relay.join(timeout=GRACE_S)
    return 130 if interrupts else status


def _wait_for_all(procs: Sequence[subprocess.Popen]) -> tuple[int | None, int]:
    """(None, 0) once every process has exited with 0; (index, status) of the first that
    fails, as soon as it does."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            return failed, 128 - codes[failed] if codes[failed] < 0 else codes[failed]
        if all(code == 0 for code in codes):
            return None, 0
        time.sleep(POLL_S)


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to the processes still running, SIGKILL to those still running GRACE_S later."""
    _signal_running(procs, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    _signal_running(procs, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def _signal_running(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)


_LOCK = threading.Lock()


def _write(sink: BinaryIO, data: bytes) -> None:
    with _LOCK:  # whole lines from different processes never interleave
        sink.write(data)
        sink.flush()


def _relay(pipe: BinaryIO, sink: BinaryIO, prefix: bytes) -> None:
    """Copy `pipe` to `sink`, `prefix` at the start of every line (after '\\n' or '\\r', so a
    progress bar redrawn with '\\r' keeps it), whole lines at a time, until end of file."""
    pending = b""
    for chunk in iter(lambda: pipe.read1(65536), b""):
        pending += chunk
        end = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
        if end:
            lines, pending = pending[:end], pending[end:]
            _write(sink, _LINE_START.sub(prefix, lines))
    if pending:
        _write(sink, prefix + pending + b"\n")


def _die_with_launcher() -> None:
    """In the child before exec (Linux): the kernel kills it if the launcher dies, even by
    SIGKILL, so no process is ever orphaned."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
