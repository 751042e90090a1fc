"""What the benchmark scripts share: method specs, timing a compiled step, running a case in a
fresh process, reading a run's metrics rows and writing the results file."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import traceback
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


def run_in_child(script: Path, case: list, timeout: float | None = None) -> dict:
    """Run `python script --case JSON(case)` (whose main calls `answer_case`) in a fresh process:
    its own device memory, and a hang or crash stays there. Returns the row it printed; if it
    failed, crashed or ran past `timeout` seconds: {"error": one line, "stderr_tail": lines}."""
    try:
        out = subprocess.run([sys.executable, str(script), "--case", json.dumps(case)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:  # its output is bytes even in text mode
        stderr = (expired.stderr or b"").decode(errors="replace")
        return {"error": f"ran past its {timeout:.0f} s budget", "stderr_tail": _tail(stderr)}
    lines = out.stdout.strip().splitlines()
    try:
        row = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        row = {}
    if out.returncode == 0 and row:
        return row
    tail = _tail(out.stderr)
    status = (f"killed by signal {-out.returncode}" if out.returncode < 0
              else f"exit status {out.returncode}")
    return {"error": row.get("error") or (tail[-1] if tail else status), "exit": status,
            "stderr_tail": tail}


def answer_case(run_case, case: str) -> None:
    """The child's side of `run_in_child`: print `run_case(*case)` as JSON; if it raises, the
    traceback on stderr, {"error": the exception's type and first line} and exit status 1."""
    try:
        row = run_case(*json.loads(case))
    except Exception as error:  # any failure becomes the case's one-line error
        traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(error).__name__}: {first}"}))
        sys.exit(1)
    print(json.dumps(row))


def _tail(text: str, lines: int = 20) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def default_backend() -> str:
    """JAX's default backend, asked in a short-lived process (so the caller holds no device)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "cpu"


def write_report(report: dict, path: str) -> None:
    """Write `report` as JSON, atomically (a reader never sees half a file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out)
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
    'method.fragments=2', 'method.fragment_delay=1']); a dotted key is any config key
    (`diloco:run.eval_params=phi`)."""
    name, *settings = spec.split(":")
    for setting in settings:
        if "=" not in setting:
            raise SystemExit(f"--methods entry {spec!r}: expected NAME:KEY=VALUE:...")
    overrides = [f"method.name={name}", *(s if "." in s.partition("=")[0] else f"method.{s}"
                                          for s in settings)]
    return " ".join([name, *settings]), name, overrides
