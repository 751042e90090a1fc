"""The sharded inner step under `jax.shard_map` on the ('replica', 'shard') mesh.

Per device: squeeze the replica dimension, run the forward pass with each layer all-gathered
over `shard` inside the scan, differentiate (autodiff turns the all-gather into the gradient's
reduce-scatter), and apply the inner optimizer to the local shard. Every method uses this one
step; they differ in the step's plan (methods.py):
  DDP    gradients are averaged over `replica` (one pmean);
  LOCAL  no collective over `replica` at all;
  SYNC   a local step plus the method's rule on the plan's units: EDiT's whole-model sync runs
         inside the forward pass (the non-layer unit just before it); fragments and delayed
         syncs run from the step's input (a sliced delayed sync: its start and one slice per
         step, its landing after the update); DiLoCo's outer step and local SGD's averaging
         run after the inner update; DreamDDP averages the step's input parameters.
Compressed local SGD and DreamDDP average from an anchor through the outer sync (sync.py), at
the same places; error feedback's residuals ride in `TrainState.residual`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from edit_jax.methods import REST_UNIT, Method, StepKind, StepPlan, SyncRule, Units
from edit_jax.model import Params, loss_fn
from edit_jax.optimizer import sharded_global_norm
from edit_jax.sharding import (BATCH_SPEC, is_sharded, make_gather, named, optimizer_specs,
                               outer_param_specs, param_specs, shard_dims)
from edit_jax.state import OuterState, TrainState
from edit_jax.sync import OuterSync, assemble, average_units, split_units


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every piece of the train state lives on the mesh."""

    mesh: jax.sharding.Mesh
    dims: Params  # per parameter: the dimension split over `shard` (or NOT_SHARDED)
    state_specs: TrainState  # PartitionSpecs of the TrainState

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
    feedback = outer is not None and outer.error_feedback
    sliced = outer is not None and outer.slices > 1
    return TrainState(stacked, jax.vmap(tx.init)(stacked), jnp.zeros((num_replicas,), jnp.int32),
                      None if outer is None else outer.init(params),
                      jax.tree.map(jnp.zeros_like, stacked) if feedback else None,
                      jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), stacked)
                      if sliced else None)


def make_layout(mesh: jax.sharding.Mesh, params_shapes: Params, tx: optax.GradientTransformation,
                outer: OuterSync | None = None) -> Layout:
    dims = shard_dims(params_shapes, mesh.shape["shard"])
    specs = param_specs(params_shapes, dims)
    opt_shapes = jax.eval_shape(
        lambda p: jax.vmap(tx.init)(stack_replicas(p, mesh.shape["replica"])), params_shapes)
    state_specs = TrainState(specs, optimizer_specs(tx, opt_shapes, specs, P("replica")),
                             P("replica"),
                             None if outer is None else outer_specs(outer, params_shapes, dims),
                             specs if outer is not None and outer.error_feedback else None,
                             specs if outer is not None and outer.slices > 1 else None)
    return Layout(mesh, dims, state_specs)


def outer_specs(outer: OuterSync, params_shapes: Params, dims: Params) -> OuterState:
    """phi and outer moments like the parameters minus the replica axis (split over `replica`
    too with shard_outer_over_replica); statistics replicated."""
    phi_specs = outer_param_specs(params_shapes, dims, outer.replica_dims)
    shapes = jax.eval_shape(outer.init, params_shapes)
    rest_specs, layer_specs = split_units(phi_specs)
    return OuterState(phi_specs, optimizer_specs(outer.rest_tx, shapes.rest, rest_specs),
                      optimizer_specs(outer.layer_tx, shapes.layers, layer_specs), P(),
                      phi_specs if outer.slices > 1 else None)


def init_state(layout: Layout, init_params, tx: optax.GradientTransformation,
               outer: OuterSync | None = None) -> TrainState:
    """Initialise on device, each device creating only its shards. `init_params()` -> Params."""
    return jax.jit(lambda: _fresh_state(init_params(), layout.num_replicas, tx, outer),
                   out_shardings=layout.state_shardings)()


def state_from_params(layout: Layout, params: Params, tx: optax.GradientTransformation,
                      outer: OuterSync | None = None) -> TrainState:
    """The fresh state of a run that starts from `params` (global arrays, e.g. laid out as phi):
    every replica starts from them, the optimizer and outer states are new."""
    return jax.jit(lambda p: _fresh_state(p, layout.num_replicas, tx, outer),
                   out_shardings=layout.state_shardings)(params)


