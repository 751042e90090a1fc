"""Elastic resume: a checkpoint of R replicas continues on R' != R replicas and another shard
count, for the methods with an outer state (edit; a_edit with compressed syncs, whose
error-feedback residual starts afresh); phi and the outer momentum carry over exactly."""

import jax
import numpy as np
import pytest

from edit_jax.checkpoint import Checkpointer
from edit_jax.config import load_config
from edit_jax.elastic import restore
from edit_jax.errors import UserError
from edit_jax.program import build_program
from runs import EDIT, SMALL, VOCAB, final_state, train

A_EDIT = ["method.name=a_edit", *EDIT[1:], "method.sync_interval_seconds=0.2",
          "method.step_weighting=0.5"]
COMPRESSED = ["method.compression=int8", "method.compression_block=64",
              "method.error_feedback=true"]
METHODS = {"edit": EDIT, "a_edit-int8-error-feedback": [*A_EDIT, *COMPRESSED]}


def _restored(run_dir, step, method, mesh):
    cfg = load_config(None, [*SMALL, *method, f"run.steps={step}", *mesh])
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1, keep=1)
    state = restore(ckpt, step, build_program(cfg, VOCAB), None, log=lambda _: None)
    ckpt.close()
    return state


def _assert_restarts_from_phi(saved, state, replicas, step):
    for phi, new_phi, theta in zip(jax.tree.leaves(saved.outer.phi),
                                   jax.tree.leaves(state.outer.phi),
                                   jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(new_phi), np.asarray(phi))
        assert theta.shape[0] == replicas
        for r in range(replicas):
            np.testing.assert_array_equal(np.asarray(theta)[r], np.asarray(phi))
    old_trace = saved.outer.rest.inner_state[0].trace["embed"]["embedding"]
    new_trace = state.outer.rest.inner_state[0].trace["embed"]["embedding"]
    np.testing.assert_array_equal(np.asarray(new_trace), np.asarray(old_trace))
    assert state.outer.rest.stats.mean.shape == (replicas,)
    for stats in (state.outer.rest.stats, state.outer.layers.stats):
        for x in stats:  # statistics start afresh, the sync count too
            assert not np.any(np.asarray(x))
    assert int(saved.outer.rest.stats.count) > 0
    if saved.residual is not None:  # error feedback's residual belongs to the old replicas
        assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(saved.residual))
        assert all(x.shape[0] == replicas and not np.any(np.asarray(x))
                   for x in jax.tree.leaves(state.residual))
    np.testing.assert_array_equal(state.replica_steps, [step] * replicas)
    np.testing.assert_array_equal(state.outer.synced_steps, [[step] * replicas])


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_on_more_then_fewer_replicas(tmp_path, name):
    """R=2 (2x4 mesh) -> R=4 (4x2) -> R=1 (1x8): each hop restarts every replica from phi,
    then training goes on with syncs over the new replica count."""
    method = METHODS[name]
    _, rows = train(tmp_path, *method, "run.steps=9", "run.checkpoint_every=100")
    assert any(r.get("sync") for r in rows)
    step, saved_mesh = 9, ["mesh.replica=2", "mesh.shard=4"]
    for replicas, shards, steps in ((4, 2, 14), (1, 8, 18)):
        mesh = [f"mesh.replica={replicas}", f"mesh.shard={shards}"]
        saved = final_state(tmp_path, step, *method, *saved_mesh)
        _assert_restarts_from_phi(saved, _restored(tmp_path, step, method, mesh), replicas, step)
        losses, rows = train(tmp_path, *method, f"run.steps={steps}",
                             "run.checkpoint_every=100", *mesh)
        assert max(r["step"] for r in rows) == steps
        last_sync = [r for r in rows if r.get("sync")][-1]
        assert last_sync["step"] > step
        assert len(last_sync["weights"]) == len(last_sync["local_steps"]) == replicas
        assert all(np.isfinite(loss) for loss in losses.values())
        step, saved_mesh = steps, mesh


def test_resume_at_the_end_of_warmup_restarts_from_replica_0(tmp_path):
    """A checkpoint of step W = warmup_steps was saved before phi <- theta: its phi is still
    the initial one, so the replicas of the new mesh must start from replica 0 instead."""
    train(tmp_path, *EDIT, "run.steps=2", "run.checkpoint_every=100")  # EDIT: 2 warm-up steps
    saved = final_state(tmp_path, 2, *EDIT)
    state = _restored(tmp_path, 2, EDIT, ["mesh.replica=4", "mesh.shard=2"])
    for theta_saved, theta, phi in zip(jax.tree.leaves(saved.params),
                                       jax.tree.leaves(state.params),
                                       jax.tree.leaves(saved.outer.phi)):
        assert not np.array_equal(np.asarray(theta_saved)[0], np.asarray(phi))  # phi: initial
        for r in range(4):
            np.testing.assert_array_equal(np.asarray(theta)[r], np.asarray(theta_saved)[0])
    # Same replica count, other state shapes (fragments add rows of sync counts): not elastic
    # resume but a changed run, refused in one line rather than silently restarted from phi.
    with pytest.raises(UserError, match="method.fragments"):
        _restored(tmp_path, 2, [*EDIT, "method.sync_every=4", "method.fragments=2"], [])
