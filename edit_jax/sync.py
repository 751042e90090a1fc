"""Syncing replicas: the outer state and the per-unit sync rules of local SGD, DreamDDP, DiLoCo
and EDiT.

A *synced unit* is one decoder layer, or all non-layer parameters together (embedding, final
norm, head). For a unit, `sync_unit` runs the outer transformation of outer.py (the
pseudo-gradient penalty around SGD with Nesterov momentum) on this device's shard:
delta_r = phi - theta_r -> weights -> combined delta -> clip -> phi <- OuterOpt(phi, delta);
every replica then continues from phi (or from `alpha * theta_r + (1 - alpha) * phi`, streaming's
blend). Which units sync at which step is the method's schedule (methods.py); where:
EDiT's whole-model sync runs per layer inside the forward pass's layer scan (`layer_sync`),
right before that layer's all-gather; any other set of units (a fragment, DiLoCo's whole model)
runs through `sync_units`, per layer under `vmap` over the selected layers. Local SGD and
DreamDDP only average (`average_units`); a delayed fragment's outer step is blended in later by
`apply_units`. A sliced delayed sync (methods.delay_slices) runs in three parts: `start_sliced`
weighs the pseudo-gradients and keeps each replica's weighted term in `TrainState.in_flight`,
`send_slice` sums one slice of it over `replica` per step into `OuterState.arrived`, and
`land_sliced` takes the outer step from the sum and blends it in: the same values as the
one-shot sync, since the sum is elementwise.

With `method.compression` the combination moves 8- or 4-bit codes (compression.py). Syncs that
average parameters (local SGD, DreamDDP) then send theta_r's difference from the units' last
synced value instead of theta_r itself: an `OuterSync` with plain averaging, outer learning rate
1 and no momentum, whose phi is that anchor. With `method.error_feedback` each replica keeps
what quantization dropped (`TrainState.residual`; compression.quantized_combine) and sends
it with the next sync. The penalty judges the uncompressed pseudo-gradients.

What every unit's sync shares is gathered once, by scalar collectives only (`sync_inputs`): the
local steps each replica ran since the synced fragment's last sync (always passed to the
penalty: its anomaly test judges norms per local step, so an A-EDiT replica that ran more steps
is not flagged for that alone; also A-EDiT's step weighting and the metrics) and, with `global`
norm granularity, the per-replica norms of the pseudo-gradient of all the synced units; with
`layer` granularity each unit uses its own norms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from edit_jax.compression import Compression
from edit_jax.config import MethodConfig
from edit_jax.fragments import blend
from edit_jax.methods import REST_UNIT, Units, delay_slices
from edit_jax.model import LAYER_GROUP, LayerSync, Params
from edit_jax.outer import (PenaltyState, StackedSum, gather_replicas, pseudo_gradient_penalty,
                            replica_norms, weighted_terms)
from edit_jax.sharding import NOT_SHARDED
from edit_jax.sparse import TopK
from edit_jax.state import OuterState


class UnitSync(NamedTuple):
    """One unit's sync on this device: the replica's new values (phi blended by `alpha`), the
    new phi, the unit's new outer state, this replica's new error-feedback residual (None
    without error feedback)."""

    theta: Params
    phi: Params
    state: PenaltyState
    residual: Params | None


def split_units(params: Params) -> tuple[Params, Params]:
    """(non-layer parameters, stacked layer parameters)."""
    return {k: v for k, v in params.items() if k != LAYER_GROUP}, params[LAYER_GROUP]


def _use_value(x: Params, value: Params) -> Params:
    """Exactly `value`, with the gradient flowing to `x` unchanged (the sync is not
    differentiated): value + (x - x) with the second term's gradient 1. Non-finite entries of x
    (a diverged replica) are dropped rather than carried into the value."""

    def one(x_leaf, value_leaf):
        zero_with_grad = x_leaf - jax.lax.stop_gradient(x_leaf)
        return jax.lax.stop_gradient(value_leaf) + jnp.where(jnp.isfinite(x_leaf),
                                                             zero_with_grad, 0.0)

    return jax.tree.map(one, x, value)


def _to_pieces(x: jax.Array, replica_dim: int, num_replicas: int) -> jax.Array:
    """(R, piece): every replica's copy of this device's piece of its shard `x`, via one
    all-to-all over `replica`; a leaf kept whole is gathered (psum of one-hot rows, so the
    result is typed replica-invariant; such leaves are small)."""
    if replica_dim == NOT_SHARDED:
        mine = jnp.arange(num_replicas) == jax.lax.axis_index("replica")
        rows = jnp.where(mine.reshape((-1,) + (1,) * x.ndim), x[None], jnp.zeros_like(x)[None])
        return jax.lax.psum(rows, "replica")
    chunks = jnp.stack(jnp.split(x, num_replicas, axis=replica_dim))
    return jax.lax.all_to_all(chunks, "replica", 0, 0, tiled=True)


def _from_piece(piece: jax.Array, replica_dim: int) -> jax.Array:
    """This replica's whole shard, from the pieces of every replica (all-gather over `replica`)."""
    if replica_dim == NOT_SHARDED:
        return piece
    return jax.lax.all_gather(piece, "replica", axis=replica_dim, tiled=True)


