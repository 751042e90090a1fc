"""A-EDiT's local phase: each process steps its own replicas at its own pace, then syncs.

After the synchronous warm-up, every process runs the local step of its replicas on a mesh of
its own devices, shape (replicas held, S), so no collective ever leaves the process, until
`method.sync_interval_seconds` have passed on its own clock since the last sync (or its replicas
are one step from `run.steps`, or a stop was requested). It then enters the global sync step:
EDiT's layer-wise sync plus one inner step over the whole ('replica', 'shard') mesh (step.py).
That collective is the barrier: fast replicas run more local steps per interval than slow ones,
and the sync weights each replica's pseudo-gradient by the steps it ran since the last sync if
`method.step_weighting` > 0. A replica never spans two processes, so one host loop, one clock,
decides for all of a replica's devices.

The local mesh holds the same devices in the same order as this process's rows of the global
mesh, so moving the state between the two is a relabelling of the same device buffers
(`jax.make_array_from_single_device_arrays`), never a copy.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from edit_jax.errors import UserError
from edit_jax.methods import LOCAL_PLAN
from edit_jax.mesh import AXES
from edit_jax.program import Program
from edit_jax.step import Layout, TrainState, make_layout, make_train_step
from edit_jax.stragglers import Straggler

def local_replica_indices(mesh: jax.sharding.Mesh) -> list[int]:
    """The replicas (rows of the mesh) whose devices all belong to this process.

    Raises UserError if a replica is split between this process and another.
    """
    me = jax.process_index()
    rows = [[d.process_index == me for d in row] for row in mesh.devices]
    if any(any(row) and not all(row) for row in rows):
        raise UserError(f"a_edit needs every replica inside one process, but mesh.shard="
                        f"{mesh.shape['shard']} spans processes; set mesh.shard to a divisor of "
                        f"the {jax.local_device_count()} devices per process")
    return [r for r, row in enumerate(rows) if all(row)]


class LocalReplicas:
    """This process's replicas: their local mesh and layout, the local step, and the moves of
    the replica-varying state between the global and the local mesh."""

    def __init__(self, program: Program):
        self.global_layout = program.layout
        mesh = program.layout.mesh
        self.replicas = local_replica_indices(mesh)
        local_mesh = jax.sharding.Mesh(mesh.devices[self.replicas], AXES,
                                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
        self.layout: Layout = make_layout(local_mesh, program.params_shapes, program.tx)
        data = program.cfg.data
        rows = data.global_batch_size * len(self.replicas) // mesh.shape["replica"]
        batch = jax.ShapeDtypeStruct((rows, data.seq_len + 1), np.int32,
                                     sharding=self.layout.batch_sharding)
        state = self.layout.abstract_state(program.params_shapes, program.tx, None)
        # Compiled now, so that compilation does not eat into the first interval.
        self.step = make_train_step(program.graphdef, program.tx, self.layout,
                                    LOCAL_PLAN).lower(state, batch).compile()

    def split(self, state: TrainState) -> TrainState:
        """The local replicas' params, optimizer state and step counts, on the local mesh."""
        return jax.tree.map(self._relabel, state.local_part(), self.layout.state_shardings)

    def join(self, local: TrainState, state: TrainState) -> TrainState:
        """`state` with the local replicas' part replaced by `local` (on the global mesh)."""
        joined = jax.tree.map(self._relabel, local,
                              self.global_layout.state_shardings.local_part())
        return joined._replace(outer=state.outer, residual=state.residual)

    def batch(self, rows: np.ndarray) -> jax.Array:
        """This process's rows of a global batch, laid out over the local mesh."""
        return jax.device_put(rows, self.layout.batch_sharding)

    def _relabel(self, x: jax.Array, sharding: jax.sharding.NamedSharding) -> jax.Array:
        num_replicas = sharding.mesh.shape["replica"]
        shape = (num_replicas, *x.shape[1:])
        return jax.make_array_from_single_device_arrays(
            shape, sharding, [shard.data for shard in x.addressable_shards])


class LocalPhase:
    """Runs the local steps of one sync interval on this process's clock."""

    def __init__(self, program: Program, straggler: Straggler,
                 clock: Callable[[], float] = time.perf_counter):
        self.local = LocalReplicas(program)
        self.interval = program.cfg.method.sync_interval_seconds
        self.straggler, self.clock = straggler, clock

    def run(self, state: TrainState, next_rows: Callable[[], np.ndarray], replica_steps: int,
            last_step: int, stop_requested: Callable[[], bool]) -> tuple[TrainState, int]:
        """Local steps until the interval has passed, the replicas' next step would be
        `last_step` (the sync step takes it) or a stop is requested; returns (state, number
        of local steps run). `replica_steps`: the steps these replicas have taken so far."""
        local, count, start = self.local.split(state), 0, self.clock()
        while (self.clock() - start < self.interval
               and replica_steps + count + 1 < last_step and not stop_requested()):
            step_start = self.clock()
            local, metrics = self.local.step(local, self.local.batch(next_rows()))
            jax.block_until_ready(metrics["loss"])  # the clock measures the work itself
            self.straggler.after_step(metrics["loss"], step_start)
            count += 1
        return self.local.join(local, state), count
