"""Time to a target validation loss over a real slow link: each method as 2 processes (one
replica each, 4 fake CPU devices) in network namespaces joined by a shaped veth pair.

    python scripts/slow_link_time_to_loss.py [--link-mbit 100] [--steps 300] [--eval-every 20]
        [--methods ddp,local_sgd,diloco:fragments=2,...] [--target LOSS] [--runs-dir runs/slow_link]
        [--sync-every 8] [--warmup-steps 30] [--model-mbit 10] [--out results/slow_link.json]
        [--plot results/slow_link_loss_vs_wall_time.png]
        [key=value ...]

Every byte the two processes exchange crosses the link (edit_jax/slow_link.py; needs root and
iproute2): the script reads the veth's counters and reports them next to the compiled HLO's
replica bytes, which they must exceed. All methods train the same steps on the same batches
(equal tokens) with the same evaluation schedule; `a_edit` syncs every tau x edit's measured
step time; a `--methods` entry may carry method settings after colons (benchlib.method_spec). The target is the worst final validation loss of the methods (so all reach it)
unless `--target` is given; the table gives each method's wall-clock time to it and the ratio to
ddp's, measured in one invocation (the seconds are this machine's; the ratios are the result).
A second, MODELLED column (`--model-mbit`, labelled so) extrapolates to a slower link from the
bytes each run really sent, assuming communication does not overlap compute. Wall time counts
each run's loop, evaluation included (the same schedule for every method), compilation
excluded: `edit-jax train` compiles every step plan before its loop starts. A run that aborts
(gloo on CPU sometimes does, see docs/results.md, "Top-k over the slow link") is started again
from scratch, up to 3 times, and counted under `aborted_runs`. Resumable by method: one recorded
in `--out` with the same settings is not rerun; an interrupted one is measured again from the
start, since its link bytes must come from one run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

from benchlib import method_spec, run_rows, time_to, write_report

from edit_jax.launch import LINK_PORT, run_processes, train_commands
from edit_jax.slow_link import SlowLink

DEVICES_PER_PROCESS = 4


ATTEMPTS = 3  # per run: gloo on CPU sometimes aborts a 2-process run (docs/results.md)


def launch(link: SlowLink, settings: list[str], run_dir: Path) -> bool:
    """Whether the 2-process run in `run_dir` (from scratch) finished."""
    shutil.rmtree(run_dir, ignore_errors=True)
    commands = train_commands([*settings, f"run.run_dir={run_dir}", "run.progress=false"], 2,
                              DEVICES_PER_PROCESS, f"{link.address(0)}:{LINK_PORT}")
    print(" ".join(settings), file=sys.stderr, flush=True)
    return run_processes([link.command(i, c) for i, c in enumerate(commands)]) == 0


def train_once(link: SlowLink, settings: list[str], run_dir: Path) -> dict:
    """One measured 2-process run over the link: its rows, the bytes each process sent on the
    veth, and how many runs aborted before it (each started again from scratch, up to
    ATTEMPTS times)."""
    for aborted in range(ATTEMPTS):
        before = [link.sent_bytes(i) for i in range(2)]
        if launch(link, settings, run_dir):
            return {"rows": run_rows(run_dir), "aborted_runs": aborted,
                    "link_sent_bytes": [link.sent_bytes(i) - before[i] for i in range(2)]}
        print(f"{run_dir}: aborted, starting it again", file=sys.stderr, flush=True)
    raise SystemExit(f"{run_dir} failed {ATTEMPTS} times; see its output above")


def summary(run: dict) -> dict:
    rows = run["rows"]
    evals = [r for r in rows if "eval_loss" in r]
    trained = [r for r in rows if "loss" in r]
    hlo = trained[-1]["replica_bytes"] * DEVICES_PER_PROCESS  # one process's devices
    return {"final_eval_loss": evals[-1]["eval_loss"], "wall_time": trained[-1]["wall_time"],
            "tokens": trained[-1]["tokens"],
            "median_step_time": statistics.median(  # past the first row, where it can
                r["step_time"] for r in trained[1:] or trained),
            "hlo_replica_bytes_per_process": hlo,
            "link_sent_bytes": run["link_sent_bytes"], "aborted_runs": run["aborted_runs"],
            "link_over_hlo": min(run["link_sent_bytes"]) / hlo if hlo else None}


def modelled(rows: list[dict], target: float, result: dict, link_mbit: float,
              model_mbit: float) -> float | None:
    """MODELLED, not measured: the time to target had the link run at `model_mbit`, assuming
    (as with gloo on CPU) that communication does not overlap compute. The bytes sent by the
    target's row are its HLO replica bytes for this process's devices, scaled by what the link
    really carried over the whole run per HLO byte (evaluation and protocol overhead)."""
    row = next((r for r in rows if "eval_loss" in r and r["eval_loss"] <= target), None)
    if row is None or not result["link_over_hlo"]:
        return None
    sent = row["replica_bytes"] * DEVICES_PER_PROCESS * result["link_over_hlo"]
    return row["wall_time"] + sent * 8 / 1e6 * (1 / model_mbit - 1 / link_mbit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link-mbit", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--sync-every", type=int, default=8, help="tau of the local methods")
    parser.add_argument("--warmup-steps", type=int, default=30,
                        help="synchronous steps before the local methods' first local step")
    parser.add_argument("--methods", default="ddp,local_sgd,diloco,edit,a_edit")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--model-mbit", type=float, default=10.0,
                        help="also give a modelled time to target on a link of this rate")
    parser.add_argument("--runs-dir", default="runs/slow_link")
    parser.add_argument("--out", default="results/slow_link.json")
    parser.add_argument("--plot", default="results/slow_link_loss_vs_wall_time.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    methods = [method_spec(spec) for spec in args.methods.split(",")]
    names = [name for _, name, _ in methods]
    if "a_edit" in names and "edit" not in [label for label, _, _ in methods][
            :names.index("a_edit")]:
        raise SystemExit("a_edit's sync interval comes from edit's step time: list plain edit "
                         "first")

    out = Path(args.out)
    recorded = json.loads(out.read_text())["methods"] if out.exists() else {}
    common = ["mesh.replica=2", f"mesh.shard={DEVICES_PER_PROCESS}", f"run.steps={args.steps}",
              f"method.sync_every={args.sync_every}", f"method.warmup_steps={args.warmup_steps}",
              f"run.eval_every={args.eval_every}", "run.eval_batches=2",
              f"run.checkpoint_every={args.steps}", *args.overrides]
    results = {}
    with SlowLink(args.link_mbit) as link:
        for label, method, overrides in methods:
            settings = [*overrides, *common]
            if method == "a_edit":
                interval = args.sync_every * results["edit"]["median_step_time"]
                settings.append(f"method.sync_interval_seconds={round(interval, 3)}")
            if label in recorded and recorded[label]["settings"] == settings:
                print(f"{label}: recorded, not rerun", file=sys.stderr)
                results[label] = recorded[label]
                continue
            run_dir = Path(args.runs_dir) / re.sub(r"[^\w.=-]+", "_", label)  # one directory
            results[label] = {"settings": settings, "run_dir": str(run_dir),
                              **summary(train_once(link, settings, run_dir))}
            write_report({"link_mbit": args.link_mbit, "methods": results}, out)

    target = args.target or max(r["final_eval_loss"] for r in results.values())
    for method, result in results.items():
        rows = run_rows(result["run_dir"])
        result["time_to_target"] = time_to(rows, target)
        result[f"modelled_time_to_target_at_{args.model_mbit:g}_mbit"] = modelled(
            rows, target, result, args.link_mbit, args.model_mbit)
    base = results.get("ddp", {}).get("time_to_target")
    modelled_key = f"modelled_time_to_target_at_{args.model_mbit:g}_mbit"
    modelled_base = results.get("ddp", {}).get(modelled_key)
    print(f"\n2 processes over a {args.link_mbit:g} Mbit/s link, {args.steps} steps each; "
          f"target validation loss {target:.4f}")
    width = max(10, *(len(label) + 2 for label in results))
    print(f"{'method':<{width}}{'final val':>10}{'time to target':>16}{'vs ddp':>8}{'wall time':>11}"
          f"{'step time':>11}{'link MB sent':>14}{'link/HLO':>10}"
          f"{f'modelled at {args.model_mbit:g} Mbit/s':>26}")
    for method, r in results.items():
        t = r["time_to_target"]
        r["time_to_target_vs_ddp"] = t / base if t and base else None
        ratio = r["time_to_target_vs_ddp"]
        over = r["link_over_hlo"]
        m = r[modelled_key]
        r["modelled_vs_ddp"] = m / modelled_base if m and modelled_base else None
        m_ratio = r["modelled_vs_ddp"]
        m_text = "-" if m is None else f"{m:.1f}s" + (f" ({m_ratio:.2f})" if m_ratio else "")
        print(f"{method:<{width}}{r['final_eval_loss']:>10.4f}"
              f"{'-' if t is None else f'{t:.1f}s':>16}{'-' if ratio is None else f'{ratio:.2f}':>8}"
              f"{r['wall_time']:>10.1f}s{r['median_step_time']:>10.3f}s"
              f"{min(r['link_sent_bytes']) / 1e6:>14.1f}{'-' if over is None else f'{over:.2f}':>10}"
              f"{m_text:>26}")
    write_report({"link_mbit": args.link_mbit, "model_mbit": args.model_mbit, "steps": args.steps,
                  "target_eval_loss": target,
                  "methods": results}, out)
    if args.plot != "none":
        from edit_jax.plot import load_runs, save_plot

        runs = load_runs([r["run_dir"] for r in results.values()], labels=list(results))
        print(f"wrote {save_plot(runs, 'wall_time', args.plot)}", file=sys.stderr)


if __name__ == "__main__":
    main()
