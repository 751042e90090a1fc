"""Seed-002 comparison in the asynchronous Local-SGD simulator, on the paper's protocol: DiLoCo
(synchronous), naive asynchronous Nesterov (also at outer lr / W, which offsets its W-fold
weight per round), asynchronous delayed Nesterov (DN) and DN with dynamic local updates (DyLU).

    python scripts/sim_async.py [--local-steps 50] [--budget 8000] [--pretrain-steps 2000]
        [--min-lr-ratio 0.05] [--d-model 64] [--layers 4] [--seq-len 64] [--rows 4]
        [--step-times 0.58,0.75,1.51,3.33] [--seed 0] [--out results/sim_async.json]
        [--plot results/sim_async.png]

As in the paper (arXiv 2401.09135, section 4): every rule starts from the same model pretrained
synchronously (`--pretrain-steps` AdamW steps on the global batch), runs H = 50 local steps per
worker and round on 4 workers of fixed speeds (the step times of the authors' public notebook;
the paper's text gives them only as a figure), and all rules get the same budget of local steps
over all workers (the paper's "updates"), with the inner learning rate on a cosine over that
budget. The table gives, at equal local steps, the final validation loss and the mean of the
last three evaluations; at equal simulated time, the loss each rule had evaluated when the
fastest rule ended, and when each first reached DiLoCo's final loss. Times are the simulator's
faked seconds, not this machine's. The PNG shows loss against local steps and against
simulated time.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from benchlib import write_report
from matplotlib.figure import Figure

from edit_jax.async_sim import PAPER_STEP_TIMES, SimConfig, SimResult, pretrained, simulate
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


def plot(results: dict[str, SimResult], path: str) -> None:
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    by_steps, by_time = fig.subplots(1, 2, sharey=True)
    for name, result in results.items():
        evals = result.evals
        losses = [e["eval_loss"] for e in evals]
        by_steps.plot([e["local_steps"] for e in evals], losses, label=name)
        by_time.plot([e["time"] for e in evals], losses, label=name)
    start = next(iter(results.values())).evals[0]["eval_loss"]  # the pretrained model's
    lowest = min(e["eval_loss"] for r in results.values() for e in r.evals)
    by_steps.set_ylim(lowest - 0.05, start + 0.3)  # diverging rules leave the frame
    by_steps.set_xlabel("local steps over all workers (the paper's updates)")
    by_time.set_xlabel("simulated seconds")
    by_steps.set_ylabel("validation loss")
    by_steps.legend()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-steps", type=int, default=50, help="H")
    parser.add_argument("--budget", type=int, default=8000,
                        help="local steps over all workers per rule (the paper's updates)")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--min-lr-ratio", type=float, default=0.05)
    parser.add_argument("--step-times", default=",".join(map(str, PAPER_STEP_TIMES)),
                        help="simulated seconds per local step, one per worker")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4, help="sequences per worker per step")
    parser.add_argument("--eval-every", type=int, default=8, help="in pseudo-gradients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/sim_async.json")
    parser.add_argument("--plot", default="results/sim_async.png")
    args = parser.parse_args()

    step_times = tuple(float(t) for t in args.step_times.split(","))
    model = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                        d_ff=3 * args.d_model, max_seq_len=args.seq_len, remat="none")
    data = DataConfig(seq_len=args.seq_len, global_batch_size=args.rows * len(step_times),
                      shuffle_seed=args.seed)
    base = SimConfig(step_times=step_times, local_steps=args.local_steps,
                     num_local_steps=args.budget, pretrain_steps=args.pretrain_steps,
                     min_lr_ratio=args.min_lr_ratio, eval_every=args.eval_every, eval_batches=8,
                     seed=args.seed)
    pretrained(model, data, base.seed, base.pretrain_steps, base.inner_lr, base.weight_decay,
               base.clip_norm)  # shared by every rule
    results = {}
    for name, sim in methods(base).items():
        results[name] = simulate(model, data, sim)
        print(f"{name}: final eval loss {results[name].evals[-1]['eval_loss']:.4f}", flush=True)

    target = results["diloco_sync"].evals[-1]["eval_loss"]
    common_time = min(r.evals[-1]["time"] for r in results.values())
    table = {name: summary(r, target, common_time) for name, r in results.items()}
    pretrained_loss = results["diloco_sync"].evals[0]["eval_loss"]
    print(f"\npretrained ({args.pretrain_steps} steps): val loss {pretrained_loss:.4f}; "
          f"budget {args.budget} local steps per rule")
    print(f"{'method':<21}{'final':>8}{'last3':>8}{'end time':>10}{'t(sync loss)':>14}"
          f"{f'loss@{common_time:.0f}s':>12}{'updates':>9}{'local steps':>13}")
    for name, row in table.items():
        reached = row["time_to_sync_loss"]
        print(f"{name:<21}{row['final_loss']:>8.4f}{row['last3_loss']:>8.4f}"
              f"{row['end_time']:>10.1f}{'-' if reached is None else f'{reached:.1f}':>14}"
              f"{row['loss_at_common_time']:>12.4f}{row['updates']:>9}{row['local_steps']:>13}")
    write_report({"model": dataclasses.asdict(model), "data": dataclasses.asdict(data),
                  "pretrained_eval_loss": pretrained_loss, "common_time": common_time,
                  "table": table, "runs": {k: dataclasses.asdict(v) for k, v in results.items()}},
                 args.out)
    if args.plot != "none":
        plot(results, args.plot)


if __name__ == "__main__":
    main()
