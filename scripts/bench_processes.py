"""Multi-process step time: agreeing on stop requests every step vs only where processes meet.

    python scripts/bench_processes.py [--steps 120] [--repeats 2] [--method local_sgd]
                                      [--out results/bench_processes.json] [key=value ...]

Runs the tiny model as 2 processes of 4 fake CPU devices (one replica each, as
`edit-jax launch --processes 2` starts them) in two arms, alternated `--repeats` times in one
invocation: `meet` is the trainer as it is (processes agree on a stop request only at syncs, log
rows and checkpoints, so a local step has no cross-process collective); `every_step` patches the
trainer's stop check to agree on every step (a `process_allgather` per step, as before). The
table gives the median of the logged per-step times (each the mean over `run.log_every` steps)
of each arm, and the ratio; on one machine only the ratio means something.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import portpicker
from benchlib import run_rows, write_report

from edit_jax.launch import run_processes, train_commands

# Runs `edit-jax train` with the stop check forced to meet on every step.
EVERY_STEP = ("import sys, edit_jax.train as t\n"
              "agreed = t.StopRequest.agreed\n"
              "t.StopRequest.agreed = lambda self, meeting: agreed(self, True)\n"
              "from edit_jax.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


def run(arm: str, run_dir: Path, args) -> list[float]:
    """One 2-process run; the logged step times past the first log row (compilation)."""
    train_args = ["method.name=" + args.method, f"run.steps={args.steps}",
                  f"run.run_dir={run_dir}", "run.progress=false", "run.eval_every=100000",
                  "run.checkpoint_every=100000", *args.overrides]
    commands = train_commands(train_args, 2, 4, f"localhost:{portpicker.pick_unused_port()}")
    if arm == "every_step":
        commands = [[c[0], "-c", EVERY_STEP, *c[3:]] for c in commands]
    print(f"{arm}: {' '.join(train_args)}", file=sys.stderr, flush=True)
    if run_processes(commands):
        raise SystemExit(f"the {arm} run failed")
    return [r["step_time"] for r in run_rows(run_dir) if "step_time" in r][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", default="local_sgd")
    parser.add_argument("--out", default="results/bench_processes.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    times: dict[str, list[float]] = {"every_step": [], "meet": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for arm in times:
                times[arm] += run(arm, Path(tmp) / f"{arm}-{repeat}", args)
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    ratio = medians["meet"] / medians["every_step"]
    print(f"\n2 processes x 4 CPU devices, {args.method}, {args.steps} steps x {args.repeats}")
    print(f"{'stop agreement':<16}{'median step time':>18}{'samples':>9}")
    for arm, median in medians.items():
        print(f"{arm:<16}{median * 1e3:>16.1f}ms{len(times[arm]):>9}")
    print(f"meet / every_step: {ratio:.3f}")
    write_report({"method": args.method, "steps": args.steps, "repeats": args.repeats,
                  "median_step_seconds": medians, "ratio_meet_to_every_step": ratio,
                  "step_times": times, "overrides": args.overrides}, args.out)


if __name__ == "__main__":
    main()
