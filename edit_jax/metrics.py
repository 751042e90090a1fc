"""A run's metrics: `<run_dir>/metrics.jsonl`, and optionally TensorBoard event files.

Every row has `step`; train rows `loss`, eval rows `eval_loss`, sync rows `sync: true` with the
replicas' weights and local steps. The loop adds `tokens`, `wall_time` and the cumulative bytes
sent over `replica` (traffic.py) to every row, so curves can be drawn against any of them
(`edit-jax plot`). Reading needs no JAX.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from edit_jax.errors import UserError


class MetricsLog:
    """`<run_dir>/metrics.jsonl`: one JSON object per line; rows past a resume point dropped
    (`kept`: the rows that stay). With `tensorboard`, every row also goes to TensorBoard event
    files in `<run_dir>/tensorboard` (tags `train/...`, `eval/...`, `sync/...`); each new file
    tells TensorBoard to discard the older files' steps past the resume point (all of them on a
    fresh start).

    A crash can leave a torn last line; it is dropped with a warning. The file is rewritten
    through a temporary file and a rename, so a crash during the rewrite loses nothing.
    """

    def __init__(self, path: Path, resume_step: int, enabled: bool = True,
                 tensorboard: bool = False, warn: Callable[[str], None] = print):
        self.path = path
        self.enabled = enabled  # one process of a multi-process run writes
        self.kept: list[dict] = []
        if self.enabled and path.exists():
            self.kept = [row for row in read_rows(path, warn)  # all dropped on a fresh start
                         if resume_step and row.get("step", 0) <= resume_step]
            write_atomically(path, "".join(json.dumps(row) + "\n" for row in self.kept))
        self.tensorboard = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(  # a new file per resume, never overwritten
                str(path.parent / "tensorboard"), filename_suffix=f".from{resume_step}",
                purge_step=resume_step + 1 if resume_step else 0)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            group = "sync" if row.get("sync") else "eval" if "eval_loss" in row else "train"
            for key, value in row.items():
                if key in ("step", "sync") or isinstance(value, str):  # names are not scalars
                    continue
                for suffix, number in (enumerate(value) if isinstance(value, list)
                                       else [(None, value)]):
                    tag = f"{group}/{key}" + ("" if suffix is None else f"/{suffix}")
                    self.tensorboard.add_scalar(tag, number, row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a crash leaves the old file or the new one,
    never a part of either."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def read_rows(path: Path, warn: Callable[[str], None]) -> list[dict]:
    """The rows of a metrics file; an unparsable last line (a torn write) is dropped with a
    `warn`ing, an unparsable line before it is an error (the file was edited or damaged)."""
    text = path.read_text(errors="replace")  # bytes that are not UTF-8 fail as JSON, below
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != lines[-1][0]:
                raise UserError(f"{path} line {number} is not JSON ({line[:40]!r}); fix or "
                                "remove that line, or use a new run.run_dir") from None
            warn(f"dropped the torn last line of {path} (line {number}, {line[:40]!r}), "
                 "left by an interrupted write")
    return rows
