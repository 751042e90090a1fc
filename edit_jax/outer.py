"""The outer optimizer: EDiT's pseudo-gradient penalty wrapped around any optax optimizer.

Each replica r holds its pseudo-gradient delta_r = phi - theta_r. A sync gathers the replicas'
norms, drops anomalous replicas (judged per local step when the step counts are given), weights
the rest by a softmax of their negative norms, sums the weighted deltas with one psum, clips the
result and hands it to the outer optimizer (docs/algorithms.md section 3). Code runs per
replica under `jax.shard_map` or `jax.vmap(..., axis_name=...)`; the axis names are arguments,
so the same functions serve both.

The building blocks (`replica_norms`, `penalty_weights`, `combine`, `clip_by_norm`) are public so
that a layer-wise sync can apply them per layer; `pseudo_gradient_penalty` chains them over the
whole tree as an `optax.GradientTransformation`; its `combine=` argument says how the weighted
sum travels: `PlainSum()` (one fp32 psum, the default), a `compression.Compression` or
`sparse.TopK` (codes on the wire), or `StackedSum(mask)` (an outer state split over replicas).
Plain parameter averaging is `pseudo_gradient_penalty(..., anomaly=False, weighting=False,
clip_norm=0)`.

`delayed_nesterov` (delayed_nesterov.py, also importable from here) is the outer optimizer of
asynchronous Local-SGD, where the server applies one worker's pseudo-gradient at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from edit_jax import xla_flags
from edit_jax.compression import Compression
from edit_jax.delayed_nesterov import DelayedNesterovState, delayed_nesterov  # noqa: F401
from edit_jax.sparse import TopK
from edit_jax.optimizer import split_sum_of_squares


class AnomalyStats(NamedTuple):
    """Per-replica exponentially weighted mean and variance of the pseudo-gradient norm."""

    mean: jax.Array  # f32[R]
    var: jax.Array  # f32[R]
    count: jax.Array  # i32[], syncs seen


class PenaltyState(NamedTuple):
    """State of `pseudo_gradient_penalty`: statistics, the outer optimizer's state, last sync."""

    stats: AnomalyStats
    inner_state: optax.OptState
    weights: jax.Array  # f32[R], the last sync's weights (zeros before the first)
    outliers: jax.Array  # bool[R], the last sync's excluded replicas
    residual: Any = None  # error feedback: this replica's (it differs between replicas)


class PenaltyTransformation(optax.GradientTransformationExtraArgs):
    """`pseudo_gradient_penalty`'s transformation. Besides `init` and `update` it carries the
    three parts `update` chains, for callers that keep the error-feedback residual themselves
    or spread the combination over several steps (sync.py): `weigh(delta, state, norms=,
    steps=)` -> state with the weights; `combine(delta, state, residual)` -> (combined delta,
    new residual), the one collective over replicas; `land(combined, state, params)` ->
    (updates, state)."""

    def __new__(cls, init, update, weigh, combine, land):
        transformation = super().__new__(cls, init, update)
        transformation.weigh, transformation.combine, transformation.land = weigh, combine, land
        return transformation


def init_anomaly_stats(num_replicas: int) -> AnomalyStats:
    """Zero statistics for `num_replicas` replicas (the reference code starts at zero too)."""
    zeros = jnp.zeros((num_replicas,), jnp.float32)
    return AnomalyStats(mean=zeros, var=zeros, count=jnp.zeros((), jnp.int32))


def _split_axes(tree, shard_axis: str | None, sharded_mask, replica_axis: str | None = None,
                replica_split_mask=None):
    """Per leaf, the mesh axes its pieces are spread over (see `split_sum_of_squares`)."""
    if shard_axis is not None and sharded_mask is None:
        sharded_mask = jax.tree.map(lambda _: True, tree)
    if sharded_mask is None:
        sharded_mask = jax.tree.map(lambda _: False, tree)
    if replica_split_mask is None:
        replica_split_mask = jax.tree.map(lambda _: False, tree)
    return jax.tree.map(lambda s, r: ((shard_axis,) if s else ()) + ((replica_axis,) if r else ()),
                        sharded_mask, replica_split_mask)


