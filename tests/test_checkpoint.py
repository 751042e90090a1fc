"""Checkpointer: exact round trips across mesh shapes, retention, crash safety, clear errors."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from edit_jax.checkpoint import Checkpointer, CorruptCheckpoint
from edit_jax.errors import UserError

CONFIG = {"model": {"d_model": 8}, "run": {"steps": 10, "run_dir": "runs/x"}}
PARAM_SPECS = {"w": P("replica", "shard"), "b": P("replica", None, "shard")}


def make_mesh(shape, devices=None):
    return jax.make_mesh(shape, ("replica", "shard"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def host_state():
    """A train-state-like tree: replica-stacked params, an optax state (namedtuples), a step."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((2, 8, 6), np.float32),
              "b": rng.standard_normal((2, 3, 4), np.float32)}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params),
            "step": np.int32(7)}


def shardings(mesh, state):
    """Params and moments split as in PARAM_SPECS; step counts replicated."""

    def spec(path, _):
        return NamedSharding(mesh, PARAM_SPECS.get(getattr(path[-1], "key", None), P()))

    return jax.tree_util.tree_map_with_path(spec, state)


def on_mesh(mesh, state):
    return jax.tree.map(jax.device_put, state, shardings(mesh, state))


def target_for(mesh, state):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        state, shardings(mesh, state))


def assert_same_values(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for r, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(e))


def save_once(directory, step, state, **kwargs):
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    assert ckpt.save(step, state, config=CONFIG, **kwargs)
    ckpt.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A complete step-5 checkpoint (state saved on a (2, 4) mesh, config, data iterator)."""
    directory = tmp_path_factory.mktemp("saved")
    iterator = data_iterator()
    next(iterator)
    save_once(directory, 5, on_mesh(make_mesh((2, 4)), host_state()), data_iterator=iterator)
    return directory


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def data_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4))


def test_restore_onto_a_different_shard_split(saved):
    mesh = make_mesh((2, 2), jax.devices()[:4])
    target = target_for(mesh, host_state())
    state, config = Checkpointer(saved, save_every=1, keep=3).restore(5, target)
    assert_same_values(state, host_state())
    assert config == CONFIG
    for restored, wanted in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert restored.sharding == wanted.sharding


@pytest.mark.parametrize("shape", [(4, 2), (1, 8)])
def test_replica_free_array_onto_other_meshes(tmp_path, shape):
    value = np.arange(8 * 8, dtype=np.float32).reshape(8, 8)
    saved_on = NamedSharding(make_mesh((2, 4)), P("shard"))
    save_once(tmp_path, 1, {"x": jax.device_put(value, saved_on)})
    sharding = NamedSharding(make_mesh(shape), P("shard", "replica"))
    target = {"x": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)}
    state, _ = Checkpointer(tmp_path, save_every=1, keep=3).restore(1, target)
    np.testing.assert_array_equal(np.asarray(state["x"]), value)
    assert state["x"].sharding == sharding


def test_data_iterator_round_trip(tmp_path):
    iterator = data_iterator()
    for _ in range(3):
        next(iterator)
    save_once(tmp_path, 3, {"x": np.zeros(2, np.float32)}, data_iterator=iterator)
    expected = [next(iterator) for _ in range(2)]
    fresh = data_iterator()
    target = {"x": jax.ShapeDtypeStruct((2,), np.float32, sharding=NamedSharding(
        make_mesh((2, 4)), P()))}
    Checkpointer(tmp_path, save_every=1, keep=3).restore(3, target, data_iterator=fresh)
    np.testing.assert_array_equal(np.stack([next(fresh) for _ in range(2)]), np.stack(expected))


def test_save_every_keep_and_force(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=3, keep=2)
    state = {"x": np.ones(3, np.float32)}
    saved_steps = [s for s in range(1, 11) if ckpt.save(s, state, config=CONFIG)]
    assert saved_steps == [3, 6, 9]
    assert ckpt.save(10, state, config=CONFIG, force=True)
    assert not ckpt.save(10, state, config=CONFIG, force=True)  # already saved
    assert ckpt.all_steps() == [9, 10]
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "9"]
    assert Checkpointer(tmp_path, save_every=3, keep=2).all_steps() == [9, 10]


def test_empty_directory_has_no_steps(tmp_path):
    assert Checkpointer(tmp_path / "new", save_every=1, keep=1).all_steps() == []


def test_save_cut_short_by_a_crash_is_ignored(tmp_path):
    """A process killed mid-save leaves only a tmp directory; resuming uses the earlier step."""
    child = textwrap.dedent(f"""
        import os, time, numpy as np
        from edit_jax.checkpoint import Checkpointer
        ckpt = Checkpointer({str(tmp_path)!r}, save_every=1, keep=3)
        ckpt.save(1, {{"x": np.ones(4, np.float32)}}, config={{}})
        ckpt.wait()
        ckpt.save(2, {{"x": np.ones((4096, 4096), np.float32)}}, config={{}})
        while not os.path.isdir({str(tmp_path / "2.orbax-checkpoint-tmp")!r}):
            time.sleep(0.001)  # Orbax creates the directory in the background
        os._exit(0)  # dies while step 2 is being written
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60,
                   cwd=Path(__file__).parent.parent)
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir() and not (tmp_path / "2").exists()
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
    assert ckpt.all_steps() == [1]
    sharding = NamedSharding(make_mesh((2, 4)), P())
    state, _ = ckpt.restore(1, {"x": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)})
    np.testing.assert_array_equal(np.asarray(state["x"]), np.ones(4, np.float32))


