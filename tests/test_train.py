"""The training program end to end: resume, other meshes, errors, and that it learns."""

import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from edit_jax.cli import main
from runs import EDIT, SMALL, VOCAB, final_state, train as _train

def test_ddp_resumes_onto_other_mesh_shapes(tmp_path):
    """DDP replicas are identical, so another mesh continues the same trajectory."""
    ddp = "method.name=ddp"
    straight, _ = _train(tmp_path / "a", ddp, "run.steps=8", "run.checkpoint_every=100")
    _train(tmp_path / "b", ddp, "run.steps=4", "run.checkpoint_every=4")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    for run, mesh in (("b", ["mesh.replica=4", "mesh.shard=2"]),
                      ("c", ["mesh.replica=1", "mesh.shard=8"])):
        resumed, _ = _train(tmp_path / run, ddp, "run.steps=8", "run.checkpoint_every=4", *mesh)
        np.testing.assert_allclose([resumed[s] for s in range(5, 9)],
                                   [straight[s] for s in range(5, 9)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["model.d_modle=3"], "unknown config key 'model.d_modle'"),
    (["mesh.replica=3"], "mesh (3, 4) needs 12 devices but 8 are available"),
    (["data.global_batch_size=12"], "data.global_batch_size=12 is not divisible by replicas x "
                                    "shards = 2 x 4"),
    (["data.seq_len=1024"], "1024 is longer than model.max_seq_len=512"),
    (["data.source=files", "data.paths=[/no/such/file.txt]"], "/no/such/file.txt"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, overrides, message):
    assert main(["train", f"run.run_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _corrupt(step_dir):
    for path in step_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 7)


def test_resume_after_a_crash_continues_exactly(tmp_path, capsys):
    """A crash mid-write left a torn metrics line and a corrupt newest checkpoint (6): the torn
    line is dropped, checkpoint 6 is moved aside, and the run resumes from step 4 (data
    position included) onto the uninterrupted trajectory."""
    straight, straight_rows = _train(tmp_path / "a", "run.steps=8", "run.checkpoint_every=100")
    run = tmp_path / "b"
    _train(run, "run.steps=6", "run.checkpoint_every=2")
    _corrupt(run / "checkpoints" / "6")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 2.3')  # torn: no closing brace, no newline
    capsys.readouterr()
    resumed, rows = _train(run, "run.steps=8", "run.checkpoint_every=2")
    err = capsys.readouterr().err
    assert "dropped the torn last line" in err
    assert "checkpoint 6 is corrupt or incomplete" in err and "resumed from step 4" in err
    assert (run / "checkpoints" / "6.corrupt").is_dir()  # kept, not deleted
    assert sorted(resumed) == list(range(1, 9))  # steps 5 and 6 were run again, once each
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    np.testing.assert_allclose([resumed[s] for s in range(5, 9)],
                               [straight[s] for s in range(5, 9)], atol=1e-6, rtol=0)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4, 8]
    assert rows[-1]["eval_loss"] == pytest.approx(straight_rows[-1]["eval_loss"], abs=1e-6)


def test_unusable_checkpoints_are_a_clear_error(tmp_path, capsys):
    _train(tmp_path, "run.steps=4", "run.checkpoint_every=2")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    assert main(["train", *SMALL, f"run.run_dir={tmp_path}", "run.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 2 is not JSON" in err and err.count("\n") == 1
    for step in (2, 4):
        _corrupt(tmp_path / "checkpoints" / str(step))
    assert main(["train", *SMALL, f"run.run_dir={tmp_path}", "run.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "steps 4, 2 are corrupt" in err
    assert err.count("\n") == 1
    assert (tmp_path / "checkpoints" / "4").is_dir()  # nothing moved when nothing restores


def test_default_command_learns(tmp_path):
    """`edit-jax train` as a user runs it (the console entry point), shortened to 40 steps; a
    metrics file left without any checkpoint (a run that crashed before its first) is started
    afresh."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 99.0}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "edit_jax.cli", "train", f"run.run_dir={tmp_path}",
         "run.steps=40", "run.eval_every=40", "run.progress=false"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [json.loads(line)["eval_loss"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert 5.0 < evals[0] < 6.0  # about ln(257) at initialisation; the stale row is gone
    assert evals[-1] < evals[0] - 1.5
    assert json.loads(proc.stdout.strip().splitlines()[-1])["summary"]["step"] == 40
    assert f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}\n" in proc.stdout


def test_edit_saves_without_changing_the_trajectory_and_resumes_exactly(tmp_path):
    """Saving (at a local step and at a sync) leaves the trajectory bit for bit as it was; the
    resume after the sync restores the outer state exactly."""
    straight, rows = _train(tmp_path / "a", *EDIT, "run.steps=10", "run.checkpoint_every=100",
                            "run.profile_steps='5,6'")  # traced (a sync at 6): changes nothing
    traces = [p.name for p in (tmp_path / "a" / "profile").rglob("*") if p.is_file()]
    assert any(n.endswith(".xplane.pb") for n in traces)  # TensorBoard's profile plugin
    assert "perfetto_trace.json.gz" in traces  # Perfetto
    _train(tmp_path / "b", *EDIT, "run.steps=6", "run.checkpoint_every=3",
           "run.tensorboard=true")  # stops after a sync
    resumed, resumed_rows = _train(tmp_path / "b", *EDIT, "run.steps=10",
                                   "run.checkpoint_every=3", "run.tensorboard=true")
    assert [resumed[s] for s in range(1, 7)] == [straight[s] for s in range(1, 7)]
    np.testing.assert_allclose([resumed[s] for s in range(7, 11)],
                               [straight[s] for s in range(7, 11)], atol=1e-6, rtol=0)
    assert [r["step"] for r in rows if r.get("sync")] == [6, 9]
    a, b = final_state(tmp_path / "a", 10, *EDIT), final_state(tmp_path / "b", 10, *EDIT)
    outer_a, outer_b = a.outer, b.outer
    assert int(outer_a.rest.stats.count) == 2  # two syncs fed the penalty statistics
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(outer_a.rest.stats.mean, outer_b.rest.stats.mean)
    _check_replica_bytes(rows, resumed_rows)
    _check_tensorboard(tmp_path / "b" / "tensorboard", resumed_rows)


def _check_replica_bytes(rows, resumed_rows):
    """Every row's cumulative replica bytes are the compiled HLO's bytes of each step plan
    times the steps of that kind run so far (EDIT: 2 DDP steps, then a sync at the start of
    steps 5 and 8, 0-based), in the straight run and across the resume alike."""
    from edit_jax.config import load_config
    from edit_jax.inspect_steps import inspect_program
    from edit_jax.program import build_program

    report = inspect_program(build_program(load_config(None, [*SMALL, *EDIT]), VOCAB))
    per_kind = {kind: step["replica_bytes"] for kind, step in report["steps"].items()}
    assert per_kind["local"] == 0 and per_kind["ddp"] > 0 and per_kind["sync"] > 0
    kinds = ["ddp", "ddp", "local", "local", "local", "sync", "local", "local", "sync", "local"]
    for row in rows:
        assert row["replica_bytes"] == sum(per_kind[k] for k in kinds[:row["step"]]), row
    assert rows[-1]["replica_bytes"] == 2 * per_kind["ddp"] + 2 * per_kind["sync"]
    def progress(rows):  # of the train and sync rows (the first run also evaluated at its end)
        return [(r["step"], r["replica_bytes"], r["tokens"]) for r in rows if "eval_loss" not in r]

    assert progress(resumed_rows) == progress(rows)
    assert resumed_rows[-1]["wall_time"] > resumed_rows[7]["wall_time"]  # continued, not reset


def _check_tensorboard(directory, rows):
    """The event files (parsed here as TFRecords) hold every row's loss, and the resumed run's
    file tells TensorBoard to drop the steps after the checkpoint (6) from the first file (which
    itself starts by dropping anything an earlier run in the directory left)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + length]))
            at += length + 16
    losses = {e.step: v.simple_value for e in events for v in e.summary.value
              if v.tag == "train/loss"}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r})
    assert [e.step for e in events if e.HasField("session_log")] == [0, 7]
    assert {v.tag for e in events for v in e.summary.value} >= {
        "eval/eval_loss", "sync/weights/0", "sync/weights/1", "train/replica_bytes"}

