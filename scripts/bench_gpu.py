"""One-accelerator benchmark of the real training step: tokens/s, step time, MFU, peak memory.

    python scripts/bench_gpu.py [--configs 350m,1b] [--remat full,dots_no_batch] [--batch 8]
                                [--seq-len 2048] [--steps 10] [--out results/bench_gpu.json]
                                [key=value ...]
    python scripts/bench_gpu.py --smoke     # CPU: the tiny config, results/bench_gpu_cpu_smoke.json

Each (config, remat policy) case runs in a fresh process (so the device's peak memory is that
case's alone) on one device: the run's Program (`edit_jax.program.build_program`) with
`method.name=ddp` on a 1 x 1 ('replica', 'shard') mesh, i.e. the same sharded DDP train step
`edit-jax train` runs (forward, backward, gradient clipping, AdamW), with the config's dtype
(bfloat16 compute for 350m and 1b), on a per-device batch of `--batch` x `--seq-len` random
tokens. The step is compiled once, called twice to warm up, then timed over `--steps` calls with
`block_until_ready` (benchlib.time_step: the median).

Model FLOPs per step (the PaLM convention: no rematerialisation, attention counted over the full
T x T, not halved for causality):

    6 * N_nonembedding * tokens + 12 * n_layers * d_model * T * tokens

with tokens = batch x T per step and N_nonembedding = all parameters minus the input embedding
table (vocab x d_model, a lookup, not a matmul); the lm_head matmul (d_model x vocab) counts.
MFU = model FLOPs per step / step time / the chip's dense bf16 peak (PEAK_BF16_FLOPS, matched
on the device kind; an unknown kind, or a CPU, gets no MFU and a note). Peak memory: the
device's `memory_stats()['peak_bytes_in_use']` where it has one (GPU), otherwise the compiled
step's memory analysis (arguments + outputs + temporaries - aliased, `inspect_hlo.memory_stats`
of `Program.compiled_step`, the executable `edit-jax inspect` reads), which is recorded for
every case too.

Without an accelerator (JAX's default backend is the CPU) the script runs the smoke test
instead (as `--smoke` does): the tiny config, 8 x 128 tokens, 3 timed steps, written to
results/bench_gpu_cpu_smoke.json; results/bench_gpu.json is for accelerator numbers only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchlib import answer_case, default_backend, run_in_child, time_step, write_report

# Dense (no sparsity) bf16 peak FLOP/s per chip, matched in order on the device kind.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
)
SMOKE = {"configs": "tiny", "batch": 8, "seq_len": None, "steps": 3,
         "out": "results/bench_gpu_cpu_smoke.json"}
MODEL_FLOPS_FORMULA = ("6 * N_nonembedding * tokens + 12 * n_layers * d_model * seq_len * tokens "
                       "(N_nonembedding excludes only the input embedding)")


def one_device(batch: int, seq_len: int | None = None) -> list[str]:
    """Overrides for a 1 x 1 mesh and a step of `batch` x `seq_len` tokens (None: the config's)."""
    overrides = ["mesh.replica=1", "mesh.shard=1", "mesh.num_cpu_devices=1",
                 f"data.global_batch_size={batch}"]
    return overrides + ([f"data.seq_len={seq_len}"] if seq_len else [])


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def model_flops_per_step(num_params: int, vocab: int, n_layers: int, d_model: int,
                         seq_len: int, tokens: int) -> tuple[int, int]:
    """(model FLOPs of one training step, N_nonembedding): see the module docstring."""
    nonembedding = num_params - vocab * d_model
    return 6 * nonembedding * tokens + 12 * n_layers * d_model * seq_len * tokens, nonembedding


def one_device_case(config: str, overrides: list[str], vocab_default: int):
    """(Program, its device, a batch of random tokens, the step-0 state) of a case on the first
    device, in this process."""
    from edit_jax.config import load_config
    from edit_jax.mesh import start_jax

    cfg = load_config(config, overrides)
    start_jax(cfg.mesh)
    import jax
    import numpy as np

    from edit_jax.program import build_program

    device = jax.devices()[0]
    vocab = cfg.model.vocab_size or vocab_default
    program = build_program(cfg, vocab, devices=[device])
    shape = (cfg.data.global_batch_size, cfg.data.seq_len + 1)
    tokens = np.random.default_rng(0).integers(0, vocab, shape).astype(np.int32)
    batch = jax.device_put(tokens, program.layout.batch_sharding)
    return program, device, batch, program.init_state()


def run_case(config: str, overrides: list[str], steps: int, vocab_default: int) -> dict:
    """One case, in this process: build, compile, time, measure."""
    import time

    import jax
    import numpy as np

    from edit_jax.inspect_hlo import memory_stats
    from edit_jax.methods import DDP_PLAN

    program, device, batch, state = one_device_case(config, overrides, vocab_default)
    cfg, vocab = program.cfg, program.vocab_size
    rows, seq = cfg.data.global_batch_size, cfg.data.seq_len
    start = time.perf_counter()
    compiled = program.compiled_step(DDP_PLAN, batch.shape)  # what `edit-jax inspect` reads
    compile_s = time.perf_counter() - start
    compiled_memory = memory_stats(compiled)
    step_s, state = time_step(compiled, state, batch, steps)
    _, metrics = compiled(state, batch)
    loss = float(np.mean(jax.device_get(metrics["loss"])))

    stats = device.memory_stats() or {}
    measured = stats.get("peak_bytes_in_use")
    m = cfg.model
    flops, nonembedding = model_flops_per_step(program.num_params, vocab, m.n_layers, m.d_model,
                                               seq, rows * seq)
    peak = peak_flops(device.device_kind) if device.platform != "cpu" else None
    return {
        "config": config, "remat": m.remat, "attention": m.attention,
        "device_kind": device.device_kind,
        "platform": device.platform, "dtype": m.dtype, "batch": rows, "seq_len": seq,
        "tokens_per_step": rows * seq, "num_params": program.num_params,
        "nonembedding_params": nonembedding, "vocab_size": vocab,
        "loss_chunk_tokens": m.loss_chunk_tokens,
        "attention_chunk_tokens": m.attention_chunk_tokens,
        "compile_s": round(compile_s, 2), "steps_timed": steps, "step_time_s": step_s,
        "tokens_per_s": rows * seq / step_s, "model_flops_per_step": flops,
        "model_flops_per_s": flops / step_s,
        "mfu": None if peak is None else flops / step_s / peak, "peak_flops_per_s": peak,
        "peak_memory_bytes": measured if measured is not None else compiled_memory["peak"],
        "peak_memory_source": ("device memory_stats peak_bytes_in_use" if measured is not None
                               else "compiled memory analysis"),
        "measured_peak_bytes": measured, "compiled_memory": compiled_memory,
        "final_loss": loss,
    }


def run_case_in_child(config: str, overrides: list[str], steps: int, vocab: int,
                      timeout: float | None = None) -> dict:
    """`run_case` in a fresh process (benchlib.run_in_child): the device's peak is this case's."""
    row = run_in_child(Path(__file__), [config, overrides, steps, vocab], timeout)
    return row if "error" not in row else {"config": config, "overrides": overrides, **row}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="350m,1b")
    parser.add_argument("--remat", default="full,dots_no_batch",
                        help="remat policies to compare (model.remat)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (one device)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--vocab", type=int, default=257, help="vocabulary when model.vocab_size=0")
    parser.add_argument("--out", default="results/bench_gpu.json")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke test: the tiny config, results/bench_gpu_cpu_smoke.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()

    if args.case:
        answer_case(run_case, args.case)
        return

    backend = default_backend()
    if backend == "cpu" and not args.smoke:
        print("no accelerator: JAX's default backend is the CPU; running the smoke test "
              "(--smoke) instead", file=sys.stderr)
        args.smoke = True
    if args.smoke:
        args.configs, args.batch, args.steps, args.out = (SMOKE["configs"], SMOKE["batch"],
                                                          SMOKE["steps"], SMOKE["out"])
        os.environ["JAX_PLATFORMS"] = "cpu"

    results = []
    for config in args.configs.split(","):
        for remat in args.remat.split(","):
            overrides = ["method.name=ddp", f"model.remat={remat}",
                         *one_device(args.batch, args.seq_len)]
            row = run_case_in_child(config, overrides + args.overrides, args.steps, args.vocab)
            row.setdefault("remat", remat)
            results.append(row)
            done = (f"failed: {row['error']}" if "error" in row
                    else f"{row['step_time_s'] * 1e3:.1f} ms per step")
            print(f"{config} remat={remat}: {done}", file=sys.stderr)

    ok = [r for r in results if "error" not in r]
    kind = ok[0]["device_kind"] if ok else "unknown"
    peak = ok[0]["peak_flops_per_s"] if ok else None
    notes = []
    if args.smoke:
        notes.append("CPU smoke test: checks that the benchmark runs; times are not GPU numbers "
                     "and MFU is left out")
    elif peak is None:
        notes.append(f"no dense bf16 peak known for device kind '{kind}': MFU left out "
                     "(add it to PEAK_BF16_FLOPS)")
    report = {
        "device": f"1 x {kind}", "backend": backend, "smoke": args.smoke,
        "peak_bf16_flops_per_s": peak,
        "model_flops_formula": MODEL_FLOPS_FORMULA,
        "notes": notes, "results": results,
    }
    print(f"1 x {kind}; DDP step of the real Program on a 1 x 1 mesh")
    print(f"{'config':>6} | {'remat':>13} | {'batch':>9} | {'step ms':>9} | {'tokens/s':>10} | "
          f"{'MFU':>6} | {'peak memory':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:>6} | {r['remat']:>13} | failed: {r['error']}")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['config']:>6} | {r['remat']:>13} | {r['batch']:>4} x {r['seq_len']:<4} | "
              f"{r['step_time_s'] * 1e3:9.1f} | {r['tokens_per_s']:10,.0f} | {mfu:>6} | "
              f"{_gb(r['peak_memory_bytes']):>11}")
    for note in notes:
        print(f"note: {note}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
