"""Everything the compiled programs of a run need, built once from its config.

`edit-jax train`, `edit-jax inspect` and the benchmarks all start here, so they compile exactly
the same steps: the mesh, the parameter layout, the inner optimizer, the method's schedule and
outer optimizer, and the step functions of each kind.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import optax

from edit_jax.config import PENALTY_METHODS, Config
from edit_jax.errors import UserError
from edit_jax.mesh import make_mesh
from edit_jax.methods import Method, StepKind
from edit_jax.model import Params, abstract_model, count_params, init_model
from edit_jax.optimizer import inner_optimizer
from edit_jax.sharding import is_sharded, replica_split_dims, shard_dims
from edit_jax.step import (Layout, TrainState, init_state, make_begin_local_phase, make_eval_step,
                           make_layout, make_train_step)
from edit_jax.sync import OuterSync


@dataclasses.dataclass(frozen=True)
class Program:
    cfg: Config
    vocab_size: int
    graphdef: object
    params_shapes: Params
    tx: optax.GradientTransformation
    method: Method
    outer: OuterSync | None
    layout: Layout

    @property
    def num_params(self) -> int:
        return count_params(self.params_shapes)

    def describe(self) -> str:
        mesh = self.layout.mesh
        return (f"model: {self.num_params:,} parameters; mesh: {mesh.shape['replica']} replicas x "
                f"{mesh.shape['shard']} shards on {jax.device_count()} "
                f"{jax.devices()[0].platform} devices; method: {self.method.name}")

    def init_state(self) -> TrainState:
        return init_state(self.layout,
                          lambda: init_model(self.cfg.model, self.vocab_size, self.cfg.run.seed)[1],
                          self.tx, self.outer)

    def abstract_state(self):
        return self.layout.abstract_state(self.params_shapes, self.tx, self.outer)

    @functools.cached_property
    def train_steps(self) -> dict:
        """The jitted step of each kind (each compiles on first use)."""
        return {kind: make_train_step(self.graphdef, self.tx, self.layout, kind, self.method.rule,
                                      self.outer) for kind in StepKind}

    @functools.cached_property
    def eval_step(self):
        return make_eval_step(self.graphdef, self.layout)

    @functools.cached_property
    def begin_local_phase(self):
        """jit: phi <- theta before the first local step (None for methods without phi)."""
        return None if self.outer is None else make_begin_local_phase(self.layout, self.outer)


    def step(self, state: TrainState, step: int, batch: jax.Array):
        """Run training step `step` (0-based) as the method's schedule says.

        Returns (state, metrics, kind); phi <- theta first if the local phase begins here.
        """
        if self.begin_local_phase is not None and self.method.begins_local_phase(step):
            state = self.begin_local_phase(state)
        kind = self.method.kind(step)
        state, metrics = self.train_steps[kind](state, batch)
        return state, metrics, kind


def build_program(cfg: Config, vocab_size: int, devices=None) -> Program:
    """Check the config against the devices and build the layout and step functions."""
    mesh = make_mesh(cfg.mesh, devices)
    replicas, shards = mesh.shape["replica"], mesh.shape["shard"]
    if cfg.data.global_batch_size % (replicas * shards):
        raise UserError(f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by "
                        f"replicas x shards = {replicas} x {shards}; use a multiple of "
                        f"{replicas * shards}")
    graphdef, params_shapes = abstract_model(cfg.model, vocab_size)
    sharded_mask = is_sharded(shard_dims(params_shapes, shards))
    tx = inner_optimizer(cfg.optimizer, cfg.run.steps, sharded_mask)
    method = Method.from_config(cfg.method)
    outer = None
    if method.has_outer_state:
        replica_dims = (replica_split_dims(params_shapes, shard_dims(params_shapes, shards), shards,
                                           replicas)
                        if cfg.method.shard_outer_over_replica else None)
        outer = OuterSync.create(cfg.method, replicas, sharded_mask,
                                 penalty=method.name in PENALTY_METHODS, replica_dims=replica_dims)
    return Program(cfg, vocab_size, graphdef, params_shapes, tx, method, outer,
                   make_layout(mesh, params_shapes, tx, outer))