def _norm(tree, shard_axis: str | None, sharded_mask, replica_axis: str | None = None,
          replica_split_mask=None) -> jax.Array:
    """f32 L2 norm of `tree` from this device's pieces; psums each leaf over the axes it is split
    over (`shard_axis` for the sharded leaves, `replica_axis` for the replica-split ones)."""
    axes = _split_axes(tree, shard_axis, sharded_mask, replica_axis, replica_split_mask)
    return jnp.sqrt(split_sum_of_squares(tree, axes))


def stacked_replica_norms(delta_stacked, *, replica_axis: str, shard_axis: str | None = None,
                          sharded_mask=None, replica_split_mask=None) -> jax.Array:
    """Every replica's norm, f32[R], from stacked pieces: leaf[r] = replica r's delta piece.

    The stacked layout is the one of an outer state sharded over replicas too: each device holds
    its 1/R piece of its shard of phi and receives every replica's delta for that piece.
    """
    axes = _split_axes(delta_stacked, shard_axis, sharded_mask, replica_axis, replica_split_mask)
    return jnp.sqrt(split_sum_of_squares(delta_stacked, axes, per_row=True))


def stacked_combine(delta_stacked, weights: jax.Array):
    """sum_r weights[r] * delta_stacked[r], locally; excluded replicas contribute exact zeros."""

    def weighted_sum(x):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(jnp.where(w > 0, w * x.astype(jnp.float32), 0.0), axis=0).astype(x.dtype)

    return jax.tree.map(weighted_sum, delta_stacked)


def gather_replicas(value: jax.Array, replica_axis: str) -> jax.Array:
    """[R]: every replica's scalar `value`, identical on every device.

    A psum of a one-hot vector (built with `where`, so a non-finite value stays in its own
    slot): unlike `all_gather`, its result is replica-invariant under `shard_map`.
    """
    num_replicas = jax.lax.axis_size(replica_axis)
    mine = jnp.arange(num_replicas) == jax.lax.axis_index(replica_axis)
    return jax.lax.psum(jnp.where(mine, value, jnp.zeros((), value.dtype)), replica_axis)


def replica_norms(delta, *, replica_axis: str, shard_axis: str | None = None,
                  sharded_mask=None) -> jax.Array:
    """Every replica's pseudo-gradient norm, f32[R], identical on every device.

    Args:
        delta: this replica's pseudo-gradient (its shard of each leaf under `shard_axis`).
        replica_axis: the mapped axis over replicas.
        shard_axis: the axis the masked leaves are split over; None = leaves are whole.
        sharded_mask: bool tree like `delta`; None with a `shard_axis` = every leaf sharded.

    Returns:
        f32[R]: entry r is replica r's L2 norm.

    Where the runtime overlaps collectives (`xla_flags.overlaps_collectives`): one psum over `replica_axis` and `shard_axis` together of every
    replica's partial sums of squares (one row per group of leaves, a whole leaf counted on
    shard 0 only) gives the same sums as a psum over `shard_axis` and a gather over replicas,
    in one collective whose device groups differ from those of the step's psums over `shard`,
    so XLA never merges it into one of them (which would make a sync started from the step's
    input wait for the backward pass). Elsewhere: that psum over `shard_axis` and gather.
    """
    if not xla_flags.overlaps_collectives():
        return gather_replicas(_norm(delta, shard_axis, sharded_mask), replica_axis)
    axes = jax.tree.leaves(_split_axes(delta, shard_axis, sharded_mask),
                           is_leaf=lambda a: isinstance(a, tuple))
    groups: dict[tuple[str, ...], jax.Array] = {}
    for x, split in zip(jax.tree.leaves(delta), axes):
        sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
        groups[split] = groups[split] + sq if split in groups else sq
    num_replicas = jax.lax.axis_size(replica_axis)
    mine = jnp.arange(num_replicas) == jax.lax.axis_index(replica_axis)
    first_shard = True if shard_axis is None else jax.lax.axis_index(shard_axis) == 0
    rows = jnp.stack([jnp.where(mine & (True if split else first_shard), sq, 0.0)
                      for split, sq in groups.items()])
    summed = jax.lax.psum(rows, (replica_axis,) if shard_axis is None
                          else (replica_axis, shard_axis))
    total = jnp.zeros((num_replicas,), jnp.float32)
    for row in summed:
        total = total + row
    return jnp.sqrt(total)


