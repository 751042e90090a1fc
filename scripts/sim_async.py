"""Seed-002 comparison in the asynchronous Local-SGD simulator: DiLoCo (synchronous), naive
asynchronous Nesterov, asynchronous delayed Nesterov (DN) and DN with dynamic local updates.
Naive Nesterov also runs at outer lr / W, which offsets its W-fold gradient weight per round.

    python scripts/sim_async.py [--local-steps 50] [--updates 160] [--d-model 64] [--seed 0]
                                [--step-times 0.58,0.75,1.51,3.33] [--out results/sim_async.json]

Every method applies the same number of pseudo-gradients (a synchronous round counts one per
worker). The table gives the final validation loss, the mean of the last three evaluations,
the simulated time at the end, the simulated time at which the method first evaluated at or
below DiLoCo's final loss, and the last loss evaluated by the time the fastest method ended.
Times are the simulator's faked seconds, not this machine's.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from benchlib import write_report

from edit_jax.async_sim import PAPER_STEP_TIMES, SimConfig, SimResult, simulate
from edit_jax.config import DataConfig, ModelConfig


def methods(base: SimConfig) -> dict[str, SimConfig]:
    """The compared runs, by name."""
    runs = {"diloco_sync": {"outer": "sync"},
            "async_nesterov": {"outer": "nesterov"},
            "async_nesterov_lr/W": {"outer": "nesterov",
                                    "outer_lr": base.outer_lr / len(base.step_times)},
            "async_dn": {"outer": "delayed_nesterov"},
            "async_dn_dylu": {"outer": "delayed_nesterov", "dylu": True}}
    return {name: dataclasses.replace(base, **changes) for name, changes in runs.items()}


def summary(result: SimResult, target: float, common_time: float) -> dict:
    """Final loss, mean of the last three evals, end time, time to reach `target`, the loss at
    `common_time`, and the work done."""
    evals = result.evals
    reached = [e["time"] for e in evals if e["eval_loss"] <= target]
    return {"final_loss": evals[-1]["eval_loss"],
            "last3_loss": float(np.mean([e["eval_loss"] for e in evals[-3:]])),
            "end_time": evals[-1]["time"],
            "time_to_sync_loss": reached[0] if reached else None,
            "loss_at_common_time": [e["eval_loss"] for e in evals if e["time"] <= common_time][-1],
            "updates": evals[-1]["updates"], "local_steps": evals[-1]["local_steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-steps", type=int, default=50, help="H")
    parser.add_argument("--updates", type=int, default=160, help="pseudo-gradients per method")
    parser.add_argument("--step-times", default=",".join(map(str, PAPER_STEP_TIMES)),
                        help="simulated seconds per local step, one per worker")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4, help="sequences per worker per step")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/sim_async.json")
    args = parser.parse_args()

    step_times = tuple(float(t) for t in args.step_times.split(","))
    model = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                        d_ff=2 * args.d_model, max_seq_len=args.seq_len, remat="none")
    data = DataConfig(seq_len=args.seq_len, global_batch_size=args.rows * len(step_times),
                      shuffle_seed=args.seed)
    base = SimConfig(step_times=step_times, local_steps=args.local_steps,
                     num_updates=args.updates, eval_every=args.eval_every, eval_batches=8,
                     seed=args.seed)
    results = {}
    for name, sim in methods(base).items():
        results[name] = simulate(model, data, sim)
        print(f"{name}: final eval loss {results[name].evals[-1]['eval_loss']:.3f}", flush=True)

    target = results["diloco_sync"].evals[-1]["eval_loss"]
    common_time = min(r.evals[-1]["time"] for r in results.values())
    table = {name: summary(r, target, common_time) for name, r in results.items()}
    print(f"\n{'method':<21}{'final':>8}{'last3':>8}{'end time':>10}{'t(sync loss)':>14}"
          f"{f'loss@{common_time:.0f}s':>12}{'local steps':>13}")
    for name, row in table.items():
        reached = row["time_to_sync_loss"]
        print(f"{name:<21}{row['final_loss']:>8.3f}{row['last3_loss']:>8.3f}"
              f"{row['end_time']:>10.1f}{'-' if reached is None else f'{reached:.1f}':>14}"
              f"{row['loss_at_common_time']:>12.3f}{row['local_steps']:>13}")
    write_report({"model": dataclasses.asdict(model), "data": dataclasses.asdict(data),
                  "table": table, "runs": {k: dataclasses.asdict(v) for k, v in results.items()}},
                 args.out)


if __name__ == "__main__":
    main()
