"""The cumulative bytes each device has sent over `replica`, written into every metrics row.

A step plan's bytes are read from its compiled HLO (the figures `edit-jax inspect` reports), once
per plan, when the run first counts a step of it; the run's total is the sum over the steps it
ran, so loss can be plotted against communication. a_edit's local phase runs on each process's
own devices and sends nothing over `replica`: it counts only its synchronous steps. On a resume
the count continues from the last metrics row at or before the checkpoint, plus the steps the
schedule ran between that row and the checkpoint.
"""

from __future__ import annotations

from edit_jax.inspect_hlo import collective_stats, replica_traffic, summarize
from edit_jax.methods import StepPlan
from edit_jax.program import Program

KEYS = ("replica_bytes", "replica_wire_bytes")


class ReplicaTraffic:
    """Payload and wire bytes per device over `replica`, summed over the steps run."""

    def __init__(self, program: Program):
        self.program = program
        self.per_plan: dict[StepPlan, dict[str, int]] = {}
        self.total = dict.fromkeys(KEYS, 0)

    def figures(self, plan: StepPlan) -> dict[str, int]:
        """Bytes one step of `plan` sends per device, from its compiled HLO."""
        if plan not in self.per_plan:
            compiled = self.program.compiled_step(plan)
            self.per_plan[plan] = replica_traffic(
                summarize(collective_stats(compiled, self.program.layout.mesh)))
        return self.per_plan[plan]

    def add(self, plan: StepPlan) -> None:
        """Count one step of `plan`."""
        for key, value in self.figures(plan).items():
            self.total[key] += value

    def resume(self, rows: list[dict], step: int) -> None:
        """Continue from the newest row at or before `step` that has the totals, adding the
        schedule's steps from that row's step up to `step`."""
        last = next((r for r in reversed(rows) if KEYS[0] in r and r["step"] <= step),
                    {"step": 0, **dict.fromkeys(KEYS, 0)})
        self.total = {key: last[key] for key in KEYS}
        for s in range(last["step"], step):
            self.add(self.program.method.plan(s))
