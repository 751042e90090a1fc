"""Syncing replicas: the outer state and the sync rules of local SGD, DiLoCo and EDiT.

A *synced unit* is one decoder layer, or all non-layer parameters together (embedding, final
norm, head). For a unit, `sync_unit` runs the outer transformation of outer.py (the
pseudo-gradient penalty around SGD with Nesterov momentum) on this device's shard:
delta_r = phi - theta_r -> weights -> combined delta -> clip -> phi <- OuterOpt(phi, delta);
every replica then continues from phi. EDiT calls it for each layer inside the forward pass's
layer scan (`layer_sync`), right before that layer's all-gather; DiLoCo calls it for every unit
after the inner step (`sync_after_step`). Local SGD only averages (`average_replicas`).

With `global` norm granularity the per-replica norms of the whole model's pseudo-gradient are
computed once before the scan (scalar collectives only) and every unit uses them; with `layer`
granularity each unit uses the norms of its own pseudo-gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from edit_jax.config import MethodConfig
from edit_jax.model import LAYER_GROUP, LayerSync, Params
from edit_jax.outer import pseudo_gradient_penalty, replica_norms

REST = "rest"  # the unit of all non-layer parameters
OuterState = dict  # {'phi': Params, 'rest': PenaltyState, 'layers': PenaltyState stacked over L}


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


@dataclasses.dataclass(frozen=True)
class OuterSync:
    """The outer optimizer of diloco and edit, applied per synced unit on local shards."""

    rest_tx: optax.GradientTransformationExtraArgs
    layer_tx: optax.GradientTransformationExtraArgs
    global_norms: bool  # one norm per replica over the whole model (else per unit)
    sharded_mask: Params  # per parameter: split over `shard`?

    @classmethod
    def create(cls, cfg: MethodConfig, num_replicas: int, sharded_mask: Params,
               penalty: bool) -> OuterSync:
        """penalty=False: plain averaging of pseudo-gradients (DiLoCo)."""
        sgd = optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum or None,
                        nesterov=cfg.nesterov and cfg.outer_momentum > 0)
        rest_mask, layer_mask = split_units(sharded_mask)

        def make(mask):
            return pseudo_gradient_penalty(
                sgd, replica_axis="replica", num_replicas=num_replicas, shard_axis="shard",
                sharded_mask=mask, anomaly=penalty and cfg.anomaly,
                weighting=penalty and cfg.weighting, clip_norm=cfg.clip_norm if penalty else 0.0,
                temperature=cfg.temperature, alpha=cfg.anomaly_alpha,
                anomaly_warmup=cfg.anomaly_warmup, threshold=cfg.anomaly_threshold)

        return cls(make(rest_mask), make(layer_mask),
                   penalty and cfg.norm_granularity == "global", sharded_mask)

    def init(self, phi: Params) -> OuterState:
        rest, layers = split_units(phi)
        return {"phi": phi, REST: self.rest_tx.init(rest),
                LAYER_GROUP: jax.vmap(self.layer_tx.init)(layers)}

    def model_norms(self, theta: Params, phi: Params) -> jax.Array | None:
        """f32[R] norms of every replica's whole pseudo-gradient, or None (per-unit norms)."""
        if not self.global_norms:
            return None
        delta = jax.tree.map(jnp.subtract, phi, theta)
        return replica_norms(delta, replica_axis="replica", shard_axis="shard",
                             sharded_mask=self.sharded_mask)

    def sync_unit(self, tx, theta: Params, phi: Params, state, norms) -> tuple[Params, Any]:
        """(new phi, new outer state) of one unit, from this replica's shard theta."""
        delta = jax.tree.map(jnp.subtract, phi, theta)
        updates, state = tx.update(delta, state, phi, norms=norms)
        return optax.apply_updates(phi, updates), state

    def sync_rest(self, theta: Params, outer: OuterState, norms):
        """Sync the non-layer unit; returns (params to use, new rest phi, new rest state)."""
        rest_theta, _ = split_units(theta)
        rest_phi, _ = split_units(outer["phi"])
        new_phi, new_state = self.sync_unit(self.rest_tx, rest_theta, rest_phi, outer[REST], norms)
        return {**theta, **_use_value(rest_theta, new_phi)}, new_phi, new_state

    def layer_sync(self, outer: OuterState, norms) -> LayerSync:
        """The per-layer sync run inside the model's layer scan (EDiT)."""

        def fn(theta_l: Params, xs):
            phi_l, state_l = xs
            new_phi_l, new_state_l = self.sync_unit(self.layer_tx, theta_l, phi_l, state_l, norms)
            return _use_value(theta_l, new_phi_l), (new_phi_l, new_state_l)

        return LayerSync(fn, (outer["phi"][LAYER_GROUP], outer[LAYER_GROUP]))

    def sync_after_step(self, theta: Params, outer: OuterState) -> tuple[Params, OuterState]:
        """DiLoCo: every unit at once after the inner step; returns (new theta = phi, outer)."""
        norms = self.model_norms(theta, outer["phi"])
        _, rest_phi, rest_state = self.sync_rest(theta, outer, norms)
        layer_phi, layer_state = jax.vmap(
            lambda t, p, s: self.sync_unit(self.layer_tx, t, p, s, norms))(
                theta[LAYER_GROUP], outer["phi"][LAYER_GROUP], outer[LAYER_GROUP])
        phi = {**rest_phi, LAYER_GROUP: layer_phi}
        return phi, {"phi": phi, REST: rest_state, LAYER_GROUP: layer_state}


def average_replicas(theta: Params) -> Params:
    """Local SGD's sync: theta_r <- mean_r theta_r."""
    return jax.lax.pmean(theta, "replica")
