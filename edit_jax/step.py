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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from edit_jax.methods import REST_UNIT, Method, Placement, StepKind, StepPlan, SyncRule, Units
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


class _Carry(NamedTuple):
    """What a step's sync changes besides theta: the outer state, this replica's error-feedback
    residual and sliced terms in flight (None where the method has none), and the metrics."""

    outer: OuterState | None
    residual: Params | None
    in_flight: Params | None
    metrics: dict


def _outer_sync_metrics(carry: _Carry, units: Units, steps: jax.Array) -> _Carry:
    metrics = {**carry.metrics, "sync_local_steps": steps.astype(jnp.int32),
               **_sync_metrics(carry.outer, units)}
    return carry._replace(metrics=metrics)


def _sync_before(method: Method, outer: OuterSync | None, plan: StepPlan, theta: Params,
                 replica_steps: jax.Array, carry: _Carry) -> tuple[Params, Params | None, _Carry]:
    """The sync starting from the step's input (`Placement.BEFORE`) and the slices in flight
    the plan sends; no data dependency on the step's compute. Returns (the parameters the step
    computes with, those its update starts from if not those, carry)."""
    update_from, sends = None, set(plan.send)
    if method.placement(plan) is Placement.BEFORE and not method.has_outer_state:
        update_from = average_units(theta, plan.sync, method.num_layers)  # plsgd, DreamDDP
    elif method.placement(plan) is Placement.BEFORE and method.slices > 1:
        outer_state, in_flight, steps = outer.start_sliced(theta, carry.outer, replica_steps,
                                                           plan.sync, carry.in_flight)
        carry = _outer_sync_metrics(carry._replace(outer=outer_state, in_flight=in_flight),
                                    plan.sync, steps)
        sends.add((plan.sync, 0))  # its first slice travels now
    elif method.placement(plan) is Placement.BEFORE:
        synced, outer_state, steps, residual = outer.sync_units(
            theta, carry.outer, replica_steps, plan.sync, carry.residual)
        carry = _outer_sync_metrics(carry._replace(outer=outer_state, residual=residual),
                                    plan.sync, steps)
        if method.rule is SyncRule.PARTIAL:  # compressed: the update starts from the average
            update_from = synced
        elif not method.fragment_delay:  # the synced values take part in this step
            theta = synced
    for units, index in sorted(sends, key=lambda s: s[1]):
        carry = carry._replace(outer=outer.send_slice(carry.outer, carry.in_flight, units, index))
    return theta, update_from, carry


def _sync_after(method: Method, outer: OuterSync | None, plan: StepPlan, theta: Params,
                replica_steps: jax.Array, carry: _Carry) -> tuple[Params, _Carry]:
    """The sync after the inner update (`Placement.AFTER`: DiLoCo's outer step, local SGD's
    averaging), then the delayed outer steps that land at the end of this step."""
    if method.placement(plan) is Placement.AFTER and not method.has_outer_state:
        theta = average_units(theta, plan.sync, method.num_layers)
    elif method.placement(plan) is Placement.AFTER:
        theta, outer_state, steps, residual = outer.sync_units(
            theta, carry.outer, replica_steps, plan.sync, carry.residual)
        carry = _outer_sync_metrics(carry._replace(outer=outer_state, residual=residual),
                                    plan.sync, steps)
    if plan.apply and method.slices > 1:  # a sliced fragment's last slice has arrived
        theta, outer_state = outer.land_sliced(theta, carry.outer, plan.apply)
        carry = carry._replace(outer=outer_state)
    elif plan.apply:  # a delayed fragment's outer step lands
        theta = outer.apply_units(theta, carry.outer, plan.apply)
    return theta, carry


