"""The typed containers of the training state, shared by step.py, sync.py, elastic.py and a_edit.py.

Both are NamedTuples, hence pytrees: jit, shard_map, Orbax and `jax.tree.map` take them as they
are, and their PartitionSpecs are the same container holding specs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from edit_jax.model import Params
from edit_jax.outer import PenaltyState


class OuterState(NamedTuple):
    """What diloco, edit and a_edit (and compressed local SGD and DreamDDP, as their anchor)
    keep besides the replicas' parameters; the same on every replica. The synced units
    (sync.py) are the non-layer parameters and each decoder layer."""

    phi: Params  # the global parameters
    rest: PenaltyState  # the non-layer unit's outer optimizer state and penalty statistics
    layers: PenaltyState  # the same per layer, stacked over the L layers
    synced_steps: jax.Array  # i32[F, R]: every replica's step count at fragment f's last sync
    arrived: Params | None = None  # sliced delayed syncs: the f32 sums of the slices arrived


class TrainState(NamedTuple):
    """Everything a run carries from step to step (and saves in checkpoints)."""

    params: Params  # replica-stacked: leading axis R
    opt_state: optax.OptState  # the inner optimizer's, per replica (its counters too)
    replica_steps: jax.Array  # i32[R]: inner steps each replica has taken
    outer: OuterState | None = None  # methods with an outer optimizer only
    residual: Params | None = None  # error feedback: what quantization dropped, per replica
    in_flight: Params | None = None  # sliced delayed syncs: each replica's f32 terms to send

    def local_part(self) -> TrainState:
        """The part a local step changes (a_edit moves it between meshes)."""
        return self._replace(outer=None, residual=None, in_flight=None)
