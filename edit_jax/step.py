"""The sharded inner step under `jax.shard_map` on the ('replica', 'shard') mesh.

Per device: squeeze the replica dimension, run the forward pass with each layer all-gathered
over `shard` inside the scan, differentiate (autodiff turns the all-gather into the gradient's
reduce-scatter), optionally average gradients over `replica`, and apply the inner optimizer to
the local shard. `reduce_over_replica=True` is DDP/HSDP; the local-SGD methods reuse the same
step with False, so a plain local step makes no collective over `replica` at all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from edit_jax.model import Params, loss_fn
from edit_jax.optimizer import sharded_global_norm
from edit_jax.sharding import (BATCH_SPEC, is_sharded, make_gather, named, optimizer_specs,
                               param_specs, shard_dims)

TrainState = dict  # {'params': replica-stacked params, 'opt_state': inner optax state}


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

    def abstract_state(self, params_shapes: Params, tx: optax.GradientTransformation):
        """ShapeDtypeStructs (with shardings) of the TrainState, for restoring checkpoints."""
        shapes = jax.eval_shape(
            lambda p: _fresh_state(stack_replicas(p, self.num_replicas), tx), params_shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)


def stack_replicas(params: Params, num_replicas: int) -> Params:
    """Give every leaf a leading replica dimension (identical copies)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_replicas, *x.shape)), params)


def _fresh_state(params: Params, tx: optax.GradientTransformation) -> TrainState:
    return {"params": params, "opt_state": tx.init(params)}


def make_layout(mesh: jax.sharding.Mesh, params_shapes: Params,
                tx: optax.GradientTransformation) -> Layout:
    dims = shard_dims(params_shapes, mesh.shape["shard"])
    specs = param_specs(params_shapes, dims)
    opt_shapes = jax.eval_shape(lambda p: tx.init(stack_replicas(p, mesh.shape["replica"])),
                                params_shapes)
    opt_specs = optimizer_specs(tx, opt_shapes, specs)
    return Layout(mesh, dims, {"params": specs, "opt_state": opt_specs})


def init_state(layout: Layout, init_params, tx: optax.GradientTransformation) -> TrainState:
    """Initialise on device, each device creating only its shards. `init_params()` -> Params."""

    def init():
        return _fresh_state(stack_replicas(init_params(), layout.num_replicas), tx)

    return jax.jit(init, out_shardings=layout.state_shardings)()


def _unstack(tree):
    return jax.tree.map(lambda x: x[0], tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, layout: Layout, *,
                    reduce_over_replica: bool):
    """jit(shard_map(step)): (TrainState, tokens (B, T+1)) -> (TrainState, metrics)."""
    gather = make_gather(layout.dims)
    sharded_mask = is_sharded(layout.dims)
    num_shards = layout.num_shards

    def local_step(state: TrainState, tokens_bxT1):
        def replica_loss_part(params):
            # Each device's share of its replica's mean loss; the all-gather's transpose sums
            # the shares' gradients over `shard`, giving the gradient of the replica mean.
            return loss_fn(graphdef, params, tokens_bxT1, gather)[0] / num_shards

        loss_part, grads = jax.value_and_grad(replica_loss_part)(_unstack(state["params"]))
        if reduce_over_replica:
            grads = jax.lax.pmean(grads, "replica")
        grad_norm = sharded_global_norm(grads, sharded_mask)
        grads = jax.tree.map(lambda g: g[None], grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        metrics = {"loss": jax.lax.pmean(jax.lax.psum(loss_part, "shard"), "replica"),
                   "grad_norm": jax.lax.pmean(grad_norm, "replica")}
        return new_state, metrics

    step = jax.shard_map(local_step, mesh=layout.mesh, in_specs=(layout.state_specs, BATCH_SPEC),
                         out_specs=(layout.state_specs, P()))
    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef, layout: Layout):
    """jit(shard_map): (params, tokens) -> mean loss; each replica scores its rows."""
    gather = make_gather(layout.dims)

    def local_eval(params, tokens_bxT1):
        loss = loss_fn(graphdef, _unstack(params), tokens_bxT1, gather)[0]
        return jax.lax.pmean(loss, ("replica", "shard"))

    return jax.jit(jax.shard_map(local_eval, mesh=layout.mesh,
                                 in_specs=(layout.state_specs["params"], BATCH_SPEC),
                                 out_specs=P()))