@dataclasses.dataclass(frozen=True)
class UnitSelection:
    """Static indices of a set of units in the parameter tree: whether the non-layer unit is in
    it and which rows of the stacked layers (None: all of them, in order, so that a whole-model
    sync compiles to the same program as before selections existed)."""

    rest: bool
    layers: np.ndarray | None

    @classmethod
    def of(cls, units: Units, num_layers: int) -> UnitSelection:
        rows = np.array(sorted(u for u in units if u != REST_UNIT), np.int32)
        every = len(rows) == num_layers
        return cls(REST_UNIT in units, None if every else rows)

    @property
    def has_layers(self) -> bool:
        return self.layers is None or len(self.layers) > 0

    def take(self, stacked):
        """The selected layers' rows of a tree stacked over layers."""
        return stacked if self.layers is None else jax.tree.map(lambda x: x[self.layers], stacked)

    def put(self, stacked, rows):
        """`stacked` with the selected layers' rows replaced by `rows`."""
        if self.layers is None:
            return rows
        return jax.tree.map(lambda x, v: x.at[self.layers].set(v), stacked, rows)

    def view(self, params: Params, per_leaf: bool = False) -> Params:
        """The selected units of a parameter tree: non-layer groups (if selected) and layers;
        `per_leaf`: a tree of per-parameter facts (masks, dims), whose layers are not stacked."""
        rest, layers = split_units(params)
        out = dict(rest) if self.rest else {}
        if self.has_layers:
            out[LAYER_GROUP] = layers if per_leaf else self.take(layers)
        return out

    def merge(self, params: Params, view: Params) -> Params:
        """`params` with the selected units replaced by those of `view`."""
        out = {**params, **{k: v for k, v in view.items() if k != LAYER_GROUP}}
        if self.has_layers:
            out[LAYER_GROUP] = self.put(params[LAYER_GROUP], view[LAYER_GROUP])
        return out


def codec(cfg: MethodConfig) -> Compression | TopK | None:
    """The codes `method.compression` names: dense block codes, sparse top-k, or None."""
    if cfg.compression == "none":
        return None
    if cfg.compression == "topk":
        return TopK(cfg.compression_block, cfg.topk_fraction, cfg.topk_value_bits,
                    cfg.error_feedback_decay)
    return Compression(cfg.compression, cfg.compression_block)


