"""One device: the time of each step plan a method runs (DDP warm-up, local, sync), against the
local step.

    python scripts/bench_sync_step.py [--config 350m] [--batch 8] [--seq-len 2048] [--steps 10]
                                      [key=value ...]     # prints the result as JSON

The run's Program (`build_program`) with the config's method (edit unless a `method.name=...`
override says otherwise) on a 1 x 1 ('replica', 'shard') mesh. Every distinct plan of
`Method.plans()` is compiled (`Program.compiled_step`, the executable `edit-jax inspect` reads)
and timed (benchlib.time_step) on one batch of random tokens, from a state whose outer state
exists (phi <- theta, as when the local phase begins). With one replica the collectives over
`replica` vanish, so what a sync step adds to a local step is the sync's own compute:
pseudo-gradients, norms, penalty, outer update (and with `method.compression` the quantizing).
`scripts/device_check.py` runs it for edit with fp32 and int8 syncs.
"""

from __future__ import annotations

import argparse
import json
import time

from bench_gpu import one_device, one_device_case
from benchlib import answer_case, time_step


def run_case(config: str, overrides: list[str], steps: int, vocab_default: int) -> dict:
    """Compile and time every plan of the method, in this process."""
    from edit_jax.inspect_hlo import memory_stats

    program, device, batch, state = one_device_case(config, overrides, vocab_default)
    if program.begin_local_phase is not None:
        state = program.begin_local_phase(state)
    method, cfg = program.method, program.cfg
    plans = {}
    for plan in method.plans():
        start = time.perf_counter()
        compiled = program.compiled_step(plan, batch.shape)
        compile_s = time.perf_counter() - start
        step_s, state = time_step(compiled, state, batch, steps)
        plans[plan.name(method.num_layers)] = {
            "kind": plan.kind.value, "step_time_s": step_s, "compile_s": round(compile_s, 2),
            "compiled_memory": memory_stats(compiled)}
    local_s = next(p["step_time_s"] for p in plans.values() if p["kind"] == "local")
    for p in plans.values():
        p["vs_local"] = p["step_time_s"] / local_s
    return {
        "config": config, "method": method.name, "compression": cfg.method.compression,
        "warmup_steps": method.warmup_steps, "sync_every": method.sync_every,
        "device_kind": device.device_kind, "platform": device.platform,
        "dtype": cfg.model.dtype, "attention": cfg.model.attention,
        "batch": cfg.data.global_batch_size, "seq_len": cfg.data.seq_len,
        "num_params": program.num_params, "steps_timed": steps, "plans": plans,
        "measured_peak_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use"),
        "compiled_peak_bytes": max(p["compiled_memory"]["peak"] for p in plans.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="350m")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per plan")
    parser.add_argument("--vocab", type=int, default=257, help="vocabulary when model.vocab_size=0")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON on stdout
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    if args.case:
        answer_case(run_case, args.case)
        return
    overrides = ["method.name=edit", *one_device(args.batch, args.seq_len), *args.overrides]
    print(json.dumps(run_case(args.config, overrides, args.steps, args.vocab), indent=2))


if __name__ == "__main__":
    main()
