"""The sharded inner step under `jax.shard_map` on the ('replica', 'shard') mesh.

Per device: squeeze the replica dimension, run the forward pass with each layer all-gathered
over `shard` inside the scan, differentiate (autodiff turns the all-gather into the gradient's
reduce-scatter), and apply the inner optimizer to the local shard. Every method uses this one
step; they differ in the step kind (methods.py):
  DDP    gradients are averaged over `replica` (one pmean);
  LOCAL  no collective over `replica` at all;
  SYNC   a local step plus the method's sync rule: EDiT's layer-wise sync runs inside the
         forward pass (the non-layer unit just before it), DiLoCo's outer step and local SGD's
         averaging run after the inner update.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from edit_jax.methods import StepKind, SyncRule
from edit_jax.model import LAYER_GROUP, Params, loss_fn
from edit_jax.optimizer import sharded_global_norm
from edit_jax.sharding import (BATCH_SPEC, is_sharded, make_gather, named, optimizer_specs,
                               outer_param_specs, param_specs, shard_dims)
from edit_jax.sync import REST, OuterSync, assemble, average_replicas, split_units

# {'params': replica-stacked params, 'opt_state': inner optax state (per replica, counters too),
#  'replica_steps': i32[R] inner steps each replica has taken, 'outer': OuterState (methods with
#  an outer optimizer only)}
TrainState = dict


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every piece of the train state lives on the mesh."""

    mesh: jax.sharding.Mesh
    dims: Params  # per parameter: the dimension split over `shard` (or NOT_SHARDED)
    state_specs: dict  # PartitionSpecs of the TrainState

    @property
    def num_replicas(self) -> int:
        return self.mesh.shape["replica"]

    @property
    def num_shards(self) -> int:
        return self.mesh.shape["shard"]

    @property
    def state_shardings(self):
        return named(self.mesh, self.state_specs)

    @property
    def batch_sharding(self):
        return jax.sharding.NamedSharding(self.mesh, BATCH_SPEC)

    def abstract_state(self, params_shapes: Params, tx: optax.GradientTransformation,
                       outer: OuterSync | None):
        """ShapeDtypeStructs (with shardings) of the TrainState, for restoring checkpoints."""
        shapes = jax.eval_shape(lambda p: _fresh_state(p, self.num_replicas, tx, outer),
                                params_shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)


