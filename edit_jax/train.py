"""The training loop: data -> sharded step -> metrics, evaluation, checkpoints, progress.

Rerunning the same command resumes from the newest checkpoint in `run.run_dir` (parameters,
optimizer state, data position). Ctrl-C or SIGTERM finishes the current step, saves a checkpoint
and exits; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from edit_jax import data as data_lib
from edit_jax.checkpoint import Checkpointer
from edit_jax.config import Config, to_dict
from edit_jax.errors import UserError
from edit_jax.methods import StepKind
from edit_jax.optimizer import lr_schedule
from edit_jax.program import Program, build_program
from edit_jax.step import Layout, TrainState, stack_replicas
from edit_jax.tokenizer import load_tokenizer


def log(message: str) -> None:
    """Print once per run (from process 0), above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


class MetricsLog:
    """`<run_dir>/metrics.jsonl`: one JSON object per line; rows past a resume point dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops now

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must save together)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _global_batch(layout: Layout, local_rows: np.ndarray, global_rows: int) -> jax.Array:
    return jax.make_array_from_process_local_data(
        layout.batch_sharding, local_rows, (global_rows, local_rows.shape[1]))


def _without_replica_axis(spec: P) -> P:
    """The spec with the 'replica' mesh axis removed (the leaf is then whole on every replica)."""

    def drop(entry):
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != "replica")
            return kept if len(kept) > 1 else (kept[0] if kept else None)
        return None if entry == "replica" else entry

    return P(*(drop(e) for e in spec))


def _restore(ckpt: Checkpointer, step: int, program: Program, iterator):
    """Restore onto this mesh. With another replica count (elastic resume): phi and the outer
    momentum carry over, every replica restarts from phi once the local phase has begun (from
    replica 0 during the synchronous warm-up, when all replicas are equal), the inner optimizer
    moments come from replica 0, and the per-replica penalty statistics start afresh."""
    layout = program.layout
    target = program.abstract_state()
    saved = ckpt.saved_state_shapes(step, like=target)
    if all(s.shape == t.shape for s, t in zip(jax.tree.leaves(saved), jax.tree.leaves(target))):
        return ckpt.restore(step, target, data_iterator=iterator)[0]
    saved_replicas = jax.tree.leaves(saved["params"])[0].shape[0]
    from_phi = program.outer is not None and step >= program.method.warmup_steps
    log(f"checkpoint has {saved_replicas} replicas, this mesh {layout.num_replicas}: every "
        f"replica restarts from {'phi' if from_phi else 'replica 0'}")

    def as_saved(t, s):
        if s.shape == t.shape:
            return t
        sharding = NamedSharding(layout.mesh, _without_replica_axis(t.sharding.spec))
        return jax.ShapeDtypeStruct(s.shape, t.dtype, sharding=sharding)

    restored = ckpt.restore(step, jax.tree.map(as_saved, target, saved),
                            data_iterator=iterator)[0]

    def convert(state):
        def leaf(x, t):
            if x.shape == t.shape:
                return x
            if t.sharding.spec[:1] == ("replica",):
                return jnp.broadcast_to(x[0], t.shape)
            return jnp.zeros(t.shape, t.dtype)  # per-replica statistics

        state = jax.tree.map(leaf, state, target)
        if from_phi:
            state["params"] = stack_replicas(state["outer"]["phi"], layout.num_replicas)
        return state

    return jax.jit(convert, out_shardings=layout.state_shardings)(restored)


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns the final summary."""
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.data)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}; set model.vocab_size=0 to use the tokenizer's")
    program = build_program(cfg, vocab_size)
    layout = program.layout
    log(program.describe())

    iterator = data_lib.train_iterator(cfg.data, tokenizer, process_index=jax.process_index(),
                                       process_count=jax.process_count())
    eval_batches = [_global_batch(layout, rows, cfg.data.global_batch_size)
                    for rows in data_lib.eval_batches(cfg.data, tokenizer,
                                                      num_batches=cfg.run.eval_batches,
                                                      process_index=jax.process_index(),
                                                      process_count=jax.process_count())]
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=cfg.run.checkpoint_every,
                        keep=cfg.run.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        state = _restore(ckpt, start, program, iterator)
        log(f"resumed from step {start} in {run_dir}")
    else:
        state = program.init_state()

    summary = _loop(program, state, iterator, eval_batches, ckpt, start,
                    MetricsLog(run_dir / "metrics.jsonl", start))
    ckpt.close()
    return summary


def _loop(program: Program, state: TrainState, iterator, eval_batches, ckpt: Checkpointer,
          start: int, metrics: MetricsLog) -> dict:
    cfg, run, layout, eval_step = program.cfg, program.cfg.run, program.layout, program.eval_step
    schedule = lr_schedule(cfg.optimizer, run.steps)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    config_dict = to_dict(cfg)

    def evaluate(step: int, record: bool = True) -> float:
        loss = float(np.mean([float(eval_step(state["params"], b)) for b in eval_batches]))
        if record:
            metrics.write({"step": step, "eval_loss": loss})
        log(f"step {step}: eval loss {loss:.4f}")
        return loss

    eval_loss = evaluate(0) if start == 0 else None
    step, interval_start, interval_steps = start, time.perf_counter(), 0
    bar = tqdm(total=run.steps, initial=start, disable=not run.progress or jax.process_index(),
               unit="step", dynamic_ncols=True)
    with StopRequest() as stop:
        while step < run.steps:
            batch = _global_batch(layout, next(iterator), cfg.data.global_batch_size)
            state, step_metrics, kind = program.step(state, step, batch)
            if kind is StepKind.SYNC and "sync_weights" in step_metrics:
                row = {"step": step + 1, "sync": True,
                       "weights": np.asarray(step_metrics["sync_weights"]).round(6).tolist()}
                if "sync_outliers" in step_metrics:
                    row["outliers"] = int(step_metrics["sync_outliers"])
                metrics.write(row)
            step += 1
            interval_steps += 1
            bar.update(1)
            if step % run.log_every == 0 or step == run.steps:
                loss = float(step_metrics["loss"].mean())  # blocks: the interval's time is now real
                step_time = (time.perf_counter() - interval_start) / interval_steps
                metrics.write({"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                               "tokens": step * tokens_per_step, "step_time": step_time,
                               "grad_norm": float(step_metrics["grad_norm"].mean())})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / step_time:,.0f}")
                interval_start, interval_steps = time.perf_counter(), 0
            if step % run.eval_every == 0 or step == run.steps:
                eval_loss = evaluate(step)
            stopping = stop.agreed()
            ckpt.save(step, state, config=config_dict, data_iterator=iterator,
                      force=stopping or step == run.steps)
            if stopping:
                ckpt.wait()
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved in "
                                        f"{Path(run.run_dir) / 'checkpoints'}; rerun the same "
                                        "command to resume")
    bar.close()
    ckpt.wait()
    if eval_loss is None:  # the run had already finished: report, don't record twice
        eval_loss = evaluate(step, record=False)
    summary = {"step": step, "final_eval_loss": eval_loss, "tokens": step * tokens_per_step}
    log(f"done: {step} steps, {summary['tokens']:,} tokens, final eval loss {eval_loss:.4f}")
    return summary
