"""Straggler benchmark: edit vs a_edit on 2 processes with one replica slowed down.

    python scripts/bench_a_edit.py [--slowdown 2] [--steps 240] [--sync-every 8]
                                   [--interval 0] [--step-weighting 0.5]
                                   [--out results/bench_a_edit.json] [key=value ...]

Each method runs as `edit-jax launch --processes 2` (one replica per process, 4 fake CPU devices
each, the tiny model on the bundled corpus) with `straggler.slowdown=[1, S]`. `edit` syncs every
tau local steps, so the fast replica waits for the slow one at every sync; `a_edit` syncs every
`--interval` seconds of each replica's own clock (0 = tau x the fast replica's step time,
measured from `edit`'s run), so the fast replica keeps stepping, and weights the replicas'
pseudo-gradients partly by their local steps (`--step-weighting`; without it the norm weights
favour the slow replica, whose pseudo-gradient is smaller). Both runs share the seed, data and
evaluation schedule; `run.steps` counts the fastest replica's steps. The target is the worse of the two final validation losses, so both
reach it; the table gives each method's wall-clock time to the target and the ratio, measured
in one invocation (the seconds are this machine's; the ratio is the result).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import run_rows, time_to, write_report


def run(method: str, run_dir: Path, args, extra: list[str]) -> list[dict]:
    """Launch one run of `method` and return its metrics rows."""
    command = [sys.executable, "-m", "edit_jax.cli", "launch", "--processes", "2",
               f"method.name={method}", f"run.steps={args.steps}", f"run.run_dir={run_dir}",
               f"run.eval_every={args.eval_every}", "run.progress=false",
               f"method.sync_every={args.sync_every}",
               f"straggler.slowdown=[1,{args.slowdown}]", *extra, *args.overrides]
    print(" ".join(command[2:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                   stdout=subprocess.DEVNULL)
    return run_rows(run_dir)


def summary(rows: list[dict]) -> dict:
    syncs = [r for r in rows if r.get("sync")]
    evals = [r for r in rows if "eval_loss" in r]
    trains = [r for r in rows if "loss" in r]
    return {"final_eval_loss": evals[-1]["eval_loss"], "wall_time": evals[-1]["wall_time"],
            "tokens": trains[-1]["tokens"], "syncs": len(syncs),
            "local_steps_per_sync": [round(sum(r["local_steps"][i] for r in syncs) / len(syncs), 1)
                                     for i in range(2)] if syncs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slowdown", type=float, default=2.0, help="replica 1's slowdown")
    parser.add_argument("--steps", type=int, default=240, help="steps of the fastest replica")
    parser.add_argument("--sync-every", type=int, default=8, help="edit's tau")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="a_edit's sync interval in seconds (0: tau x fast step time)")
    parser.add_argument("--step-weighting", type=float, default=0.5,
                        help="a_edit's method.step_weighting")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--out", default="results/bench_a_edit.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        edit = run("edit", Path(tmp) / "edit", args, [])
        # The fast replica's step time: edit's local steps run at the slow replica's pace, so
        # take the unslowed share of it.
        step_time = min(r["step_time"] for r in edit if "step_time" in r) / args.slowdown
        interval = args.interval or round(args.sync_every * step_time, 3)
        a_edit = run("a_edit", Path(tmp) / "a_edit", args,
                     [f"method.sync_interval_seconds={interval}",
                      f"method.step_weighting={args.step_weighting}"])
    results = {"edit": summary(edit), "a_edit": summary(a_edit)}
    target = max(r["final_eval_loss"] for r in results.values())
    for name, rows in (("edit", edit), ("a_edit", a_edit)):
        results[name]["time_to_target"] = time_to(rows, target)
    ratio = results["a_edit"]["time_to_target"] / results["edit"]["time_to_target"]

    print(f"\nreplica 1 slowed {args.slowdown:g}x; a_edit interval {interval:g} s; target "
          f"validation loss {target:.4f}")
    print(f"{'method':<8}{'final eval':>11}{'time to target':>16}{'wall time':>11}"
          f"{'tokens':>10}{'syncs':>7}  local steps/sync (fast, slow)")
    for name, row in results.items():
        print(f"{name:<8}{row['final_eval_loss']:>11.4f}{row['time_to_target']:>15.1f}s"
              f"{row['wall_time']:>10.1f}s{row['tokens']:>10,}{row['syncs']:>7}  "
              f"{row['local_steps_per_sync']}")
    print(f"a_edit / edit time to target: {ratio:.2f}")
    write_report({"slowdown": args.slowdown, "steps": args.steps, "sync_every": args.sync_every,
                  "interval_seconds": interval, "step_weighting": args.step_weighting,
                  "target_eval_loss": target,
                  "time_to_target_ratio": ratio, "methods": results,
                  "overrides": args.overrides}, args.out)


if __name__ == "__main__":
    main()
