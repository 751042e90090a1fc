"""`edit-jax plot`: the loss curves of several runs in one PNG, against tokens, steps, wall time
or the bytes each device sent over `replica`; and a comparison's summary, the final loss of
each run against its wire bytes.

The curves show what a comparison's table says: validation loss over the last three quarters
of training, on a y-range that fits them (train loss smoothed, and panels of the replicas'
sync weights and local steps, on request). Each run is labelled by its method and settings,
read from the `config.json` `edit-jax train` writes, and the legend keeps only the words that
differ between runs. Drawn with matplotlib's Agg canvas: no display needed. Reading needs no JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator

from edit_jax.errors import UserError
from edit_jax.methods import METHODS, SyncRule
from edit_jax.metrics import read_rows

X_AXES = {"tokens": "tokens", "step": "step", "wall_time": "wall time (s)",
          "replica_bytes": "bytes sent per device over replica"}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's metrics rows, split by kind, and its label."""

    label: str
    train: list[dict]
    eval: list[dict]
    sync: list[dict]


def describe(config: dict) -> str:
    """A short label: the method and the settings that tell its runs apart."""
    method = config["method"]
    spec = METHODS[method["name"]]
    parts = [method["name"]]
    if spec.rule is not SyncRule.NONE:
        parts.append(f"tau={method['sync_every']}" if not spec.timed
                     else f"interval={method['sync_interval_seconds']}s")
        parts.append(f"warmup={method['warmup_steps']}")
    if spec.has_outer_state:
        parts.append(f"outer lr={method['outer_lr']} mom={method['outer_momentum']}")
    if method.get("fragments", 1) > 1:  # streaming; configs older than fragments lack the key
        parts.append(f"P={method['fragments']}")
        if method["fragment_delay"]:
            parts.append(f"delay={method['fragment_delay']} alpha={method['fragment_alpha']}")
    return " ".join(parts)


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """A run directory's rows; one-line errors for anything that is not a run with rows."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass run directories (run.run_dir)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl, so it is not a run directory; pass "
                        "the run.run_dir of an `edit-jax train` run")
    rows = read_rows(metrics, warn=lambda message: None)
    train = [r for r in rows if "loss" in r]
    if not train:
        raise UserError(f"{metrics} has no train rows yet; plot it once the run has logged "
                        "(run.log_every steps)")
    if label is None:
        config = run_dir / "config.json"
        label = _describe_file(config) if config.is_file() else run_dir.name
    return Run(label, train, [r for r in rows if "eval_loss" in r],
               [r for r in rows if r.get("sync")])


def _describe_file(config: Path) -> str:
    """`describe` of a run's config.json; one-line errors if it is not one."""
    try:
        return describe(json.loads(config.read_text()))
    except json.JSONDecodeError as e:
        problem = f"not JSON: {e.msg} at line {e.lineno}"
    except (KeyError, TypeError, AttributeError) as e:
        problem = f"not a config `edit-jax train` wrote ({type(e).__name__}: {e})"
    raise UserError(f"{config} is {problem}; restore it, or remove it to label the run by its "
                    "directory name")


def load_runs(run_dirs: list[str | Path], labels: list[str] | None = None) -> list[Run]:
    """Several runs; labels that would repeat get their directory's name appended."""
    if not run_dirs:
        raise UserError("no run directories given")
    runs = [load_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)]
    names = [run.label for run in runs]
    return [dataclasses.replace(run, label=f"{run.label} ({Path(d).name})")
            if names.count(run.label) > 1 else run for run, d in zip(runs, run_dirs)]


def _column(rows: list[dict], key: str, run: Run) -> list:
    if any(key not in r for r in rows):
        raise UserError(f"run '{run.label}' has no {key!r} in its metrics (written before "
                        f"edit-jax recorded it); plot it with --x step")
    return [r[key] for r in rows]


