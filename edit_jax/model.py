"""Flax NNX Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU; layers stacked and scanned.

Parameters live outside the module as a plain nested dict (`nnx.split` + `nnx.to_pure_dict`), so
the sharded step can hand the forward pass parameter *shards*. The forward pass takes a `gather`
hook, called on each parameter group right before use: the identity on one device, an all-gather
over `shard` under `shard_map`. The decoder layers are run by `jax.lax.scan` over the stacked
layer parameters, each layer wrapped in `jax.checkpoint` with the policy named in the config, so
the backward pass re-gathers a layer instead of keeping every gathered layer alive.

Two chunkings keep the largest activations out of memory, each a `jax.lax.scan` over chunks of
a `jax.checkpoint`ed function, so one chunk's values exist at a time and the backward pass
recomputes them: `model.loss_chunk_tokens` runs the final norm, lm_head, log-softmax and NLL
over chunks of the flattened tokens (`chunked_cross_entropy`; never the full (B, T, V) float32
logits), and `model.attention_chunk_tokens` runs attention over chunks of query positions
(`causal_attention`; never the full (B, N, T, T) float32 scores). 0 turns either off. With
`model.attention=cudnn` (`auto` resolves to it on GPUs where it compiles: `choose_attention`)
attention is cuDNN's fused flash attention instead, which never holds the scores either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from edit_jax.config import ModelConfig
from edit_jax.errors import UserError

Params = dict
# gather(group_name, params_of_group) -> full params of that group; group is a top-level key.
GatherFn = Callable[[str, Params], Params]
LAYER_GROUP = "layers"
HEAD_GROUPS = ("final_norm", "lm_head")  # the groups `Llama.head` uses

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
        self.chunk_tokens = cfg.attention_chunk_tokens
        self.implementation = cfg.attention
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
        if self.implementation == "cudnn":
            out_BxTxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
        else:
            out_BxTxNxH = causal_attention(q, k, v, self.chunk_tokens)
        return self.wo(out_BxTxNxH.reshape(B, T, self.n_heads * self.head_dim))


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, chunk_tokens: int = 0):
    """Causal grouped-query attention (`jax.nn.dot_product_attention`), over query chunks.

    With chunk_tokens = C > 0 and C < T, the queries run in chunks of C positions: floor(T / C)
    chunks in a `jax.lax.scan`, then (if C does not divide T) one remainder chunk. Each chunk
    attends to all T keys under a causal mask by position and is `jax.checkpoint`ed, so one
    chunk's (B, N, C, T) float32 scores exist at a time, in the forward and in the backward
    pass (which recomputes them), instead of the full (B, N, T, T). The scan, unlike a Python
    loop, makes the chunks run one after another. With 0 (or C >= T) it is one call.
    Under `model.remat=dots`, whose policy saves every matmul output, the layer's checkpoint
    still keeps every chunk's scores; `full` and `dots_no_batch` do not.
    """
    B, T, N, H = q_BxTxNxH.shape
    if chunk_tokens <= 0 or chunk_tokens >= T:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True)
    full, rest = divmod(T, chunk_tokens)
    key_pos_T = jnp.arange(T)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def attend(q_BxCxNxH, query_pos_C):
        mask_CxT = query_pos_C[:, None] >= key_pos_T[None, :]
        return jax.nn.dot_product_attention(q_BxCxNxH, k_BxTxKxH, v_BxTxKxH,
                                            mask=mask_CxT[None, None])

    main = full * chunk_tokens
    q_KxBxCxNxH = q_BxTxNxH[:, :main].reshape(B, full, chunk_tokens, N, H).swapaxes(0, 1)
    pos_KxC = jnp.arange(main).reshape(full, chunk_tokens)
    _, out_KxBxCxNxH = jax.lax.scan(lambda carry, xs: (carry, attend(*xs)), None,
                                    (q_KxBxCxNxH, pos_KxC))
    out_BxTxNxH = out_KxBxCxNxH.swapaxes(0, 1).reshape(B, main, N, H)
    if rest:
        out_BxTxNxH = jnp.concatenate(
            [out_BxTxNxH, attend(q_BxTxNxH[:, main:], jnp.arange(main, T))], axis=1)
    return out_BxTxNxH


def choose_attention(cfg: ModelConfig, platform: str, seq_len: int) -> tuple[str, str | None]:
    """(the attention `cfg.attention` resolves to, a warning or None) on `platform` for
    sequences of `seq_len` tokens.

    `xla` is `causal_attention` (chunked); `cudnn` is cuDNN's fused flash attention (no T x T
    scores, nothing recomputed). `auto` takes cuDNN on GPUs in bf16 if one layer's attention,
    forward and backward, compiles with it here, and otherwise the XLA path (with a warning
    where cuDNN was tried and failed: a failure to lower, as with some CUDA 13 builds, is found
    at compile time, not guessed from versions). An explicit `cudnn` that does not compile is
    an error. Layers built from a config still saying `auto` use the XLA path.
    """
    wanted = cfg.attention
    if wanted == "xla" or (wanted == "auto" and not (platform == "gpu"
                                                     and cfg.dtype == "bfloat16")):
        return "xla", None
    try:
        _compile_cudnn_attention(cfg, seq_len)
    except Exception as e:  # any failure to trace, lower or compile means: not here
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        if wanted == "cudnn":
            raise UserError(f"model.attention=cudnn does not compile on this {platform} "
                            f"({reason}); set model.attention to xla or auto") from None
        return "xla", f"cuDNN attention does not compile here ({reason}); using XLA attention"
    return "cudnn", None


def _compile_cudnn_attention(cfg: ModelConfig, seq_len: int) -> None:
    """Compile one sequence's cuDNN attention and its gradient at the model's head shapes."""
    head_dim, dtype = cfg.d_model // cfg.n_heads, jnp.dtype(cfg.dtype)
    q = jax.ShapeDtypeStruct((1, seq_len, cfg.n_heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, seq_len, cfg.n_kv_heads, head_dim), dtype)

    def loss(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return out.astype(jnp.float32).sum()

    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()


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
        x_BxTxD, sync_outs = self.hidden_states(tokens_BxT, gather, layer_sync)
        return self.head()(self.head_params(gather), x_BxTxD), sync_outs

    def hidden_states(self, tokens_BxT, gather: GatherFn = no_gather,
                      layer_sync: LayerSync | None = None):
        """The last decoder layer's output (B, T, D), before the final norm, and the layer
        sync's per-layer outputs (or None)."""
        embed = _with_gathered(self.embed, "embed", gather)
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
        return jax.lax.scan(layer, embed(tokens_BxT),
                            (nnx.to_pure_dict(stacked_state), sync_states))

    def head_params(self, gather: GatherFn = no_gather) -> Params:
        """The (gathered) parameters of the final norm and lm_head, for `head`."""
        return {group: gather(group, nnx.to_pure_dict(nnx.state(getattr(self, group))))
                for group in HEAD_GROUPS}

    def head(self):
        """head(head_params, x_...xD) -> float32 logits: final norm, then lm_head. A pure
        function of its arguments, so it can run inside a scan / checkpoint per chunk."""
        norm_def, head_def = nnx.graphdef(self.final_norm), nnx.graphdef(self.lm_head)

        def apply(params: Params, x_xD):
            x_xD = nnx.merge(norm_def, params["final_norm"])(x_xD)
            return nnx.merge(head_def, params["lm_head"])(x_xD).astype(jnp.float32)

        return apply


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
    """(mean next-token cross-entropy over a (B, T+1) token batch, the layer sync's outputs).

    With `model.loss_chunk_tokens` = C > 0 the head and the loss run over chunks of C tokens
    (`chunked_cross_entropy`); with 0 the full (B, T, V) float32 logits are computed at once.
    """
    model = nnx.merge(graphdef, params)
    inputs_BxT, labels_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    chunk = model.cfg.loss_chunk_tokens
    if chunk == 0:
        logits_BxTxV, sync_outs = model(inputs_BxT, gather, layer_sync)
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, labels_BxT)
        return losses_BxT.mean(), sync_outs
    x_BxTxD, sync_outs = model.hidden_states(inputs_BxT, gather, layer_sync)
    d_model = x_BxTxD.shape[-1]
    loss = chunked_cross_entropy(model.head(), model.head_params(gather),
                                 x_BxTxD.reshape(-1, d_model), labels_BxT.reshape(-1), chunk)
    return loss, sync_outs


