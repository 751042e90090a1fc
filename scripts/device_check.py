"""The whole one-GPU measurement in one run of at most 8 minutes (scripts/device_check.sh installs
what is missing, then runs this).

    python scripts/device_check.py [--smoke] [--out results/device_check.json] [--total-s 465]

Parts, each in a fresh process with a timeout from its budget (BUDGET_S: seconds on an H200,
compilation included), so that a hang, crash or out-of-memory stays in its part:
  - `350m` and `1b` with `model.attention=xla` and `cudnn`: tokens/s, MFU and peak device memory
    of the DDP train step on one device (scripts/bench_gpu.py's case), against the peak of
    the compiled step's memory analysis (what `edit-jax inspect` reports);
  - edit's sync step against its local step and its DDP warm-up step on one device
    (scripts/bench_sync_step.py), with fp32 syncs and with `method.compression=int8`.
After each part the JSON file is rewritten (atomically) with every part so far, a failed one as
{"part", "status": "failed", "error": one line, "stderr_tail"}, and one line is printed; at the
end, Markdown tables for docs/multihost.md's device check. A part whose budget would end past
`--total-s` gets only the time left. The exit status is 0 even when parts fail; they are listed.

`--smoke` (and any run where JAX's default backend is the CPU) runs the same parts on the tiny
config, 8 x 128 tokens, 3 timed steps, into results/device_check_cpu_smoke.json; there cuDNN
attention does not compile, so its part fails, which exercises the failure path.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from bench_gpu import MODEL_FLOPS_FORMULA, one_device, peak_flops
from benchlib import default_backend, run_in_child, write_report

SCRIPTS = Path(__file__).resolve().parent
STEPS, SMOKE_STEPS = 10, 3
VOCAB = 257  # only for model.vocab_size=0 (tiny); 350m and 1b have 32000
# Seconds per part on an H200 (8 x 2048 tokens per step; each includes ~10-15 s of process
# start-up, CUDA and state init, 2 warm-up and STEPS timed calls), 450 s in all: a 350m step
# compiles in ~20-30 s and takes ~0.1 s, a 1b step ~30-45 s and ~0.35 s; "sync" compiles three
# plans of 350m (DDP, local, sync), "sync int8" two (no warm-up: int8 changes only the sync).
BUDGET_S = {"350m": 50, "1b": 85, "sync": 105, "sync int8": 75}
SMOKE_PART_S = 90  # a cap only: a tiny part takes 1-15 s on 2 CPU cores
MIN_PART_S = 10  # a part given less than this is not started


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    script: str  # bench_gpu.py (throughput) or bench_sync_step.py (step plans)
    config: str
    overrides: tuple[str, ...]
    budget_s: int


def parts(smoke: bool) -> list[Part]:
    """What to measure, in order, with BUDGET_S (or SMOKE_PART_S). The sync parts pin XLA
    attention: their ratios are about the sync, and they should not depend on cuDNN."""
    batch = one_device(8, None if smoke else 2048)
    budget = (lambda name: SMOKE_PART_S) if smoke else BUDGET_S.get
    configs = ("tiny",) if smoke else ("350m", "1b")
    out = [Part(f"{config} attention={attention}", "bench_gpu.py", config,
                ("method.name=ddp", f"model.attention={attention}", *batch), budget(config))
           for config in configs for attention in ("xla", "cudnn")]
    config = "tiny" if smoke else "350m"
    edit = ("method.name=edit", "model.attention=xla", *batch)
    out.append(Part(f"edit sync step ({config})", "bench_sync_step.py", config, edit,
                    budget("sync")))
    out.append(Part(f"edit sync step int8 ({config})", "bench_sync_step.py", config,
                    (*edit, "method.compression=int8", "method.warmup_steps=0"),
                    budget("sync int8")))
    return out


def run_part(part: Part, timeout: float, steps: int) -> dict:
    """The part's row: its script's case in a fresh process, at most `timeout` seconds."""
    start = time.perf_counter()
    row = run_in_child(SCRIPTS / part.script, [part.config, list(part.overrides), steps, VOCAB],
                       timeout)
    status = "failed" if "error" in row else "ok"
    return {"part": part.name, "status": status, "config": part.config,
            "overrides": list(part.overrides), "budget_s": round(timeout),
            "wall_s": round(time.perf_counter() - start, 1), **row}


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def _plan_time(row: dict, kind: str) -> float | None:
    """The step time of the row's plan of this kind (the first, if several)."""
    return next((p["step_time_s"] for p in row["plans"].values() if p["kind"] == kind), None)


THROUGHPUT_COLUMNS = ("config", "attention", "tokens per step", "step time", "tokens/s", "MFU",
                      "peak memory (measured)", "compiled peak (inspect)", "measured / compiled")
PLANS_COLUMNS = ("method", "syncs", "DDP step", "local step", "sync step", "sync / local",
                 "DDP / local", "peak memory (measured)", "compiled peak (inspect, largest plan)")


