"""Restoring a checkpoint onto this run's mesh, also with another replica count (elastic).

The shard split is resharded by orbax whatever the mesh. When the replica count changes,
replica-varying state cannot carry over one to one, so the rule is: phi and the outer momentum
carry over; every replica restarts from phi once the local phase has begun (from replica 0
during the synchronous warm-up, when all replicas are equal); the inner optimizer state (AdamW
moments and step counts) comes from replica 0 and every replica's step counter is the
checkpoint's step; the penalty statistics (per-replica means and variances, sync count)
and the error-feedback residuals start afresh; the data position is that
of the checkpoint's process 0 when the process count changed too (checkpoint.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from edit_jax.checkpoint import Checkpointer, MismatchedCheckpoint
from edit_jax.outer import AnomalyStats
from edit_jax.program import Program
from edit_jax.step import TrainState, stack_replicas


def _without_replica_axis(spec: P) -> P:
    """The spec with the 'replica' mesh axis removed (the leaf is then whole on every replica)."""

    def drop(entry):
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != "replica")
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return None if entry == "replica" else entry

    return P(*(drop(e) for e in spec))


def restore(ckpt: Checkpointer, step: int, program: Program, iterator, log=print) -> TrainState:
    """The state of checkpoint `step` on `program`'s mesh (the module docstring says how a
    change of replica count is handled); moves `iterator` to the saved data position."""
    layout = program.layout
    target = program.abstract_state()
    saved = ckpt.saved_state_shapes(step, like=target)
    if all(s.shape == t.shape for s, t in zip(jax.tree.leaves(saved), jax.tree.leaves(target))):
        return ckpt.restore(step, target, data_iterator=iterator)[0]
    saved_replicas = jax.tree.leaves(saved.params)[0].shape[0]
    if saved_replicas == layout.num_replicas:
        reason = (f"{saved_replicas} replicas as here, but state of other shapes (a changed "
                  "model or method.fragments?)")
        raise MismatchedCheckpoint(f"checkpoint {step} in {ckpt.directory} has {reason}; resume "
                                   "with the settings it was saved with, or start a new "
                                   "run.run_dir", step, reason)
    # phi <- theta happens as step `warmup_steps` begins: a checkpoint of that very step still
    # holds the initial phi, and its replicas are equal, so it restarts from replica 0.
    from_phi = program.outer is not None and step > program.method.warmup_steps
    log(f"checkpoint has {saved_replicas} replicas, this mesh {layout.num_replicas}: every "
        f"replica restarts from {'phi' if from_phi else 'replica 0'}")

    def as_saved(t, s):
        if s.shape == t.shape:
            return t
        sharding = NamedSharding(layout.mesh, _without_replica_axis(t.sharding.spec))
        return jax.ShapeDtypeStruct(s.shape, t.dtype, sharding=sharding)

    restored = ckpt.restore(step, jax.tree.map(as_saved, target, saved),
                            data_iterator=iterator)[0]

    def convert(state):
        def leaf(x, t):
            if x.shape == t.shape:
                return x
            if t.sharding.spec[:1] == ("replica",):
                return jnp.broadcast_to(x[0], t.shape)
            return jnp.zeros(t.shape, t.dtype)  # per-replica statistics

        steps = jnp.max(state.replica_steps)  # the checkpoint's step, also for a_edit
        state = jax.tree.map(leaf, state, target)
        # The statistics start afresh, their sync count too: with the old count past the
        # anomaly warm-up, the zeroed means and variances would flag every replica for good.
        state = jax.tree.map(lambda x: jax.tree.map(jnp.zeros_like, x) if isinstance(
            x, AnomalyStats) else x, state, is_leaf=lambda x: isinstance(x, AnomalyStats))
        state = state._replace(replica_steps=jnp.full_like(state.replica_steps, steps))
        if state.residual is not None:  # what each old replica still owed belongs to no one now
            state = state._replace(residual=jax.tree.map(jnp.zeros_like, state.residual))
        if state.in_flight is not None:  # so do the old replicas' sliced syncs in flight: they
            # land as zero pseudo-gradients (the outer momentum alone moves phi)
            state = state._replace(in_flight=jax.tree.map(jnp.zeros_like, state.in_flight),
                                   outer=state.outer._replace(arrived=jax.tree.map(
                                       jnp.zeros_like, state.outer.arrived)))
        if from_phi:
            outer = state.outer
            synced = jnp.full_like(outer.synced_steps, steps)  # every fragment, every replica
            state = state._replace(params=stack_replicas(outer.phi, layout.num_replicas),
                                   outer=outer._replace(synced_steps=synced))
        return state

    return jax.jit(convert, out_shardings=layout.state_shardings)(restored)
