"""What the benchmark scripts share: method specs, timing a compiled step, reading a run's metrics
rows and writing the results file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

WARMUP_CALLS = 2
TIMED_CALLS = 10


def time_step(step, state, batch, timed_calls: int = TIMED_CALLS) -> tuple[float, object]:
    """(median seconds per call, the state after the calls) of a jitted train step, after
    WARMUP_CALLS untimed calls (the first one compiles)."""
    import jax

    times = []
    for call in range(WARMUP_CALLS + timed_calls):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if call >= WARMUP_CALLS:
            times.append(time.perf_counter() - start)
    return statistics.median(times), state


def write_report(report: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def run_rows(run_dir: str | Path) -> list[dict]:
    """The rows of a run's `metrics.jsonl` (edit_jax.metrics.read_rows: a torn last line is
    dropped with a warning)."""
    from edit_jax.metrics import read_rows

    return read_rows(Path(run_dir) / "metrics.jsonl", warn=lambda m: print(m, file=sys.stderr))


def time_to(rows: list[dict], target: float) -> float | None:
    """Wall-clock seconds (the rows' `wall_time`) of a run's first evaluation at or below
    `target`; None if it never got there."""
    return next((r["wall_time"] for r in rows if "eval_loss" in r and r["eval_loss"] <= target),
                None)


def method_spec(spec: str) -> tuple[str, str, list[str]]:
    """(label, method name, config overrides) of a `--methods` entry: a method name, optionally
    with method settings after colons, e.g. `diloco:fragments=2:fragment_delay=1` ->
    ('diloco fragments=2 fragment_delay=1', 'diloco', ['method.name=diloco',
    'method.fragments=2', 'method.fragment_delay=1'])."""
    name, *settings = spec.split(":")
    for setting in settings:
        if "=" not in setting:
            raise SystemExit(f"--methods entry {spec!r}: expected NAME:KEY=VALUE:...")
    overrides = [f"method.name={name}", *(f"method.{s}" for s in settings)]
    return " ".join([name, *settings]), name, overrides
