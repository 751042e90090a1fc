"""docs/cli.md's promises (resume and crash safety, errors) about crashes, damaged storage, two
trainers on one run directory and the paths a user gives, met as a user meets them: through the
CLI, one line on stderr."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from edit_jax.checkpoint import Checkpointer
from edit_jax.cli import main
from edit_jax.run_lock import LOCK_FILE, hold_run_dir
from runs import SMALL

# Chunks far longer than what they chunk are clipped: the shared run below shows they are
# harmless.
HUGE_CHUNKS = ["model.loss_chunk_tokens=1000000000", "model.attention_chunk_tokens=1000000000"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _train(run_dir, *overrides) -> int:
    return main(["train", *SMALL, *HUGE_CHUNKS, f"run.run_dir={run_dir}", *overrides])


def _one_line(capsys, start="error: ") -> str:
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints 2 and 4 (huge chunk settings: they clip)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert _train(run, "run.steps=4", "run.checkpoint_every=2") == 0
    return run


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _files(step_dir, pattern):
    files = [p for p in step_dir.glob(pattern) if p.is_file()]
    assert files, pattern
    return files


def _truncate(pattern):
    return lambda step_dir: [p.write_bytes(p.read_bytes()[:5]) for p in _files(step_dir, pattern)]


def _delete(pattern):
    return lambda step_dir: [p.unlink() for p in _files(step_dir, pattern)]


def _garbage(pattern):
    return lambda step_dir: [p.write_bytes(b"garbage\n") for p in _files(step_dir, pattern)]


def _flip_bit(pattern, at):
    def damage(step_dir):
        for path in _files(step_dir, pattern):
            data = bytearray(path.read_bytes())
            data[int(len(data) * at)] ^= 0x10
            path.write_bytes(bytes(data))
    return damage


def _state_of_another_model(step_dir):
    """The arrays of another model in place of this step's (its config still this run's)."""
    other = step_dir.parent.parent / "other"
    ckpt = Checkpointer(other, save_every=1, keep=1)
    ckpt.save(1, {"w": np.ones(3, np.float32)}, config={})
    ckpt.close()
    shutil.rmtree(step_dir / "state")
    shutil.copytree(other / "1" / "state", step_dir / "state")


def _alien_data_state(step_dir):
    (step_dir / "data" / "process_0-of-1.json").write_text('{"not": "a grain state"}')


DATA = "state/ocdbt.process_0/d/*"
DAMAGE = {  # name: (damage, what the warning says)
    "data-truncated": (_truncate(DATA), "OUT_OF_RANGE"),
    "data-deleted": (_delete(DATA), "FAILED_PRECONDITION"),
    "data-bit-flip": (_flip_bit(DATA, 0.0), "FAILED_PRECONDITION"),  # a zstd frame header
    "manifest-bit-flip": (_flip_bit("state/manifest.ocdbt", 0.5), "DATA_LOSS"),  # checksummed
    "manifest-garbage": (_garbage("state/manifest.ocdbt"), "DATA_LOSS"),
    "array-metadata-garbage": (_garbage("state/array_metadatas/*"), "bad JSON"),
    "tree-metadata-garbage": (_garbage("state/_METADATA"), "bad JSON"),
    "sharding-garbage": (_garbage("state/_sharding"), "FAILED_PRECONDITION"),
    "other-model": (_state_of_another_model, "does not match this run"),
    "data-position-alien": (_alien_data_state, "is not a data-iterator state"),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside(copy_of_trained, capsys, name):
    """Every kind of damage to the newest checkpoint: one warning, the step moved to
    `<step>.corrupt`, a resume from the one before (the run is then already finished)."""
    damage, reason = DAMAGE[name]
    damage(copy_of_trained / "checkpoints" / "4")
    capsys.readouterr()
    assert _train(copy_of_trained, "run.steps=2") == 0
    err = _one_line(capsys, start="warning: checkpoint 4 ")
    assert reason in err and "resumed from step 2" in err
    assert sorted(p.name for p in (copy_of_trained / "checkpoints").iterdir()) == [
        "2", "4.corrupt"]


def test_when_no_checkpoint_restores_it_is_one_error_and_nothing_moves(copy_of_trained,
                                                                        capsys):
    for step in ("2", "4"):
        _truncate(DATA)(copy_of_trained / "checkpoints" / step)
    capsys.readouterr()
    assert _train(copy_of_trained, "run.steps=6") == 2
    err = _one_line(capsys)
    assert "no usable checkpoint" in err and "steps 4, 2 are corrupt" in err
    assert sorted(p.name for p in (copy_of_trained / "checkpoints").iterdir()) == ["2", "4"]


def test_a_second_trainer_is_refused_until_the_first_dies(tmp_path, capsys):
    """One trainer per run directory: a second exits 2 naming the holder's host and pid; once
    the holder is killed (-9) the OS has released its lock and a third starts, saying that it
    removes the partial save it found."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "edit_jax.cli", "train", *SMALL, f"run.run_dir={run}",
         "run.steps=1000000", "run.checkpoint_every=1000000", "run.eval_every=1000000",
         "run.log_every=1000000"], env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK_FILE).is_file() or not (run / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        capsys.readouterr()
        assert _train(run, "run.steps=1") == 2
        err = _one_line(capsys)
        assert f"is in use by another trainer (host {socket.gethostname()} pid {first.pid})" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (run / "checkpoints" / "1.orbax-checkpoint-tmp").mkdir(parents=True)
    assert _train(run, "run.steps=1") == 0
    err = capsys.readouterr().err
    assert f"warning: removing {run / 'checkpoints' / '1.orbax-checkpoint-tmp'}" in err
    assert (run / LOCK_FILE).read_text() == f"host {socket.gethostname()} pid {os.getpid()}\n"


def test_every_process_of_a_multi_process_run_stops_at_a_held_lock(tmp_path):
    """Process 0 finds the lock held and tells process 1, so both exit 2 at once."""
    with hold_run_dir(tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "edit_jax.cli", "launch", "--processes", "2", *SMALL,
             f"run.run_dir={tmp_path}"], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"[p0] error: run directory {tmp_path} is in use by another trainer (host " \
           f"{socket.gethostname()} pid {os.getpid()})" in proc.stderr
    assert "[p1] error: process 0 could not lock run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def _plot_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s, "tokens": 512 * s}) + "\n" for s in (1, 2)))
    return run


@pytest.mark.parametrize("out, message", [
    ("/proc/x.png", "cannot write /proc/x.png ("),
    ("/dev/null/x.png", "cannot write /dev/null/x.png (/dev/null is not a directory)"),
    ("{tmp}", "is a directory; name a file in it"),
    ("{tmp}/loss", "does not end in an image format's extension"),
], ids=["proc", "under-a-file", "a-directory", "no-extension"])
def test_plot_out_that_cannot_be_written_as_asked(tmp_path, capsys, out, message):
    run = _plot_run(tmp_path)
    assert main(["plot", str(run), "--out", out.format(tmp=tmp_path)]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path.parent / f"{tmp_path.name}.png").exists()  # nothing written elsewhere


def test_plot_creates_missing_parents_and_rejects_a_bad_config(tmp_path, capsys):
    run = _plot_run(tmp_path)
    out = tmp_path / "new" / "dirs" / "loss.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.is_file()
    (run / "config.json").write_text('{"method": {"name": "ed')  # torn
    assert main(["plot", str(run), "--out", str(out)]) == 2
    assert f"{run / 'config.json'} is not JSON" in _one_line(capsys)


@pytest.mark.parametrize("overrides, message", [
    (["run.run_dir=/dev/null/run"], "cannot use /dev/null/run as run.run_dir (Not a directory)"),
    (["run.run_dir={file}"], "as run.run_dir (it is a file)"),
    (["method.compression=int8", "method.compression_block=1000000000"],
     "method.compression_block=1000000000 is larger than the 8240 values a device holds of "
     "the smallest synced unit"),
    (["data.seq_len=1048576", "model.max_seq_len=1048576"],
     "step needs 71.39 GiB per device but a device has"),
], ids=["run-dir-under-a-file", "run-dir-a-file", "compression-block", "sequence-too-long"])
def test_impossible_values_are_one_line_errors(tmp_path, capsys, overrides, message):
    (tmp_path / "file").write_text("")
    overrides = [o.format(file=tmp_path / "file") for o in overrides]
    assert main(["train", *SMALL, f"run.run_dir={tmp_path / 'run'}", *overrides]) == 2
    err = _one_line(capsys)
    assert message in err
