"""Sparse top-k codes: worked by hand, against a numpy implementation for every value width,
and the combine over replicas (error feedback, excluded replicas, bit-identical results)
against a numpy simulation of every replica over several syncs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.sparse import TopK


def np_topk(x: np.ndarray, code: TopK) -> np.ndarray:
    """What a receiver decodes, in numpy: per chunk the k largest |x| (stable order), scale =
    their largest magnitude, codes round((v / scale + 1) * (2^b - 1) / 2) on 2^b levels."""
    chunks = x.astype(np.float32).reshape(-1, code.block)
    levels = 2**code.value_bits - 1
    out = np.zeros_like(chunks)
    for row, chunk in enumerate(chunks):
        keep = np.argsort(-np.abs(chunk), kind="stable")[:code.k]
        scale = np.abs(chunk[keep]).max()
        unit = chunk[keep] / (scale if scale > 0 else 1)
        codes = np.clip(np.round((unit + 1) * np.float32(levels / 2)), 0, levels)
        out[row, keep] = (codes * np.float32(2 / levels) - 1) * scale
    return out.reshape(-1)


def test_codes_by_hand():
    """Chunk of 8, keep 4, 2 bits: levels -4, -4/3, 4/3, 4 (scale 4, the largest kept)."""
    code = TopK(block=8, fraction=0.5, value_bits=2)
    x = jnp.array([0.1, -4.0, 2.0, 0.0, 3.0, -1.0, 0.5, 4.0])
    indices, packed, scales = code.encode(x)
    assert sorted(indices[0].tolist()) == [1, 2, 4, 7] and indices.dtype == jnp.uint8
    assert scales.tolist() == [4.0] and packed.shape == (1,)  # four 2-bit codes in one byte
    decoded = code.decode(indices, packed, scales)
    np.testing.assert_allclose(decoded, [0, -4, 4 / 3, 0, 4, 0, 0, 4], rtol=1e-6)
    assert code.chunk_bytes() == 4 + 1 + 4
    assert TopK(block=4096, fraction=1 / 64).chunk_bytes() == 64 * 2 + 16 + 4  # uint16 indices


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_match_numpy(bits):
    rng = np.random.default_rng(bits)
    code = TopK(block=64, fraction=1 / 8, value_bits=bits)
    x = rng.normal(size=64 * 20).astype(np.float32) * np.repeat(10.0 ** rng.integers(-4, 3, 20),
                                                                  64)
    x[64:128] = 0.0  # a chunk of zeros: nothing but zeros comes back
    decoded = np.asarray(code.decode(*code.encode(jnp.asarray(x))))
    np.testing.assert_allclose(decoded, np_topk(x, code), rtol=1e-6, atol=0)
    kept = np.count_nonzero(decoded.reshape(20, 64), axis=1)
    assert kept[1] == 0 and (kept <= code.k).all()


def test_combine_with_error_feedback_matches_numpy_over_syncs():
    """4 replicas, 5 syncs, weights changing each sync (one replica excluded at sync 3): the
    combined values and every replica's buffer equal a numpy simulation of each replica, and
    every replica gets the same combined values bit for bit."""
    code = TopK(block=32, fraction=1 / 8, value_bits=4, decay=0.9)
    rng = np.random.default_rng(0)
    shape = (5, 24)  # 120 values: 3 whole chunks and one padded
    run = jax.jit(jax.vmap(lambda x, e, w: code.combine({"w": x}, w, replica_axis="r",
                                                        residual={"w": e}),
                           axis_name="r", in_axes=(0, 0, None)))
    buffers = np.zeros((4, *shape), np.float32)
    ours = jnp.zeros((4, *shape))
    for sync in range(5):
        deltas = rng.normal(size=(4, *shape)).astype(np.float32)
        weights = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
        if sync == 3:
            weights = np.array([0.5, 0.0, 0.25, 0.25], np.float32)
            deltas[1] = np.nan  # excluded: never sent, its buffer kept as it was
        combined, residual = run(jnp.asarray(deltas), ours, jnp.asarray(weights))
        ours = residual["w"]
        expected = np.zeros(shape[0] * shape[1], np.float32)
        for r in range(4):
            if weights[r] == 0:
                continue
            padded = np.zeros(128, np.float32)
            padded[:120] = 0.9 * buffers[r].reshape(-1) + deltas[r].reshape(-1)
            sent = np_topk(padded, code)
            buffers[r] = (padded - sent)[:120].reshape(shape)
            expected += weights[r] * sent[:120]
        got = np.asarray(combined["w"])
        assert all(np.array_equal(got[0], got[r]) for r in range(4))
        np.testing.assert_allclose(got[0].reshape(-1), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours), buffers, rtol=1e-5, atol=1e-6)


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="keeps 0 of a chunk of 256"):
        TopK(block=256, fraction=1 / 1024)
    with pytest.raises(ValueError, match="do not fill whole bytes"):
        TopK(block=256, fraction=3 / 256, value_bits=2)
    with pytest.raises(ValueError, match="2 to 65536 values"):
        TopK(block=2**17)
    with pytest.raises(ValueError, match="always keep an error-feedback buffer"):
        jax.vmap(lambda x: TopK().combine(x, jnp.ones(2) / 2, replica_axis="r", residual=None),
                 axis_name="r")(jnp.ones((2, 256)))