def _delete(pattern):
    def corrupt(step_dir: Path):
        for path in step_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return corrupt


def _truncate(pattern):
    def corrupt(step_dir: Path):
        for path in step_dir.glob(pattern):
            path.write_bytes(path.read_bytes()[:5])
    return corrupt


@pytest.mark.parametrize("corrupt, reason", [
    (_delete("state/d/*"), "NOT_FOUND"),
    (_truncate("state/d/*"), "OUT_OF_RANGE"),
    (_truncate("state/manifest.ocdbt"), "DATA_LOSS"),
    (_delete("state/_METADATA"), "state/_METADATA is missing"),
    (_truncate("state/_METADATA"), "bad JSON"),
    (_delete("state"), "state/ is missing"),
    (_delete("config/metadata"), "not found"),
    (_truncate("data/*.json"), "bad JSON"),
], ids=["array-deleted", "array-truncated", "manifest-truncated", "metadata-deleted",
        "metadata-truncated", "state-deleted", "config-deleted", "data-truncated"])
def test_corrupt_checkpoint(copy_of_saved, corrupt, reason):
    corrupt(copy_of_saved / "5")
    ckpt = Checkpointer(copy_of_saved, save_every=1, keep=3)
    assert ckpt.all_steps() == [5]
    target = target_for(make_mesh((2, 4)), host_state())
    with pytest.raises(CorruptCheckpoint) as e:
        ckpt.restore(5, target, data_iterator=data_iterator())
    assert e.value.step == 5 and e.value.reason in str(e.value)
    message = str(e.value)
    assert message.startswith(f"checkpoint {copy_of_saved / '5'} is corrupt or incomplete (")
    assert reason in message and "\n" not in message
    assert message.endswith("delete that step directory to resume from an earlier one, "
                            "or use a new run.run_dir")


def test_data_state_of_another_process_count_resumes_at_process_0s_position(copy_of_saved):
    """A checkpoint written by 2 processes, resumed by 1: process 0's iterator state is used."""
    data_dir = copy_of_saved / "5" / "data"
    saved_state = (data_dir / "process_0-of-1.json").read_text()
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
    (data_dir / "process_1-of-2.json").write_text("not read")
    iterator = data_iterator()
    Checkpointer(copy_of_saved, save_every=1, keep=3).restore(
        5, target_for(make_mesh((2, 4)), host_state()), data_iterator=iterator)
    expected = data_iterator()
    next(expected)  # the saved iterator had yielded one element
    assert json.loads(saved_state) == expected.get_state() == iterator.get_state()
    np.testing.assert_array_equal(next(iterator), next(expected))


