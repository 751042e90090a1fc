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


def sharded_global_norm(tree, sharded_mask, axis_name: str = "shard") -> jax.Array:
    """L2 norm of a tree whose masked leaves are split over `axis_name` and the rest whole."""
    sharded_sq, whole_sq = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for x, sharded in zip(jax.tree.leaves(tree), jax.tree.leaves(sharded_mask)):
        sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
        if sharded:
            sharded_sq += sq
        else:
            whole_sq += sq
    return jnp.sqrt(jax.lax.psum(sharded_sq, axis_name) + whole_sq)


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
