"""Injected stragglers: make chosen replicas slower, for experiments with heterogeneous clusters.

`straggler.slowdown[r]` = f makes replica r sleep (f - 1) x its step's own time after each step,
so it runs f times slower; `straggler.delay_seconds[r]` adds a fixed sleep per step. A process
sleeps for the slowest of the replicas it holds (they step together). The step has to be waited
for to be timed, so a process with an injected straggler gives up overlapping its steps.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax

from edit_jax.config import StragglerConfig
from edit_jax.errors import UserError


class Straggler:
    """This process's injected slowness: `after_step(output, started)` sleeps as configured."""

    def __init__(self, slowdown: float = 1.0, delay_seconds: float = 0.0):
        self.slowdown, self.delay_seconds = slowdown, delay_seconds

    @classmethod
    def for_replicas(cls, cfg: StragglerConfig, num_replicas: int,
                     local_replicas: Sequence[int]) -> Straggler:
        """The slowness of the replicas `local_replicas` (indices) held by this process."""
        for key, values in (("slowdown", cfg.slowdown), ("delay_seconds", cfg.delay_seconds)):
            if values and len(values) != num_replicas:
                raise UserError(f"straggler.{key} has {len(values)} values for {num_replicas} "
                                f"replicas; give one per replica (or none)")

        def slowest(values: Sequence[float], neutral: float) -> float:
            return max((values[r] for r in local_replicas), default=neutral) if values else neutral

        return cls(slowest(cfg.slowdown, 1.0), slowest(cfg.delay_seconds, 0.0))

    @property
    def active(self) -> bool:
        return self.slowdown > 1 or self.delay_seconds > 0

    def after_step(self, output, started: float) -> None:
        """Wait for `output` of a step begun at time.perf_counter() `started`, then sleep."""
        if not self.active:
            return
        jax.block_until_ready(output)
        time.sleep((self.slowdown - 1) * (time.perf_counter() - started) + self.delay_seconds)
