"""Flax NNX Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU; layers stacked and scanned.

Parameters live outside the module as a plain nested dict (`nnx.split` + `nnx.to_pure_dict`), so
the sharded step can hand the forward pass parameter *shards*. The forward pass takes a `gather`
hook, called on each parameter group right before use: the identity on one device, an all-gather
over `shard` under `shard_map`. The decoder layers are run by `jax.lax.scan` over the stacked
layer parameters, each layer wrapped in `jax.checkpoint` with the policy named in the config, so
the backward pass re-gathers a layer instead of keeping every gathered layer alive.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from edit_jax.config import ModelConfig

Params = dict
# gather(group_name, params_of_group) -> full params of that group; group is a top-level key.
GatherFn = Callable[[str, Params], Params]
LAYER_GROUP = "layers"

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerSync:
    """A step run on each layer's stored params inside the layer scan, before the gather.

    fn(layer_params, layer_state) -> (params to use from now on, per-layer output); `states` is
    stacked over layers (leading axis L) and scanned with the parameters.
    """

    fn: Callable[[Params, Any], tuple[Params, Any]]
    states: Any


def no_gather(group: str, params: Params) -> Params:
    """The gather hook for unsharded parameters."""
    del group
    return params


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def _linear(d_in: int, d_out: int, std: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


def rope_tables(seq_len: int, head_dim: int, theta: float):
    """cos/sin tables of shape (T, head_dim/2) for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_TxH = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles_TxH), jnp.sin(angles_TxH)


def apply_rope(x_BxTxNxH, cos_TxH, sin_TxH):
    """Rotate the two halves of each head (the Llama 'rotate_half' convention)."""
    half = x_BxTxNxH.shape[-1] // 2
    x1, x2 = x_BxTxNxH[..., :half], x_BxTxNxH[..., half:]
    cos, sin = cos_TxH[None, :, None, :], sin_TxH[None, :, None, :]
    x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
    out = jnp.concatenate([x1f * cos - x2f * sin, x2f * cos + x1f * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    """Causal grouped-query attention: n_kv_heads key/value heads shared by n_heads queries."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        d, hd, std = cfg.d_model, self.head_dim, cfg.init_std
        self.wq = _linear(d, cfg.n_heads * hd, std, dtype, rngs)
        self.wk = _linear(d, cfg.n_kv_heads * hd, std, dtype, rngs)
        self.wv = _linear(d, cfg.n_kv_heads * hd, std, dtype, rngs)
        self.wo = _linear(cfg.n_heads * hd, d, std / math.sqrt(2 * cfg.n_layers), dtype, rngs)

    def __call__(self, x_BxTxD, cos, sin):
        B, T, _ = x_BxTxD.shape
        q = self.wq(x_BxTxD).reshape(B, T, self.n_heads, self.head_dim)
        k = self.wk(x_BxTxD).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BxTxD).reshape(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out_BxTxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out_BxTxNxH.reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        std = cfg.init_std
        self.w_gate = _linear(cfg.d_model, cfg.d_ff, std, dtype, rngs)
        self.w_up = _linear(cfg.d_model, cfg.d_ff, std, dtype, rngs)
        self.w_down = _linear(cfg.d_ff, cfg.d_model, std / math.sqrt(2 * cfg.n_layers), dtype, rngs)

    def __call__(self, x):
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, dtype, rngs)

    def __call__(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtype, rngs)

        self.layers = stacked_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = _linear(cfg.d_model, vocab_size, cfg.init_std, dtype, rngs)

    def __call__(self, tokens_BxT, gather: GatherFn = no_gather, layer_sync: LayerSync | None = None):
        """Logits (float32) for every position, and the layer sync's per-layer outputs (or None).

        `gather` turns stored params into usable ones (inside the rematerialised layer body, so
        the backward pass re-gathers). `layer_sync`, if given, runs in the same scan before each
        layer is gathered and outside the remat, so its collectives run once per step.
        """
        embed = _with_gathered(self.embed, "embed", gather)
        final_norm = _with_gathered(self.final_norm, "final_norm", gather)
        lm_head = _with_gathered(self.lm_head, "lm_head", gather)
        cos, sin = rope_tables(tokens_BxT.shape[1], self.cfg.d_model // self.cfg.n_heads,
                               self.cfg.rope_theta)
        block_def, stacked_state = nnx.split(self.layers)

        def compute(x_BxTxD, layer_params):
            block = nnx.merge(block_def, gather(LAYER_GROUP, layer_params))
            return block(x_BxTxD, cos, sin)

        if self.cfg.remat != "none":
            compute = jax.checkpoint(compute, policy=REMAT_POLICIES[self.cfg.remat])

        def layer(x_BxTxD, xs):
            layer_params, sync_state = xs
            sync_out = None
            if layer_sync is not None:
                layer_params, sync_out = layer_sync.fn(layer_params, sync_state)
            return compute(x_BxTxD, layer_params), sync_out

        sync_states = None if layer_sync is None else layer_sync.states
        x_BxTxD, sync_outs = jax.lax.scan(
            layer, embed(tokens_BxT), (nnx.to_pure_dict(stacked_state), sync_states))
        return lm_head(final_norm(x_BxTxD)).astype(jnp.float32), sync_outs


def _with_gathered(module: nnx.Module, group: str, gather: GatherFn) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, gather(group, nnx.to_pure_dict(state)))


def init_model(cfg: ModelConfig, vocab_size: int, seed: int):
    """(graphdef, params): the module structure and its parameters as a plain nested dict."""
    graphdef, state = nnx.split(Llama(cfg, vocab_size, nnx.Rngs(seed)))
    return graphdef, nnx.to_pure_dict(state)


def abstract_model(cfg: ModelConfig, vocab_size: int):
    """(graphdef, params as ShapeDtypeStructs) without allocating anything."""
    module = nnx.eval_shape(lambda: Llama(cfg, vocab_size, nnx.Rngs(0)))
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def loss_fn(graphdef, params: Params, tokens_BxT1, gather: GatherFn = no_gather,
            layer_sync: LayerSync | None = None):
    """(mean next-token cross-entropy over a (B, T+1) token batch, the layer sync's outputs)."""
    logits_BxTxV, sync_outs = nnx.merge(graphdef, params)(tokens_BxT1[:, :-1], gather, layer_sync)
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT1[:, 1:])
    return losses_BxT.mean(), sync_outs


def count_params(params: Params) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))