def chunked_cross_entropy(head: Callable[[Any, jax.Array], jax.Array], head_params,
                          x_NxD: jax.Array, labels_N: jax.Array, chunk_tokens: int) -> jax.Array:
    """Mean over N tokens of -log softmax(head(head_params, x))[label], never holding more than
    one chunk's logits: equal to `softmax_cross_entropy_with_integer_labels(head(params, x),
    labels).mean()`.

    The N tokens run as floor(N / C) chunks of C = min(chunk_tokens, N) tokens in a
    `jax.lax.scan`, then (if C does not divide N) one remainder chunk of N mod C tokens. Each
    chunk is `jax.checkpoint`ed, so its (C, V) logits are neither kept for nor stacked into the
    backward pass: the backward recomputes them chunk by chunk, and the gradient of
    `head_params` accumulates over the chunks inside the backward scan.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    num_tokens, d_model = x_NxD.shape
    chunk = min(chunk_tokens, num_tokens)
    full, rest = divmod(num_tokens, chunk)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def nll_sum(params, x_CxD, labels_C):
        return optax.softmax_cross_entropy_with_integer_labels(head(params, x_CxD),
                                                               labels_C).sum()

    def body(carry, xs):  # no carry: under shard_map its type would have to match the inputs'
        return carry, nll_sum(head_params, *xs)

    main = full * chunk
    xs = (x_NxD[:main].reshape(full, chunk, d_model), labels_N[:main].reshape(full, chunk))
    total = jnp.sum(jax.lax.scan(body, None, xs)[1])
    if rest:
        total = total + nll_sum(head_params, x_NxD[main:], labels_N[main:])
    return total / num_tokens


def count_params(params: Params) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))
