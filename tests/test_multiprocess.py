"""Real multi-process runs on one machine: `edit-jax launch` with 2 processes of 4 CPU devices
each, so that `replica` spans processes as it spans hosts on a cluster."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from edit_jax.launch import train_commands
from runs import EDIT, SMALL, read_rows, train

A_EDIT = ["method.name=a_edit", *EDIT[1:], "method.sync_interval_seconds=1.0",
          "method.step_weighting=0.5", "method.outer_momentum=0.9"]  # what the thresholds were
# measured with
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _launch(run_dir, *overrides, timeout=400):
    proc = subprocess.run(
        [sys.executable, "-m", "edit_jax.cli", "launch", "--processes", "2", *SMALL,
         f"run.run_dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_rows(run_dir), proc.stdout


def test_two_process_edit_equals_the_single_process_run(tmp_path):
    overrides = [*EDIT, "run.steps=9"]
    rows, stdout = _launch(tmp_path / "two", *overrides)
    assert stdout.count('"summary"') == 2  # both processes finished
    single_losses, single_rows = train(tmp_path / "one", *overrides)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == list(range(1, 10))
    np.testing.assert_allclose([losses[s] for s in range(1, 10)],
                               [single_losses[s] for s in range(1, 10)], atol=1e-4, rtol=0)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    single_evals = [(r["step"], r["eval_loss"]) for r in single_rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [s for s, _ in single_evals]
    np.testing.assert_allclose([e for _, e in evals], [e for _, e in single_evals], atol=1e-4)


def test_a_edit_with_a_replica_three_times_slower(tmp_path):
    rows, _ = _launch(tmp_path, *A_EDIT, "run.steps=48", "run.eval_every=48",
                      "straggler.slowdown=[1,3]")
    syncs = [r for r in rows if r.get("sync")]
    assert len(syncs) >= 3 and max(r["step"] for r in rows) == 48
    # Every sync but the last (which the end of the run cuts short for the fast replica).
    local = np.array([r["local_steps"] for r in syncs[:-1]])
    assert np.all(local[:, 0] > local[:, 1]), local  # the fast replica runs more steps
    assert local[:, 0].sum() >= 1.5 * local[:, 1].sum(), local
    # Step weighting (rho = 0.5) gives each non-outlier at least rho x its share of the local
    # steps, whatever the norm weights: w_r = (1 - rho) w_norm_r + rho s_r / sum(s) >= rho s_r /
    # sum(s), the sums over non-outliers. Outliers (the anomaly check may flag one) get zero.
    for row in syncs:
        weights = np.array(row["weights"])
        kept = weights > 0
        assert np.sum(~kept) == row["outliers"], row
        shares = np.array(row["local_steps"]) / sum(row["local_steps"])
        assert np.all(weights[kept] >= 0.5 * shares[kept] - 1e-6), row
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.5


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_process_makes_the_other_stop_with_a_clear_error(tmp_path, sig):
    """Killed: its sockets close and the next collective fails. Hung (stopped): nothing fails,
    and the barrier's or the watchdog's timeout ends the wait."""
    timeout_s = 15
    args = [*SMALL, *A_EDIT, f"run.run_dir={tmp_path}", "run.steps=100000",
            "method.sync_interval_seconds=0.3", "run.checkpoint_every=4",
            f"run.barrier_timeout_seconds={timeout_s}"]
    commands = train_commands(args, 2, 4, f"localhost:{portpicker.pick_unused_port()}")
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for c in commands]
    try:
        deadline = time.monotonic() + 300
        checkpoints = tmp_path / "checkpoints"
        while not (checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 4
                                                for p in checkpoints.iterdir())):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.2)
        procs[1].send_signal(sig)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        stopped_after = time.monotonic() - killed_at
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode == 3, err[-2000:]
    assert stopped_after < timeout_s + 15
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "process" in error_lines[0], err[-2000:]
    assert "rerun the same command on every process" in error_lines[0]
    assert "Traceback" not in err
    # The newest complete checkpoint is intact: one process resumes from it (as 2 replicas)
    # and goes on training (checked once).
    if sig == signal.SIGSTOP:
        return
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    losses, rows = train(tmp_path, *A_EDIT, f"run.steps={saved[-1] + 3}")
    assert max(r["step"] for r in rows) == saved[-1] + 3
    assert all(np.isfinite(loss) for loss in losses.values())