def penalty_weights(norms: jax.Array, stats: AnomalyStats, *, anomaly: bool = True,
                    weighting: bool = True, temperature: float = 1.0, alpha: float = 0.02,
                    anomaly_warmup: int = 120, threshold: float = 3.0,
                    steps: jax.Array | None = None,
                    step_weighting: float = 0.0) -> tuple[jax.Array, AnomalyStats, jax.Array]:
    """Weights, updated statistics and outlier flags from the gathered norms; no collectives.

    The anomaly test judges the norm per local step, m_r = n_r / max(s_r, 1), when the local
    step counts s = `steps` are given (else m_r = n_r): a pseudo-gradient's norm grows with the
    steps it spans, so under A-EDiT a fast replica would otherwise be flagged only for running
    more steps. This is our deviation from the paper's raw norms (docs/algorithms.md section
    4); with equal counts (EDiT: tau each) the z-score is the same up to rounding.

    A non-finite norm is always an outlier. With `anomaly`, once `stats.count >= anomaly_warmup`,
    replica r is also an outlier if (m_r - mean_r) / sqrt(var_r) > threshold (never while
    var_r = 0: there is no scale to judge by yet). Only non-outliers update their statistics
    (EWMA of m_r), so a spike cannot poison them. The weights use the raw norms n_r (as do the
    clipping and the combination): with `weighting` the non-outliers get softmax(-n / temperature),
    otherwise equal weights; all outliers -> all weights zero. With `step_weighting` rho > 0
    (A-EDiT) the weights become (1 - rho) * w_r + rho * s_r / sum(s), summed over the
    non-outliers.

    Args:
        norms: f32[R] from `replica_norms`.
        stats: the statistics before this sync (of per-step norms when `steps` are given).
        anomaly: flag replicas whose norm is anomalously high.
        weighting: softmax weights instead of uniform ones.
        temperature: softmax temperature (raw norms grow with model size).
        alpha: smoothing factor of the mean and variance.
        anomaly_warmup: syncs to observe before flagging anything.
        threshold: the z-score above which a replica is an outlier.
        steps: f32[R], local steps per replica since the last sync: the anomaly statistics then
            use per-step norms; needed when rho > 0. None = raw norms (steps unknown).
        step_weighting: rho in [0, 1], the share of the weight given by steps.

    Returns:
        (weights f32[R] summing to 1 or all 0, new statistics, outliers bool[R]).
    """
    norms = norms.astype(jnp.float32)
    if steps is None:
        judged = norms
    else:
        judged = norms / jnp.maximum(steps.astype(jnp.float32), 1.0)
    outliers = ~jnp.isfinite(norms)
    if anomaly:
        has_scale = stats.var > 0
        z = (judged - stats.mean) / jnp.sqrt(jnp.where(has_scale, stats.var, 1.0))
        flagged = (stats.count >= anomaly_warmup) & has_scale & (z > threshold)
        outliers = outliers | flagged
    keep = ~outliers

    d = jnp.where(keep, judged - stats.mean, 0.0)
    new_stats = AnomalyStats(
        mean=jnp.where(keep, stats.mean + alpha * d, stats.mean),
        var=jnp.where(keep, (1 - alpha) * (stats.var + alpha * d * d), stats.var),
        count=optax.safe_increment(stats.count))

    if weighting:
        logits = jnp.where(keep, -norms / temperature, -jnp.inf)
        top = jnp.max(logits)
        scores = jnp.where(keep, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    else:
        scores = keep.astype(jnp.float32)
    weights = _normalized(scores)
    if step_weighting > 0:
        if steps is None:
            raise ValueError("step_weighting > 0 needs the replicas' step counts (steps=...)")
        step_shares = _normalized(jnp.where(keep, steps.astype(jnp.float32), 0.0))
        weights = (1 - step_weighting) * weights + step_weighting * step_shares
    return weights, new_stats, outliers


def _normalized(scores: jax.Array) -> jax.Array:
    """scores / sum(scores), or all zeros if they sum to 0."""
    total = jnp.sum(scores)
    return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), 0.0)


