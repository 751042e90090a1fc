"""One place that maps a method name to its sync rule and its schedule of step kinds.

Every method shares one inner step (step.py); they differ only in whether a step averages
gradients over `replica` and in the sync rule run on sync steps:

  method          warm-up   sync rule (every `sync_every` local steps)
  ddp             -         none: every step averages gradients over replicas
  local_sgd       W >= 0    average: theta_r <- mean_r theta_r, after the inner step
  post_local_sgd  W > 0     average (local SGD after a synchronous warm-up)
  diloco          W >= 0    outer: phi <- OuterOpt(phi, mean_r(phi - theta_r)), theta_r <- phi,
                            after the inner step, whole model at once
  edit            W >= 0    layerwise: the outer step with the pseudo-gradient penalty, layer by
                            layer inside the forward pass of the sync step
  a_edit          W >= 0    layerwise, but timed: each replica runs local steps until
                            `sync_interval_seconds` have passed on its own clock (a_edit.py)

Steps 0..W-1 are DDP steps; phi <- theta when step W begins. The layer-wise sync at the start
of step W + k*tau sees the same tau local steps as the after-step sync at the end of step
W + k*tau - 1, so edit with the penalty off follows diloco's trajectory.
"""

from __future__ import annotations

import dataclasses
import enum

from edit_jax.config import MethodConfig


class StepKind(enum.Enum):
    DDP = "ddp"  # gradients averaged over replicas
    LOCAL = "local"  # no collective over replicas
    SYNC = "sync"  # a local step plus the method's sync rule


class SyncRule(enum.Enum):
    NONE = "none"
    AVERAGE = "average"
    OUTER = "outer"
    LAYERWISE = "layerwise"


RULES = {"ddp": SyncRule.NONE, "local_sgd": SyncRule.AVERAGE, "post_local_sgd": SyncRule.AVERAGE,
         "diloco": SyncRule.OUTER, "edit": SyncRule.LAYERWISE, "a_edit": SyncRule.LAYERWISE}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    rule: SyncRule
    warmup_steps: int
    sync_every: int

    @classmethod
    def from_config(cls, cfg: MethodConfig) -> Method:
        return cls(cfg.name, RULES[cfg.name], cfg.warmup_steps, cfg.sync_every)

    @property
    def timed(self) -> bool:
        """Whether replicas sync by their clocks (a_edit), not every `sync_every` steps."""
        return self.name == "a_edit"

    @property
    def has_outer_state(self) -> bool:
        """Whether the train state carries phi and the outer optimizer state."""
        return self.rule in (SyncRule.OUTER, SyncRule.LAYERWISE)

    def kind(self, step: int) -> StepKind:
        """The kind of step `step` (0-based: the number of steps already taken); for a timed
        method, the kind it would have if every replica ran `sync_every` steps per interval."""
        if self.rule is SyncRule.NONE or step < self.warmup_steps:
            return StepKind.DDP
        local_index = step - self.warmup_steps
        if self.rule is SyncRule.LAYERWISE:  # syncs at the start of the step
            due = local_index > 0 and local_index % self.sync_every == 0
        else:  # syncs at the end of the step
            due = (local_index + 1) % self.sync_every == 0
        return StepKind.SYNC if due else StepKind.LOCAL

    def begins_local_phase(self, step: int) -> bool:
        """Whether phi <- theta happens before step `step`."""
        return self.rule is not SyncRule.NONE and step == self.warmup_steps
