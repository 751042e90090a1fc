"""The Llama forward pass against numpy references and structural properties."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edit_jax.config import ModelConfig, load_config
from edit_jax.errors import UserError
from edit_jax.model import (Attention, RMSNorm, apply_rope, causal_attention, choose_attention,
                            chunked_cross_entropy, count_params, init_model, loss_fn, rope_tables)

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)


def test_rope_is_a_complex_rotation():
    x = np.random.default_rng(0).normal(size=(1, 5, 2, 8)).astype(np.float32)
    cos, sin = rope_tables(5, 8, 10000.0)
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    pos = np.arange(5)[:, None]
    freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos * freq)[None, :, None, :]
    np.testing.assert_allclose(ours, np.concatenate([z.real, z.imag], -1), atol=1e-5)


def test_rmsnorm_matches_numpy():
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    norm = RMSNorm(16, 1e-5)
    norm.scale[...] = jnp.arange(16.0)
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * np.arange(16.0)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 4])  # 4: two query chunks of 6 positions, 4 + 2
def test_grouped_query_attention_matches_numpy(chunk):
    attn = Attention(dataclasses.replace(CFG, attention_chunk_tokens=chunk), jnp.float32,
                     nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(2, 6, 32)).astype(np.float32)
    cos, sin = rope_tables(6, 8, CFG.rope_theta)
    ours = np.asarray(attn(jnp.asarray(x), cos, sin))

    w = {name: np.asarray(getattr(attn, name).kernel[...]) for name in ("wq", "wk", "wv", "wo")}
    q = (x @ w["wq"]).reshape(2, 6, 4, 8)
    k = (x @ w["wk"]).reshape(2, 6, 2, 8)
    v = (x @ w["wv"]).reshape(2, 6, 2, 8)
    q, k = np.asarray(apply_rope(q, cos, sin)), np.asarray(apply_rope(k, cos, sin))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h uses kv head h // 2
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 6, 32) @ w["wo"]
    np.testing.assert_allclose(ours, out, atol=2e-5)


def test_causal_and_parameter_count():
    graphdef, params = init_model(CFG, 50, 0)
    d, f, hd, L, V = 32, 48, 8, 2, 50
    per_layer = 2 * d + d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d + 3 * d * f
    assert count_params(params) == 2 * V * d + d + L * per_layer
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, V, (2, 10)))
    logits, _ = nnx.merge(graphdef, params)(tokens)
    changed, _ = nnx.merge(graphdef, params)(tokens.at[:, 6].set((tokens[:, 6] + 1) % V))
    np.testing.assert_allclose(logits[:, :6], changed[:, :6], atol=1e-6)
    assert not np.allclose(logits[:, 6:], changed[:, 6:])


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_nothing_but_memory(remat):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 50, (2, 9)))
    results = []
    for policy in ("none", remat):
        graphdef, params = init_model(dataclasses.replace(CFG, remat=policy), 50, 0)
        results.append(jax.value_and_grad(lambda p: loss_fn(graphdef, p, tokens)[0])(params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_close_loss():
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 50, (2, 9)))
    losses = []
    for dtype in ("float32", "bfloat16"):
        graphdef, params = init_model(dataclasses.replace(CFG, dtype=dtype), 50, 0)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
        losses.append(float(loss_fn(graphdef, params, tokens)[0]))
    assert abs(losses[0] - losses[1]) < 2e-2


def _log_softmax_nll(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])  # 37 tokens: 8 leaves a remainder of 5
def test_chunked_cross_entropy_matches_full_logits(chunk):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(37, 16)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, 37))
    params = {"w": jnp.asarray(rng.normal(size=(16, 11)), jnp.float32), "b": jnp.ones(11)}

    def head(p, x_CxD):
        return x_CxD @ p["w"] + p["b"]

    def full(p, x):  # the reference: the whole (N, V) logits at once, plain optax
        return optax.softmax_cross_entropy_with_integer_labels(head(p, x), labels).mean()

    loss, grads = jax.jit(jax.value_and_grad(
        lambda p, x: chunked_cross_entropy(head, p, x, labels, chunk), argnums=(0, 1)))(params, x)
    ref_loss, ref_grads = jax.value_and_grad(full, argnums=(0, 1))(params, x)
    numpy_loss = _log_softmax_nll(np.asarray(x) @ np.asarray(params["w"]) + 1, np.asarray(labels))
    np.testing.assert_allclose(loss, numpy_loss.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_chunked_loss_and_attention_change_nothing_but_memory():
    """The model's loss with chunked head + loss (7 of 18 tokens) and chunked attention (4 of 9
    positions; neither divides) equals the unchunked one, value and gradients."""
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 50, (2, 10)))
    results = []
    for loss_chunk, attention_chunk in ((0, 0), (7, 4)):
        cfg = dataclasses.replace(CFG, loss_chunk_tokens=loss_chunk,
                                  attention_chunk_tokens=attention_chunk)
        graphdef, params = init_model(cfg, 50, 0)
        results.append(jax.jit(jax.value_and_grad(
            lambda p: loss_fn(graphdef, p, tokens)[0]))(params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _temp_bytes(fn, *args) -> int:
    """Temporary bytes of the compiled fn (XLA's buffer assignment: deterministic)."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunking_cuts_compiled_temp_memory():
    """Gradients of the loss over 4096 tokens x 4096 classes (float32 logits: 64 MiB) in
    512-token chunks, and of causal attention over 1024 positions (float32 scores: 32 MiB) in
    chunks of 128 queries, take less than a quarter of the unchunked temp memory."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(4096, 64)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4096, 4096))
    w = jnp.asarray(rng.normal(size=(64, 4096)) * 0.1, jnp.float32)

    def head(w, x_CxD):
        return x_CxD @ w

    def ce(chunk):
        if chunk == 0:
            return jax.grad(lambda w, x: optax.softmax_cross_entropy_with_integer_labels(
                head(w, x), labels).mean(), argnums=(0, 1))
        return jax.grad(lambda w, x: chunked_cross_entropy(head, w, x, labels, chunk),
                        argnums=(0, 1))

    logits_bytes = 4096 * 4096 * 4
    full, chunked = _temp_bytes(ce(0), w, x), _temp_bytes(ce(512), w, x)
    assert full >= logits_bytes  # at least the logits; in practice they and their gradient
    assert chunked < full / 4  # in practice 1/8: two chunks' logits instead of two full ones

    q = jnp.asarray(rng.normal(size=(2, 1024, 4, 16)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(2, 1024, 2, 16)), jnp.float32)

    def attention(chunk):
        return jax.grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v, chunk) ** 2),
                        argnums=(0, 1, 2))

    scores_bytes = 2 * 4 * 1024 * 1024 * 4
    full, chunked = _temp_bytes(attention(0), q, kv, kv), _temp_bytes(attention(128), q, kv, kv)
    assert full >= scores_bytes
    assert chunked < full / 4  # in practice 1/7


@pytest.mark.parametrize("key", ["model.loss_chunk_tokens", "model.attention_chunk_tokens"])
def test_negative_chunk_sizes_are_one_line_errors(key):
    with pytest.raises(UserError, match=f"bad value for config key '{key}': must be >= 0"):
        load_config(None, [f"{key}=-1"])


def test_attention_choice_and_its_fallback_at_compile_time():
    """`auto` tries cuDNN only on GPUs in bf16, by compiling it: on this CPU the compile fails,
    which is the fallback path a GPU takes where cuDNN attention does not lower."""
    bf16 = ModelConfig(dtype="bfloat16")
    assert choose_attention(bf16, "cpu", 128) == ("xla", None)
    assert choose_attention(ModelConfig(), "gpu", 128) == ("xla", None)  # float32: XLA
    assert choose_attention(dataclasses.replace(bf16, attention="xla"), "gpu", 128) == (
        "xla", None)
    chosen, warning = choose_attention(bf16, "gpu", 128)
    assert chosen == "xla" and warning.startswith("cuDNN attention does not compile here (")
    assert "\n" not in warning and warning.endswith("using XLA attention")
    with pytest.raises(UserError, match="model.attention=cudnn does not compile on this cpu"):
        choose_attention(dataclasses.replace(bf16, attention="cudnn"), "cpu", 128)
    with pytest.raises(UserError, match="'model.attention': 'flash' is not one of"):
        load_config(None, ["model.attention=flash"])
