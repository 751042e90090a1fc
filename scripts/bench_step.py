"""Step benchmark: tokens/s and step time of the sharded DDP step for several mesh shapes.

    python scripts/bench_step.py [--config tiny] [--meshes 1x8,2x4,4x2,8x1] [--steps 20]
                                 [--out results/bench_step.json] [key=value ...]

Every mesh runs the same model and global batch on random tokens; times are medians over
`--steps` steps after two warm-up steps (the first compiles). The table gives each shape's
time as a ratio to the first one: on shared CPU machines quote the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses

from benchlib import time_step, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--meshes", default="1x8,2x4,4x2,8x1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=257, help="vocabulary size when model.vocab_size=0")
    parser.add_argument("--out", default="results/bench_step.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from edit_jax.config import load_config
    from edit_jax.mesh import start_jax

    cfg = load_config(args.config, args.overrides)
    start_jax(cfg.mesh)
    import jax
    import numpy as np

    from edit_jax.mesh import make_mesh
    from edit_jax.methods import DDP_PLAN
    from edit_jax.model import abstract_model, count_params, init_model
    from edit_jax.optimizer import inner_optimizer
    from edit_jax.sharding import is_sharded, shard_dims
    from edit_jax.step import init_state, make_layout, make_train_step

    vocab = cfg.model.vocab_size or args.vocab
    graphdef, shapes = abstract_model(cfg.model, vocab)
    rows, seq = cfg.data.global_batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    results = []
    for shape in args.meshes.split(","):
        replicas, shards = (int(n) for n in shape.split("x"))
        mesh = make_mesh(dataclasses.replace(cfg.mesh, replica=replicas, shard=shards))
        tx = inner_optimizer(cfg.optimizer, 1000, is_sharded(shard_dims(shapes, shards)))
        layout = make_layout(mesh, shapes, tx)
        state = init_state(layout, lambda: init_model(cfg.model, vocab, 0)[1], tx)
        step = make_train_step(graphdef, tx, layout, DDP_PLAN)
        batch = jax.device_put(tokens, layout.batch_sharding)
        step_s, state = time_step(step, state, batch, args.steps)
        results.append({"mesh": shape, "step_time_s": step_s, "tokens_per_s": rows * seq / step_s})
        del state

    base = results[0]["step_time_s"]
    for row in results:
        row["time_ratio_vs_first"] = row["step_time_s"] / base
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    report = {"device": device, "parameters": count_params(shapes), "global_batch": rows,
              "seq_len": seq, "steps_timed": args.steps, "results": results}
    print(f"{count_params(shapes):,} parameters, batch {rows} x {seq} tokens, {device}")
    print(f"{'mesh (RxS)':>10} | {'step ms':>8} | {'tokens/s':>9} | {'ratio':>6}")
    for row in results:
        print(f"{row['mesh']:>10} | {row['step_time_s'] * 1e3:8.1f} | "
              f"{row['tokens_per_s']:9.0f} | {row['time_ratio_vs_first']:6.2f}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