def throughput_cells(r: dict) -> list[str]:
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    measured, compiled = r["measured_peak_bytes"], r["compiled_memory"]["peak"]
    return [f"`{r['config']}`", r["attention"], f"{r['batch']} x {r['seq_len']}",
            _ms(r["step_time_s"]), f"{r['tokens_per_s']:,.0f}", mfu, _gb(measured),
            _gb(compiled), _ratio(measured, compiled)]


def plans_cells(r: dict) -> list[str]:
    ddp, local, sync = (_plan_time(r, kind) for kind in ("ddp", "local", "sync"))
    return [f"`{r['method']}` `{r['config']}`",
            "fp32" if r["compression"] == "none" else r["compression"], _ms(ddp), _ms(local),
            _ms(sync), _ratio(sync, local), _ratio(ddp, local), _gb(r["measured_peak_bytes"]),
            _gb(r["compiled_peak_bytes"])]


def summary(row: dict) -> str:
    """One line of a finished part: its cells after the first two (which name the part)."""
    if row["status"] == "failed":
        return f"FAILED: {row['error']}"
    columns, cells = ((PLANS_COLUMNS, plans_cells(row)) if "plans" in row
                      else (THROUGHPUT_COLUMNS, throughput_cells(row)))
    return ", ".join(f"{column} {cell}" for column, cell in list(zip(columns, cells))[2:])


def notes(report: dict) -> str:
    """What the tables' numbers are."""
    peak = report["peak_bf16_flops_per_s"]
    mfu = ("no MFU on CPU" if report["smoke"] else
           f"MFU = model FLOPs / step time / {peak / 1e12:.0f} TFLOP/s (dense bf16 peak)"
           if peak else "MFU: no dense bf16 peak known for this device")
    device = report["device"] or "no part ran"
    text = (f"{device}, {report['wall_s']:.0f} s. {mfu}; model FLOPs per step = "
            f"{MODEL_FLOPS_FORMULA}, attention over the full T x T. On one device the sync "
            "step's collectives vanish: what it adds to the local step is its own compute.")
    if report["smoke"]:
        text += " CPU smoke test: it checks that every part runs; times are not GPU numbers."
    return text


def tables(rows: list[dict]) -> str:
    """The finished parts as markdown tables (throughput, then step plans), then the failures."""
    lines = []
    for columns, cells, is_kind in ((THROUGHPUT_COLUMNS, throughput_cells, lambda r: "mfu" in r),
                                    (PLANS_COLUMNS, plans_cells, lambda r: "plans" in r)):
        lines += [f"| {' | '.join(columns)} |", "| --- " * len(columns) + "|"]
        lines += [f"| {' | '.join(cells(r))} |" for r in rows if r["status"] == "ok" and is_kind(r)]
        lines.append("")
    failed = [r for r in rows if r["status"] == "failed"]
    lines += [f"failed parts: {len(failed)}"] + [f"- {r['part']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: the tiny config, results/device_check_cpu_smoke.json")
    parser.add_argument("--out", default=None, help="default: results/device_check.json, or "
                        "results/device_check_cpu_smoke.json for the smoke test")
    parser.add_argument("--total-s", type=float, default=465,
                        help="seconds for all parts together (smoke: 4 x the parts' cap)")
    args = parser.parse_args()
    started = time.perf_counter()

    backend = default_backend()
    if backend == "cpu" and not args.smoke:
        print("the device check needs a GPU (JAX's default backend is the CPU): running the "
              "smoke test (--smoke) instead", flush=True)
        args.smoke = True
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the parts' processes inherit it
        args.total_s = min(args.total_s, 4 * SMOKE_PART_S)
    out = args.out or ("results/device_check_cpu_smoke.json" if args.smoke
                       else "results/device_check.json")
    todo = parts(args.smoke)
    report = {"backend": backend, "smoke": args.smoke, "total_budget_s": args.total_s,
              "model_flops_formula": MODEL_FLOPS_FORMULA, "parts": []}
    print(f"device check ({'smoke test, ' if args.smoke else ''}{len(todo)} parts, "
          f"{args.total_s:.0f} s at most) -> {out}", flush=True)
    for number, part in enumerate(todo, 1):
        left = args.total_s - (time.perf_counter() - started)
        if left < MIN_PART_S:
            row = {"part": part.name, "status": "failed",
                   "error": f"not run: {max(left, 0):.0f} s of the total budget left"}
        else:
            row = run_part(part, min(part.budget_s, left), SMOKE_STEPS if args.smoke else STEPS)
        report["parts"].append(row)
        kind = next((r["device_kind"] for r in report["parts"] if "device_kind" in r), None)
        report["device"] = f"1 x {kind}" if kind else None
        report["peak_bf16_flops_per_s"] = None if kind is None or args.smoke else peak_flops(kind)
        report["failed"] = [r["part"] for r in report["parts"] if r["status"] == "failed"]
        report["wall_s"] = round(time.perf_counter() - started, 1)
        write_report(report, out)
        print(f"[{number}/{len(todo)}] {part.name} ({row.get('wall_s', 0):.0f} s): "
              f"{summary(row)}", flush=True)

    print(f"\n{notes(report)}\n\n{tables(report['parts'])}", flush=True)


if __name__ == "__main__":
    main()
