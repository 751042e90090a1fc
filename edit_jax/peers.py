"""Noticing, in a multi-process run, that another process died or hung, and stopping cleanly.

Three guards, all bounded by `run.barrier_timeout_seconds`:
  barrier     A-EDiT's sync starts with a barrier on the coordination service; a process that
              does not arrive in time is named in the error.
  collectives a collective whose peer is gone fails (gloo: "connection closed by peer"); that
              error becomes the same clear message.
  watchdog    a thread that stops the process when a wait for results makes no progress for
              the timeout (a peer that hangs inside a collective, where nothing fails).
A process that stops this way prints one line, `error: ...`, and exits with status 3 without
running JAX's shutdown barrier (which would wait for the missing process). Checkpoints are only
ever complete or absent (checkpoint.py), so the newest one survives.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Iterator

import jax

from edit_jax.errors import PeerFailure, exit_at_once

# Fragments of the runtime errors a collective or coordination call raises when a peer is gone.
_PEER_LOST = ("Gloo", "Connection closed", "Connection reset", "UNAVAILABLE", "DEADLINE_EXCEEDED",
              "heartbeat", "NCCL")
_FIX = "rerun the same command on every process to resume from the newest checkpoint"


def _client():
    from jax._src import distributed  # the coordination-service client: barriers

    return distributed.global_state.client


def _missing_processes(error_text: str = "") -> str:
    """'process 1' / 'processes 1, 3' as named by a barrier's timeout error, or 'another
    process' (asking the coordination service instead would block until it notices)."""
    named = re.search(r"timed out task names:\s*(.*?)(?:\n\s*\n|$)", error_text, re.S)
    part = named.group(1) if named else ""
    ids = sorted({int(i) for i in re.findall(r"task:(\d+)", part) or re.findall(r"\d+", part)})
    if not ids:
        return "another process"
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def barrier(name: str, timeout_s: float, what: str) -> None:
    """Wait until every process reaches barrier `name` (unique per use), at most `timeout_s`."""
    if jax.process_count() == 1:
        return
    try:
        _client().wait_at_barrier(name, int(timeout_s * 1000))
    except Exception as e:  # the client raises the runtime's own error type
        raise PeerFailure(f"{_missing_processes(str(e))} did not reach {what} within "
                          f"run.barrier_timeout_seconds={timeout_s:g} ({_first_line(e)}); "
                          f"{_FIX}") from None


@contextlib.contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """Turn a collective's failure caused by a lost peer into a PeerFailure."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1 or not any(f in str(e) for f in _PEER_LOST):
            raise
        raise PeerFailure(f"lost {_missing_processes()} during {what} ({_first_line(e)}); "
                          f"{_FIX}") from None


class Watchdog:
    """Stops this process when a guarded wait lasts longer than `timeout_s` (multi-process).

    Guard the waits for device results and peers (`with watchdog.guard("step 7"):`), not
    compilation (a run compiles its steps before its loop, `Program.precompile`): a hung
    collective shows up as a wait that never ends. Use the watchdog itself as a context manager
    to run its thread.
    """

    def __init__(self, timeout_s: float, enabled: bool | None = None):
        self.timeout_s = timeout_s
        self.enabled = jax.process_count() > 1 if enabled is None else enabled
        self._deadline: float | None = None
        self._what = ""
        self._done = threading.Event()

    def __enter__(self) -> Watchdog:
        if self.enabled:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 10)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                exit_at_once(PeerFailure(
                    f"no progress for run.barrier_timeout_seconds={self.timeout_s:g} during "
                    f"{self._what}: {_missing_processes()} is not taking part; {_FIX}"))


def _first_line(e: Exception) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."
