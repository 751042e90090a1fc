"""Compressed syncs: block-wise codes against numpy, the quantized all-reduce against a numpy
simulation of every device, error feedback's bookkeeping, the bytes XLA really moves, and
training runs whose replicas leave a compressed sync bit-identical."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from edit_jax.compression import Compression, quantized_combine
from edit_jax.config import MeshConfig
from edit_jax.inspect_hlo import collective_stats, replica_traffic, summarize
from edit_jax.mesh import make_mesh
from edit_jax.methods import REST_UNIT, StepKind, StepPlan
from edit_jax.program import build_program
from edit_jax.sparse import TopK
from edit_jax.sync import codec
from test_sync import EDIT, VOCAB, _config, _run_ours

LARGEST = {"int8": 127, "fp8": 448, "int4": 7}


def np_roundtrip(x: np.ndarray, fmt: str, block: int) -> np.ndarray:
    """What a receiver decodes, in numpy: per block scale = max|x| x f32(1 / largest code) (NaN for a
    block with NaN or inf), codes round(x / scale) clipped (fp8: e4m3 of x / scale)."""
    blocks = x.astype(np.float32).reshape(-1, block)
    finite = np.isfinite(blocks).all(axis=1)
    with np.errstate(invalid="ignore"):
        scale = np.where(finite, np.abs(blocks).max(axis=1) * np.float32(1 / LARGEST[fmt]),
                         np.nan)
    scale = scale.astype(np.float32)
    usable = finite & (scale > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(usable[:, None], blocks / np.where(usable, scale, 1)[:, None], 0)
    if fmt == "fp8":
        codes = np.clip(scaled, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        codes = np.clip(np.round(scaled), -LARGEST[fmt], LARGEST[fmt])
    return (codes.astype(np.float32) * scale[:, None]).astype(np.float32).reshape(-1)


def _awkward_blocks(block: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=block) * 0.02,  # parameter-sized values
             np.zeros(block),  # an all-zero block
             rng.normal(size=block) * 1e30,  # huge values
             np.r_[1e-3, rng.normal(size=block - 1) * 1e-8],  # one large, the rest tiny
             np.r_[np.nan, np.ones(block - 1)],  # NaN: the whole block decodes to NaN
             np.r_[np.ones(block - 1), -np.inf],  # inf: likewise
             rng.uniform(-5, 5, size=block)]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_roundtrip_matches_numpy(fmt):
    x = _awkward_blocks(16)
    c = Compression(fmt, 16)
    ours = np.asarray(jax.jit(lambda v: c.dequantize(*c.quantize(v)))(x))
    np.testing.assert_array_equal(ours, np_roundtrip(x, fmt, 16))
    assert np.isnan(ours[64:96]).all() and np.isfinite(ours[:64]).all()
    assert (ours[16:32] == 0).all()


def test_codes_by_hand():
    """int8: [0.5, -1] -> scale f32(1/127), codes round(63.5) = 64 (half to even), -127. int4:
    [7, -7, 3.5, 0] -> scale 1, codes 7, -7, 4 (half to even), 0, stored as nibble + 8, two per
    byte, low first: 15 | 1 << 4 = 31 and 12 | 8 << 4 = 140. fp8: [1, -0.5] -> e4m3 448 =
    1.75 x 2^8 (sign 0, exponent 8 + 7 = 1111, mantissa 110: 0x7E) and -224 (1, 1110, 110: 0xF6),
    sent as those bytes."""
    codes, scales = Compression("int8", 2).quantize(jnp.array([0.5, -1.0]))
    assert codes.dtype == jnp.int8 and codes.tolist() == [64, -127]
    assert scales.tolist() == [np.float32(1 / 127)]
    codes, scales = Compression("int4", 4).quantize(jnp.array([7.0, -7.0, 3.5, 0.0]))
    assert codes.dtype == jnp.uint8 and codes.tolist() == [31, 140] and scales.tolist() == [1.0]
    packed = Compression("int4", 4)
    np.testing.assert_array_equal(packed.dequantize(codes, scales), [7.0, -7.0, 4.0, 0.0])
    codes, _ = Compression("fp8", 2).quantize(jnp.array([1.0, -0.5]))  # e4m3 448, -224
    assert codes.dtype == jnp.uint8 and codes.tolist() == [0x7E, 0xF6]
    assert Compression("int4", 256).wire_bytes(512) == 256 + 8


def _simulate_combine(pieces, weights, fmt, block, residuals=None):
    """numpy: pieces[r] = replica r's flat values on one device; the combine of
    compression.quantized_combine. Returns (result, new residuals or None)."""
    R, n = len(pieces), pieces[0].size
    padded = -(-n // (R * block)) * R * block
    chunk = padded // R
    pad = lambda v: np.pad(v.astype(np.float32), (0, padded - n)).reshape(R, chunk)  # noqa: E731
    mine = [pad(p) if w > 0 else np.zeros((R, chunk), np.float32) for p, w in zip(pieces, weights)]
    owed = None if residuals is None else [pad(e) for e in residuals]
    sent = [m.copy() for m in mine]
    if owed is not None:
        for r in range(R):
            if weights[r] > 0:
                sent[r] += np.where(np.arange(R)[:, None] == r, 0, owed[r])
    decoded = [np_roundtrip(s.reshape(-1), fmt, block).reshape(R, chunk) for s in sent]
    result, new = [], [None if owed is None else o.copy() for o in (owed or [None] * R)]
    for i in range(R):
        total = np.zeros(chunk, np.float32)
        for r in range(R):
            values = mine[i][i] if r == i else decoded[r][i]
            if weights[r] > 0:
                total = total + np.float32(weights[r]) * values
        if owed is not None:
            total = total + owed[i][i]
        out = np_roundtrip(total, fmt, block)
        result.append(out)
        if owed is not None:
            new[i][i] = total - out if any(w > 0 for w in weights) else owed[i][i]
    if owed is not None:
        for r in range(R):
            for i in range(R):
                if i != r and weights[r] > 0:
                    new[r][i] = sent[r][i] - decoded[r][i]
    flat = np.concatenate(result)[:n]
    return flat, None if owed is None else [e.reshape(-1)[:n] for e in new]


def _block_steps(values: np.ndarray, local_shape, fmt: str) -> np.ndarray:
    """One quantization step of the block each value of a combined leaf was decoded in: its
    device-local piece (`local_shape`, pieces side by side along the last axis) flattened
    into blocks of 8."""
    pieces = np.split(values, values.shape[-1] // local_shape[-1], axis=-1)
    steps = []
    for piece in pieces:
        flat = np.pad(piece.reshape(-1), (0, -piece.size % 8)).reshape(-1, 8)
        step = np.abs(flat).max(axis=1, keepdims=True) / LARGEST[fmt] + np.zeros_like(flat)
        steps.append(step.reshape(-1)[:piece.size].reshape(piece.shape))
    return np.concatenate(steps, axis=-1)


@pytest.mark.parametrize("fmt, weights, poisoned", [("int8", (0.25, 0.75), False),
                                                    ("fp8", (0.5, 0.5), False),
                                                    ("int4", (1.0, 0.0), True)])
def test_combine_under_shard_map_matches_numpy(fmt, weights, poisoned):
    """2 replicas x 4 shards; 'w' split over `shard` along its columns, 'b' whole on every
    shard. A replica with weight 0 holding NaN and inf is left out before quantizing."""
    mesh = make_mesh(MeshConfig(2, 4), jax.devices()[:8])
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 8, 16)).astype(np.float32)  # [replica, rows, cols]
    w[0, :, :4] *= 1e4  # blocks of very different scales
    b = rng.normal(size=(2, 6)).astype(np.float32)
    if poisoned:
        w[1, 0, 0], b[1, 2] = np.nan, np.inf
    compression = Compression(fmt, 8)
    specs = {"w": P("replica", None, "shard"), "b": P("replica")}
    tree = {"w": jax.device_put(w, NamedSharding(mesh, specs["w"])),
            "b": jax.device_put(b, NamedSharding(mesh, specs["b"]))}

    def combine(tree):
        local = jax.tree.map(lambda x: x[0], tree)
        out, _ = quantized_combine(local, jnp.array(weights), replica_axis="replica",
                                   compression=compression)
        return out

    ours = jax.jit(jax.shard_map(combine, mesh=mesh, in_specs=(specs,),
                                 out_specs={"w": P(None, "shard"), "b": P()}))(tree)
    expected_w = np.concatenate([_simulate_combine([w[r][:, 4 * s:4 * s + 4].reshape(-1)
                                                    for r in range(2)], weights, fmt, 8)[0]
                                 .reshape(8, 4) for s in range(4)], axis=1)
    expected_b = _simulate_combine([b[0], b[1]], weights, fmt, 8)[0]
    # Bit for bit up to the f32 sum's order (XLA may fuse w0 x0 + w1 x1): then a block's scale
    # can differ in its last bit, a code by one step at most.
    for got, want, block_shape in ((ours["w"], expected_w, (8, 4)), (ours["b"], expected_b, (6,))):
        step = _block_steps(want, block_shape, fmt)
        assert (np.abs(np.asarray(got) - want) <= step).all()
    assert np.isfinite(expected_w).all() and np.isfinite(expected_b).all()
    exact = sum(wr * x for wr, x in zip(weights, w) if wr > 0)
    assert np.abs(expected_w - exact).max() < 0.1 * np.abs(exact).max()


def test_error_feedback_loses_nothing():
    """4 replicas (vmap), int4, weights 1/4, six syncs of deltas of changing scale: the sum of
    what every replica applied plus the residuals still held (a sender's divided by R, the
    owner's of its chunk as is) equals the mean over replicas of the summed deltas; the
    residuals equal numpy's; without error feedback the shortfall is visible."""
    R, n, block, syncs = 4, 50, 8, 6
    compression = Compression("int4", block)
    rng = np.random.default_rng(2)
    deltas = [rng.normal(size=(R, n)).astype(np.float32) * (t + 1) for t in range(syncs)]
    weights = jnp.full((R,), 1 / R)
    step = jax.jit(jax.vmap(lambda d, e: quantized_combine(d, weights, replica_axis="r",
                                                           compression=compression, residual=e),
                            axis_name="r"))
    no_feedback = jax.jit(jax.vmap(lambda d: quantized_combine(
        d, weights, replica_axis="r", compression=compression)[0], axis_name="r"))
    residual = jnp.zeros((R, n))
    applied, plain = np.zeros(n), np.zeros(n)
    sim_residual = [np.zeros(n, np.float32) for _ in range(R)]
    for d in deltas:
        out, residual = step(jnp.asarray(d), residual)
        out = np.asarray(out)
        assert (out == out[0]).all()  # every replica applies the same values
        sim_out, sim_residual = _simulate_combine(list(d), [1 / R] * R, "int4", block,
                                                  sim_residual)
        np.testing.assert_allclose(out[0], sim_out, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(residual), np.stack(sim_residual), rtol=0,
                                   atol=1e-5)
        applied += out[0]
        plain += np.asarray(no_feedback(jnp.asarray(d)))[0]
    chunk = (-(-n // (R * block)) * R * block) // R
    owner = np.arange(n) // chunk
    held = np.asarray(residual, np.float64)
    owed = np.where(owner == np.arange(R)[:, None], held, held / R).sum(axis=0)
    truth = np.mean(np.sum(deltas, axis=0), axis=0)
    np.testing.assert_allclose(applied + owed, truth, rtol=0, atol=2e-5)
    assert np.abs(plain - truth).max() > 100 * np.abs(applied + owed - truth).max()


# ----------------------------------------------------------------------------- the compiled step


def _expected_wire(program, units, compression: Compression | TopK | None) -> int:
    """Wire bytes over `replica` of one exchange of `units`, per device, computed from each
    leaf's local shard size n (per layer for the layers): fp32 all-reduce 2(R-1)/R x 4n;
    dense codes: all-to-all and all-gather of every code and scale, 2(R-1)/R x wire_bytes(n
    padded to R chunks of whole blocks); top-k: the all-gather of every replica's indices,
    codes and scales, (R-1) x chunks(n) x chunk_bytes (sparse.py)."""
    R, L = program.layout.num_replicas, program.method.num_layers
    layers = sum(u != REST_UNIT for u in units)  # each layer syncs on its own
    total = 0
    for (path, leaf), dim in zip(jax.tree_util.tree_flatten_with_path(program.params_shapes)[0],
                                 jax.tree.leaves(program.layout.dims)):
        is_layer = path[0].key == "layers"
        count = layers if is_layer else int(REST_UNIT in units)
        n = leaf.size // (L if is_layer else 1) // (program.layout.num_shards if dim >= 0 else 1)
        if isinstance(compression, TopK):
            chunks = compression.padded_size(n) // compression.block
            total += count * (R - 1) * chunks * compression.chunk_bytes()
            continue
        per = 4 * n if compression is None else compression.wire_bytes(
            compression.padded_size(n, R))
        total += count * 2 * (R - 1) * per // R
    return total


STREAMING = {"fragments": 2, "fragment_delay": 1, "sync_every": 4}


TOPK = {"topk_fraction": 1 / 16}  # 4 of every chunk of 64, 2-bit values


@pytest.mark.parametrize("name, fmt, settings", [
    ("edit", "int8", {}), ("local_sgd", "int4", {}), ("diloco", "fp8", STREAMING),
    ("diloco", "topk", TOPK), ("edit", "topk", {**STREAMING, **TOPK})],
    ids=["edit-int8", "local_sgd-int4", "streaming-diloco-fp8", "diloco-topk",
         "streaming-edit-topk"])
def test_hlo_bytes_of_a_compressed_sync(name, fmt, settings):
    """A sync step's replica wire bytes from the compiled HLO, fp32 against compressed: they
    differ by exactly the synced parameters' fp32 bytes minus the codes' and scales' (top-k:
    the indices' too), so the saving is 4x (8-bit) or 8x (4-bit) up to the scales' share and
    padding, and 28x for top-k 4 of 64 at 2 bits on 2 replicas. edit's and diloco's scalar
    collectives (norms, step counts) are the same in both; compressed local SGD adds a few
    (it averages from an anchor, leaving out non-finite replicas by their norms). Streaming:
    the step that syncs the second fragment (layer 1 and the rest) and applies its delayed
    outer step."""
    wire, expected = {}, {}
    streaming = "fragments" in settings
    for compressed in (False, True):
        method = dataclasses.replace(EDIT, name=name, compression_block=64, **settings,
                                     compression=fmt if compressed else "none",
                                     error_feedback=compressed)
        program = build_program(_config(method), VOCAB)
        units = program.method.fragments[-1] if streaming else program.method.units
        plan = StepPlan(StepKind.SYNC, units, units if streaming else frozenset())
        summary = summarize(collective_stats(program.compiled_step(plan), program.layout.mesh))
        wire[compressed] = replica_traffic(summary)["replica_wire_bytes"]
        expected[compressed] = _expected_wire(program, units, codec(method))
    scalars = (wire[True] - expected[True]) - (wire[False] - expected[False])
    assert scalars == 0 if name != "local_sgd" else 0 < scalars <= 64
    assert wire[False] / wire[True] > {"int8": 3.5, "fp8": 3.5, "int4": 6.5, "topk": 25}[fmt]


@pytest.mark.parametrize("name, fmt, feedback", [("diloco", "int4", True),
                                                 ("plsgd", "int8", False),
                                                 ("diloco", "topk", True)])
def test_training_with_compressed_syncs(name, fmt, feedback):
    """Training follows fp32's closely (dense codes within 5e-3; top-k, which sends 1/64 of
    each pseudo-gradient per sync, within 0.1). diloco: the same losses up to its compressed
    sync at the end of step 4, after which every replica holds bit-identical parameters. plsgd
    (averaging from an anchor when compressed) reports each step's sync, which plain averaging
    does not."""
    base = dataclasses.replace(EDIT, name=name, warmup_steps=2, sync_every=3)
    compressed = dataclasses.replace(base, compression=fmt, error_feedback=feedback)
    after_sync = []

    def record(t, state):
        if t == 5:  # the state after step 4
            after_sync.extend(jax.tree.leaves(jax.tree.map(np.asarray, state.params)))
        return state

    losses, state, synced = _run_ours(compressed, before_step=record)
    fp32_losses = _run_ours(base)[0]
    np.testing.assert_allclose(losses, fp32_losses, rtol=0, atol=0.1 if fmt == "topk" else 5e-3)
    assert (state.residual is not None) == feedback
    if name == "diloco":
        np.testing.assert_array_equal(losses[:5], fp32_losses[:5])
        assert synced[0] == [3, 3] and len(synced) == 3
        assert all(np.array_equal(x[0], x[1]) for x in after_sync)
    else:
        assert len(synced) == len(losses) - 2  # every local step averages one unit