def test_missing_data_state(copy_of_saved):
    (copy_of_saved / "5" / "data" / "process_0-of-1.json").unlink()
    target = target_for(make_mesh((2, 4)), host_state())
    with pytest.raises(CorruptCheckpoint, match="no data-iterator state for this process"):
        Checkpointer(copy_of_saved, save_every=1, keep=3).restore(
            5, target, data_iterator=data_iterator())


def test_set_aside_keeps_the_files_out_of_orbax_sight(copy_of_saved):
    state = host_state()
    save_once(copy_of_saved, 3, state)
    ckpt = Checkpointer(copy_of_saved, save_every=1, keep=2)
    assert ckpt.all_steps() == [3, 5]
    files = sorted(p.relative_to(copy_of_saved / "5") for p in (copy_of_saved / "5").rglob("*"))
    assert ckpt.set_aside(5) == copy_of_saved / "5.corrupt"
    assert ckpt.all_steps() == [3]
    assert sorted(p.relative_to(copy_of_saved / "5.corrupt")
                  for p in (copy_of_saved / "5.corrupt").rglob("*")) == files
    ckpt.save(5, state, config=CONFIG)  # the step is free again; a second bad one is kept too
    ckpt.wait()
    assert ckpt.set_aside(5) == copy_of_saved / "5.corrupt2"
    ckpt.close()
    ckpt = Checkpointer(copy_of_saved, save_every=1, keep=2)  # a new manager neither lists
    assert ckpt.all_steps() == [3]                             # nor cleans up what was set aside
    for step in (6, 7, 8):
        ckpt.save(step, state, config=CONFIG)
    ckpt.close()
    assert (copy_of_saved / "5.corrupt").is_dir() and (copy_of_saved / "5.corrupt2").is_dir()
    assert Checkpointer(copy_of_saved, save_every=1, keep=2).all_steps() == [7, 8]


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["params"].update(w=np.zeros((2, 8, 4), np.float32)),
     r"params\.w has shape \(2, 8, 6\) in the checkpoint but \(2, 8, 4\) here"),
    (lambda s: s["params"].update(extra=np.zeros(3, np.float32)),
     r"params\.extra \(shape \(3,\) here\) is not in the checkpoint"),
    (lambda s: s.pop("step"), r"the checkpoint has step \(shape \(\)\), which this run lacks"),
], ids=["shape", "missing-key", "extra-key"])
def test_mismatched_target(saved, change, expected):
    state = host_state()
    change(state)
    with pytest.raises(UserError, match=expected) as e:
        Checkpointer(saved, save_every=1, keep=3).restore(5, target_for(make_mesh((2, 4)), state))
    assert str(e.value).endswith(
        "use a fresh run.run_dir or the config the checkpoint was saved with")


def test_saved_state_shapes(saved):
    ckpt = Checkpointer(saved, save_every=1, keep=3)
    shapes = ckpt.saved_state_shapes(5)
    assert shapes["params"]["w"] == jax.ShapeDtypeStruct((2, 8, 6), np.float32)
    assert shapes["step"] == jax.ShapeDtypeStruct((), np.int32)
    target = target_for(make_mesh((2, 4)), host_state())
    arranged = ckpt.saved_state_shapes(5, like=target)
    assert jax.tree.structure(arranged) == jax.tree.structure(target)
    for t, s in zip(jax.tree.leaves(target), jax.tree.leaves(arranged)):
        assert (t.shape, t.dtype) == (s.shape, s.dtype)


def test_unusable_directory_and_missing_step(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        Checkpointer(tmp_path / "file", save_every=1, keep=1)
    with pytest.raises(UserError, match="no checkpoint for step 4 in"):
        Checkpointer(tmp_path, save_every=1, keep=1).restore(4, {})
