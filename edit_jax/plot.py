"""`edit-jax plot`: the loss curves of several runs in one PNG, against tokens, steps, wall time
or the bytes each device sent over `replica`.

The top panel has each run's train loss (thin) and validation loss (markers); runs with sync
rows (edit, a_edit) add a panel of the replicas' sync weights and, when replicas ran different
numbers of local steps (a_edit), one of those. Each run is labelled by its method and the
settings that tell such runs apart, read from the `config.json` `edit-jax train` writes. Drawn
with matplotlib's Agg canvas: no display needed. Reading needs no JAX.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from matplotlib.figure import Figure

from edit_jax.errors import UserError
from edit_jax.metrics import read_rows

X_AXES = {"tokens": "tokens", "step": "step", "wall_time": "wall time (s)",
          "replica_bytes": "bytes sent per device over replica"}
OUTER_METHODS = ("diloco", "edit", "a_edit")


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
    parts = [method["name"]]
    if method["name"] != "ddp":
        parts.append(f"tau={method['sync_every']}" if method["name"] != "a_edit"
                     else f"interval={method['sync_interval_seconds']}s")
        parts.append(f"warmup={method['warmup_steps']}")
    if method["name"] in OUTER_METHODS:
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


def plot_runs(runs: list[Run], x: str = "tokens") -> Figure:
    """The figure: losses on top, sync weights and local steps below where runs have them."""
    if x not in X_AXES:
        raise UserError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    synced = [run for run in runs if run.sync]
    uneven = [run for run in synced if any(len(set(r["local_steps"])) > 1 for r in run.sync)]
    lower = [(key, title, members) for key, title, members in (
        ("weights", "sync weight", synced), ("local_steps", "local steps per sync", uneven))
        if members]
    fig = Figure(figsize=(12, 4 + 2.5 * len(lower)), layout="constrained")
    axes = fig.subplots(1 + len(lower), 1, sharex=True, squeeze=False)[:, 0]
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        axes[0].plot(_column(run.train, x, run), [r["loss"] for r in run.train], color=color,
                     linewidth=0.8, alpha=0.6, label=f"{run.label} train")
        if run.eval:
            axes[0].plot(_column(run.eval, x, run), [r["eval_loss"] for r in run.eval],
                         color=color, marker="o", label=f"{run.label} val")
        for ax, (key, _, members) in zip(axes[1:], lower):
            if run in members:
                xs = _column(run.sync, x, run)
                for replica in range(len(run.sync[0][key])):
                    ax.plot(xs, [r[key][replica] for r in run.sync], color=color,
                            linestyle=("-", "--", ":", "-.")[replica % 4],
                            label=f"{run.label} r{replica}")
    axes[0].set_ylabel("loss")
    beside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1)}  # never over the curves
    axes[0].legend(fontsize="small", **beside)
    for ax, (_, title, _) in zip(axes[1:], lower):
        ax.set_ylabel(title)
        ax.legend(fontsize="x-small", ncol=2, **beside)
    axes[-1].set_xlabel(X_AXES[x])
    return fig


def save_plot(runs: list[Run], x: str, out: str | Path) -> Path:
    """Write the figure to exactly `out` (missing parent directories are created), in the
    format its extension names (.png, .pdf, .svg, ...)."""
    out = Path(out)
    fig = plot_runs(runs, x)
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
