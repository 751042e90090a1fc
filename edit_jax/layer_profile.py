"""The inputs of DreamDDP's schedule: per-unit backward time and communication time.

Units in backward order are the non-layer unit (its largest part, the head, is where the
backward pass starts; the embedding's gradient, produced last, is a cheap scatter), then layers
L-1, ..., 0. Compute times are measured on this
process's first device with the per-device batch of the run (B / (R * S) rows, layers whole, as
each device computes them after the all-gather), by differencing models of one and two layers:
a layer's forward f = F(2) - F(1), its backward b = (T(2) - T(1)) - f, where F times the forward
pass and T forward plus backward; the rest's backward is (T(1) - F(1)) - b. Communication time
is a unit's parameter bytes over the slow link between replicas (`method.link_gbps`,
`method.link_latency_ms`), as a ring all-reduce: all shards of a replica share its link.
A user may instead pass a JSON profile measured elsewhere (`method.layer_profile`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import multihost_utils

from edit_jax.config import Config
from edit_jax.errors import UserError
from edit_jax.methods import METHODS, REST_UNIT, Units, unit_name
from edit_jax.model import LAYER_GROUP, Params, init_model, loss_fn
from edit_jax.schedule import (UnitProfile, comm_seconds, dreamddp_schedule, load_profile,
                               plsgd_schedule)

PROFILE_FILE = "layer_profile.json"  # in run.run_dir: the profile a run's schedule was built on


def backward_units(num_layers: int) -> list[int]:
    """The units in the order the backward pass finishes them."""
    return [REST_UNIT, *range(num_layers - 1, -1, -1)]


def unit_bytes(params_shapes: Params, num_layers: int) -> dict[int, int]:
    """Parameter bytes of every unit (a layer's share of the stacked leaves)."""
    def nbytes(tree):
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    rest = {k: v for k, v in params_shapes.items() if k != LAYER_GROUP}
    per_layer = nbytes(params_shapes[LAYER_GROUP]) // num_layers
    return {**dict.fromkeys(range(num_layers), per_layer), REST_UNIT: nbytes(rest)}


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_compute(cfg: Config, vocab_size: int, rows: int,
                    repeats: int = 5) -> tuple[float, float, float]:
    """(forward seconds of the whole model, backward seconds of one layer, backward seconds of
    the non-layer unit) on the first device, for a batch of `rows` sequences."""
    device = jax.local_devices()[0]
    tokens = jax.device_put(
        np.random.default_rng(0).integers(0, vocab_size, (rows, cfg.data.seq_len + 1), np.int32),
        device)
    forward, both = [], []
    for layers in (1, 2):
        model_cfg = dataclasses.replace(cfg.model, n_layers=layers)
        graphdef, params = init_model(model_cfg, vocab_size, 0)
        params = jax.device_put(params, device)
        loss = jax.jit(lambda p, t: loss_fn(graphdef, p, t)[0])
        grad = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(graphdef, p, t)[0]))
        forward.append(_median_seconds(loss, params, tokens, repeats=repeats))
        both.append(_median_seconds(grad, params, tokens, repeats=repeats))
    layer_forward = max(forward[1] - forward[0], 0.0)
    layer_backward = max(both[1] - both[0] - layer_forward, 0.0)
    rest_backward = max(both[0] - forward[0] - layer_backward, 0.0)
    whole_forward = forward[0] + (cfg.model.n_layers - 1) * layer_forward
    return whole_forward, layer_backward, rest_backward


def measure_profile(cfg: Config, vocab_size: int, params_shapes: Params, num_replicas: int,
                    num_shards: int) -> UnitProfile:
    """The run's unit profile: compute measured here, communication from bytes and the link."""
    rows = max(cfg.data.global_batch_size // (num_replicas * num_shards), 1)
    measured = np.array(measure_compute(cfg, vocab_size, rows))
    if jax.process_count() > 1:  # every process must build the same schedule: process 0's
        measured = multihost_utils.broadcast_one_to_all(measured)
    whole_forward, layer_backward, rest_backward = (float(x) for x in measured)
    num_layers, m = cfg.model.n_layers, cfg.method
    sizes = unit_bytes(params_shapes, num_layers)
    order = backward_units(num_layers)
    return UnitProfile(
        names=tuple(unit_name(u) for u in order),
        backward_seconds=tuple(rest_backward if u == REST_UNIT else layer_backward
                               for u in order),
        comm_seconds=tuple(comm_seconds(sizes[u], m.link_gbps, m.link_latency_ms, num_replicas)
                           for u in order),
        forward_seconds=whole_forward)


def saved_profile_path(cfg: Config, resumable: bool = True) -> Path | None:
    """The profile file to use: `method.layer_profile` if given; else, for a run that will
    resume (`resumable` and checkpoints in its directory), the one it saved, so that it keeps
    its schedule; None: measure. A multi-process run's directory is shared, as for its
    checkpoints, so every process reads the same file."""
    if cfg.method.layer_profile:
        return Path(cfg.method.layer_profile)
    run_dir = Path(cfg.run.run_dir)
    saved = run_dir / PROFILE_FILE
    checkpoints = run_dir / "checkpoints"
    resuming = resumable and checkpoints.is_dir() and any(checkpoints.iterdir())
    return saved if resuming and saved.is_file() else None


def run_profile(cfg: Config, vocab_size: int, params_shapes: Params, num_replicas: int,
                num_shards: int, resumable: bool = True) -> UnitProfile:
    """dreamddp's profile: read from `saved_profile_path`, else measured now."""
    path = saved_profile_path(cfg, resumable)
    if path is not None:
        profile = load_profile(path)
        expected = cfg.model.n_layers + 1
        if len(profile.names) != expected:
            raise UserError(f"layer profile {path} has {len(profile.names)} units, but the model "
                            f"has {expected} (the non-layer unit, then model.n_layers="
                            f"{cfg.model.n_layers} layers, in backward order); pass a profile of "
                            "this model")
        return profile
    return measure_profile(cfg, vocab_size, params_shapes, num_replicas, num_shards)


def unit_schedule(cfg: Config, profile: UnitProfile | None) -> tuple[Units, ...]:
    """plsgd's or dreamddp's units per step of a period of `method.sync_every` steps."""
    order = backward_units(cfg.model.n_layers)
    period = cfg.method.sync_every
    sets = (plsgd_schedule(len(order), period) if METHODS[cfg.method.name].period == "in order"
            else dreamddp_schedule(profile, period))
    return tuple(frozenset(order[i] for i in s) for s in sets)
