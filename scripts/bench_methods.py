"""Method benchmark: bytes over `replica`, outer-state memory and step times of ddp, local_sgd,
diloco and edit on one mesh (their losses: scripts/compare_methods.py).

    python scripts/bench_methods.py [--config FILE] [--mesh 2x4] [--sync-every 8]
                                    [--out results/bench_methods.json] [key=value ...]

Bytes are read from the compiled HLO (`edit_jax.inspect_steps.inspect_program`): per device per
step, averaged over a sync period ((tau-1) LOCAL + SYNC) / tau. Step times are medians of
`TIMED_CALLS` calls after two warm-up calls on random tokens, given as ratios to the DDP step
timed in the same run (on shared CPU machines quote the ratios, not the seconds).
"""

from __future__ import annotations

import argparse

from benchlib import TIMED_CALLS, time_step, write_report

METHODS = ("ddp", "local_sgd", "diloco", "edit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--mesh", default="2x4", help="RxS: replicas x shards")
    parser.add_argument("--sync-every", type=int, default=8, help="tau: local steps per sync")
    parser.add_argument("--out", default="results/bench_methods.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    replicas, shards = (int(n) for n in args.mesh.split("x"))

    from edit_jax.config import load_config
    from edit_jax.mesh import start_jax

    def config(method: str):
        return load_config(args.config, [
            *args.overrides, f"mesh.replica={replicas}", f"mesh.shard={shards}",
            f"method.name={method}", f"method.sync_every={args.sync_every}"])

    base = config("ddp")
    start_jax(base.mesh)
    import jax
    import numpy as np

    from edit_jax.inspect_steps import compile_steps, inspect_program
    from edit_jax.program import build_program
    from edit_jax.data import load_tokenizer

    vocab = base.model.vocab_size or load_tokenizer(base.data).vocab_size
    batch_rows, seq = base.data.global_batch_size, base.data.seq_len
    tokens = np.random.default_rng(0).integers(0, vocab, (batch_rows, seq + 1)).astype(np.int32)
    rows = []
    for method in METHODS:
        program = build_program(config(method), vocab)
        compiled = compile_steps(program)
        report = inspect_program(program, compiled)
        state = program.init_state()
        batch = jax.device_put(tokens, program.layout.batch_sharding)
        times = {}
        for plan, step in compiled.items():  # every plan the method runs, warm-up's too
            times[plan.name(program.method.num_layers)], state = time_step(step, state, batch)
        del state
        rows.append({"method": method,
                     "replica_bytes_per_step": report["replica_bytes_per_step"],
                     "replica_wire_bytes_per_step": report["replica_wire_bytes_per_step"],
                     "outer_state_bytes_per_device": report["outer_state_bytes_per_device"],
                     "step_time_s": times, "num_params": report["num_params"]})

    ddp = rows[0]
    for row in rows:
        row["replica_bytes_ratio_vs_ddp"] = (  # None on one replica, where nothing crosses
            row["replica_bytes_per_step"] / ddp["replica_bytes_per_step"]
            if ddp["replica_bytes_per_step"] else None)
        row["step_time_ratio_vs_ddp"] = {kind: t / ddp["step_time_s"]["ddp"]
                                         for kind, t in row["step_time_s"].items()}
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    title = (f"{ddp['num_params']:,} parameters, mesh {replicas} x {shards} (replica x shard), "
             f"tau {args.sync_every}, batch {batch_rows} x {seq} tokens, {device}")
    print(title)
    print(f"{'method':>10} | {'replica B/step':>14} | {'vs ddp':>6} | {'outer state B':>13} | "
          f"{'local/ddp':>9} | {'sync/ddp':>8}")
    for row in rows:
        ratios = row["step_time_ratio_vs_ddp"]
        local = ratios.get("local", ratios.get("ddp"))
        sync = f"{ratios['sync']:8.2f}" if "sync" in ratios else f"{'-':>8}"
        bytes_ratio = row["replica_bytes_ratio_vs_ddp"]
        bytes_ratio = f"{bytes_ratio:6.3f}" if bytes_ratio is not None else f"{'-':>6}"
        print(f"{row['method']:>10} | {row['replica_bytes_per_step']:14,.0f} | {bytes_ratio} | "
              f"{row['outer_state_bytes_per_device']:13,} | {local:9.2f} | {sync}")
    report = {"device": device, "device_kind": jax.devices()[0].device_kind,
              "mesh": {"replica": replicas, "shard": shards}, "sync_every": args.sync_every,
              "global_batch": batch_rows, "seq_len": seq, "timed_calls": TIMED_CALLS,
              "results": rows}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
