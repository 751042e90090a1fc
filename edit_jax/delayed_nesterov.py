"""Delayed Nesterov: the outer optimizer of asynchronous Local-SGD (Liu et al., arXiv
2401.09135), where a server applies one worker's pseudo-gradient at a time
(docs/algorithms.md section 5); `async_sim.py` runs it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class DelayedNesterovState(NamedTuple):
    """State of `delayed_nesterov`: momentum, the buffered pseudo-gradients, arrivals seen."""

    momentum: optax.Updates
    buffer: optax.Updates
    count: jax.Array  # i32[], arrivals so far (t)


def delayed_nesterov(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *,
                     buffer_size: int, activation: float = 0.0) -> optax.GradientTransformation:
    """Delayed Nesterov for a server that receives pseudo-gradients one worker at a time.

    Plain Nesterov applied per arrival compounds momentum on stale pseudo-gradients
    (docs/algorithms.md section 5). Delayed Nesterov applies each arriving g_t at once, scaled
    by 1/N, but folds the buffered arrivals into the momentum m only every N = `buffer_size`
    arrivals:
        buffer += g_t
        if (t + 1) % N == 0:  m = b*m + buffer/N;  update = -lr*((1 - c*N + c)*b*m + g_t/N);
                              buffer = 0
        else:                 update = -lr*(c*b*m + g_t/N)
    With c = `activation` = 0 the updates of a cycle of N arrivals sum to
    -lr*(mean + b*(b*m + mean)), which is exactly one `optax.sgd(lr, momentum=b,
    nesterov=True)` step on the cycle's mean (optax's trace is this m). c in (0, 1/N] spreads
    a share c of the momentum step over the arrivals inside the cycle.

    Args:
        learning_rate: the outer learning rate, or a schedule of the arrival count.
        momentum: b, in [0, 1).
        buffer_size: N, arrivals per momentum update (usually the number of workers).
        activation: c, the momentum applied on every arrival, in [0, 1/N].

    Returns:
        An `optax.GradientTransformation` whose state is a `DelayedNesterovState`; add the
        updates to the parameters.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from edit_jax.delayed_nesterov import delayed_nesterov
        >>> tx = delayed_nesterov(0.5, 0.5, buffer_size=2)
        >>> phi = {"w": jnp.zeros(2)}
        >>> state = tx.init(phi)
        >>> for g in (1.0, 3.0):
        ...     updates, state = tx.update({"w": jnp.full(2, g)}, state)
        ...     phi = optax.apply_updates(phi, updates)
        >>> phi["w"].tolist(), state.momentum["w"].tolist()
        ([-1.5, -1.5], [2.0, 2.0])
    """
    if buffer_size < 1:
        raise ValueError(f"the delayed Nesterov buffer size must be at least 1, got {buffer_size}")
    if not 0 <= momentum < 1:
        raise ValueError(f"the outer momentum must be in [0, 1), got {momentum}")
    if not 0 <= activation <= 1 / buffer_size:
        raise ValueError(f"the momentum activation must be in [0, 1/buffer_size] = "
                         f"[0, {1 / buffer_size:g}], got {activation}")
    flush_coef = (1 - activation * buffer_size + activation) * momentum
    hold_coef = activation * momentum

    def init_fn(params) -> DelayedNesterovState:
        return DelayedNesterovState(momentum=optax.tree.zeros_like(params),
                                    buffer=optax.tree.zeros_like(params),
                                    count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state: DelayedNesterovState, params=None):
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        flush = (state.count + 1) % buffer_size == 0
        buffer = jax.tree.map(jnp.add, state.buffer, updates)
        m = jax.tree.map(lambda m, d: jnp.where(flush, momentum * m + d / buffer_size, m),
                         state.momentum, buffer)
        new_updates = jax.tree.map(
            lambda m, g: (-lr * (jnp.where(flush, flush_coef * m, hold_coef * m)
                                 + g / buffer_size)).astype(g.dtype), m, updates)
        buffer = jax.tree.map(lambda d: jnp.where(flush, jnp.zeros_like(d), d), buffer)
        return new_updates, DelayedNesterovState(m, buffer, optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