def distinct_labels(labels: list[str]) -> list[str]:
    """Each label without the words every label shares (the legend then names what differs);
    labels left empty keep their words."""
    words = [label.split() for label in labels]
    common = set.intersection(*map(set, words)) if len(words) > 1 else set()
    return [" ".join(w for w in ws if w not in common) or label
            for ws, label in zip(words, labels)]


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """An exponential moving average (TensorBoard's smoothing), started at the first value."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _late_window(runs: list[Run], x: str) -> tuple[float, tuple[float, float]] | None:
    """Where the last three quarters of training lie: the x they start from (less a 2% margin)
    and a y-range from the lowest validation loss to the highest one past that x (5% margins)."""
    evals = [(r[x], r["eval_loss"]) for run in runs for r in run.eval if x in r]
    if not evals:
        return None
    end = max(v for v, _ in evals)
    start = end / 4
    late = [l for v, l in evals if v >= start] or [l for _, l in evals]
    low, high = min(l for _, l in evals), max(late)
    margin = 0.05 * (high - low) or 0.05
    return start - 0.02 * (end - start), (low - margin, high + margin)


def plot_runs(runs: list[Run], x: str = "tokens", *, train: bool = False,
              sync: bool = False) -> Figure:
    """The figure: each run's validation loss (a line with markers) over the last three
    quarters of training, on a y-range that fits them; with `train` its train loss too,
    smoothed; with `sync` panels of the replicas' sync weights and (where replicas ran
    different numbers of local steps, a_edit) of those. Bytes go on a log axis. The legend
    names what tells runs apart."""
    if x not in X_AXES:
        raise UserError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    synced = [run for run in runs if run.sync] if sync else []
    uneven = [run for run in synced if any(len(set(r["local_steps"])) > 1 for r in run.sync)]
    lower = [(key, title, members) for key, title, members in (
        ("weights", "sync weight", synced), ("local_steps", "local steps per sync", uneven))
        if members]
    fig = Figure(figsize=(11, 5 + 2.5 * len(lower)), layout="constrained")
    axes = fig.subplots(1 + len(lower), 1, sharex=True, squeeze=False)[:, 0]
    labels = distinct_labels([run.label for run in runs])
    palette = colormaps["tab20"] if len(runs) > 10 else None  # 20 distinct colours
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = palette(i % 20) if palette else f"C{i}"
        if run.eval:
            axes[0].plot(_column(run.eval, x, run), [r["eval_loss"] for r in run.eval],
                         color=color, marker="o", markersize=3,
                         label=f"{label} val" if train else label)
        if train or not run.eval:
            axes[0].plot(_column(run.train, x, run), smoothed([r["loss"] for r in run.train]),
                         color=color, linewidth=0.8, alpha=0.6, label=f"{label} train")
        for ax, (key, _, members) in zip(axes[1:], lower):
            if run in members:
                xs = _column(run.sync, x, run)
                for replica in range(len(run.sync[0][key])):
                    ax.plot(xs, [r[key][replica] for r in run.sync], color=color,
                            linestyle=("-", "--", ":", "-.")[replica % 4],
                            label=f"{label} r{replica}")
    window = _late_window(runs, x)
    if window is not None and not train:
        x_start, y_range = window
        if x != "replica_bytes":  # a log axis of bytes already starts near the first sync
            axes[0].set_xlim(left=x_start)  # the first quarter's losses lie above the range
        axes[0].set_ylim(*y_range)
    axes[0].set_ylabel("validation loss" if not train else "loss (train smoothed)")
    axes[0].grid(True, alpha=0.3)
    beside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1)}  # never over the curves
    axes[0].legend(fontsize="small", **beside)
    for ax, (_, title, _) in zip(axes[1:], lower):
        ax.set_ylabel(title)
        ax.legend(fontsize="x-small", **beside)
    if x == "replica_bytes":
        axes[-1].set_xscale("log", nonpositive="mask")
        _label_bytes(axes[-1].xaxis)
    axes[-1].set_xlabel(X_AXES[x] + (" (log)" if x == "replica_bytes" else ""))
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (bytes, loss) points no other point beats on both (fewer or equal bytes
    and lower loss), by increasing bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_final_vs_bytes(rows: list[dict], bytes_key: str = "replica_wire_bytes_per_step"
                        ) -> Figure:
    """One point per run: its final validation loss against its bytes per step over `replica`
    (log axis), each point labelled, the Pareto front (no run has fewer bytes and a lower loss)
    joined by a line. `rows`: compare_methods.py's, with `label`, `final_eval_loss` and
    `bytes_key`."""
    rows = [r for r in rows if r.get(bytes_key)]
    if not rows:
        raise UserError(f"no run has {bytes_key!r}; record the runs with compare_methods.py")
    points = [(r[bytes_key], r["final_eval_loss"]) for r in rows]
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {method: f"C{i}" for i, method in enumerate(methods)}
    for method in methods:  # one colour per method
        mine = [p for row, p in zip(rows, points) if row["method"] == method]
        ax.scatter([b for b, _ in mine], [l for _, l in mine], color=colors[method],
                   label=method, zorder=3)
    span = max(l for _, l in points) - min(l for _, l in points) or 1.0
    placed: list[tuple[float, float]] = []
    for i in sorted(range(len(rows)), key=lambda i: (-points[i][1], points[i][0])):
        row, (b, l) = rows[i], points[i]  # each point named by its settings; crowded: below
        crowded = sum(abs(math.log(b / pb)) < 0.3 and abs(l - pl) < 0.02 * span
                      for pb, pl in placed)
        settings = row["label"].removeprefix(row["method"]).replace("compression=", "").strip()
        ax.annotate(settings or "fp32", (b, l), textcoords="offset points",
                    xytext=(5, 3 - 9 * crowded), fontsize="x-small", color=colors[row["method"]])
        placed.append((b, l))
    ax.set_xlim(right=max(b for b, _ in points) * 6)  # room for the rightmost labels
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="C3",
            drawstyle="steps-post", label="Pareto front", zorder=2)
    _label_bytes(ax.xaxis)
    ax.set_xlabel("wire bytes per step per device over replica (log)")
    ax.set_ylabel("final validation loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    return fig


def _label_bytes(axis) -> None:
    """A log axis of bytes labelled in B, kB, MB: each decade and its 2x and 5x (labels at all
    eight minor ticks would overlap)."""
    axis.set_major_formatter(EngFormatter(unit="B"))
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(EngFormatter(unit="B"))


def save_plot(runs: list[Run], x: str, out: str | Path, *, train: bool = False,
              sync: bool = False) -> Path:
    """Write `plot_runs`'s figure to exactly `out` (missing parent directories are created), in
    the format its extension names (.png, .pdf, .svg, ...)."""
    return save_figure(plot_runs(runs, x, train=train, sync=sync), out)


def save_figure(fig: Figure, out: str | Path) -> Path:
    """`fig` to exactly `out`, as `save_plot` writes it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name a file in it, e.g. {out / 'loss.png'}")
    if out.suffix[1:].lower() not in fig.canvas.get_supported_filetypes():
        raise UserError(f"--out {out} does not end in an image format's extension (.png, .pdf, "
                        f".svg, ...); e.g. {out}.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as e:  # mkdir's FileExistsError: a parent is a file
        problem = f"{e.filename} is not a directory" if isinstance(e, FileExistsError) else (
            e.strerror)
        raise UserError(f"cannot write {out} ({problem}); choose a writable path for "
                        "--out") from e
    return out
