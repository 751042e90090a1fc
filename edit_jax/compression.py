"""Compressed syncs: block-wise 8- and 4-bit codes with fp32 scales, and the quantized
all-reduce that moves them.

A value tree is flattened per leaf and cut into blocks of `block` values; each block is sent as
codes plus one fp32 scale (its largest magnitude over the format's largest code), so the bytes
per value are bits/8 + 4/block (scale = max|x| x f32(1 / largest code)):

  format  codes                                  largest code
  int8    round(x / scale) in int8               127
  fp8     x / scale cast to float8_e4m3fn, sent  448 (e4m3's largest finite value)
          as its raw bytes
  int4    round(x / scale) in [-7, 7], two       7
          codes per byte (low nibble first)

A block holding NaN or inf decodes to NaN everywhere (scale NaN, codes 0): a non-finite value
is never turned into a finite one. Syncs exclude such replicas before anything is quantized
(their weight is 0 and they send zeros), so this only guards direct use.

`quantized_combine` is the weighted all-reduce sum_r w_r x_r over a replica axis with 1/4 (8-bit)
or 1/8 (4-bit) of fp32's bytes: each replica quantizes its R chunks, one all-to-all brings every
replica's codes of chunk i to replica i, which decodes them and sums them in fp32 with the
weights, quantizes the sum and all-gathers it. Every replica decodes the same codes, so every
replica gets bit-identical values: replicas never drift apart from rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from edit_jax.config import COMPRESSIONS

FORMATS = tuple(c for c in COMPRESSIONS if c not in ("none", "topk"))  # topk: sparse.py
_LARGEST = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
_BITS = {"int8": 8, "fp8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class Compression:
    """A block-wise quantization format: `format` in FORMATS, `block` values per fp32 scale."""

    format: str = "int8"
    block: int = 256

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"compression format '{self.format}' is not one of {FORMATS}")
        if self.block < 2 or self.block % 2:
            raise ValueError(f"compression block must be an even number >= 2, got {self.block}")

    @property
    def bits(self) -> int:
        return _BITS[self.format]

    def padded_size(self, n: int, num_chunks: int = 1) -> int:
        """n rounded up to whole blocks in each of `num_chunks` equal chunks."""
        return math.ceil(n / (num_chunks * self.block)) * num_chunks * self.block

    def wire_bytes(self, n: int) -> int:
        """Bytes of codes plus scales for n values (n a multiple of `block`)."""
        return n * self.bits // 8 + n // self.block * 4

    def quantize(self, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(codes, f32 scales) of a 1-D f32 array whose size is a multiple of `block`."""
        blocks = flat.astype(jnp.float32).reshape(-1, self.block)
        finite = jnp.all(jnp.isfinite(blocks), axis=1)
        largest = _LARGEST[self.format]
        reciprocal = jnp.float32(1 / largest)  # explicit: XLA turns "/ largest" into this
        scales = jnp.where(finite, jnp.max(jnp.abs(blocks), axis=1) * reciprocal, jnp.nan)
        usable = (finite & (scales > 0))[:, None]
        scaled = jnp.where(usable, blocks / jnp.where(usable, scales[:, None], 1.0), 0.0)
        if self.format == "fp8":  # as raw bytes: XLA's CPU collectives would widen f8 to f16
            codes = jax.lax.bitcast_convert_type(
                jnp.clip(scaled, -largest, largest).astype(jnp.float8_e4m3fn), jnp.uint8)
        else:
            codes = jnp.clip(jnp.round(scaled), -largest, largest).astype(jnp.int8)
        codes = codes.reshape(-1)
        if self.format == "int4":
            nibbles = (codes + 8).astype(jnp.uint8).reshape(-1, 2)
            codes = nibbles[:, 0] | (nibbles[:, 1] << 4)
        return codes, scales

    def combine(self, tree, weights: jax.Array, *, replica_axis: str, residual=None):
        """`quantized_combine` in this format (the interface `sparse.TopK` shares)."""
        return quantized_combine(tree, weights, replica_axis=replica_axis, compression=self,
                                 residual=residual)

    def dequantize(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        """The f32 values of `quantize`'s output (1-D)."""
        if self.format == "int4":
            low = (codes & 0xF).astype(jnp.int8) - 8
            high = (codes >> 4).astype(jnp.int8) - 8
            codes = jnp.stack([low, high], axis=-1).reshape(-1)
        elif self.format == "fp8":
            codes = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
        values = codes.astype(jnp.float32).reshape(-1, self.block) * scales[:, None]
        return values.reshape(-1)


def all_gather_invariant(x: jax.Array, axis_name: str) -> jax.Array:
    """all_gather (tiled, axis 0) typed as the same on every member of `axis_name`, so that a
    shard_map may return it without that axis (one all-gather either way); under vmap, where
    nothing is typed varying, the plain all_gather."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)  # jax 0.10 to 0.12
    if axis_name not in getattr(manual, "varying", ()):
        return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")


def quantized_combine(tree, weights: jax.Array, *, replica_axis: str,
                      compression: Compression, residual=None):
    """sum_r weights[r] * tree_r over `replica_axis`, sent as `compression` codes.

    Per leaf, this replica's values (zeros if its weight is 0, so an excluded replica's NaN or
    inf is never quantized) are padded into R equal chunks of whole blocks. Chunk i goes to
    replica i: every replica quantizes its chunks, one all-to-all (of codes, one of scales)
    delivers them, and replica i decodes them and sums them in f32 (`where(w > 0, w * x, 0)`,
    in replica order; its own chunk never leaves it, so it enters unquantized). It quantizes the
    sum, and one all-gather brings every chunk's codes to every replica, which decode them.
    Call it once per replica under `jax.shard_map` or `jax.vmap(..., axis_name=...)`.

    Error feedback (`residual` given: this replica's, like `tree`, zeros at first): a replica
    adds its residual to the chunks it sends, and keeps what their quantization dropped; in the
    slots of its own chunk it keeps what the second quantization dropped from the sum, and adds
    it to the next sum. With weights 1/R, the sum over syncs of the results plus the residuals
    (the senders' divided by R, the owners' as they are) equals the mean of the replicas' sums
    of `tree`: nothing is lost, only delayed. A replica with weight 0 keeps its residual as it
    was (all weights 0: every residual is kept).

    Args:
        tree: this replica's values (any float dtypes).
        weights: f32[R], identical on every replica (e.g. `penalty_weights`; 1/R for a mean).
        replica_axis: the mapped axis over replicas.
        compression: the format and block size.
        residual: this replica's error-feedback residual, or None for none.

    Returns:
        (the combined tree in `tree`'s dtypes, bit-identical on every replica; the new residual,
        or None).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from edit_jax.compression import Compression, quantized_combine
        >>> x = jnp.arange(8.0).reshape(2, 4)  # two replicas
        >>> mean, _ = jax.vmap(lambda x: quantized_combine(
        ...     x, jnp.full(2, 0.5), replica_axis="r", compression=Compression("int8", 2)),
        ...     axis_name="r")(x)
        >>> [round(v, 1) for v in mean[0].tolist()]
        [2.0, 3.0, 4.0, 5.0]
    """
    num_replicas = jax.lax.axis_size(replica_axis)
    me = jax.lax.axis_index(replica_axis)
    weight = weights[me]
    column = weights.reshape(-1, 1)
    own = (jnp.arange(num_replicas) == me)[:, None]

    def one(x, owed):
        size = x.size
        padded = compression.padded_size(size, num_replicas)

        def rows(v):  # (R, chunk): row i is chunk i
            return jnp.pad(v.reshape(-1).astype(jnp.float32), (0, padded - size)).reshape(
                num_replicas, -1)

        mine = jnp.where(weight > 0, rows(x), 0.0)
        owed = None if owed is None else rows(owed)
        sent = mine if owed is None else jnp.where(weight > 0, mine + jnp.where(own, 0.0, owed), 0.0)
        codes, scales = compression.quantize(sent.reshape(-1))
        received = [jax.lax.all_to_all(a.reshape(num_replicas, -1), replica_axis, 0, 0, tiled=True)
                    for a in (codes, scales)]
        values = jnp.where(own, mine[me][None], jax.vmap(compression.dequantize)(*received))
        chunk = jnp.sum(jnp.where(column > 0, column * values, 0.0), axis=0)
        if owed is not None:
            chunk = chunk + owed[me]
        chunk_codes, chunk_scales = compression.quantize(chunk)
        gathered = [all_gather_invariant(a, replica_axis) for a in (chunk_codes, chunk_scales)]
        combined = compression.dequantize(*gathered)[:size].reshape(x.shape).astype(x.dtype)
        if owed is None:
            return combined, None
        dropped = sent - compression.dequantize(codes, scales).reshape(num_replicas, -1)
        chunk_dropped = chunk - compression.dequantize(chunk_codes, chunk_scales)
        new = jnp.where(own, jnp.where(jnp.any(weights > 0), chunk_dropped, owed[me])[None],
                        jnp.where(weight > 0, dropped, owed))
        return combined, new.reshape(-1)[:size].reshape(x.shape).astype(x.dtype)

    if residual is None:
        pairs = jax.tree.map(lambda x: one(x, None), tree)
    else:
        pairs = jax.tree.map(one, tree, residual)
    combined = jax.tree.map(lambda _, p: p[0], tree, pairs)
    new_residual = None if residual is None else jax.tree.map(lambda _, p: p[1], tree, pairs)
    return combined, new_residual