@dataclasses.dataclass(frozen=True)
class OuterSync:
    """The outer optimizer of diloco and edit, applied per synced unit on local shards.

    With `replica_dims` (method.shard_outer_over_replica) phi and the outer moments are split
    over `replica` too: a sync exchanges the shards' pieces by all-to-all, combines them where
    the piece lives, and all-gathers the new phi back: the bytes of an all-reduce, with 1/R of
    the outer state per device.
    """

    rest_tx: optax.GradientTransformationExtraArgs
    layer_tx: optax.GradientTransformationExtraArgs
    global_norms: bool  # one norm per replica over the synced units (else per unit)
    sharded_mask: Params  # per parameter: split over `shard`?
    num_replicas: int
    fragments: tuple[Units, ...]  # the units of each fragment (one: the whole model)
    alpha: float  # the replica continues from alpha * theta_r + (1 - alpha) * phi
    replica_dims: Params | None  # per parameter: the shard dimension split over `replica`
    error_feedback: bool  # replicas carry what quantization dropped into the next sync
    slices: int = 1  # a delayed sync's payload travels in this many slices, one per step

    @classmethod
    def create(cls, cfg: MethodConfig, num_replicas: int, fragments: tuple[Units, ...],
               sharded_mask: Params, penalty: bool, replica_dims: Params | None = None,
               averaging: bool = False) -> OuterSync:
        """penalty=False: plain averaging of pseudo-gradients (DiLoCo); `fragments`: the units
        of each fragment (methods.Method.fragments); `averaging`: phi <- the replicas' mean
        (outer learning rate 1, no momentum: compressed local SGD and DreamDDP)."""
        if averaging:
            sgd = optax.sgd(1.0)
        else:
            sgd = optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum or None,
                            nesterov=cfg.nesterov and cfg.outer_momentum > 0)
        compression = codec(cfg)
        rest_mask, layer_mask = split_units(sharded_mask)
        split_masks = (split_units(jax.tree.map(lambda d: d != NOT_SHARDED, replica_dims))
                       if replica_dims is not None else (None, None))

        def make(mask, split_mask):
            combination = StackedSum(split_mask) if split_mask is not None else compression
            return pseudo_gradient_penalty(
                sgd, replica_axis="replica", num_replicas=num_replicas, shard_axis="shard",
                sharded_mask=mask, anomaly=penalty and cfg.anomaly,
                weighting=penalty and cfg.weighting, clip_norm=cfg.clip_norm if penalty else 0.0,
                temperature=cfg.temperature, alpha=cfg.anomaly_alpha,
                anomaly_warmup=cfg.anomaly_warmup, threshold=cfg.anomaly_threshold,
                step_weighting=cfg.step_weighting if penalty else 0.0,
                combine=combination)

        return cls(make(rest_mask, split_masks[0]), make(layer_mask, split_masks[1]),
                   penalty and cfg.norm_granularity == "global", sharded_mask, num_replicas,
                   fragments, cfg.fragment_alpha, replica_dims,
                   compression is not None and (cfg.error_feedback
                                                or isinstance(compression, TopK)),
                   delay_slices(cfg))

    def init(self, phi: Params, replica_steps: jax.Array | None = None) -> OuterState:
        """Fresh outer state at phi; `replica_steps` (i32[R], default zeros) counts as synced
        for every fragment."""
        rest, layers = split_units(phi)
        if replica_steps is None:
            replica_steps = jnp.zeros((self.num_replicas,), jnp.int32)
        synced = jnp.broadcast_to(replica_steps, (len(self.fragments), self.num_replicas))
        arrived = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), phi)
                   if self.slices > 1 else None)
        return OuterState(phi=phi, rest=self.rest_tx.init(rest),
                          layers=jax.vmap(self.layer_tx.init)(layers), synced_steps=synced,
                          arrived=arrived)

    @property
    def num_layers(self) -> int:
        return sum(u != REST_UNIT for f in self.fragments for u in f)

    def select(self, units: Units) -> UnitSelection:
        return UnitSelection.of(units, self.num_layers)

    def fragment_index(self, units: Units) -> int:
        """The fragment these units form; 0 for a set that is none (DreamDDP's schedule, whose
        syncs then share one count of local steps, used by the metrics only)."""
        return self.fragments.index(units) if units in self.fragments else 0

    def sync_inputs(self, theta: Params, outer: OuterState, replica_steps: jax.Array,
                    units: Units, fragment: int = 0) -> tuple[dict, jax.Array]:
        """(extra arguments of every synced unit's update, i32[R] every replica's step count).

        `steps`: f32[R] local steps per replica since fragment `fragment`'s last sync, always
        present (every unit's anomaly test divides the norms by them, and step weighting uses
        them); `norms`: f32[R] norms of every replica's pseudo-gradient over `units` (global
        granularity only). `replica_steps` is this replica's count, shape (1,).
        """
        totals = gather_replicas(replica_steps[0], "replica")
        extra = {"steps": (totals - outer.synced_steps[fragment]).astype(jnp.float32)}
        if self.global_norms:
            selection = self.select(units)
            delta = jax.tree.map(jnp.subtract, selection.view(outer.phi), selection.view(theta))
            extra["norms"] = replica_norms(delta, replica_axis="replica", shard_axis="shard",
                                           sharded_mask=selection.view(self.sharded_mask, True))
        return extra, totals

    def _unit(self, group: str):
        """(outer transformation, replica dims) of the 'rest' or 'layers' unit kind; the
        layers' dims are those of one layer."""
        rest_dims, layer_dims = (None, None) if self.replica_dims is None else split_units(
            self.replica_dims)
        return (self.rest_tx, rest_dims) if group == "rest" else (self.layer_tx, layer_dims)

    def sync_unit(self, group: str, theta: Params, phi: Params, state: PenaltyState,
                  extra: dict, residual: Params | None = None) -> UnitSync:
        """One unit of kind `group` ('rest' or 'layers') from this replica's shard theta; the
        new theta is typed as varying over `replica` like theta (`_use_value`): a
        replica-invariant value would make the gradient of a step that differentiates through it
        be summed over replicas. `residual`: this replica's error-feedback residual of the unit
        (kept in `TrainState.residual`, not in the shared outer state), or None."""
        tx, replica_dims = self._unit(group)
        if replica_dims is None:
            delta = jax.tree.map(jnp.subtract, phi, theta)
        else:
            delta = jax.tree.map(lambda p, t, d: p[None] - _to_pieces(t, d, self.num_replicas),
                                 phi, theta, replica_dims)
        state = tx.weigh(delta, state, **extra)
        combined, residual = tx.combine(delta, state, residual)
        updates, state = tx.land(combined, state, phi)
        phi = optax.apply_updates(phi, updates)
        new_theta = _use_value(theta, blend(theta, self._whole(phi, replica_dims), self.alpha))
        return UnitSync(new_theta, phi, state, residual)

    @staticmethod
    def _whole(phi: Params, replica_dims) -> Params:
        """This replica's shard of phi (all-gathered over `replica` when split over it)."""
        return phi if replica_dims is None else jax.tree.map(_from_piece, phi, replica_dims)

    def sync_rest(self, theta: Params, outer: OuterState, extra: dict,
                  residual: Params | None = None) -> tuple[Params, UnitSync]:
        """Sync the non-layer unit: (params to use, its `UnitSync`); `residual`: the whole
        residual tree, or None."""
        rest_theta, _ = split_units(theta)
        rest_phi, _ = split_units(outer.phi)
        rest_residual = None if residual is None else split_units(residual)[0]
        synced = self.sync_unit("rest", rest_theta, rest_phi, outer.rest, extra, rest_residual)
        return {**theta, **synced.theta}, synced

    def layer_sync(self, outer: OuterState, extra: dict,
                   residual: Params | None = None) -> LayerSync:
        """The per-layer sync run inside the model's layer scan (EDiT); the per-layer outputs
        are `UnitSync`s."""

        def fn(theta_l: Params, xs):
            synced = self.sync_unit("layers", theta_l, *xs[:2], extra, *xs[2:])
            return synced.theta, synced

        states = (outer.phi[LAYER_GROUP], outer.layers)
        if residual is not None:
            states += (residual[LAYER_GROUP],)
        return LayerSync(fn, states)

    def sync_units(self, theta: Params, outer: OuterState, replica_steps: jax.Array,
                   units: Units, residual: Params | None = None
                   ) -> tuple[Params, OuterState, jax.Array, Params | None]:
        """The outer step of `units` (a fragment, or the whole model) at once, outside the layer
        scan: (theta with those units' new values, new outer state, the local steps per replica
        since the fragment's last sync, the new residual)."""
        fragment = self.fragment_index(units)
        extra, totals = self.sync_inputs(theta, outer, replica_steps, units, fragment)

        def one(group, state, theta_u, phi_u, *residual_u):
            synced = self.sync_unit(group, theta_u, phi_u, state, extra, *residual_u)
            kept = (synced.residual,) if residual_u else ()
            return (synced.theta, synced.phi, *kept, synced.state)

        trees = (theta, outer.phi) + (() if residual is None else (residual,))
        (new_theta, phi, *new_residual), outer_units = self._each_unit(units, outer, one, trees,
                                                                       trees)
        new_outer = outer_units._replace(phi=phi,
                                         synced_steps=outer.synced_steps.at[fragment].set(totals))
        return (new_theta, new_outer, totals - outer.synced_steps[fragment],
                new_residual[0] if new_residual else None)

    def _each_unit(self, units: Units, outer: OuterState, fn, inputs: tuple[Params, ...],
                   into: tuple[Params, ...]):
        """fn(unit kind 'rest' or 'layers', unit state, *views of `inputs`) -> (*new views, new
        unit state) on the selected non-layer unit and, under vmap, on the selected layers.
        Returns (the trees `into` with the selected units' views replaced by the new ones, the
        outer state with the units' new states)."""
        selection = self.select(units)
        new_trees, rest_state, layer_states = [dict(t) for t in into], outer.rest, outer.layers
        if selection.rest:
            *views, rest_state = fn("rest", outer.rest, *(split_units(t)[0] for t in inputs))
            for new, view in zip(new_trees, views):
                new.update(view)
        if selection.has_layers:
            *views, states = jax.vmap(lambda state, *xs: fn("layers", state, *xs))(
                selection.take(outer.layers), *(selection.take(t[LAYER_GROUP]) for t in inputs))
            for new, tree, view in zip(new_trees, into, views):
                new[LAYER_GROUP] = selection.put(tree[LAYER_GROUP], view)
            layer_states = selection.put(outer.layers, states)
        return new_trees, outer._replace(rest=rest_state, layers=layer_states)

    def start_sliced(self, theta: Params, outer: OuterState, replica_steps: jax.Array,
                     units: Units, in_flight: Params
                     ) -> tuple[OuterState, Params, jax.Array]:
        """A sliced sync's start, from the step's input: the penalty weighs the units'
        pseudo-gradients (norms, outliers, weights, statistics) and this replica's weighted f32
        terms go in flight. Returns (new outer state, new in-flight terms, the local steps per
        replica since the fragment's last sync)."""
        fragment = self.fragment_index(units)
        extra, totals = self.sync_inputs(theta, outer, replica_steps, units, fragment)

        def weigh(group, state, theta_u, phi_u):
            delta = jax.tree.map(jnp.subtract, phi_u, theta_u)
            state = self._unit(group)[0].weigh(delta, state, **extra)
            return weighted_terms(delta, state.weights, replica_axis="replica"), state

        (in_flight,), outer = self._each_unit(units, outer, weigh, (theta, outer.phi),
                                              (in_flight,))
        synced = outer.synced_steps.at[fragment].set(totals)
        return (outer._replace(synced_steps=synced), in_flight,
                totals - outer.synced_steps[fragment])

    def send_slice(self, outer: OuterState, in_flight: Params, units: Units,
                   index: int) -> OuterState:
        """Slice `index` of the units' in-flight terms, summed over `replica` by one all-reduce
        (from the step's input: it depends on nothing the step computes), into
        `outer.arrived`. Slice i of a leaf is its flat elements [i c, (i + 1) c), c = ceil(n /
        slices)."""
        selection = self.select(units)

        def cut(x):
            size = math.ceil(x.size / self.slices)
            return x.reshape(-1)[index * size:(index + 1) * size]

        summed = jax.lax.psum(jax.tree.map(cut, selection.view(in_flight)), "replica")

        def put(x, part):
            size = math.ceil(x.size / self.slices)
            return x.reshape(-1).at[index * size:index * size + part.size].set(part).reshape(
                x.shape)

        arrived = jax.tree.map(put, selection.view(outer.arrived), summed)
        return outer._replace(arrived=selection.merge(outer.arrived, arrived))

    def land_sliced(self, theta: Params, outer: OuterState, units: Units
                    ) -> tuple[Params, OuterState]:
        """A sliced sync lands once its last slice has arrived: the penalty clips the sum and
        the outer optimizer steps phi; the units continue from phi blended by `alpha`."""

        def step(group, state, phi_u, summed):
            combined = jax.tree.map(lambda s, p: s.astype(p.dtype), summed, phi_u)
            updates, state = self._unit(group)[0].land(combined, state, phi_u)
            return optax.apply_updates(phi_u, updates), state

        (phi,), outer = self._each_unit(units, outer, step, (outer.phi, outer.arrived),
                                        (outer.phi,))
        outer = outer._replace(phi=phi)
        return self.apply_units(theta, outer, units), outer

    def apply_units(self, theta: Params, outer: OuterState, units: Units) -> Params:
        """A delayed fragment's outer step lands: its units continue from phi, blended with
        their local values by `alpha`."""
        selection = self.select(units)
        phi = selection.view(outer.phi)
        if self.replica_dims is not None:  # all-gather the selected units' pieces only
            rest_dims, layer_dims = split_units(self.replica_dims)
            phi = {k: (jax.vmap(lambda p: self._whole(p, layer_dims))(v) if k == LAYER_GROUP
                       else self._whole(v, rest_dims[k])) for k, v in phi.items()}
        return selection.merge(theta, blend(selection.view(theta), phi, self.alpha))


def assemble(rest: UnitSync, layers: UnitSync, synced_steps: jax.Array
             ) -> tuple[Params, OuterState, Params | None]:
    """(theta, outer state, residual) from the `UnitSync`s of both unit kinds (the layers'
    stacked by the scan)."""
    theta = {**rest.theta, LAYER_GROUP: layers.theta}
    phi = {**rest.phi, LAYER_GROUP: layers.phi}
    residual = None if rest.residual is None else {**rest.residual, LAYER_GROUP: layers.residual}
    return theta, OuterState(phi, rest.state, layers.state, synced_steps), residual


def average_units(theta: Params, units: Units, num_layers: int) -> Params:
    """Local SGD's and DreamDDP's sync: theta_r <- mean_r theta_r for the given units."""
    selection = UnitSelection.of(units, num_layers)
    return selection.merge(theta, jax.lax.pmean(selection.view(theta), "replica"))