def stack_replicas(params: Params, num_replicas: int) -> Params:
    """Give every leaf a leading replica dimension (identical copies)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_replicas, *x.shape)), params)


def _fresh_state(params: Params, num_replicas: int, tx: optax.GradientTransformation,
                 outer: OuterSync | None) -> TrainState:
    stacked = stack_replicas(params, num_replicas)
    state = {"params": stacked, "opt_state": jax.vmap(tx.init)(stacked),
             "replica_steps": jnp.zeros((num_replicas,), jnp.int32)}
    if outer is not None:
        state["outer"] = outer.init(params)
    return state


def make_layout(mesh: jax.sharding.Mesh, params_shapes: Params, tx: optax.GradientTransformation,
                outer: OuterSync | None = None) -> Layout:
    dims = shard_dims(params_shapes, mesh.shape["shard"])
    specs = param_specs(params_shapes, dims)
    opt_shapes = jax.eval_shape(
        lambda p: jax.vmap(tx.init)(stack_replicas(p, mesh.shape["replica"])), params_shapes)
    state_specs = {"params": specs,
                   "opt_state": optimizer_specs(tx, opt_shapes, specs, P("replica")),
                   "replica_steps": P("replica")}
    if outer is not None:
        state_specs["outer"] = outer_specs(outer, params_shapes, dims)
    return Layout(mesh, dims, state_specs)


def outer_specs(outer: OuterSync, params_shapes: Params, dims: Params) -> dict:
    """phi and outer moments like the parameters minus the replica axis (split over `replica`
    too with shard_outer_over_replica); statistics replicated."""
    phi_specs = outer_param_specs(params_shapes, dims, outer.replica_dims)
    shapes = jax.eval_shape(outer.init, params_shapes)
    rest_specs, layer_specs = split_units(phi_specs)
    return {"phi": phi_specs,
            REST: optimizer_specs(outer.rest_tx, shapes[REST], rest_specs),
            LAYER_GROUP: optimizer_specs(outer.layer_tx, shapes[LAYER_GROUP], layer_specs),
            "synced_steps": P()}


def init_state(layout: Layout, init_params, tx: optax.GradientTransformation,
               outer: OuterSync | None = None) -> TrainState:
    """Initialise on device, each device creating only its shards. `init_params()` -> Params."""
    return jax.jit(lambda: _fresh_state(init_params(), layout.num_replicas, tx, outer),
                   out_shardings=layout.state_shardings)()


def make_begin_local_phase(layout: Layout, outer: OuterSync):
    """jit: phi <- theta (replica 0; all replicas are equal after synchronous steps), fresh
    outer optimizer state, the steps so far count as synced. Runs when the first local step
    begins."""

    def begin(state: TrainState) -> TrainState:
        return {**state, "outer": outer.init(_unstack(state["params"]), state["replica_steps"])}

    return jax.jit(begin, out_shardings=layout.state_shardings, donate_argnums=0)


def _unstack(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _stack(tree):
    return jax.tree.map(lambda x: x[None], tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, layout: Layout, kind: StepKind,
                    rule: SyncRule = SyncRule.NONE, outer: OuterSync | None = None):
    """jit(shard_map(step)): (TrainState, tokens (B, T+1)) -> (TrainState, metrics).

    metrics: 'loss' and 'grad_norm' per replica (shape (R,)); on sync steps with an outer
    optimizer the sync's replica weights, the local steps per replica since the previous sync,
    and (layer-wise) the outliers and every replica's step count after this step.
    """
    gather = make_gather(layout.dims)
    sharded_mask = is_sharded(layout.dims)
    num_shards = layout.num_shards
    sync_rule = rule if kind is StepKind.SYNC else SyncRule.NONE
    if sync_rule in (SyncRule.OUTER, SyncRule.LAYERWISE) and outer is None:
        raise ValueError(f"the {sync_rule.value} sync needs an OuterSync")

    def local_step(state: TrainState, tokens_bxT1):
        outer_state = state.get("outer")
        theta = _unstack(state["params"])
        metrics = {}
        if sync_rule is SyncRule.LAYERWISE:
            extra, totals = outer.sync_inputs(theta, outer_state, state["replica_steps"])
            metrics["sync_local_steps"] = extra["steps"].astype(jnp.int32)
            metrics["replica_steps"] = totals + 1  # after this step

        def replica_loss_part(params):
            # Each device's share of its replica's mean loss; the all-gather's transpose sums
            # the shares' gradients over `shard`, giving the gradient of the replica mean.
            layer_sync, rest = None, None
            if sync_rule is SyncRule.LAYERWISE:
                params, rest = outer.sync_rest(params, outer_state, extra)
                layer_sync = outer.layer_sync(outer_state, extra)
            loss, layer_outs = loss_fn(graphdef, params, tokens_bxT1, gather, layer_sync)
            return loss / num_shards, (layer_outs, rest)

        (loss_part, (layer_outs, rest)), grads = jax.value_and_grad(
            replica_loss_part, has_aux=True)(theta)
        if sync_rule is SyncRule.LAYERWISE:  # every replica continues from the new phi
            theta, outer_state = assemble(rest, layer_outs, totals)
            metrics["sync_weights"] = outer_state[REST].weights
            metrics["sync_outliers"] = jnp.sum(outer_state[REST].outliers)
        if kind is StepKind.DDP:
            grads = jax.lax.pmean(grads, "replica")
        grad_norm = sharded_global_norm(grads, sharded_mask)
        updates, opt_state = tx.update(grads, _unstack(state["opt_state"]), theta)
        theta = optax.apply_updates(theta, updates)
        replica_steps = state["replica_steps"] + 1
        if sync_rule is SyncRule.AVERAGE:
            theta = average_replicas(theta)
        elif sync_rule is SyncRule.OUTER:
            theta, outer_state, local_steps = outer.sync_after_step(theta, outer_state,
                                                                    replica_steps)
            metrics["sync_weights"] = outer_state[REST].weights
            metrics["sync_local_steps"] = local_steps
        new_state = {"params": _stack(theta), "opt_state": _stack(opt_state),
                     "replica_steps": replica_steps}
        if outer_state is not None:
            new_state["outer"] = outer_state
        # Per replica (averaged on the host): a collective here would tie the replicas together.
        metrics["loss"] = jax.lax.psum(loss_part, "shard")[None]
        metrics["grad_norm"] = grad_norm[None]
        return new_state, metrics

    metric_specs = {"loss": P("replica"), "grad_norm": P("replica")}
    if sync_rule is SyncRule.LAYERWISE:
        metric_specs.update(sync_weights=P(), sync_outliers=P(), sync_local_steps=P(),
                            replica_steps=P())
    elif sync_rule is SyncRule.OUTER:
        metric_specs.update(sync_weights=P(), sync_local_steps=P())
    step = jax.shard_map(local_step, mesh=layout.mesh, in_specs=(layout.state_specs, BATCH_SPEC),
                         out_specs=(layout.state_specs, metric_specs))
    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef, layout: Layout):
    """jit(shard_map): (params, tokens of N batches) -> mean loss of the replica-averaged model
    over the N batches. The replicas are averaged once per evaluation, not once per batch: on a
    slow link between replicas that average is the evaluation's cost."""
    gather = make_gather(layout.dims)

    def local_eval(params, tokens_Nxbx_T1):
        mean_params = jax.lax.pmean(_unstack(params), "replica")
        losses = jax.lax.map(lambda tokens: loss_fn(graphdef, mean_params, tokens, gather)[0],
                             tokens_Nxbx_T1)
        return jax.lax.pmean(jnp.mean(losses), ("replica", "shard"))

    return jax.jit(jax.shard_map(local_eval, mesh=layout.mesh,
                                 in_specs=(layout.state_specs["params"], P(None, *BATCH_SPEC)),
                                 out_specs=P()))
