"""Asynchronous Local-SGD in the simulator, on the paper's protocol: DiLoCo (synchronous), naive
asynchronous Nesterov, asynchronous delayed Nesterov (DN) and DN with dynamic local updates
(DyLU), each at its best outer learning rate, under two grace periods and several seeds.

    python scripts/sim_async.py [--outer-lrs 0.1,0.3,0.7] [--graces 0.5,cover] [--seeds 0,1]
        [--jitter 0.1] [--local-steps 50] [--budget 4000] [--pretrain-steps 1000]
        [--min-lr-ratio 0.05] [--d-model 64] [--layers 4] [--seq-len 64] [--rows 4]
        [--step-times 0.58,0.75,1.51,3.33] [--out results/sim_async.json]
        [--plot results/sim_async.png]

As in the paper (arXiv 2401.09135, section 4): every rule starts from the same model pretrained
synchronously (`--pretrain-steps` AdamW steps on the global batch), runs H local steps per
worker and task on 4 workers (the step times of the authors' public notebook, each task's
scaled by U(1 - j, 1 + j) with j = `--jitter`), and all rules get the same budget of local
steps over all workers (the paper's "updates"), with the inner learning rate on a cosine over
that budget. The paper tunes the outer learning rate per rule; so does this script, but to fit
one CPU core it sweeps `--outer-lrs` at the first seed and the first grace period only, then
runs each rule's best rate (lowest mean of the last three evaluations) at every seed and grace
period. `cover` is a grace period that covers DyLU's finish spread: the latest minus the
earliest possible finish of a DyLU task under the jitter. The table gives, per rule and grace,
the final validation loss and the mean of the last three evaluations at equal local steps, and
at equal simulated time the loss each rule had evaluated when the fastest run of its seed
ended. Times are the simulator's faked seconds, not this machine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
from benchlib import write_report
from matplotlib.figure import Figure

from edit_jax.async_sim import (PAPER_STEP_TIMES, SimConfig, SimResult, local_step_counts,
                                pretrained, simulate)
from edit_jax.config import DataConfig, ModelConfig

RULES = {"diloco_sync": {"outer": "sync"},
         "async_nesterov": {"outer": "nesterov"},
         "async_dn": {"outer": "delayed_nesterov"},
         "async_dn_dylu": {"outer": "delayed_nesterov", "dylu": True}}


def covering_grace(base: SimConfig) -> float:
    """The latest minus the earliest finish of a DyLU task over all workers and jitter draws."""
    counts = local_step_counts(base.step_times, base.local_steps, dylu=True)
    ends = [n * t for n, t in zip(counts, base.step_times)]
    return max(ends) * (1 + base.step_time_jitter) - min(ends) * (1 - base.step_time_jitter)


def tail(result: SimResult) -> float:
    """Mean of the last three evaluations; a diverged run (nan) counts as +inf."""
    value = float(np.mean([e["eval_loss"] for e in result.evals[-3:]]))
    return value if math.isfinite(value) else math.inf


def finite(value: float) -> float | None:
    """`value`, or None (JSON null) for a diverged run's inf or nan."""
    return value if math.isfinite(value) else None


def summary(result: SimResult, target: float, common_time: float) -> dict:
    """Final loss, mean of the last three evals, end time, time to reach `target`, the loss at
    `common_time`, the work done and the mean staleness of the pseudo-gradients."""
    evals = result.evals
    reached = [e["time"] for e in evals if e["eval_loss"] <= target]
    return {"final_loss": finite(evals[-1]["eval_loss"]), "last3_loss": finite(tail(result)),
            "end_time": evals[-1]["time"],
            "time_to_sync_loss": reached[0] if reached else None,
            "loss_at_common_time": [e["eval_loss"] for e in evals if e["time"] <= common_time][-1],
            "updates": evals[-1]["updates"], "local_steps": evals[-1]["local_steps"],
            "mean_staleness": float(np.mean([a["staleness"] for a in result.arrivals]))}