def make_begin_local_phase(layout: Layout, outer: OuterSync):
    """jit: phi <- theta (replica 0; all replicas are equal after synchronous steps), fresh
    outer optimizer state, the steps so far count as synced. Runs when the first local step
    begins."""

    def begin(state: TrainState) -> TrainState:
        return state._replace(outer=outer.init(_unstack(state.params), state.replica_steps))

    return jax.jit(begin, out_shardings=layout.state_shardings, donate_argnums=0)


def _unstack(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _stack(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _sync_metrics(outer_state: OuterState, units: Units) -> dict:
    """The sync's replica weights and outlier count, from one of the synced units' states (all
    of them share the norms with global granularity)."""
    if REST_UNIT in units:
        penalty = outer_state.rest
    else:
        first = min(units)
        penalty = jax.tree.map(lambda x: x[first], outer_state.layers)
    return {"sync_weights": penalty.weights, "sync_outliers": jnp.sum(penalty.outliers)}


def make_train_step(graphdef, tx: optax.GradientTransformation, layout: Layout, plan: StepPlan,
                    method: Method | None = None, outer: OuterSync | None = None):
    """jit(shard_map(step)): (TrainState, tokens (B, T+1)) -> (TrainState, metrics).

    `plan` says what the step does over `replica` (methods.py); `method` gives the rule and
    where each sync runs: EDiT's whole-model sync inside the layer scan; an outer sync due at the
    start of the step (edit's fragments, any delayed fragment; a sliced one sends the plan's
    slices from the step's input too and lands after the update) from the step's input; DiLoCo's
    after the inner update; local SGD's averaging after the update; DreamDDP's averaging of the
    step's input parameters, which the update then starts from. metrics: 'loss' and
    'grad_norm' per replica (shape (R,)); on outer syncs the replica weights and outliers, the
    local steps per replica since the previous sync, and (in the scan) every replica's step
    count after this step.
    """
    gather = make_gather(layout.dims)
    sharded_mask = is_sharded(layout.dims)
    num_shards = layout.num_shards
    rule = method.rule if method is not None and plan.kind is StepKind.SYNC else SyncRule.NONE
    outer_sync = bool(plan.sync) and (rule in (SyncRule.OUTER, SyncRule.LAYERWISE)
                                      or (rule is not SyncRule.NONE and method.anchored))
    if (outer_sync or plan.apply or plan.send) and outer is None:
        raise ValueError(f"the {rule.value} sync needs an OuterSync")
    in_scan = (outer_sync and rule is SyncRule.LAYERWISE and plan.sync == method.units
               and method.fragment_delay == 0)
    sliced = method is not None and method.slices > 1
    at_start = outer_sync and not in_scan and method.sends_at_start and not sliced
    at_end = outer_sync and not in_scan and not method.sends_at_start
    slices = sorted(({(plan.sync, 0)} if outer_sync and sliced else set()) | plan.send,
                    key=lambda s: s[1])

    def local_step(state: TrainState, tokens_bxT1):
        outer_state = state.outer
        theta = _unstack(state.params)
        residual = None if state.residual is None else _unstack(state.residual)
        in_flight = None if state.in_flight is None else _unstack(state.in_flight)
        metrics = {}
        if in_scan:
            extra, totals = outer.sync_inputs(theta, outer_state, state.replica_steps, plan.sync)
            metrics["sync_local_steps"] = extra["steps"].astype(jnp.int32)
            metrics["replica_steps"] = totals + 1  # after this step
        elif at_start:  # from the step's input: no data dependency on this step's compute
            synced, outer_state, metrics["sync_local_steps"], residual = outer.sync_units(
                theta, outer_state, state.replica_steps, plan.sync, residual)
            metrics.update(_sync_metrics(outer_state, plan.sync))
            if not method.fragment_delay and rule is not SyncRule.PARTIAL:
                theta = synced  # the synced values take part in this step
        elif outer_sync and sliced:  # weighed from the step's input, its first slice sent below
            outer_state, in_flight, metrics["sync_local_steps"] = outer.start_sliced(
                theta, outer_state, state.replica_steps, plan.sync, in_flight)
            metrics.update(_sync_metrics(outer_state, plan.sync))
        for units, index in slices:  # from the step's input too
            outer_state = outer.send_slice(outer_state, in_flight, units, index)

        def replica_loss_part(params):
            # Each device's share of its replica's mean loss; the all-gather's transpose sums
            # the shares' gradients over `shard`, giving the gradient of the replica mean.
            layer_sync, rest = None, None
            if in_scan:
                params, rest = outer.sync_rest(params, outer_state, extra, residual)
                layer_sync = outer.layer_sync(outer_state, extra, residual)
            loss, layer_outs = loss_fn(graphdef, params, tokens_bxT1, gather, layer_sync)
            return loss / num_shards, (layer_outs, rest)

        (loss_part, (layer_outs, rest)), grads = jax.value_and_grad(
            replica_loss_part, has_aux=True)(theta)
        if in_scan:  # every replica continues from the new phi
            theta, outer_state, residual = assemble(rest, layer_outs,
                                                    outer_state.synced_steps.at[0].set(totals))
            metrics.update(_sync_metrics(outer_state, plan.sync))
        if plan.kind is StepKind.DDP:
            grads = jax.lax.pmean(grads, "replica")
        if rule is SyncRule.PARTIAL:  # the update starts from the averaged input parameters
            theta = synced if outer_sync else average_units(theta, plan.sync, method.num_layers)
        grad_norm = sharded_global_norm(grads, sharded_mask)
        updates, opt_state = tx.update(grads, _unstack(state.opt_state), theta)
        theta = optax.apply_updates(theta, updates)
        replica_steps = state.replica_steps + 1
        if rule is SyncRule.AVERAGE and not outer_sync:
            theta = average_units(theta, plan.sync, method.num_layers)
        elif at_end:
            theta, outer_state, metrics["sync_local_steps"], residual = outer.sync_units(
                theta, outer_state, replica_steps, plan.sync, residual)
            metrics.update(_sync_metrics(outer_state, plan.sync))
        if plan.apply and sliced:  # a sliced fragment's last slice has arrived
            theta, outer_state = outer.land_sliced(theta, outer_state, plan.apply)
        elif plan.apply:  # a delayed fragment's outer step lands
            theta = outer.apply_units(theta, outer_state, plan.apply)
        new_state = TrainState(_stack(theta), _stack(opt_state), replica_steps, outer_state,
                               None if residual is None else _stack(residual),
                               None if in_flight is None else _stack(in_flight))
        # Per replica (averaged on the host): a collective here would tie the replicas together.
        metrics["loss"] = jax.lax.psum(loss_part, "shard")[None]
        metrics["grad_norm"] = grad_norm[None]
        return new_state, metrics

    metric_specs = {"loss": P("replica"), "grad_norm": P("replica")}
    if outer_sync:
        metric_specs.update(sync_weights=P(), sync_outliers=P(), sync_local_steps=P())
    if in_scan:
        metric_specs["replica_steps"] = P()
    step = jax.shard_map(local_step, mesh=layout.mesh, in_specs=(layout.state_specs, BATCH_SPEC),
                         out_specs=(layout.state_specs, metric_specs))
    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef, layout: Layout, phi: bool = False):
    """jit(shard_map): (params, tokens of N batches) -> mean loss over the N batches of the
    replica-averaged model, or with `phi` of the outer state's phi (then pass
    `state.outer.phi`): the replicas are averaged once per evaluation, not once per batch, and
    on a slow link between replicas that average is the evaluation's cost, which phi, whole on
    every replica, does not have (only the scalar loss crosses)."""
    gather = make_gather(layout.dims)

    def local_eval(params, tokens_Nxbx_T1):
        params = params if phi else jax.lax.pmean(_unstack(params), "replica")
        losses = jax.lax.map(lambda tokens: loss_fn(graphdef, params, tokens, gather)[0],
                             tokens_Nxbx_T1)
        return jax.lax.pmean(jnp.mean(losses), ("replica", "shard"))

    params_specs = layout.state_specs.outer.phi if phi else layout.state_specs.params
    return jax.jit(jax.shard_map(local_eval, mesh=layout.mesh,
                                 in_specs=(params_specs, P(None, *BATCH_SPEC)), out_specs=P()))
