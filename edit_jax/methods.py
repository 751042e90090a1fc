"""One place that maps a method to its schedule over synced units and its per-unit sync rule.

A *synced unit* is one decoder layer (0..L-1) or all non-layer parameters together (`REST_UNIT`).
Every method shares one inner step (step.py); they differ in whether a step averages gradients
over `replica`, in *which units sync at which step* (the schedule, a `StepPlan` per step) and in
*what a unit's sync does* (the rule):

  method          warm-up   rule, per synced unit                          schedule of units
  ddp             -         none: every step averages gradients            -
  local_sgd       W >= 0    average theta_r after the inner step           all, every H steps
  post_local_sgd  W > 0     the same after a synchronous warm-up           all, every H steps
  plsgd           W >= 0    average the step's starting theta_r, while     in order, spread evenly
                            the backward pass runs (no data dependency)    over a period of H
  dreamddp        W >= 0    the same                                       DreamDDP's schedule over
                                                                           measured layer times
  diloco          W >= 0    outer step, after the inner step               fragments, every H steps
  edit            W >= 0    outer step with the penalty, at the start of   fragments, every H steps
                            the step (inside the layer scan for the whole
                            model)
  a_edit          W >= 0    as edit, whole model, when `sync_interval_seconds` have passed on
                            each replica's own clock (a_edit.py)

Steps 0..W-1 are DDP steps; phi <- theta when step W begins. With `method.fragments` = P the
layers form P fragments (fragments.py) and fragment p syncs at local step counts (p+1)H/P + kH, so
1/P of the model is in flight per sync; P = 1 is the whole model every H steps. The sync at the
start of step W + n sees the same n local steps as the after-step sync at the end of step
W + n - 1, so edit with the penalty off follows diloco's trajectory. With `fragment_delay` d > 0
a fragment's outer step is computed at the start of step W + n (from that step's input, so its
collective overlaps the step's compute) and blended into the replica at the end of step
W + n + d - 1.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

from edit_jax import xla_flags
from edit_jax.fragments import fragment_layers, fragment_due

if TYPE_CHECKING:  # config.py reads the method table below
    from edit_jax.config import MethodConfig

REST_UNIT = -1  # the unit of all non-layer parameters (embedding, final norm, head)


def delay_slices(cfg: MethodConfig) -> int:
    """In how many slices, one per step, a delayed sync's payload travels: d =
    `fragment_delay` for uncompressed syncs whose phi is whole on every replica; else 1 (the
    codes' collectives, and the all-to-all of an outer state split over replicas, do not cut
    into slices that sum to the whole, so their payload travels at the start). Also 1 where
    the runtime cannot overlap collectives with compute (`xla_flags.overlaps_collectives`):
    the slices' only point is that overlap, and the one-shot sync has the same values."""
    if (cfg.fragment_delay > 1 and cfg.compression == "none" and not cfg.shard_outer_over_replica
            and xla_flags.overlaps_collectives()):
        return cfg.fragment_delay
    return 1


class StepKind(enum.Enum):
    DDP = "ddp"  # gradients averaged over replicas
    LOCAL = "local"  # no collective over replicas
    SYNC = "sync"  # a local step plus the method's sync rule on some units