def combine(delta, weights: jax.Array, *, replica_axis: str):
    """sum_r weights[r] * delta_r by one psum over `replica_axis` (in fp32; for 8- or 4-bit
    codes see `compression.quantized_combine`).

    A replica with weight 0 contributes exact zeros, even if its delta holds NaN or inf.

    Args:
        delta: this replica's pseudo-gradient.
        weights: f32[R] from `penalty_weights`, identical on every device.
        replica_axis: the mapped axis over replicas.

    Returns:
        The combined pseudo-gradient, identical on every replica, in `delta`'s dtypes.
    """
    summed = jax.lax.psum(weighted_terms(delta, weights, replica_axis=replica_axis),
                          replica_axis)
    return jax.tree.map(lambda s, x: s.astype(x.dtype), summed, delta)


def weighted_terms(delta, weights: jax.Array, *, replica_axis: str):
    """This replica's f32 term of `combine`'s sum: weights[r] * delta_r, exact zeros if the
    weight is 0 (even where delta holds NaN or inf)."""
    weight = weights[jax.lax.axis_index(replica_axis)]
    return jax.tree.map(lambda x: jnp.where(weight > 0, weight * x.astype(jnp.float32), 0.0),
                        delta)


def clip_by_norm(tree, clip_norm: float, *, shard_axis: str | None = None, sharded_mask=None,
                 replica_axis: str | None = None, replica_split_mask=None):
    """tree * min(1, clip_norm / (||tree|| + 1e-6)); `clip_norm` <= 0 returns `tree` as is.

    Args:
        tree: the tree to clip (its shard of each masked leaf under `shard_axis`).
        clip_norm: the largest norm let through; <= 0 turns clipping off.
        shard_axis: the axis the masked leaves are split over; None = leaves are whole.
        sharded_mask: bool tree like `tree`; None with a `shard_axis` = every leaf sharded.
        replica_axis, replica_split_mask: leaves split over replicas too (stacked layout).

    Returns:
        The clipped tree, in `tree`'s dtypes.
    """
    if clip_norm <= 0:
        return tree
    norm = _norm(tree, shard_axis, sharded_mask, replica_axis, replica_split_mask)
    scale = jnp.minimum(1.0, clip_norm / (norm + 1e-6))
    return jax.tree.map(lambda x: (x * scale).astype(x.dtype), tree)


@dataclasses.dataclass(frozen=True)
class PlainSum:
    """The default combination: `combine`'s one fp32 psum over replicas."""

    def combine(self, tree, weights: jax.Array, *, replica_axis: str, residual=None):
        """(sum_r weights[r] * tree_r, `residual` unchanged): the interface of the codecs'."""
        return combine(tree, weights, replica_axis=replica_axis), residual


@dataclasses.dataclass(frozen=True, eq=False)
class StackedSum:
    """The combination of an outer state sharded over replicas too (the stacked layout): every
    leaf of a delta carries a leading axis of size R with every replica's delta of this
    device's piece of phi, and `replica_split_mask` (bool tree like the params) says which
    leaves' pieces are split over the replica axis (the rest are whole copies on every
    replica). Norms and the sum are local (`stacked_replica_norms`, `stacked_combine`): the
    all-to-all that brought the pieces carried parameters, so there are no codes to choose."""

    replica_split_mask: Any

    def combine(self, tree, weights: jax.Array, *, replica_axis: str, residual=None):
        """(sum_r weights[r] * tree[r], `residual` unchanged); `replica_axis` is not used."""
        del replica_axis
        return stacked_combine(tree, weights), residual


# How `pseudo_gradient_penalty` combines: any object with this `combine(tree, weights, *,
# replica_axis, residual)` -> (combined, new residual) works; these are the library's.
Combination = Union[PlainSum, StackedSum, Compression, TopK]


def _one_combination(combine, compression):
    """The combination `pseudo_gradient_penalty` was given by `combine=` or by its older
    spelling `compression=`, checked once."""
    if combine is not None and compression is not None:
        raise ValueError("combine= and compression= both choose how replicas combine; pass "
                         "one (compression=C is combine=C)")
    combination = next((c for c in (combine, compression) if c is not None), PlainSum())
    if not callable(getattr(combination, "combine", None)):
        raise ValueError(f"combine={combination!r} has no combine(tree, weights, *, "
                         "replica_axis, residual) method; pass PlainSum(), StackedSum(mask), "
                         "a compression.Compression or a sparse.TopK")
    return combination


