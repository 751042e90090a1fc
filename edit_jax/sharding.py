"""How parameters, optimizer state and batches are laid out on the ('replica', 'shard') mesh.

FSDP / ZeRO-3 within a replica: every parameter is split over `shard` along one dimension (the
largest one divisible by the shard count; tiny ones that have none stay whole on each device).
Replica-varying state carries a leading replica dimension, so its spec is the shard spec with
'replica' prepended. Stacked layer parameters keep their layer axis unsplit, so the scan over
layers hands each device its shard of one layer at a time.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from edit_jax.model import LAYER_GROUP, GatherFn, Params

NOT_SHARDED = -1
BATCH_SPEC = P(("replica", "shard"))


def _use_shape(group: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a parameter has when used: one layer's slice for the stacked layers."""
    return shape[1:] if group == LAYER_GROUP else shape


def shard_dims(params: Params, num_shards: int) -> Params:
    """Per leaf, the dimension (of the shape in use) split over `shard`, or NOT_SHARDED."""

    def pick(group: str, shape: tuple[int, ...]) -> int:
        if num_shards == 1:
            return NOT_SHARDED
        shape = _use_shape(group, shape)
        candidates = [d for d, n in enumerate(shape) if n % num_shards == 0]
        return max(candidates, key=lambda d: (shape[d], -d)) if candidates else NOT_SHARDED

    return {group: jax.tree.map(lambda x, g=group: pick(g, tuple(x.shape)), tree)
            for group, tree in params.items()}


def replica_split_dims(params: Params, dims: Params, num_shards: int, num_replicas: int) -> Params:
    """Per leaf, the dimension of its local shard that an outer state sharded over `replica`
    splits into R pieces (the shard's own dimension if it divides, else the largest that does),
    or NOT_SHARDED: the leaf's outer state stays whole on every replica."""

    def pick(group: str, shape: tuple[int, ...], dim: int) -> int:
        if num_replicas == 1:
            return NOT_SHARDED
        local = list(_use_shape(group, shape))
        if dim != NOT_SHARDED:
            local[dim] //= num_shards
        candidates = [d for d, n in enumerate(local) if n % num_replicas == 0]
        if not candidates:
            return NOT_SHARDED
        return dim if dim in candidates else max(candidates, key=lambda d: (local[d], -d))

    return {group: jax.tree.map(lambda x, d, g=group: pick(g, tuple(x.shape), d), tree,
                                dims[group]) for group, tree in params.items()}


def _spec(group: str, shape: tuple[int, ...], dim: int, replica_dim: int, stacked: bool) -> P:
    axes: list = [None] * len(_use_shape(group, shape))
    if dim != NOT_SHARDED:
        axes[dim] = "shard"
    if replica_dim != NOT_SHARDED:  # the shard's R pieces: index shard * R + replica
        axes[replica_dim] = ("shard", "replica") if replica_dim == dim else "replica"
    prefix = (["replica"] if stacked else []) + ([None] if group == LAYER_GROUP else [])
    return P(*prefix, *axes)


def param_specs(params: Params, dims: Params) -> Params:
    """PartitionSpecs of replica-stacked parameters: ('replica', [layer], ..., 'shard' at dim)."""
    return {group: jax.tree.map(lambda x, d, g=group: _spec(g, tuple(x.shape), d, NOT_SHARDED,
                                                            True), params[group], dims[group])
            for group in params}


def outer_param_specs(params: Params, dims: Params, replica_dims: Params | None) -> Params:
    """PartitionSpecs of phi (and the outer moments): like the parameters without the replica
    axis, and with each shard further split over `replica` where `replica_dims` says so."""
    if replica_dims is None:
        replica_dims = jax.tree.map(lambda _: NOT_SHARDED, dims)
    return {group: jax.tree.map(lambda x, d, rd, g=group: _spec(g, tuple(x.shape), d, rd, False),
                                params[group], dims[group], replica_dims[group])
            for group in params}


def optimizer_specs(tx: optax.GradientTransformation, opt_state_shapes, specs: Params,
                    non_param_spec: P = P()):
    """Specs of an optax state: moments follow their parameter, counters get `non_param_spec`
    (P('replica') for a state with one counter per replica)."""
    return optax.tree_map_params(tx, lambda _, spec: spec, opt_state_shapes, specs,
                                 transform_non_params=lambda _: non_param_spec,
                                 is_leaf=lambda x: isinstance(x, P))


def make_gather(dims: Params, axis_name: str = "shard") -> GatherFn:
    """The gather hook for `shard_map`: all-gather each shard along its split dimension."""

    def gather(group: str, tree: Params) -> Params:
        return jax.tree.map(
            lambda x, d: x if d == NOT_SHARDED else jax.lax.all_gather(x, axis_name, axis=d,
                                                                       tiled=True),
            tree, dims[group])

    return gather


def is_sharded(dims: Params) -> Params:
    """Per leaf, whether its shards differ across `shard` (for norms that psum over `shard`)."""
    return jax.tree.map(lambda d: d != NOT_SHARDED, dims)


def named(mesh: jax.sharding.Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))
