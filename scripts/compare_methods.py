"""Method comparison at equal tokens: runs a list of methods (and settings) on one config,
resumably, and writes their final losses, bytes over `replica` and curves.

    python scripts/compare_methods.py [--config FILE] [--methods ddp,local_sgd,diloco:fragments=2,...]
        [--vary method.outer_lr=0.7,1.0 ...] [--steps 300] [--runs-dir runs/compare]
        [--out results/compare.json] [--plots results/compare] [key=value ...]

Every run trains `--steps` steps on the same batches from its own run directory
(`<runs-dir>/<label>`); `ddp` is the baseline and runs once, every other method runs once per
combination of the `--vary` values (a sweep). A `--methods` entry may carry method settings
after colons (`diloco:fragments=2:fragment_delay=1`). The script is resumable: a run already recorded in
`--out` with the same settings is not rerun, and an interrupted run resumes from its checkpoint;
recorded runs an invocation does not plan stay in `--out`, so the invocations of a sweep add up.
Each row has the final validation loss, its difference to ddp's, the tokens, the cumulative
bytes each device sent over `replica` (from the compiled HLO, see `metrics.jsonl`), and the
mean and peak replica bytes per step over a sync period and the mean wire bytes per step
(`edit-jax inspect`'s figures; compressed syncs are compared on wire bytes). The PNGs
(`edit-jax plot`) show loss against tokens and against replica bytes, and the final loss of
each run against its wire bytes per step with the Pareto front marked; loss against wall time
over a slow link comes from `scripts/slow_link_time_to_loss.py`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from benchlib import method_spec, run_rows, write_report

BASELINE = "ddp"


def runs(specs: list[str], vary: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{label: (method, overrides)}: the baseline once, every other method per combination."""
    axes = []
    for item in vary:
        key, _, values = item.partition("=")
        if not values:
            raise SystemExit(f"--vary {item!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={value}" for value in values.split(",")])
    out = {}
    for spec in specs:
        name, method, overrides = method_spec(spec)
        combos = [()] if method == BASELINE else list(itertools.product(*axes))
        for combo in combos:
            settings = " ".join(o.partition("=")[0].rpartition(".")[2] + "=" + o.partition("=")[2]
                                for o in combo)
            out[f"{name} {settings}".strip()] = (method, [*overrides, *combo])
    return out


def kept(recorded: dict[str, dict], rows: list[dict]) -> list[dict]:
    """The recorded runs this invocation did not plan: they stay in the results file, so that
    a sweep's invocations add up."""
    planned = {row["label"] for row in rows}
    return [row for label, row in recorded.items() if label not in planned]


def final_row(run_dir: Path) -> dict:
    """The last train row's cumulative replica bytes and the last evaluation, from a run's
    metrics file."""
    rows = run_rows(run_dir)
    evals = [r for r in rows if "eval_loss" in r]
    trained = [r for r in rows if "loss" in r]
    return {"final_eval_loss": evals[-1]["eval_loss"], "tokens": trained[-1]["tokens"],
            "replica_bytes": trained[-1].get("replica_bytes"),
            "wall_time_s": trained[-1]["wall_time"]}


def step_bytes(cfg) -> dict:
    """The compiled program's replica bytes per step, mean and peak over a sync period, and the
    mean wire bytes (what a compressed sync saves is counted in them, see inspect_steps)."""
    from edit_jax.inspect_steps import inspect_program
    from edit_jax.program import build_program
    from edit_jax.data import load_tokenizer

    vocab_size = cfg.model.vocab_size or load_tokenizer(cfg.data).vocab_size
    report = inspect_program(build_program(cfg, vocab_size), compare_fp32=False)
    return {key: report[key] for key in ("replica_bytes_per_step", "replica_bytes_peak_per_step",
                                         "replica_wire_bytes_per_step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--methods", default="ddp,local_sgd,diloco,edit,a_edit",
                        help="comma-separated NAME[:KEY=VALUE...] entries")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep a setting over the non-baseline methods (repeatable)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs-dir", default="runs/compare")
    parser.add_argument("--out", default="results/compare.json")
    parser.add_argument("--plots", default="results/compare",
                        help="PNG path prefix; 'none' for no plots")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    planned = runs(args.methods.split(","), args.vary)

    from edit_jax.config import load_config
    from edit_jax.mesh import start_jax

    def config(label: str, overrides: list[str]):
        return load_config(args.config, [
            *args.overrides, *overrides, f"run.steps={args.steps}",
            f"run.run_dir={Path(args.runs_dir) / label.replace(' ', '_')}",
            "run.progress=false"])

    start_jax(config(BASELINE, []).mesh)
    from edit_jax.train import train

    out = Path(args.out)
    done = {row["label"]: row for row in
            (json.loads(out.read_text())["runs"] if out.exists() else [])}
    rows = []
    for label, (method, overrides) in planned.items():
        settings = [*args.overrides, *overrides, f"run.steps={args.steps}"]
        cfg = config(label, overrides)
        if label in done and done[label]["settings"] == settings:
            print(f"{label}: recorded, not rerun")
            rows.append({**step_bytes(cfg), **done[label]})
            continue
        print(f"{label}: training {args.steps} steps in {cfg.run.run_dir}", flush=True)
        train(cfg)
        rows.append({"label": label, "method": method, "settings": settings,
                     "run_dir": cfg.run.run_dir, **final_row(Path(cfg.run.run_dir)),
                     **step_bytes(cfg)})
        write_report({"config": args.config or "tiny", "steps": args.steps,
                      "runs": rows + kept(done, rows)}, out)
    rows += kept(done, rows)

    baseline = next((r for r in rows if r["method"] == BASELINE), None)
    print(f"{'run':<44} | {'val loss':>8} | {'vs ddp':>7} | {'tokens':>10} | {'replica bytes':>14}"
          f" | {'B/step mean':>11} | {'B/step peak':>11} | {'wire B/step':>11}")
    for row in rows:
        if baseline is not None:
            row["vs_ddp"] = row["final_eval_loss"] - baseline["final_eval_loss"]
        delta = f"{row['vs_ddp']:+7.4f}" if "vs_ddp" in row else f"{'-':>7}"
        sent = row["replica_bytes"]
        mean, peak, wire = (row.get(f"replica{k}_per_step")
                            for k in ("_bytes", "_bytes_peak", "_wire_bytes"))
        print(f"{row['label']:<44} | {row['final_eval_loss']:8.4f} | {delta} | "
              f"{row['tokens']:>10,} | {'-' if sent is None else f'{sent:,.0f}':>14} | "
              f"{'-' if mean is None else f'{mean:,.0f}':>11} | "
              f"{'-' if peak is None else f'{peak:,.0f}':>11} | "
              f"{'-' if wire is None else f'{wire:,.0f}':>11}")
    write_report({"config": args.config or "tiny", "steps": args.steps, "runs": rows}, out)
    if args.plots != "none":
        from edit_jax.plot import load_runs, plot_final_vs_bytes, save_figure, save_plot

        curves = load_runs([r["run_dir"] for r in rows], labels=[r["label"] for r in rows])
        for x in ("tokens", "replica_bytes"):
            save_plot(curves, x, f"{args.plots}_loss_vs_{x}.png")
        save_figure(plot_final_vs_bytes(rows), f"{args.plots}_final_loss_vs_wire_bytes.png")


if __name__ == "__main__":
    main()
