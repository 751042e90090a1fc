"""The Llama forward pass against numpy references and structural properties."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from edit_jax.config import ModelConfig
from edit_jax.model import Attention, RMSNorm, apply_rope, count_params, init_model, loss_fn, rope_tables

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


def test_grouped_query_attention_matches_numpy():
    attn = Attention(CFG, jnp.float32, nnx.Rngs(0))
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