def pseudo_gradient_penalty(outer_optimizer: optax.GradientTransformation, *, replica_axis: str,
                            num_replicas: int, shard_axis: str | None = None, sharded_mask=None,
                            anomaly: bool = True, weighting: bool = True, clip_norm: float = 1.0,
                            temperature: float = 1.0, alpha: float = 0.02,
                            anomaly_warmup: int = 120, threshold: float = 3.0,
                            step_weighting: float = 0.0, combine: Combination | None = None,
                            error_feedback: bool = False,
                            compression: Compression | TopK | None = None
                            ) -> PenaltyTransformation:
    """EDiT's pseudo-gradient penalty around `outer_optimizer`; call it once per replica.

    `update(delta_r, state, params=phi)` takes this replica's delta_r = phi - theta_r, gathers
    the norms, weights the non-outliers, combines, clips and applies `outer_optimizer` to the
    result; add the returned updates to phi (with `optax.sgd(lr)`: phi - lr * combined delta).
    If every replica is an outlier the step is skipped: zero updates, outer state unchanged.
    `update(..., norms=n)` uses the given f32[R] norms for the outlier test and the weights
    instead of this delta's own (EDiT's `global` granularity: one norm per replica over the whole
    model, shared by every layer's sync). `update(..., steps=s)` passes the f32[R] local step
    counts since the last sync: the anomaly test then judges each norm per local step, so a
    replica that ran more steps (A-EDiT) is not flagged for that alone (docs/algorithms.md
    section 4), and `step_weighting` mixes them into the weights; the softmax weights and the
    clipping keep the raw norms (see `penalty_weights`). Without `steps` the test uses raw norms.
    With `anomaly=False, weighting=False, clip_norm=0` it is plain parameter averaging (replicas
    with non-finite deltas are still left out). `combine` chooses how the weighted sum over
    replicas travels: with a `Compression` or a `TopK` it moves 8- or 4-bit codes
    (`compression.quantized_combine`) or sparse top-k codes, while the norms, hence the
    weights, the outlier test and the clipping, still come from the uncompressed deltas (or the
    given `norms`).

    Args:
        outer_optimizer: the optimizer applied to the combined pseudo-gradient.
        replica_axis: the mapped axis over replicas (`shard_map` mesh axis or vmap axis name).
        num_replicas: the size of `replica_axis` (the state holds per-replica statistics).
        shard_axis: the axis the masked leaves are split over; None = leaves are whole.
        sharded_mask: bool tree like the params; None with a `shard_axis` = every leaf sharded.
        anomaly: exclude replicas whose (per-step, given `steps`) norm z-score exceeds
            `threshold`.
        weighting: softmax(-norm / temperature) weights instead of uniform ones.
        clip_norm: clip the combined pseudo-gradient to this norm; <= 0 turns clipping off.
        temperature: softmax temperature.
        alpha: smoothing factor of the norm statistics.
        anomaly_warmup: syncs to observe before excluding anything.
        threshold: the z-score above which a replica is an outlier.
        step_weighting: rho in [0, 1]: weights (1 - rho) * w + rho * steps share (needs `steps`).
        combine: `PlainSum()` (the default: one fp32 psum), a `compression.Compression` or
            `sparse.TopK` (codes on the wire), or `StackedSum(replica_split_mask)`, the stacked
            layout of an outer state sharded over replicas too, where `params` is this device's
            piece of phi and norms and sum are local (see `StackedSum`).
        error_feedback: with codes, the state carries this replica's residual (what they
            dropped, re-sent next time; `TopK` always needs it): it differs between replicas,
            so keep the state per replica.
        compression: the older spelling of `combine=compression`; pass at most one of the two.

    Returns:
        A `PenaltyTransformation` (an `optax.GradientTransformationExtraArgs`) whose state is a
        `PenaltyState`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from edit_jax.outer import pseudo_gradient_penalty
        >>> tx = pseudo_gradient_penalty(optax.sgd(0.8, momentum=0.5), replica_axis="replica",
        ...                              num_replicas=4)
        >>> phi = {"w": jnp.zeros(3)}
        >>> thetas = {"w": jnp.arange(12.0).reshape(4, 3) / 10}  # one row per replica
        >>> def sync(theta, state):
        ...     delta = jax.tree.map(jnp.subtract, phi, theta)
        ...     updates, state = tx.update(delta, state, phi)
        ...     return optax.apply_updates(phi, updates), state
        >>> new_phi, state = jax.vmap(sync, axis_name="replica", in_axes=(0, None),
        ...                           out_axes=None)(thetas, tx.init(phi))
        >>> state.weights.shape, bool(jnp.all(jnp.isfinite(new_phi["w"])))
        ((4,), True)
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if temperature <= 0:
        raise ValueError(f"the penalty temperature must be positive, got {temperature}")
    if not 0 < alpha <= 1:
        raise ValueError(f"the penalty alpha must be in (0, 1], got {alpha}")
    if anomaly_warmup < 0:
        raise ValueError(f"anomaly_warmup must be non-negative, got {anomaly_warmup}")
    if not 0 <= step_weighting <= 1:
        raise ValueError(f"step_weighting must be in [0, 1], got {step_weighting}")
    outer = optax.with_extra_args_support(outer_optimizer)
    combination = _one_combination(combine, compression)
    split_mask = (combination.replica_split_mask if isinstance(combination, StackedSum)
                  else None)
    if error_feedback and isinstance(combination, (PlainSum, StackedSum)):
        raise ValueError("error_feedback needs codes to feed back; pass a compression."
                         "Compression or a sparse.TopK as combine=")

    def init_fn(params) -> PenaltyState:
        return PenaltyState(stats=init_anomaly_stats(num_replicas),
                            inner_state=outer.init(params),
                            weights=jnp.zeros((num_replicas,), jnp.float32),
                            outliers=jnp.zeros((num_replicas,), bool),
                            residual=optax.tree.zeros_like(params) if error_feedback else None)

    def weigh(updates, state: PenaltyState, *, norms: jax.Array | None = None,
              steps: jax.Array | None = None) -> PenaltyState:
        """The first half of `update`: the norms (unless given), the outlier test and the
        weights, kept in the returned state; the combination is the caller's."""
        axis_size = jax.lax.axis_size(replica_axis)
        if axis_size != num_replicas:
            raise ValueError(f"num_replicas is {num_replicas} but axis {replica_axis!r} has "
                             f"{axis_size} replicas; pass num_replicas={axis_size}")
        if norms is None and split_mask is not None:
            norms = stacked_replica_norms(updates, replica_axis=replica_axis,
                                          shard_axis=shard_axis, sharded_mask=sharded_mask,
                                          replica_split_mask=split_mask)
        elif norms is None:
            norms = replica_norms(updates, replica_axis=replica_axis, shard_axis=shard_axis,
                                  sharded_mask=sharded_mask)
        weights, stats, outliers = penalty_weights(
            norms, state.stats, anomaly=anomaly, weighting=weighting, temperature=temperature,
            alpha=alpha, anomaly_warmup=anomaly_warmup, threshold=threshold, steps=steps,
            step_weighting=step_weighting)
        return state._replace(stats=stats, weights=weights, outliers=outliers)

    def land(combined, state: PenaltyState, params=None, **extra_args: Any):
        """The second half of `update`: clip the combined pseudo-gradient and apply the outer
        optimizer, or skip the step if `weigh` found every replica an outlier."""
        combined = clip_by_norm(combined, clip_norm, shard_axis=shard_axis,
                                sharded_mask=sharded_mask, replica_axis=replica_axis,
                                replica_split_mask=split_mask)
        new_updates, inner_state = outer.update(combined, state.inner_state, params, **extra_args)
        skip = jnp.all(state.outliers)
        new_updates = optax.tree.where(skip, optax.tree.zeros_like(new_updates), new_updates)
        inner_state = optax.tree.where(skip, state.inner_state, inner_state)
        return new_updates, state._replace(inner_state=inner_state)

    def combine_weighted(updates, state: PenaltyState, residual=None):
        """The middle part of `update`: the weighted sum over replicas of `weigh`'s weights, by
        `combine`; returns (combined, this replica's new residual, None without codes)."""
        return combination.combine(updates, state.weights, replica_axis=replica_axis,
                                   residual=residual)

    def update_fn(updates, state: PenaltyState, params=None, *, norms: jax.Array | None = None,
                  steps: jax.Array | None = None, **extra_args: Any) -> tuple[Any, PenaltyState]:
        state = weigh(updates, state, norms=norms, steps=steps)
        combined, residual = combine_weighted(updates, state, state.residual)
        return land(combined, state._replace(residual=residual), params, **extra_args)

    return PenaltyTransformation(init_fn, update_fn, weigh, combine_weighted, land)
