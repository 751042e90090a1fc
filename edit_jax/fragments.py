"""Streaming DiLoCo's fragments as small public functions, usable from any training loop.

The layers are split into P fragments, and fragment p syncs every H steps at its own offset, so
only 1/P of the model is in flight per sync (Douillard et al., 2025; docs/algorithms.md
section 7). With a delay of d steps, the fragment's outer step is computed at its sync and
blended into the replica d steps later, `theta <- alpha * theta_local + (1 - alpha) * phi_new`,
so the collective overlaps d steps of compute. edit-jax's trainer uses exactly these functions
(methods.py, sync.py); a user loop can call them around `pseudo_gradient_penalty`:

    >>> from edit_jax.fragments import fragment_layers, fragment_due
    >>> fragment_layers(4, 2)                    # strided: fragment p holds layers p, p+P, ...
    [[0, 2], [1, 3]]
    >>> [fragment_due(n, 4, 2) for n in range(1, 9)]  # after n local steps, H = 4, P = 2
    [None, 0, None, 1, None, 0, None, 1]
"""

from __future__ import annotations

import jax

FRAGMENT_LAYOUTS = ("strided", "sequential")  # method.fragment_layout


def fragment_layers(num_layers: int, num_fragments: int, layout: str = "strided") -> list[list[int]]:
    """The layer indices of each of `num_fragments` equal fragments.

    strided: fragment p holds layers p, p+P, p+2P, ... (each fragment spans the whole depth);
    sequential: fragment p holds the contiguous layers [p*L/P, (p+1)*L/P).
    """
    if num_fragments < 1 or num_layers % num_fragments:
        raise ValueError(f"{num_fragments} fragments cannot split {num_layers} layers evenly; use "
                         f"a divisor of {num_layers} for method.fragments")
    if layout not in FRAGMENT_LAYOUTS:
        raise ValueError(f"fragment layout '{layout}' is not one of {FRAGMENT_LAYOUTS}")
    if layout == "strided":
        return [list(range(p, num_layers, num_fragments)) for p in range(num_fragments)]
    size = num_layers // num_fragments
    return [list(range(p * size, (p + 1) * size)) for p in range(num_fragments)]


def fragment_due(local_steps: int, sync_every: int, num_fragments: int) -> int | None:
    """The fragment whose sync is due once `local_steps` (> 0) local steps have run, or None.

    Fragment p syncs at local step counts (p+1)*H/P, then every H steps (torchft's offsets); the
    last fragment syncs at multiples of H, where a whole-model sync would.
    """
    if sync_every % num_fragments:
        raise ValueError(f"{num_fragments} fragments cannot stagger evenly over sync_every="
                         f"{sync_every} steps; use a sync_every divisible by the fragments")
    spacing = sync_every // num_fragments
    if local_steps <= 0 or local_steps % spacing:
        return None
    return (local_steps // spacing - 1) % num_fragments


def blend(local, synced, alpha: float):
    """alpha * local + (1 - alpha) * synced, leaf by leaf; alpha = 0 is exactly `synced` (also
    where `local` is not finite), alpha = 1 keeps the replica's own values."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the fragment alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return synced
    return jax.tree.map(lambda x, s: (alpha * x + (1.0 - alpha) * s).astype(s.dtype),
                        local, synced)

