"""The inner optimizer: AdamW with linear warm-up, cosine decay and global-norm clipping.

Under `shard_map` each device holds only a shard of most gradients, so the clipping norm sums
squares locally, psums the sharded leaves over `shard` and adds the leaves every device holds
whole once. Norm scales are not weight-decayed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from edit_jax.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.lr * cfg.min_lr_ratio)


def split_sum_of_squares(tree, split_axes, *, per_row: bool = False) -> jax.Array:
    """Sum of squares of a tree whose leaves are split over mesh axes (use in shard_map).

    `split_axes` holds, per leaf, the tuple of axis names its pieces are spread over; each group
    of leaves is summed locally and psummed over its axes once. per_row=True keeps the leading
    axis: one sum per row (e.g. per replica, for stacked per-replica pieces).
    """
    groups: dict[tuple[str, ...], jax.Array] = {}
    for x, axes in zip(jax.tree.leaves(tree),
                       jax.tree.leaves(split_axes, is_leaf=lambda a: isinstance(a, tuple))):
        reduce_axes = tuple(range(1, x.ndim)) if per_row else None
        sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=reduce_axes)
        groups[axes] = groups[axes] + sq if axes in groups else sq
    total = jnp.zeros((), jnp.float32)
    for axes, sq in groups.items():
        total = total + (jax.lax.psum(sq, axes) if axes else sq)
    return total


def sharded_global_norm(tree, sharded_mask, axis_name: str = "shard") -> jax.Array:
    """L2 norm of a tree whose masked leaves are split over `axis_name` and the rest whole."""
    split_axes = jax.tree.map(lambda sharded: (axis_name,) if sharded else (), sharded_mask)
    return jnp.sqrt(split_sum_of_squares(tree, split_axes))


def clip_by_sharded_global_norm(max_norm: float, sharded_mask,
                                axis_name: str = "shard") -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` for gradients sharded over `axis_name` (use in shard_map).

    Example:
        tx = optax.chain(clip_by_sharded_global_norm(1.0, mask), optax.adamw(1e-3))
    """

    def update_fn(updates, state, params=None):
        del params
        norm = sharded_global_norm(updates, sharded_mask, axis_name)
        scale = max_norm / jnp.maximum(norm, max_norm)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def decay_mask(params):
    """Weight-decay every parameter but the norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", params)


def inner_optimizer(cfg: OptimizerConfig, total_steps: int, sharded_mask,
                    axis_name: str = "shard") -> optax.GradientTransformation:
    """Clip (when clip_norm > 0), then AdamW on the schedule."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm <= 0:
        return adamw
    return optax.chain(clip_by_sharded_global_norm(cfg.clip_norm, sharded_mask, axis_name), adamw)
