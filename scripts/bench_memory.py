"""Compiled memory per device of the train steps of the large configs, on fake CPU devices.

    python scripts/bench_memory.py [--cases 350m,1b,7b] [--out results/memory.json]
                                   [--before results/memory.json] [key=value ...]

For each case (a config and a mesh, CASES below) it builds the run's Program exactly as
`edit-jax inspect` does, compiles every step plan the method runs from abstract values (nothing
is allocated; about 15-20 s a case) and reads XLA's buffer assignment per device
(`inspect_hlo.memory_stats`: peak = arguments + outputs + temporaries - aliased). The table gives
the largest peak over the step plans, split into the step's arguments (parameters, AdamW and
outer state, batch) and temporaries (activations, gathered layers, logits, gradients), next to
the sizes of the terms that dominated before (the full float32 logits and attention scores) and
the one that dominates now (the layer inputs remat=full saves for the backward pass; the CPU
backend holds them as a float32 copy, twice their bf16 size, and computes the bf16 matmuls'
temporaries in float32, so a GPU needs less than these figures).
The numbers describe the current code; `--before FILE` copies a previous report's results into
this one under "before" (the committed results/memory.json keeps, there, the numbers measured at
the parent commit of the chunked loss and attention: full (B, T, V) float32 logits and
(B, N, T, T) attention scores). Extra `key=value` overrides apply to every case (e.g.
model.loss_chunk_tokens=0 model.attention_chunk_tokens=0 for the unchunked model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchlib import write_report

# name -> (config, overrides). The mesh is chosen so the per-device batch is the config's real
# one on a cluster of 8-GPU hosts (global batch / (R x 8)) where that compiles here; 7b keeps one
# replica of 8 shards (R only adds outer state, and 64 fake devices do not fit in this machine).
CASES = {
    "350m": ("350m", ["mesh.replica=2", "mesh.shard=8", "mesh.num_cpu_devices=16"]),
    "1b": ("1b", ["mesh.replica=2", "mesh.shard=8", "mesh.num_cpu_devices=16"]),
    "7b": ("7b", ["mesh.replica=1", "mesh.shard=8", "mesh.num_cpu_devices=8",
                  "data.global_batch_size=128"]),
}


def measure(config: str, overrides: list[str]) -> dict:
    """One case in a fresh process (the fake device count is fixed at JAX start-up)."""
    import subprocess

    code = ("import json, sys; sys.path.insert(0, 'scripts'); import bench_memory as b; "
            f"print(json.dumps(b._measure_here({config!r}, {overrides!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise SystemExit(f"{config} {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_here(config: str, overrides: list[str]) -> dict:
    from edit_jax.config import load_config
    from edit_jax.mesh import start_jax

    cfg = load_config(config, overrides)
    start_jax(cfg.mesh)
    from edit_jax.inspect_hlo import memory_stats
    from edit_jax.inspect_steps import compile_steps
    from edit_jax.program import build_program

    start = time.perf_counter()
    program = build_program(cfg, cfg.model.vocab_size)
    compiled = compile_steps(program)
    steps = {plan.name(program.method.num_layers): memory_stats(step)
             for plan, step in compiled.items()}
    worst = max(steps, key=lambda k: steps[k]["peak"])
    mesh = program.layout.mesh
    rows_per_device = cfg.data.global_batch_size // (mesh.shape["replica"] * mesh.shape["shard"])
    return {
        "config": config, "overrides": overrides, "method": program.method.name,
        "mesh": f"{mesh.shape['replica']}x{mesh.shape['shard']}",
        "num_params": program.num_params, "tokens_per_device": rows_per_device * cfg.data.seq_len,
        "batch_per_device": f"{rows_per_device} x {cfg.data.seq_len}",
        "vocab_size": cfg.model.vocab_size, "remat": cfg.model.remat,
        "loss_chunk_tokens": getattr(cfg.model, "loss_chunk_tokens", None),
        "attention_chunk_tokens": getattr(cfg.model, "attention_chunk_tokens", None),
        # the sizes of the terms that dominated or dominate the peak (see the module docstring)
        "full_logits_f32_bytes": rows_per_device * cfg.data.seq_len * cfg.model.vocab_size * 4,
        "full_attention_scores_f32_bytes":
            rows_per_device * cfg.model.n_heads * cfg.data.seq_len ** 2 * 4,
        "saved_layer_inputs_bytes": cfg.model.n_layers * rows_per_device * cfg.data.seq_len
            * cfg.model.d_model * jnp_itemsize(cfg.model.dtype),
        "peak_step": worst, "peak_bytes": steps[worst]["peak"], "steps": steps,
        "compile_s": round(time.perf_counter() - start, 1),
    }


def jnp_itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="results/memory.json")
    parser.add_argument("--before", default=None,
                        help="a previous report whose results (or 'before') become 'before'")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    results = []
    for name in args.cases.split(","):
        config, overrides = CASES[name]
        row = measure(config, overrides + args.overrides)
        results.append(row)
        print(f"{name}: {row['mesh']} peak {_gb(row['peak_bytes'])} ({row['peak_step']} step), "
              f"compiled in {row['compile_s']} s", file=sys.stderr)

    report = {"note": "per-device compiled memory (XLA buffer assignment) of the train steps on "
                      "fake CPU devices; peak = argument + output + temp - alias, largest over "
                      "the step plans the method runs",
              "results": results}
    if args.before:
        prev = json.loads(Path(args.before).read_text())
        report["before"] = prev.get("before") or {
            "note": "measured at the parent commit (full float32 logits and attention "
                    "scores: no chunked loss, no chunked attention)",
            "results": prev["results"]}
    before = {r["config"]: r for r in report.get("before", {}).get("results", [])}
    print(f"{'config':>6} | {'mesh':>5} | {'batch/device':>12} | {'peak before':>11} | "
          f"{'peak now':>9} | {'args':>8} | {'temp':>8} | {'logits':>8} | {'scores':>8} | "
          f"{'layer in':>8}")
    for row in results:
        step = row["steps"][row["peak_step"]]
        was = before.get(row["config"])
        print(f"{row['config']:>6} | {row['mesh']:>5} | {row['batch_per_device']:>12} | "
              f"{_gb(was['peak_bytes']) if was else '-':>11} | {_gb(row['peak_bytes']):>9} | "
              f"{_gb(step['argument']):>8} | {_gb(step['temp']):>8} | "
              f"{_gb(row['full_logits_f32_bytes']):>8} | "
              f"{_gb(row['full_attention_scores_f32_bytes']):>8} | "
              f"{_gb(row['saved_layer_inputs_bytes']):>8}")
    print("logits, scores: the full float32 logits and one layer's attention scores, per device; "
          "layer in: the layer inputs saved for the backward pass", file=sys.stderr)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