def make_train_step(graphdef, tx: optax.GradientTransformation, layout: Layout, plan: StepPlan,
                    method: Method | None = None, outer: OuterSync | None = None):
    """jit(shard_map(step)): (TrainState, tokens (B, T+1)) -> (TrainState, metrics).

    `plan` says what the step does over `replica` (methods.py) and `method.placement(plan)`
    where its sync runs: in the layer scan (EDiT's whole-model sync, `_in_scan`), before the
    step from its input (`_sync_before`: fragments, delayed and sliced syncs, DreamDDP), or
    after the inner update (`_sync_after`: DiLoCo, local SGD; delayed outer steps land there
    too). metrics: 'loss' and 'grad_norm' per replica (shape (R,)); on outer syncs the replica
    weights and outliers and the local steps per replica since the previous sync, and (in the
    scan) every replica's step count after this step.
    """
    gather = make_gather(layout.dims)
    sharded_mask = is_sharded(layout.dims)
    num_shards = layout.num_shards
    placement = None if method is None else method.placement(plan)
    through_outer = placement is not None and method.has_outer_state
    if (through_outer or plan.apply or plan.send) and outer is None:
        raise ValueError(f"a step that syncs through phi ({plan}) needs an OuterSync")
    in_scan = placement is Placement.IN_SCAN

    def local_step(state: TrainState, tokens_bxT1):
        theta = _unstack(state.params)
        carry = _Carry(state.outer, *(None if x is None else _unstack(x)
                                      for x in (state.residual, state.in_flight)), {})
        update_from = None
        if in_scan:
            extra, totals = outer.sync_inputs(theta, carry.outer, state.replica_steps, plan.sync)
            metrics = {"sync_local_steps": extra["steps"].astype(jnp.int32),
                       "replica_steps": totals + 1}  # after this step
            carry = carry._replace(metrics=metrics)
        elif method is not None:
            theta, update_from, carry = _sync_before(method, outer, plan, theta,
                                                     state.replica_steps, carry)

        def replica_loss_part(params):
            # Each device's share of its replica's mean loss; the all-gather's transpose sums
            # the shares' gradients over `shard`, giving the gradient of the replica mean.
            layer_sync, rest = None, None
            if in_scan:
                params, rest = outer.sync_rest(params, carry.outer, extra, carry.residual)
                layer_sync = outer.layer_sync(carry.outer, extra, carry.residual)
            loss, layer_outs = loss_fn(graphdef, params, tokens_bxT1, gather, layer_sync)
            return loss / num_shards, (layer_outs, rest)

        (loss_part, (layer_outs, rest)), grads = jax.value_and_grad(
            replica_loss_part, has_aux=True)(theta)
        if in_scan:  # every replica continues from the new phi
            theta, outer_state, residual = assemble(rest, layer_outs,
                                                    carry.outer.synced_steps.at[0].set(totals))
            carry = carry._replace(outer=outer_state, residual=residual,
                                   metrics={**carry.metrics, **_sync_metrics(outer_state,
                                                                             plan.sync)})
        if plan.kind is StepKind.DDP:
            grads = jax.lax.pmean(grads, "replica")
        if update_from is not None:
            theta = update_from
        grad_norm = sharded_global_norm(grads, sharded_mask)
        updates, opt_state = tx.update(grads, _unstack(state.opt_state), theta)
        theta = optax.apply_updates(theta, updates)
        replica_steps = state.replica_steps + 1
        if method is not None:
            theta, carry = _sync_after(method, outer, plan, theta, replica_steps, carry)
        new_state = TrainState(_stack(theta), _stack(opt_state), replica_steps, carry.outer,
                               *(None if x is None else _stack(x)
                                 for x in (carry.residual, carry.in_flight)))
        # Per replica (averaged on the host): a collective here would tie the replicas together.
        metrics = {**carry.metrics, "loss": jax.lax.psum(loss_part, "shard")[None],
                   "grad_norm": grad_norm[None]}
        return new_state, metrics

    metric_specs = {"loss": P("replica"), "grad_norm": P("replica")}
    if through_outer:
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