def plot(results: dict[tuple, SimResult], seed: int, first_grace: float, pretrained_loss: float,
         path: str) -> None:
    """Loss against local steps and against simulated seconds for one seed's runs (solid: the
    first grace period, dashed: the others); the y-range spans the non-diverged runs' losses
    from a quarter of the budget on."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    by_steps, by_time = fig.subplots(1, 2, sharey=True)
    colors = dict(zip(RULES, ("black", "tab:red", "tab:blue", "tab:green")))
    shown = []
    for (rule, grace, run_seed), result in results.items():
        if run_seed != seed:
            continue
        evals = result.evals
        losses = [e["eval_loss"] for e in evals]
        label = rule if grace is None else f"{rule}, grace {grace:.1f} s"
        style = {"color": colors[rule], "linestyle": "-" if grace in (None, first_grace) else "--"}
        by_steps.plot([e["local_steps"] for e in evals], losses, label=label, **style)
        by_time.plot([e["time"] for e in evals], losses, **style)
        budget = evals[-1]["local_steps"]
        shown += [e["eval_loss"] for e in evals if e["local_steps"] >= budget / 4
                  and e["eval_loss"] < pretrained_loss]
    by_steps.set_ylim(min(shown) - 0.01, max(shown) + 0.01)
    by_steps.set_xlabel("local steps over all workers (the paper's updates)")
    by_time.set_xlabel("simulated seconds")
    by_steps.set_ylabel(f"validation loss (seed {seed})")
    by_steps.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-lrs", default="0.1,0.3,0.7")
    parser.add_argument("--graces", default="0.5,cover",
                        help="grace periods in seconds; 'cover' = DyLU's finish spread")
    parser.add_argument("--seeds", default="0,1", help="model, data order and jitter seeds")
    parser.add_argument("--jitter", type=float, default=0.1, help="step-time jitter j")
    parser.add_argument("--local-steps", type=int, default=50, help="H")
    parser.add_argument("--budget", type=int, default=4000,
                        help="local steps over all workers per rule (the paper's updates)")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--min-lr-ratio", type=float, default=0.05)
    parser.add_argument("--step-times", default=",".join(map(str, PAPER_STEP_TIMES)),
                        help="simulated seconds per local step, one per worker")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rows", type=int, default=4, help="sequences per worker per step")
    parser.add_argument("--eval-every", type=int, default=8, help="in pseudo-gradients")
    parser.add_argument("--out", default="results/sim_async.json")
    parser.add_argument("--plot", default="results/sim_async.png")
    args = parser.parse_args()

    step_times = tuple(float(t) for t in args.step_times.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    outer_lrs = [float(lr) for lr in args.outer_lrs.split(",")]
    model = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                        d_ff=3 * args.d_model, max_seq_len=args.seq_len, remat="none")
    base = SimConfig(step_times=step_times, local_steps=args.local_steps,
                     num_local_steps=args.budget, pretrain_steps=args.pretrain_steps,
                     min_lr_ratio=args.min_lr_ratio, step_time_jitter=args.jitter,
                     eval_every=args.eval_every, eval_batches=8)
    graces = [covering_grace(base) if g == "cover" else float(g)
              for g in args.graces.split(",")]

    def data(seed: int) -> DataConfig:
        return DataConfig(seq_len=args.seq_len, global_batch_size=args.rows * len(step_times),
                          shuffle_seed=seed)

    def run(rule: str, grace: float, seed: int, outer_lr: float) -> SimResult:
        sim = dataclasses.replace(base, **RULES[rule], grace_seconds=grace, seed=seed,
                                  outer_lr=outer_lr)
        pretrained(model, data(seed), seed, sim.pretrain_steps, sim.inner_lr, sim.weight_decay,
                   sim.clip_norm)
        result = simulate(model, data(seed), sim)
        print(f"{rule} grace {grace:.2f} seed {seed} outer lr {outer_lr}: final eval loss "
              f"{result.evals[-1]['eval_loss']:.4f}, last 3 {tail(result):.4f}", flush=True)
        return result

    sweep = {rule: {lr: run(rule, graces[0], seeds[0], lr) for lr in outer_lrs}
             for rule in RULES}
    best = {rule: min(outer_lrs, key=lambda lr, r=rule: tail(sweep[r][lr])) for rule in RULES}
    results = {}  # (rule, grace or None for sync, seed) -> SimResult
    for seed in seeds:
        for rule in RULES:
            for grace in [None] if rule == "diloco_sync" else graces:
                if seed == seeds[0] and grace in (None, graces[0]):
                    results[rule, grace, seed] = sweep[rule][best[rule]]
                else:
                    results[rule, grace, seed] = run(rule, graces[0] if grace is None else grace,
                                                     seed, best[rule])

    table = {}
    for (rule, grace, seed), result in results.items():
        target = results["diloco_sync", None, seed].evals[-1]["eval_loss"]
        common = min(r.evals[-1]["time"] for (_, _, s), r in results.items() if s == seed)
        name = rule if grace is None else f"{rule}|grace={grace:.2f}"
        row = table.setdefault(name, {"outer_lr": best[rule], "seeds": {}})
        row["seeds"][seed] = {**summary(result, target, common), "common_time": common}
    for row in table.values():
        for key in ("final_loss", "last3_loss", "loss_at_common_time", "end_time"):
            values = [s[key] for s in row["seeds"].values()]
            row[f"mean_{key}"] = None if None in values else float(np.mean(values))

    pretrained_losses = {seed: results["diloco_sync", None, seed].evals[0]["eval_loss"]
                         for seed in seeds}
    print(f"\npretrained ({args.pretrain_steps} steps): val loss {pretrained_losses}; budget "
          f"{args.budget} local steps per rule; means over seeds {seeds}")
    print(f"{'run':<30}{'lr':>5}{'final':>8}{'last3':>8}{'end time':>10}{'loss@common':>13}"
          f"{'staleness':>11}")
    for name, row in table.items():
        staleness = np.mean([s["mean_staleness"] for s in row["seeds"].values()])
        final, last3, common = (row[f"mean_{k}"] or math.nan for k in
                                ("final_loss", "last3_loss", "loss_at_common_time"))
        print(f"{name:<30}{row['outer_lr']:>5}{final:>8.4f}{last3:>8.4f}"
              f"{row['mean_end_time']:>10.1f}{common:>13.4f}{staleness:>11.2f}")
    write_report({"model": dataclasses.asdict(model), "data": dataclasses.asdict(data(seeds[0])),
                  "graces": graces, "seeds": seeds, "pretrained_eval_loss": pretrained_losses,
                  "sweep": {rule: {str(lr): {"final_loss": finite(r.evals[-1]["eval_loss"]),
                                             "last3_loss": finite(tail(r))}
                                   for lr, r in by_lr.items()}
                            for rule, by_lr in sweep.items()},
                  "best_outer_lr": best, "table": table,
                  "runs": {f"{rule}|grace={grace}|seed={seed}": {"config": r.config,
                                                                 "evals": r.evals}
                           for (rule, grace, seed), r in results.items()}},
                 args.out)
    if args.plot != "none":
        plot(results, seeds[0], graces[0], pretrained_losses[seeds[0]], args.plot)


if __name__ == "__main__":
    main()
