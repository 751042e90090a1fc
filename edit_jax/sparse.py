"""Sparse compressed syncs: the top k values of every chunk, as low-bit codes, with error feedback
(SparseLoCo's code, docs/algorithms.md section 8).

Each replica keeps an error-feedback buffer e like its parameters. At a sync it folds its
pseudo-gradient in (e <- decay * e + delta), and in every chunk of `block` values of its local
shard keeps the k = fraction * block largest magnitudes: their indices in the chunk (uint8 for
chunks of at most 256 values, else uint16) and their values as `value_bits`-bit codes with one
fp32 scale per chunk (the largest kept magnitude; the 2^b levels are spread evenly over
[-scale, scale], both ends included). What it sends leaves e; the rest waits for later syncs.
One all-gather over the replicas brings every replica's (indices, codes, scales) to every
replica, which decodes them all and sums them with the weights in fp32, in replica order, so
every replica holds bit-identical results.

Bytes one replica sends per chunk: k * index_bytes + k * value_bits / 8 + 4 (its scale). The
all-gather delivers R of those to every replica: per device (R - 1) x that on the wire, against
fp32's all-reduce of 2 (R - 1) / R x 4 x block; the saving is 8 block / (R x chunk bytes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from edit_jax.compression import all_gather_invariant

VALUE_BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Top-k per chunk of `block` values, k = round(fraction * block), `value_bits`-bit values,
    error feedback with `decay`."""

    block: int = 256
    fraction: float = 1 / 64
    value_bits: int = 2
    decay: float = 0.95

    def __post_init__(self):
        if not 2 <= self.block <= 2**16:
            raise ValueError(f"top-k chunks must hold 2 to 65536 values, got {self.block}")
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"top-k values take {VALUE_BITS} bits, not {self.value_bits}")
        if not 1 <= self.k <= self.block:
            raise ValueError(f"top-k fraction {self.fraction} keeps {self.k} of a chunk of "
                             f"{self.block}; keep at least 1")
        if self.k * self.value_bits % 8:
            raise ValueError(f"{self.k} values of {self.value_bits} bits do not fill whole "
                             f"bytes; choose fraction x block = a multiple of "
                             f"{8 // self.value_bits}")
        if not 0 <= self.decay <= 1:
            raise ValueError(f"the error-feedback decay must be in [0, 1], got {self.decay}")

    @property
    def k(self) -> int:
        return round(self.fraction * self.block)

    @property
    def index_dtype(self):
        return jnp.uint8 if self.block <= 256 else jnp.uint16

    def chunk_bytes(self) -> int:
        """Bytes one replica sends for one chunk: indices, packed codes, one fp32 scale."""
        return self.k * jnp.dtype(self.index_dtype).itemsize + self.k * self.value_bits // 8 + 4

    def padded_size(self, n: int) -> int:
        """n rounded up to whole chunks."""
        return math.ceil(n / self.block) * self.block

    def encode(self, flat: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(indices (chunks, k), packed codes (chunks * k * bits / 8,), f32 scales (chunks,))
        of a 1-D f32 array whose size is a multiple of `block`."""
        chunks = flat.reshape(-1, self.block)
        _, indices = jax.lax.top_k(jnp.abs(chunks), self.k)
        values = jnp.take_along_axis(chunks, indices, axis=1)
        scales = jnp.max(jnp.abs(values), axis=1)
        levels = 2**self.value_bits - 1
        unit = values / jnp.where(scales > 0, scales, 1.0)[:, None]  # in [-1, 1]
        codes = jnp.clip(jnp.round((unit + 1) * (levels / 2)), 0, levels).astype(jnp.uint8)
        per_byte = 8 // self.value_bits
        shifts = jnp.arange(per_byte, dtype=jnp.uint8) * self.value_bits
        packed = jnp.sum(codes.reshape(-1, per_byte) << shifts, axis=1, dtype=jnp.uint8)
        return indices.astype(self.index_dtype), packed, scales

    def decode(self, indices: jax.Array, packed: jax.Array, scales: jax.Array) -> jax.Array:
        """The dense f32 values (chunks * block,) of `encode`'s output: zeros but the kept."""
        levels = 2**self.value_bits - 1
        per_byte = 8 // self.value_bits
        shifts = jnp.arange(per_byte, dtype=jnp.uint8) * self.value_bits
        codes = ((packed[:, None] >> shifts) & levels).reshape(-1, self.k)
        values = (codes.astype(jnp.float32) * (2 / levels) - 1) * scales[:, None]
        rows = jnp.arange(len(scales))[:, None]
        dense = jnp.zeros((len(scales), self.block), jnp.float32)
        return dense.at[rows, indices.astype(jnp.int32)].set(values).reshape(-1)

    def combine(self, tree, weights: jax.Array, *, replica_axis: str, residual):
        """sum_r weights[r] * (what replica r sends of decay * e_r + tree_r), and the new e.

        `residual` is this replica's buffer e (like `tree`; zeros at first). A replica with
        weight 0 sends zeros and keeps e as it was. Call it once per replica under
        `jax.shard_map` or `jax.vmap(..., axis_name=...)`.

        Returns:
            (the combined tree in `tree`'s dtypes, bit-identical on every replica; the new e).
        """
        if residual is None:
            raise ValueError("top-k syncs always keep an error-feedback buffer; pass this "
                             "replica's residual (zeros at first)")
        me = jax.lax.axis_index(replica_axis)
        weight = weights[me]
        column = weights.reshape(-1, 1)

        def one(x, owed):
            size, padded = x.size, self.padded_size(x.size)

            def flat(v):
                return jnp.pad(v.reshape(-1).astype(jnp.float32), (0, padded - size))

            buffer = self.decay * flat(owed) + flat(x)
            payload = self.encode(jnp.where(weight > 0, buffer, 0.0))
            kept = jnp.where(weight > 0, buffer - self.decode(*payload), flat(owed))
            gathered = [all_gather_invariant(a[None], replica_axis) for a in payload]
            values = jax.vmap(self.decode)(*gathered)  # (R, padded): every replica's
            total = jnp.sum(jnp.where(column > 0, column * values, 0.0), axis=0)
            return (total[:size].reshape(x.shape).astype(x.dtype),
                    kept[:size].reshape(x.shape).astype(x.dtype))

        pairs = jax.tree.map(one, tree, residual)
        return (jax.tree.map(lambda _, p: p[0], tree, pairs),
                jax.tree.map(lambda _, p: p[1], tree, pairs))