class SyncRule(enum.Enum):
    NONE = "none"
    AVERAGE = "average"  # local SGD: after the inner step
    PARTIAL = "partial"  # DreamDDP: the step's starting parameters, overlapping the backward
    OUTER = "outer"  # DiLoCo
    LAYERWISE = "layerwise"  # EDiT


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a method is, declared once (`METHODS`): config validation, program.py,
    layer_profile.py, inspect and plot read these facts instead of comparing method names."""

    rule: SyncRule
    min_warmup: int = 0  # synchronous steps it needs first (post-local SGD's are its point)
    penalty: bool = False  # EDiT's pseudo-gradient penalty in its outer step
    streaming: bool = False  # streaming fragments (fragments, delay, blend) apply
    timed: bool = False  # replicas sync by their clocks, not every sync_every steps (a_edit.py)
    period: str = ""  # partial methods: how a period's units are chosen ("in order", "profiled")

    @property
    def has_outer_state(self) -> bool:
        """Whether it keeps phi and an outer optimizer (compression aside)."""
        return self.rule in (SyncRule.OUTER, SyncRule.LAYERWISE)


# Adding a method: one row here, its rule (a SyncRule and, if new, its placement and sync), tests.
METHODS = {
    "ddp": MethodSpec(SyncRule.NONE),
    "local_sgd": MethodSpec(SyncRule.AVERAGE),
    "post_local_sgd": MethodSpec(SyncRule.AVERAGE, min_warmup=1),
    "plsgd": MethodSpec(SyncRule.PARTIAL, period="in order"),
    "dreamddp": MethodSpec(SyncRule.PARTIAL, period="profiled"),
    "diloco": MethodSpec(SyncRule.OUTER, streaming=True),
    "edit": MethodSpec(SyncRule.LAYERWISE, penalty=True, streaming=True),
    "a_edit": MethodSpec(SyncRule.LAYERWISE, penalty=True, timed=True),
}


class Placement(enum.Enum):
    """Where a step's sync runs (`Method.placement`)."""

    IN_SCAN = "in the layer scan"  # EDiT's whole-model sync, layer by layer in the forward pass
    BEFORE = "before the step"  # from the step's input parameters, with no data dependency on
    # the step's compute (its result is used by the step, the update, or a later step)
    AFTER = "after the step"  # on the parameters the inner update produced


Units = frozenset  # of layer indices and REST_UNIT


def unit_name(unit: int) -> str:
    return "rest" if unit == REST_UNIT else f"layer {unit}"


