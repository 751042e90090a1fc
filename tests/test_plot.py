"""`edit-jax plot` on hand-written run directories: the series handed to matplotlib, the
labels from each run's config, the panels, and one-line errors for what is not a run."""

import json

import pytest

from edit_jax.cli import main
from edit_jax.errors import UserError
from edit_jax.plot import load_runs, pareto_front, plot_final_vs_bytes, plot_runs


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
    """By default the validation loss only, over the last three quarters (from a quarter of
    2000 tokens, 500, less 2% of the 1500 shown: 470) on their range (from 2.2 to the highest
    loss past 500 tokens, 2.4, with 5% margins); with train and sync the
    smoothed train loss (EMA 0.8: 3.0, 0.8 x 3.0 + 0.2 x 2.0 = 2.8) and the weights."""
    fig = plot_runs(load_runs(runs), x="tokens")
    (top,) = fig.axes
    assert _series(top) == {
        "ddp": ([0, 2000], [5.5, 2.2]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6": ([0, 2000], [5.5, 2.4])}
    assert top.get_ylim() == pytest.approx((2.19, 2.41))
    assert top.get_xlim()[0] == pytest.approx(470)
    assert top.get_ylabel() == "validation loss"
    fig = plot_runs(load_runs(runs), x="tokens", train=True, sync=True)
    top, weights = fig.axes
    assert _series(top) == {
        "ddp train": ([1000, 2000], [3.0, pytest.approx(2.8)]),
        "ddp val": ([0, 2000], [5.5, 2.2]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 train": ([1000, 2000],
                                                             [3.5, pytest.approx(3.3)]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 val": ([0, 2000], [5.5, 2.4])}
    assert _series(weights) == {  # ddp has no sync rows
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 r0": ([1600, 2400], [0.6, 0.3]),
        "edit tau=8 warmup=30 outer lr=0.7 mom=0.6 r1": ([1600, 2400], [0.4, 0.7])}
    assert weights.get_xlabel() == "tokens"
    by_bytes = plot_runs(load_runs(runs), x="replica_bytes")
    assert _series(by_bytes.axes[0])["ddp"] == ([0, 140], [5.5, 2.2])
    assert by_bytes.axes[0].get_xscale() == "log"
    assert by_bytes.axes[0].get_xlim()[0] > 140 / 4  # bytes are not cut at a quarter (32.9)
    assert by_bytes.axes[-1].get_xlabel() == "bytes sent per device over replica (log)"


def test_uneven_local_steps_get_a_panel_and_equal_labels_get_the_directory(tmp_path):
    rows = [_row(10, loss=3.0), _row(12, sync=True, weights=[0.5, 0.5], local_steps=[9, 4])]
    a = _run(tmp_path / "a", _config("a_edit"), rows)
    b = _run(tmp_path / "b", _config("a_edit"), rows)
    assert len(plot_runs(load_runs([a, b]), x="step").axes) == 1
    fig = plot_runs(load_runs([a, b]), x="step", sync=True)
    assert len(fig.axes) == 3
    steps = _series(fig.axes[2])  # the legend keeps what differs: the directory
    assert steps["(a) r0"] == ([12], [9]) and steps["(b) r1"] == ([12], [4])


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


def test_pareto_front_and_the_summary_figure():
    """The front holds the points no other beats on both bytes and loss, by bytes (worked out
    by hand); the summary figure has one point per run, coloured by method, and the front."""
    points = [(100.0, 1.7), (10.0, 1.8), (10.0, 1.75), (1.0, 2.0), (50.0, 1.9), (200.0, 1.7)]
    assert pareto_front(points) == [3, 2, 0]
    rows = [{"label": f"{m} compression=topk" if b < 100 else m, "method": m,
             "final_eval_loss": l, "replica_wire_bytes_per_step": b}
            for m, (b, l) in zip(["diloco", "diloco", "edit", "edit", "diloco", "edit"], points)]
    ax = plot_final_vs_bytes(rows).axes[0]
    offsets = [c.get_offsets().tolist() for c in ax.collections]
    assert offsets == [[[100, 1.7], [10, 1.8], [50, 1.9]], [[10, 1.75], [1, 2.0], [200, 1.7]]]
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    assert front.get_xdata().tolist() == [1, 10, 100]
    assert sorted(t.get_text() for t in ax.texts)[:2] == ["fp32", "fp32"]
    with pytest.raises(UserError, match="no run has"):
        plot_final_vs_bytes([{"label": "ddp", "method": "ddp", "final_eval_loss": 1.0}])
