"""Syncing replicas: the outer state and the sync rules of local SGD, DiLoCo and EDiT.

A *synced unit* is one decoder layer, or all non-layer parameters together (embedding, final
norm, head). For a unit, `sync_unit` runs the outer transformation of outer.py (the
pseudo-gradient penalty around SGD with Nesterov momentum) on this device's shard:
delta_r = phi - theta_r -> weights -> combined delta -> clip -> phi <- OuterOpt(phi, delta);
every replica then continues from phi. EDiT calls it for each layer inside the forward pass's
layer scan (`layer_sync`), right before that layer's all-gather; DiLoCo calls it for every unit
after the inner step (`sync_after_step`). Local SGD only averages (`average_replicas`).

What every unit's sync shares is gathered once before the scan, by scalar collectives only
(`sync_inputs`): the local steps each replica ran since the last sync (always passed to the
penalty: its anomaly test judges norms per local step, so an A-EDiT replica that ran more steps
is not flagged for that alone; also A-EDiT's step weighting and the metrics) and, with `global`
norm granularity, the per-replica norms of the whole model's pseudo-gradient; with `layer`
granularity each unit uses its own norms.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from edit_jax.config import MethodConfig
from edit_jax.model import LAYER_GROUP, LayerSync, Params
from edit_jax.outer import gather_replicas, pseudo_gradient_penalty, replica_norms
from edit_jax.sharding import NOT_SHARDED

REST = "rest"  # the unit of all non-layer parameters
# {'phi': Params, 'rest': PenaltyState, 'layers': PenaltyState stacked over L,
#  'synced_steps': i32[R], every replica's step count at the last sync}
OuterState = dict


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
class OuterSync:
    """The outer optimizer of diloco and edit, applied per synced unit on local shards.

    With `replica_dims` (method.shard_outer_over_replica) phi and the outer moments are split
    over `replica` too: a sync exchanges the shards' pieces by all-to-all, combines them where
    the piece lives, and all-gathers the new phi back: the bytes of an all-reduce, with 1/R of
    the outer state per device.
    """

    rest_tx: optax.GradientTransformationExtraArgs
    layer_tx: optax.GradientTransformationExtraArgs
    global_norms: bool  # one norm per replica over the whole model (else per unit)
    sharded_mask: Params  # per parameter: split over `shard`?
    num_replicas: int
    replica_dims: Params | None  # per parameter: the shard dimension split over `replica`

    @classmethod
    def create(cls, cfg: MethodConfig, num_replicas: int, sharded_mask: Params, penalty: bool,
               replica_dims: Params | None = None) -> OuterSync:
        """penalty=False: plain averaging of pseudo-gradients (DiLoCo)."""
        sgd = optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum or None,
                        nesterov=cfg.nesterov and cfg.outer_momentum > 0)
        rest_mask, layer_mask = split_units(sharded_mask)
        split_masks = (split_units(jax.tree.map(lambda d: d != NOT_SHARDED, replica_dims))
                       if replica_dims is not None else (None, None))

        def make(mask, split_mask):
            return pseudo_gradient_penalty(
                sgd, replica_axis="replica", num_replicas=num_replicas, shard_axis="shard",
                sharded_mask=mask, anomaly=penalty and cfg.anomaly,
                weighting=penalty and cfg.weighting, clip_norm=cfg.clip_norm if penalty else 0.0,
                temperature=cfg.temperature, alpha=cfg.anomaly_alpha,
                anomaly_warmup=cfg.anomaly_warmup, threshold=cfg.anomaly_threshold,
                step_weighting=cfg.step_weighting if penalty else 0.0,
                replica_split_mask=split_mask)

        return cls(make(rest_mask, split_masks[0]), make(layer_mask, split_masks[1]),
                   penalty and cfg.norm_granularity == "global", sharded_mask, num_replicas,
                   replica_dims)

    def init(self, phi: Params, replica_steps: jax.Array | None = None) -> OuterState:
        """Fresh outer state at phi; `replica_steps` (i32[R], default zeros) counts as synced."""
        rest, layers = split_units(phi)
        if replica_steps is None:
            replica_steps = jnp.zeros((self.num_replicas,), jnp.int32)
        return {"phi": phi, REST: self.rest_tx.init(rest),
                LAYER_GROUP: jax.vmap(self.layer_tx.init)(layers), "synced_steps": replica_steps}

    def sync_inputs(self, theta: Params, outer: OuterState,
                    replica_steps: jax.Array) -> tuple[dict, jax.Array]:
        """(extra arguments of every unit's update, i32[R] every replica's step count).

        `steps`: f32[R] local steps per replica since the last sync, always present (every
        unit's anomaly test divides the norms by them, and step weighting uses them); `norms`:
        f32[R] norms of every replica's whole pseudo-gradient (global granularity only).
        `replica_steps` is this replica's count, shape (1,).
        """
        totals = gather_replicas(replica_steps[0], "replica")
        extra = {"steps": (totals - outer["synced_steps"]).astype(jnp.float32)}
        if self.global_norms:
            delta = jax.tree.map(jnp.subtract, outer["phi"], theta)
            extra["norms"] = replica_norms(delta, replica_axis="replica", shard_axis="shard",
                                           sharded_mask=self.sharded_mask)
        return extra, totals

    def sync_unit(self, tx, theta: Params, phi: Params, state, extra: dict, replica_dims):
        """(new theta, new phi, new outer state) of one unit, from this replica's shard theta."""
        if replica_dims is None:
            delta = jax.tree.map(jnp.subtract, phi, theta)
        else:
            delta = jax.tree.map(lambda p, t, d: p[None] - _to_pieces(t, d, self.num_replicas),
                                 phi, theta, replica_dims)
        updates, state = tx.update(delta, state, phi, **extra)
        phi = optax.apply_updates(phi, updates)
        new_theta = phi if replica_dims is None else jax.tree.map(_from_piece, phi, replica_dims)
        return new_theta, phi, state

    def _unit_dims(self):
        return (None, None) if self.replica_dims is None else split_units(self.replica_dims)

    def sync_rest(self, theta: Params, outer: OuterState, extra: dict):
        """Sync the non-layer unit: (params to use, (new theta, new phi, new state) of it)."""
        rest_theta, _ = split_units(theta)
        rest_phi, _ = split_units(outer["phi"])
        synced = self.sync_unit(self.rest_tx, rest_theta, rest_phi, outer[REST], extra,
                                self._unit_dims()[0])
        return {**theta, **_use_value(rest_theta, synced[0])}, synced

    def layer_sync(self, outer: OuterState, extra: dict) -> LayerSync:
        """The per-layer sync run inside the model's layer scan (EDiT); per-layer outputs are
        (new theta, new phi, new outer state)."""
        layer_dims = self._unit_dims()[1]

        def fn(theta_l: Params, xs):
            phi_l, state_l = xs
            synced = self.sync_unit(self.layer_tx, theta_l, phi_l, state_l, extra, layer_dims)
            return _use_value(theta_l, synced[0]), synced

        return LayerSync(fn, (outer["phi"][LAYER_GROUP], outer[LAYER_GROUP]))

    def sync_after_step(self, theta: Params, outer: OuterState,
                        replica_steps: jax.Array) -> tuple[Params, OuterState, jax.Array]:
        """DiLoCo: every unit at once after the inner step; returns (new theta, outer, the
        local steps per replica since the last sync)."""
        extra, totals = self.sync_inputs(theta, outer, replica_steps)
        _, rest = self.sync_rest(theta, outer, extra)
        layers = jax.vmap(
            lambda t, p, s: self.sync_unit(self.layer_tx, t, p, s, extra, self._unit_dims()[1]))(
                theta[LAYER_GROUP], outer["phi"][LAYER_GROUP], outer[LAYER_GROUP])
        return (*assemble(rest, layers, totals), totals - outer["synced_steps"])


def assemble(rest, layers, synced_steps: jax.Array) -> tuple[Params, OuterState]:
    """(theta, outer state) from the (new theta, new phi, new state) of both units."""
    theta = {**rest[0], LAYER_GROUP: layers[0]}
    phi = {**rest[1], LAYER_GROUP: layers[1]}
    return theta, {"phi": phi, REST: rest[2], LAYER_GROUP: layers[2],
                   "synced_steps": synced_steps}


def average_replicas(theta: Params) -> Params:
    """Local SGD's sync: theta_r <- mean_r theta_r."""
    return jax.lax.pmean(theta, "replica")