def _short(units: Units) -> str:
    return ",".join(("rest" if u == REST_UNIT else f"L{u}")
                    for u in sorted(units, key=lambda u: (u == REST_UNIT, u)))


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step does over `replica`: its kind, the units whose sync starts in it, the
    further slices of syncs in flight it sends (units, slice index >= 1; slice 0 travels with
    the start), and the units whose delayed outer step lands in the replica at its end."""

    kind: StepKind
    sync: Units = frozenset()
    apply: Units = frozenset()
    send: frozenset[tuple[Units, int]] = frozenset()

    def name(self, num_layers: int) -> str:
        """'ddp', 'local', 'sync' (every unit), or e.g. 'sync[L0,L2,rest]+apply[L1,L3]';
        slice i of a sync in flight is 'send{i+1}[...]'."""
        if self.kind is not StepKind.SYNC:
            return self.kind.value
        every = frozenset(range(num_layers)) | {REST_UNIT}
        sync = "sync" if self.sync == every else f"sync[{_short(self.sync)}]" if self.sync else ""
        sends = [f"send{i + 1}" + ("" if units == every else f"[{_short(units)}]")
                 for units, i in sorted(self.send, key=lambda s: s[1])]
        apply = f"apply[{_short(self.apply)}]" if self.apply else ""
        return "+".join(p for p in (sync, *sends, apply) if p)


DDP_PLAN, LOCAL_PLAN = StepPlan(StepKind.DDP), StepPlan(StepKind.LOCAL)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    rule: SyncRule
    warmup_steps: int
    sync_every: int
    num_layers: int
    fragments: tuple[Units, ...]  # outer methods: the units of each fragment
    fragment_delay: int = 0
    period: tuple[Units, ...] = ()  # plsgd / dreamddp: the units each step of a period averages
    anchored: bool = False  # averaging sends theta_r minus the last synced value (compressed)
    slices: int = 1  # a delayed sync's payload travels in this many slices, one per step

    @classmethod
    def from_config(cls, cfg: MethodConfig, num_layers: int,
                    period: tuple[Units, ...] = ()) -> Method:
        """`period`: the partial methods' schedule (schedule.py), one set of units per step."""
        if METHODS[cfg.name].rule is SyncRule.PARTIAL and len(period) != cfg.sync_every:
            raise ValueError(f"{cfg.name} needs its schedule: one set of units per step of a "
                             f"period of {cfg.sync_every} (layer_profile.unit_schedule)")
        layers = fragment_layers(num_layers, cfg.fragments, cfg.fragment_layout)
        fragments = tuple(frozenset(f) | ({REST_UNIT} if p == len(layers) - 1 else frozenset())
                          for p, f in enumerate(layers))
        rule = METHODS[cfg.name].rule
        anchored = cfg.compression != "none" and rule in (SyncRule.AVERAGE, SyncRule.PARTIAL)
        return cls(cfg.name, rule, cfg.warmup_steps, cfg.sync_every, num_layers, fragments,
                   cfg.fragment_delay, period, anchored, delay_slices(cfg))

    @property
    def units(self) -> Units:
        return frozenset(range(self.num_layers)) | {REST_UNIT}

    @property
    def full_sync(self) -> StepPlan:
        """A step that syncs every unit (a_edit's sync step)."""
        return StepPlan(StepKind.SYNC, self.units)

    @property
    def timed(self) -> bool:
        """Whether replicas sync by their clocks (a_edit), not every `sync_every` steps."""
        return METHODS[self.name].timed

    @property
    def has_outer_state(self) -> bool:
        """Whether the train state carries phi and the outer optimizer state (for compressed
        averaging, phi is the anchor the replicas' differences are taken from)."""
        return METHODS[self.name].has_outer_state or self.anchored

    @property
    def syncs_before_step(self) -> bool:
        """Whether syncs run from their step's input parameters: edit's, plsgd's and
        DreamDDP's always, diloco's when delayed; otherwise after the inner step."""
        return (self.rule in (SyncRule.LAYERWISE, SyncRule.PARTIAL)
                or self.fragment_delay > 0)

    def placement(self, plan: StepPlan) -> Placement | None:
        """Where the sync that starts in `plan`'s step runs; None if none starts there."""
        if plan.kind is not StepKind.SYNC or not plan.sync:
            return None
        if (self.rule is SyncRule.LAYERWISE and plan.sync == self.units
                and not self.fragment_delay):
            return Placement.IN_SCAN
        return Placement.BEFORE if self.syncs_before_step else Placement.AFTER

    def _due(self, sync_point: int) -> Units:
        """The fragment whose sync is due after `sync_point` local steps (empty if none)."""
        p = fragment_due(sync_point, self.sync_every, len(self.fragments))
        return frozenset() if p is None else self.fragments[p]

    def plan(self, step: int) -> StepPlan:
        """What step `step` (0-based: the number of steps already taken) does; for a timed
        method, what it would do if every replica ran `sync_every` steps per interval."""
        if self.rule is SyncRule.NONE or step < self.warmup_steps:
            return DDP_PLAN
        local_index = step - self.warmup_steps
        if self.rule is SyncRule.PARTIAL:
            sync, apply = self.period[local_index % len(self.period)], frozenset()
        elif self.syncs_before_step:
            sync = self._due(local_index)
            apply = (self._due(local_index - self.fragment_delay + 1) if self.fragment_delay
                     else frozenset())
        else:
            sync, apply = self._due(local_index + 1), frozenset()
        send = frozenset((self._due(local_index - i), i) for i in range(1, self.slices)
                         if self._due(local_index - i))
        return StepPlan(StepKind.SYNC, sync, apply, send) if sync or apply or send else LOCAL_PLAN

    def plans(self, first: int = 0, last: int | None = None) -> list[StepPlan]:
        """The distinct step plans of steps `first`..`last - 1` (default: every plan the method
        runs), in order of first use. Past the warm-up the schedule repeats every `sync_every`
        steps, so two periods (and a delay) past `first` hold every plan."""
        end = max(first, self.warmup_steps) + 2 * self.sync_every + self.fragment_delay
        end = end if last is None else min(end, last)
        return list(dict.fromkeys(self.plan(step) for step in range(first, end)))

    def begins_local_phase(self, step: int) -> bool:
        """Whether phi <- theta happens before step `step`."""
        return self.rule is not SyncRule.NONE and step == self.warmup_steps
