"""Everything the compiled programs of a run need, built once from its config.

`edit-jax train`, `edit-jax inspect` and the benchmarks all start here, so they compile exactly
the same steps: the mesh, the parameter layout, the inner optimizer, the method's schedule (for
dreamddp, from its layer profile) and outer optimizer, and the step function of each plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import optax

from edit_jax.config import Config
from edit_jax.errors import UserError
from edit_jax.inspect_hlo import human_bytes, memory_stats
from edit_jax.layer_profile import run_profile, unit_schedule
from edit_jax.mesh import make_mesh
from edit_jax.methods import METHODS, Method, StepKind, StepPlan, SyncRule
from edit_jax.model import (LAYER_GROUP, Params, abstract_model, choose_attention, count_params,
                            init_model)
from edit_jax.optimizer import inner_optimizer
from edit_jax.schedule import UnitProfile
from edit_jax.sharding import NOT_SHARDED, is_sharded, replica_split_dims, shard_dims
from edit_jax.step import (Layout, TrainState, init_state, make_begin_local_phase, make_eval_step,
                           make_layout, make_train_step, state_from_params)
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
    profile: UnitProfile | None = None  # dreamddp: the per-unit times its schedule was built on
    notes: tuple[str, ...] = ()  # warnings for the user (an attention fallback)

    @property
    def num_params(self) -> int:
        return count_params(self.params_shapes)

    def describe(self) -> str:
        mesh, method = self.layout.mesh, self.method
        text = (f"model: {self.num_params:,} parameters, {self.cfg.model.attention} attention; "
                f"mesh: {mesh.shape['replica']} replicas x {mesh.shape['shard']} shards on "
                f"{jax.device_count()} {jax.devices()[0].platform} devices; method: {method.name}")
        if method.period:  # plsgd, dreamddp: what each step of a period averages
            text += "; period: " + " | ".join(
                StepPlan(StepKind.SYNC, units).name(method.num_layers) if units else "-"
                for units in method.period)
        return text

    def init_state(self, params: Params | None = None) -> TrainState:
        """The state at step 0: from freshly initialised parameters, or from `params` (global
        arrays, e.g. from `hf_import.load_params`)."""
        if params is not None:
            return state_from_params(self.layout, params, self.tx, self.outer)
        return init_state(self.layout,
                          lambda: init_model(self.cfg.model, self.vocab_size, self.cfg.run.seed)[1],
                          self.tx, self.outer)

    def abstract_state(self):
        return self.layout.abstract_state(self.params_shapes, self.tx, self.outer)

    @functools.cached_property
    def _train_steps(self) -> dict:
        return {}

    def train_step(self, plan: StepPlan):
        """The jitted step of this plan (built once)."""
        if plan not in self._train_steps:
            self._train_steps[plan] = make_train_step(self.graphdef, self.tx, self.layout, plan,
                                                      self.method, self.outer)
        return self._train_steps[plan]

    @functools.cached_property
    def _compiled_steps(self) -> dict:
        return {}

    def compiled_step(self, plan: StepPlan,
                      batch_shape: tuple[int, int] | None = None) -> jax.stages.Compiled:
        """The step of this plan compiled ahead of time from abstract values (nothing is
        allocated), once per batch shape (default: the config's, (global batch, seq_len + 1)):
        what `step` runs, what `edit-jax inspect` and the byte counts read."""
        shape = batch_shape or (self.cfg.data.global_batch_size, self.cfg.data.seq_len + 1)
        if (plan, shape) not in self._compiled_steps:
            batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.layout.batch_sharding)
            self._compiled_steps[plan, shape] = self.train_step(plan).lower(
                self.abstract_state(), batch).compile()
        return self._compiled_steps[plan, shape]

    def precompile(self, first: int, last: int) -> None:
        """Compile now every step plan that steps `first`..`last - 1` run, so that none of them
        waits for the compiler (and a run's wall time is training, not compiling), and check
        that each fits in a device's memory."""
        for plan in self.method.plans(first, last):
            if not (self.method.timed and plan.kind is StepKind.LOCAL):  # a_edit.py runs those
                _check_fits(self.compiled_step(plan), plan.name(self.method.num_layers))

    @functools.cached_property
    def eval_step(self):
        """jit: (replica-stacked params, batches) -> the replicas' mean's loss."""
        return make_eval_step(self.graphdef, self.layout)

    @functools.cached_property
    def eval_phi_step(self):
        """jit: (phi, batches) -> phi's loss, with no traffic over `replica` but the loss."""
        return make_eval_step(self.graphdef, self.layout, phi=True)

    @functools.cached_property
    def begin_local_phase(self):
        """jit: phi <- theta before the first local step (None for methods without phi)."""
        return None if self.outer is None else make_begin_local_phase(self.layout, self.outer)

    def step(self, state: TrainState, step: int, batch: jax.Array):
        """Run training step `step` (0-based) as the method's schedule says.

        Returns (state, metrics, plan); phi <- theta first if the local phase begins here.
        """
        if self.begin_local_phase is not None and self.method.begins_local_phase(step):
            state = self.begin_local_phase(state)
        plan = self.method.plan(step)
        state, metrics = self.compiled_step(plan, batch.shape)(state, batch)
        return state, metrics, plan


_SHRINK = ("shrink data.global_batch_size or data.seq_len (or the model), or spread the run "
           "over more devices")


def _check_fits(compiled: jax.stages.Compiled, name: str) -> None:
    """A one-line error if the compiled step needs more memory than a device has: XLA's
    buffer assignment (arguments + outputs + temporaries, `inspect_hlo.memory_stats`) against
    the device's limit, or for CPU devices their share of the machine's memory."""
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit") or (
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // jax.local_device_count())
    needed = memory_stats(compiled)["peak"]
    if needed > limit:
        raise UserError(f"the {name} step needs {human_bytes(needed)} per device but a device "
                        f"has {human_bytes(limit)}; {_SHRINK}")


@contextlib.contextmanager
def out_of_memory_errors() -> Iterator[None]:
    """XLA running out of device memory (RESOURCE_EXHAUSTED, when compiling or running) as a
    one-line `UserError` naming what to shrink."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        raise UserError(f"out of device memory ({str(e).splitlines()[0][:160]}); "
                        f"{_SHRINK}") from e


def _check_compression_block(cfg: Config, params_shapes: Params, shards: int) -> None:
    """A compressed sync pads each leaf it sends to whole blocks (compression.py), so a block
    larger than the values a device holds of the smallest synced unit (one layer, or all
    parameters outside the layers) only adds padding, which for an absurd block is more
    memory than any machine has."""
    if cfg.method.compression == "none":
        return
    dims = shard_dims(params_shapes, shards)

    def per_device(group: str) -> int:
        layers = 1 if group != LAYER_GROUP else cfg.model.n_layers
        return sum(x.size // layers // (1 if d == NOT_SHARDED else shards) for x, d in zip(
            jax.tree.leaves(params_shapes[group]), jax.tree.leaves(dims[group])))

    rest = sum(per_device(g) for g in params_shapes if g != LAYER_GROUP)
    largest = min(per_device(LAYER_GROUP), rest) // 2 * 2
    if cfg.method.compression_block > largest:
        raise UserError(f"method.compression_block={cfg.method.compression_block} is larger "
                        f"than the {largest} values a device holds of the smallest synced unit "
                        f"(the blocks would be mostly padding); set it to at most {largest}")


def build_program(cfg: Config, vocab_size: int, devices=None,
                  profile: UnitProfile | None = None) -> Program:
    """Check the config against the devices and build the layout and step functions;
    `profile`: dreamddp's layer times, if already known (else loaded or measured)."""
    mesh = make_mesh(cfg.mesh, devices)
    replicas, shards = mesh.shape["replica"], mesh.shape["shard"]
    if cfg.data.global_batch_size % (replicas * shards):
        raise UserError(f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by "
                        f"replicas x shards = {replicas} x {shards}; use a multiple of "
                        f"{replicas * shards}")
    attention, note = choose_attention(cfg.model, jax.default_backend(), cfg.data.seq_len)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))
    graphdef, params_shapes = abstract_model(cfg.model, vocab_size)
    _check_compression_block(cfg, params_shapes, shards)
    sharded_mask = is_sharded(shard_dims(params_shapes, shards))
    tx = inner_optimizer(cfg.optimizer, cfg.run.steps, sharded_mask)
    period, spec = (), METHODS[cfg.method.name]
    if spec.period == "profiled" and profile is None:
        profile = run_profile(cfg, vocab_size, params_shapes, replicas, shards)
    if spec.rule is SyncRule.PARTIAL:
        period = unit_schedule(cfg, profile)
    method = Method.from_config(cfg.method, cfg.model.n_layers, period)
    outer = None
    if method.has_outer_state:
        replica_dims = (replica_split_dims(params_shapes, shard_dims(params_shapes, shards), shards,
                                           replicas)
                        if cfg.method.shard_outer_over_replica else None)
        outer = OuterSync.create(cfg.method, replicas, method.fragments, sharded_mask,
                                 penalty=spec.penalty, replica_dims=replica_dims,
                                 averaging=method.anchored)
    return Program(cfg, vocab_size, graphdef, params_shapes, tx, method, outer,
                   make_layout(mesh, params_shapes, tx, outer), profile,
                   notes=(note,) if note else ())
