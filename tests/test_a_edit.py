"""A-EDiT's local phase in one process: the local mesh, the clock, and a whole timed run."""

import types

import jax
import numpy as np
import pytest

from edit_jax.a_edit import LocalPhase, LocalReplicas, local_replica_indices
from edit_jax.config import load_config
from edit_jax.errors import UserError
from edit_jax.methods import LOCAL_PLAN
from edit_jax.program import build_program
from runs import EDIT, SMALL, VOCAB, train

A_EDIT = ["method.name=a_edit", *EDIT[1:]]


def _program():
    return build_program(load_config(None, [*SMALL, *A_EDIT, "run.steps=20"]), VOCAB)


def _batch_rows(seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (16, 33)).astype(np.int32)


def test_local_step_on_the_local_mesh_equals_the_global_local_step():
    """split -> local step -> join gives exactly the global LOCAL step (and the state's
    outer part is untouched)."""
    program = _program()
    local = LocalReplicas(program)
    assert local.replicas == [0, 1] and dict(local.layout.mesh.shape) == {"replica": 2, "shard": 4}
    state = program.begin_local_phase(program.init_state())
    rows = _batch_rows()
    expected, _ = program.train_step(LOCAL_PLAN)(
        jax.tree.map(lambda x: x.copy(), state), jax.device_put(rows, program.layout.batch_sharding))
    moved, _ = local.step(local.split(state), local.batch(rows))
    joined = local.join(moved, state)
    assert jax.tree.structure(joined) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(joined), jax.tree.leaves(expected)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(joined.replica_steps, [1, 1])


def test_split_and_join_move_no_data():
    program = _program()
    local = LocalReplicas(program)
    state = program.init_state()
    leaf = state.params["embed"]["embedding"]
    split = local.split(state).params["embed"]["embedding"]
    pointers = {s.device: s.data.unsafe_buffer_pointer() for s in leaf.addressable_shards}
    assert {s.device: s.data.unsafe_buffer_pointer() for s in split.addressable_shards} == pointers


class FakeClock:
    """Each local step 'takes' one second: the straggler hook advances the clock."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def after_step(self, output, started):
        self.now += 1.0


@pytest.mark.parametrize("replica_steps, stop, expected", [
    (5, False, 4),  # the 3.5 s interval ends after 4 one-second steps
    (16, False, 3),  # steps 17..19 locally; step 20, the last, is the sync step's
    (19, False, 0),
    (5, True, 0),  # a requested stop ends the phase at once
])
def test_the_interval_the_last_step_and_a_stop_end_the_local_phase(replica_steps, stop, expected):
    program = build_program(load_config(None, [*SMALL, *A_EDIT, "run.steps=20",
                                               "method.sync_interval_seconds=3.5"]), VOCAB)
    clock = FakeClock()
    phase = LocalPhase(program, clock, clock=clock)
    state = program.begin_local_phase(program.init_state())
    state, count = phase.run(state, _batch_rows, replica_steps, last_step=20,
                             stop_requested=lambda: stop)
    assert count == expected and clock.now == expected
    np.testing.assert_array_equal(state.replica_steps, [expected, expected])


def test_a_replica_split_between_processes_is_rejected():
    device = types.SimpleNamespace
    mesh = types.SimpleNamespace(devices=np.array([[device(process_index=0)] * 2,
                                                   [device(process_index=0),
                                                    device(process_index=1)]]),
                                 shape={"replica": 2, "shard": 2})
    with pytest.raises(UserError, match="a_edit needs every replica inside one process"):
        local_replica_indices(mesh)


def test_a_timed_run_syncs_by_the_clock_and_counts_every_step(tmp_path):
    losses, rows = train(tmp_path, *A_EDIT, "run.steps=24", "method.sync_interval_seconds=0.3",
                         "method.step_weighting=0.5")
    syncs = [r for r in rows if r.get("sync")]
    assert len(syncs) >= 2 and losses[24] < losses[1]
    for row in syncs:
        assert row["local_steps"][0] == row["local_steps"][1]  # one process: in step together
        all_outliers = row["outliers"] == len(row["weights"])  # then the sync is skipped
        assert abs(sum(row["weights"]) - (0 if all_outliers else 1)) < 1e-5
    # The first sync sees the local steps since phi <- theta at step W=2, then takes its own
    # step; a later one also counts the update the previous sync step made.
    assert syncs[0]["step"] == 2 + syncs[0]["local_steps"][0] + 1
    for previous, row in zip(syncs, syncs[1:]):
        assert row["step"] - previous["step"] == row["local_steps"][0]
    assert syncs[-1]["step"] == 24
    tokens = [r["tokens"] for r in rows if "tokens" in r]
    assert tokens[-1] == 24 * 16 * 32
