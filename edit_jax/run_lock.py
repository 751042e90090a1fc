"""One trainer per run directory: an advisory lock on `<run_dir>/train.lock`, held for the run.

Two trainers writing one run directory would remove each other's partial checkpoints and
duplicate metrics rows, so `edit-jax train` takes this lock before it touches anything there
and a second trainer stops with a one-line error naming the holder's host and pid (written in
the file). The lock is `fcntl.flock` on the open file: the operating system releases it when
the holder exits, however it dies (`kill -9` included), so a lock is never stale and nothing is
guessed from pids. The file itself stays (removing it would race with the next trainer). On
network file systems flock works where the mount supports it (NFS: Linux emulates it with POSIX
locks; Lustre: mount with `-o flock`).

A multi-process run takes it once, in process 0, which tells the others the outcome, so that
all of them stop together rather than wait for each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from edit_jax.errors import UserError

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Create `run_dir` if needed and hold its lock until the block ends (every process of a
    run enters; process 0 holds the lock)."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = _lock(run_dir)
        except UserError as e:
            refused = e
    if jax.process_count() > 1:  # even when refused: the others wait for the outcome
        held = bool(multihost_utils.broadcast_one_to_all(np.int32(lock is not None)))
        if not held and refused is None:
            refused = UserError(f"process 0 could not lock run directory {run_dir} (see its "
                                "error); set run.run_dir to a directory no other trainer uses")
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def _lock(run_dir: Path) -> int:
    """The open lock file of `run_dir`, locked, with this process's host and pid in it."""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = "it is a file" if run_dir.is_file() else e.strerror
        raise UserError(f"cannot use {run_dir} as run.run_dir ({problem}); set run.run_dir to "
                        "a directory you can write") from e
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create {path} ({e.strerror}); set run.run_dir to a directory "
                        "you can write") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by another trainer "
                        f"({_holder(path)}); wait for it to finish or stop it, or set "
                        "run.run_dir to a new path") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
    return fd


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it (it may not have written it yet)."""
    try:
        written = path.read_text().strip()
    except OSError:
        written = ""
    return written or "a process that has not yet written its host and pid"
