"""Shared by the end-to-end tests: a small model's overrides and running `edit-jax train`."""

import json

from edit_jax.cli import main

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=128", "data.seq_len=32", "data.global_batch_size=16", "run.log_every=1",
         "run.eval_every=4", "run.eval_batches=1", "run.progress=false",
         "optimizer.warmup_steps=2", "optimizer.decay_steps=8"]
EDIT = ["method.name=edit", "method.warmup_steps=2", "method.sync_every=3",
        "method.anomaly_warmup=1", "method.anomaly_threshold=6", "method.temperature=0.05",
        "method.clip_norm=0.05"]
VOCAB = 257  # the byte tokenizer's


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(run_dir, *overrides):
    """Train in this process; returns ({step: train loss}, all metrics rows)."""
    code = main(["train", *SMALL, f"run.run_dir={run_dir}", *overrides])
    assert code == 0
    rows = read_rows(run_dir)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, rows


def final_state(run_dir, steps, *overrides):
    """The state in a run's checkpoint of `steps`, restored with the run's own config."""
    from edit_jax.checkpoint import Checkpointer
    from edit_jax.config import load_config
    from edit_jax.program import build_program

    cfg = load_config(None, [*SMALL, *overrides, f"run.steps={steps}"])
    program = build_program(cfg, VOCAB)
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1, keep=1)
    state, _ = ckpt.restore(steps, program.abstract_state())
    ckpt.close()
    return state
