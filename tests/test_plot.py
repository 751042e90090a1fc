"""`edit-jax plot` on hand-written run directories: the series handed to matplotlib, the
labels from each run's config, the panels, and one-line errors for what is not a run."""

import json

import pytest

from edit_jax.cli import main
from edit_jax.errors import UserError
from edit_jax.plot import load_runs, plot_runs


def _config(name, **method):
    return {"method": {"name": name, "sync_every": 8, "warmup_steps": 30, "outer_lr": 0.7,
                       "outer_momentum": 0.9, "sync_interval_seconds": 2.0, **method}}


def _run(path, config, rows):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(step, **values):
    return {"step": step, "tokens": 100 * step, "wall_time": 0.5 * step,
            "replica_bytes": 7 * step, **values}


@pytest.fixture
def runs(tmp_path):
    ddp = _run(tmp_path / "ddp", _config("ddp"), [
        _row(0, eval_loss=5.5), _row(10, loss=3.0), _row(20, loss=2.0), _row(20, eval_loss=2.2)])
    edit = _run(tmp_path / "edit", _config("edit", outer_momentum=0.6), [
        _row(0, eval_loss=5.5), _row(10, loss=3.5), _row(16, sync=True, weights=[0.6, 0.4],
                                                         local_steps=[8, 8]),
        _row(20, loss=2.5), _row(24, sync=True, weights=[0.3, 0.7], local_steps=[8, 8]),
        _row(20, eval_loss=2.4)])
    return ddp, edit


def _series(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()}


def test_series_handed_to_matplotlib(runs):
    fig = plot_runs(load_runs(runs), x="tokens")
    top, weights = fig.axes
    assert _series(top) == {
        "ddp train": ([1000, 2000], [3.0, 2.0]),
        "ddp val": ([0, 2000], [5.5, 2.2]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 train": ([1000, 2000], [3.5, 2.5]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 val": ([0, 2000], [5.5, 2.4])}
    assert _series(weights) == {  # ddp has no sync rows
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 r0": ([1600, 2400], [0.6, 0.3]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 r1": ([1600, 2400], [0.4, 0.7])}
    assert top.get_ylabel() == "loss" and weights.get_xlabel() == "tokens"
    by_bytes = plot_runs(load_runs(runs), x="replica_bytes")
    assert _series(by_bytes.axes[0])["ddp val"] == ([0, 140], [5.5, 2.2])
    assert by_bytes.axes[-1].get_xlabel() == "bytes sent per device over replica"


def test_uneven_local_steps_get_a_panel_and_equal_labels_get_the_directory(tmp_path):
    rows = [_row(10, loss=3.0), _row(12, sync=True, weights=[0.5, 0.5], local_steps=[9, 4])]
    a = _run(tmp_path / "a", _config("a_edit"), rows)
    b = _run(tmp_path / "b", _config("a_edit"), rows)
    fig = plot_runs(load_runs([a, b]), x="step")
    assert len(fig.axes) == 3
    steps = _series(fig.axes[2])
    assert steps["a_edit interval=2.0s warmup=30 outer lr=0.7 mom=0.9 (a) r0"] == ([12], [9])
    assert steps["a_edit interval=2.0s warmup=30 outer lr=0.7 mom=0.9 (b) r1"] == ([12], [4])


def test_cli_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "loss.png"
    assert main(["plot", *map(str, runs), "--x", "wall_time", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {out}"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "is not a directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no metrics.jsonl"),
    (lambda d: _run(d / "fresh", _config("ddp"), [_row(0, eval_loss=5.5)]), "has no train rows"),
    (lambda d: _run(d / "old", _config("ddp"), [{"step": 10, "loss": 3.0}]),
     "has no 'tokens' in its metrics"),
    (lambda d: _run(d / "torn", _config("ddp"), []).joinpath("metrics.jsonl").write_text(
        '{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n') and d / "torn",
     "line 2 is not JSON"),
])
def test_bad_run_dirs_are_one_line_errors(tmp_path, capsys, make, message):
    assert main(["plot", str(make(tmp_path)), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_unknown_x_axis():
    with pytest.raises(UserError, match="--x 'flops' is not one of tokens, step"):
        plot_runs([], x="flops")
