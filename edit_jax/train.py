"""The training loop: data -> sharded step -> metrics, evaluation, checkpoints, progress.

Each iteration is one step, or for a_edit after its warm-up one round: this process's local
phase on its own clock, then the sync with every other process (a_edit.py). Rerunning the same
command resumes from the newest checkpoint in `run.run_dir` (parameters, optimizer state, data
position). Ctrl-C or SIGTERM finishes the current step or round, saves a checkpoint and exits; a
second Ctrl-C stops at once. Several processes agree on stopping where they meet anyway (a sync, a
log row, a checkpoint), so a local step has no cross-process collective. In a multi-process run,
a lost process stops the others (peers.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from edit_jax import data as data_lib
from edit_jax.a_edit import LocalPhase, local_replica_indices
from edit_jax.checkpoint import Checkpointer, MismatchedCheckpoint, UnusableCheckpoint
from edit_jax.config import Config, profile_steps, to_dict
from edit_jax.elastic import restore
from edit_jax.errors import UserError
from edit_jax.hf_import import check_vocab, load_params
from edit_jax.layer_profile import PROFILE_FILE
from edit_jax.methods import StepPlan, SyncRule
from edit_jax.metrics import MetricsLog, write_atomically
from edit_jax.optimizer import lr_schedule
from edit_jax.peers import Watchdog, barrier, collective_errors
from edit_jax.program import Program, build_program, out_of_memory_errors
from edit_jax.run_lock import hold_run_dir
from edit_jax.schedule import save_profile
from edit_jax.sharding import BATCH_SPEC
from edit_jax.step import Layout, TrainState
from edit_jax.stragglers import Straggler
from edit_jax.data import load_tokenizer
from edit_jax.traffic import ReplicaTraffic


def log(message: str) -> None:
    """Print once per run (from process 0), above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


def warn(message: str) -> None:
    """Print a one-line warning once per run (from process 0) on stderr."""
    if jax.process_index() == 0:
        tqdm.write(f"warning: {message}", file=sys.stderr)


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

    def agreed(self, meeting: bool, state) -> bool:
        """Whether to stop now. One process stops at the first step after the request. Several
        must stop (and save) together, so they agree only where they meet anyway (`meeting`:
        a sync, a log row or a checkpoint), and a local step carries no collective. The
        agreement waits for `state` first: the CPU client may otherwise run its all-gather
        alongside the step's own collectives, in another order on each process."""
        if jax.process_count() == 1:
            return self.requested
        if not meeting:
            return False
        jax.block_until_ready(state)
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepTrace:
    """`run.profile_steps` A,B: a jax.profiler trace of steps A..B (counted from 1) into
    `directory`, for TensorBoard's profile plugin or Perfetto (a .trace.json.gz beside it).
    Starts before the first of those steps runs (also when a resume or an a_edit round lands
    inside the range) and stops once the last has finished on the device."""

    def __init__(self, steps: tuple[int, int] | None, directory: Path):
        self.steps, self.directory = steps, directory
        self.active = self.done = False

    def before(self, step: int) -> None:
        if self.steps and not (self.active or self.done) and step <= self.steps[1] and (
                step >= self.steps[0]):
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, steps_done: int, state) -> None:
        if self.active and steps_done >= self.steps[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        jax.profiler.stop_trace()
        self.active, self.done = False, True
        log(f"wrote a profile of steps {self.steps[0]}..{self.steps[1]} to {self.directory}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:  # the run ended (or stopped) inside the range
            self.stop()


def _global_batch(layout: Layout, local_rows: np.ndarray, global_rows: int) -> jax.Array:
    return jax.make_array_from_process_local_data(
        layout.batch_sharding, local_rows, (global_rows, local_rows.shape[1]))


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns the final summary. The run directory is
    this run's alone while it trains (run_lock.py)."""
    with hold_run_dir(Path(cfg.run.run_dir)), out_of_memory_errors():
        return _train(cfg)


def _train(cfg: Config) -> dict:
    run_dir = Path(cfg.run.run_dir)
    tokenizer = load_tokenizer(cfg.data)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if cfg.model.init_from:
        check_vocab(cfg.model.init_from, vocab_size, tokenizer.vocab_size)
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}; set model.vocab_size=0 to use the tokenizer's")
    program = build_program(cfg, vocab_size)
    layout = program.layout
    log(program.describe())
    log(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}")
    for note in program.notes:
        warn(note)

    iterator = data_lib.train_iterator(cfg.data, tokenizer, process_index=jax.process_index(),
                                       process_count=jax.process_count(), vocab_size=vocab_size)
    local_eval_rows = np.stack(data_lib.eval_batches(cfg.data, tokenizer,
                                                     num_batches=cfg.run.eval_batches,
                                                     process_index=jax.process_index(),
                                                     process_count=jax.process_count(),
                                                     vocab_size=vocab_size))
    eval_batches = jax.make_array_from_process_local_data(  # (batches, global rows, T + 1)
        jax.sharding.NamedSharding(layout.mesh, P(None, *BATCH_SPEC)), local_eval_rows,
        (cfg.run.eval_batches, cfg.data.global_batch_size, local_eval_rows.shape[2]))
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=cfg.run.checkpoint_every,
                        keep=cfg.run.keep_checkpoints, warn=warn)
    start, state = _resume(ckpt, program, iterator)
    if start:
        log(f"resumed from step {start} in {run_dir}")
    elif cfg.model.init_from:  # a fresh start only: a resume's checkpoint wins
        state = program.init_state(load_params(cfg.model.init_from, program))
        log(f"initialised the parameters from {cfg.model.init_from}")
    else:
        state = program.init_state()
    profile_file = run_dir / PROFILE_FILE
    if program.profile is not None and jax.process_index() == 0 and (
            not start or not profile_file.is_file()):  # what a resume reads, to keep the schedule
        save_profile(program.profile, profile_file)
    if jax.process_index() == 0:  # the resolved config, for `edit-jax plot` and other readers
        write_atomically(run_dir / "config.json", json.dumps(to_dict(cfg), indent=1) + "\n")

    metrics = MetricsLog(run_dir / "metrics.jsonl", start, enabled=jax.process_index() == 0,
                         tensorboard=cfg.run.tensorboard, warn=warn)
    summary = _Loop(program, state, iterator, eval_batches, ckpt, metrics).run()
    metrics.close()
    ckpt.close()
    return summary


def _resume(ckpt: Checkpointer, program: Program, iterator) -> tuple[int, TrainState | None]:
    """(step, state) of the newest usable checkpoint, or (0, None) if there is none.

    A newer checkpoint that cannot be restored (damaged or missing files, or state that does
    not fit this run) is named in a warning and moved aside (never deleted) once an older one
    has restored; if none restores, that is an error and nothing is moved.
    """
    bad = []
    for step in reversed(ckpt.all_steps()):
        try:
            state = restore(ckpt, step, program, iterator, log=log)
        except UnusableCheckpoint as e:
            bad.append(e)
            continue
        for e in bad:
            moved = ckpt.set_aside(e.step)
            warn(f"checkpoint {e.step} {e.problem} ({e.reason}); moved it to {moved} and "
                 f"resumed from step {step}")
        return step, state
    if bad:
        if len(bad) == 1 or isinstance(bad[0], MismatchedCheckpoint):  # e.g. a changed config
            raise bad[0]
        raise UserError(f"no usable checkpoint in {ckpt.directory}: steps "
                        f"{', '.join(str(e.step) for e in bad)} are corrupt or incomplete "
                        f"({bad[0].reason}); move them away to start afresh, or use a new "
                        "run.run_dir")
    return 0, None


class _Steps:
    """Every replica's inner step count on the host, and the run's step: the largest of them.

    The replicas of a synchronous method are always equal; a_edit's drift apart between syncs,
    and its step is that of the fastest replica (known to every process after each sync).
    """

    def __init__(self, state: TrainState):
        self.per_replica = np.asarray(multihost_utils.process_allgather(state.replica_steps,
                                                                        tiled=True))

    @property
    def step(self) -> int:
        return int(self.per_replica.max())

    def total(self) -> int:
        return int(self.per_replica.sum())

    def advance(self, step_metrics: dict) -> None:
        """After a step or round: the counts a sync step reports, or one more step each."""
        if "replica_steps" in step_metrics:
            self.per_replica = np.asarray(step_metrics["replica_steps"])
        else:
            self.per_replica = self.per_replica + 1


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return after // every > before // every


class _Loop:
    """One run's loop state: the program and train state, data, logs, checkpoints, and the
    guards of a multi-process run (peers.py). `run()` trains to `run.steps`."""

    def __init__(self, program: Program, state: TrainState, iterator, eval_batches,
                 ckpt: Checkpointer, metrics: MetricsLog):
        self.program, self.state, self.iterator = program, state, iterator
        self.eval_batches, self.ckpt, self.metrics = eval_batches, ckpt, metrics
        self.steps = _Steps(state)  # the run's step: the checkpoint's on a resume
        # Before the clock starts: wall time is training, not compiling.
        program.precompile(self.step, program.cfg.run.steps)
        self.eval_step = program.eval_step.lower(state.params, eval_batches).compile()
        self.eval_phi_step = (program.eval_phi_step.lower(state.outer.phi, eval_batches).compile()
                              if program.cfg.run.eval_params == "phi" else None)
        self.cfg, layout = program.cfg, program.layout
        self.tokens_per_replica_step = (self.cfg.data.global_batch_size // layout.num_replicas
                                        * self.cfg.data.seq_len)
        self.straggler = Straggler.for_replicas(self.cfg.straggler, layout.num_replicas,
                                                local_replica_indices(layout.mesh))
        self.local_phase = LocalPhase(program, self.straggler) if program.method.timed else None
        self.watchdog = Watchdog(self.cfg.run.barrier_timeout_seconds)
        self.traffic = ReplicaTraffic(program)
        self.traffic.resume(metrics.kept, self.step)
        # The rows' wall_time: seconds in this run's loops, continued across resumes.
        resumed_at = [r["wall_time"] for r in metrics.kept if "wall_time" in r]
        self.started = time.perf_counter() - (resumed_at[-1] if resumed_at else 0.0)
        self.schedule = lr_schedule(self.cfg.optimizer, self.cfg.run.steps)
        self.config_dict = to_dict(self.cfg)  # saved with every checkpoint
        self.trace = StepTrace(profile_steps(self.cfg.run), Path(self.cfg.run.run_dir) / "profile")

    @property
    def step(self) -> int:
        return self.steps.step

    def run(self) -> dict:
        run = self.cfg.run
        with self.watchdog, collective_errors("training"), StopRequest() as self.stop, \
                self.trace:
            self.eval_loss = self.evaluate() if self.step == 0 else None
            self.interval = (time.perf_counter(), self.step)  # when the logged interval began
            with tqdm(total=run.steps, initial=self.step, unit="step", dynamic_ncols=True,
                      disable=not run.progress or jax.process_index()) as self.bar:
                while self.step < run.steps:
                    self.trace.before(self.step + 1)
                    step_metrics, plan = self.advance()  # compiles what it runs first
                    self.trace.after(self.step, self.state)
                    with self.watchdog.guard(f"step {self.step + 1}"):
                        self.after(step_metrics, plan)
            with self.watchdog.guard("the last checkpoint"):
                self.ckpt.wait()
            if self.eval_loss is None:  # the run had already finished: report, don't record
                self.eval_loss = self.evaluate(record=False)
        summary = {"step": self.step, "final_eval_loss": self.eval_loss, "tokens": self.tokens()}
        log(f"done: {self.step} steps, {summary['tokens']:,} tokens, final eval loss "
            f"{self.eval_loss:.4f}")
        return summary

    def after(self, step_metrics: dict, plan: StepPlan) -> None:
        """The books after a step or round: counts, metrics rows, progress, evaluation,
        checkpoints and stop requests."""
        run = self.cfg.run
        before = self.step
        self.steps.advance(step_metrics)
        self.traffic.add(plan)
        self.bar.update(self.step - before)
        if "sync_weights" in step_metrics:
            self.metrics.write({**_sync_row(self.step, step_metrics),
                                "units": plan.name(self.program.method.num_layers),
                                **self.progress()})
        logged = _crossed(before, self.step, run.log_every) or self.step == run.steps
        if logged:
            started, first_step = self.interval
            row = self.train_row(step_metrics,
                                 (time.perf_counter() - started) / (self.step - first_step))
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tok_s']:,.0f}")
            self.interval = (time.perf_counter(), self.step)
        if _crossed(before, self.step, run.eval_every) or self.step == run.steps:
            self.eval_loss = self.evaluate()
        # Processes meet at outer syncs anyway; plsgd/dreamddp average something every step, where
        # an extra agreement per step would cost more than it saves.
        meets = bool(plan.sync) and self.program.method.rule is not SyncRule.PARTIAL
        self.save_or_stop(before, meeting=logged or meets)

    def advance(self) -> tuple[dict, StepPlan]:
        """One step, or for a_edit past its warm-up one round of local steps and a sync."""
        if self.local_phase is not None and self.step >= self.program.method.warmup_steps:
            return self.timed_round()
        started = time.perf_counter()
        self.state, step_metrics, plan = self.program.step(self.state, self.step,
                                                           self.next_batch())
        with self.watchdog.guard(f"step {self.step + 1}"):
            self.straggler.after_step(step_metrics["loss"], started)
        return step_metrics, plan

    def timed_round(self) -> tuple[dict, StepPlan]:
        """a_edit: this process's local phase, then the sync step with every other process."""
        program, run, step = self.program, self.cfg.run, self.step
        if program.method.begins_local_phase(step):
            self.state = program.begin_local_phase(self.state)
        mine = int(self.steps.per_replica[self.local_phase.local.replicas].max())
        self.state, _ = self.local_phase.run(self.state, lambda: next(self.iterator), mine,
                                             run.steps, lambda: self.stop.requested)
        barrier(f"edit-jax-sync-after-{step}", run.barrier_timeout_seconds,
                f"the sync after step {step}")
        started = time.perf_counter()
        plan = program.method.full_sync
        self.state, step_metrics = program.compiled_step(plan)(self.state, self.next_batch())
        with self.watchdog.guard(f"the sync after step {step}"):
            self.straggler.after_step(step_metrics["loss"], started)
        return step_metrics, plan

    def next_batch(self) -> jax.Array:
        return _global_batch(self.program.layout, next(self.iterator),
                             self.cfg.data.global_batch_size)

    def wall_time(self) -> float:
        """Seconds this run has spent in its loops, over all its resumes."""
        return round(time.perf_counter() - self.started, 3)

    def tokens(self) -> int:
        return self.steps.total() * self.tokens_per_replica_step

    def progress(self) -> dict:
        """What every metrics row carries besides its step, so that curves can be drawn against
        any of them: tokens, wall time, and the bytes each device sent over `replica`."""
        return {"tokens": self.tokens(), "wall_time": self.wall_time(), **self.traffic.total}

    def train_row(self, step_metrics: dict, step_time: float) -> dict:
        """Write a train row; returns it with the tokens/s the progress bar shows."""
        loss = float(step_metrics["loss"].mean())
        row = {"step": self.step, "loss": loss, "lr": float(self.schedule(self.step - 1)),
               "step_time": step_time, "grad_norm": float(step_metrics["grad_norm"].mean()),
               **self.progress()}
        self.metrics.write(row)
        return {**row, "tok_s": self.cfg.data.global_batch_size * self.cfg.data.seq_len
                / step_time}

    def evaluate(self, record: bool = True) -> float:
        with self.watchdog.guard(f"the evaluation at step {self.step}"):
            if self.eval_phi_step is not None and self.step > self.program.method.warmup_steps:
                loss = float(self.eval_phi_step(self.state.outer.phi, self.eval_batches))
            else:  # phi is set when the local phase begins
                loss = float(self.eval_step(self.state.params, self.eval_batches))
        if record:
            self.metrics.write({"step": self.step, "eval_loss": loss, **self.progress()})
        log(f"step {self.step}: eval loss {loss:.4f}")
        return loss

    def save_or_stop(self, before: int, meeting: bool) -> None:
        """Checkpoint when due; on a stop request (any process), save and stop every process
        (where they meet: `meeting`, or a checkpoint)."""
        run, step = self.cfg.run, self.step
        due = step == run.steps or _crossed(before, step, run.checkpoint_every)
        stopping = self.stop.agreed(meeting or due, self.state)
        self.ckpt.save(step, self.state, config=self.config_dict, data_iterator=self.iterator,
                       force=stopping or due)
        if stopping:
            self.ckpt.wait()
            raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved in "
                                    f"{Path(run.run_dir) / 'checkpoints'}; rerun the same "
                                    "command to resume")


def _sync_row(step: int, step_metrics: dict) -> dict:
    row = {"step": step, "sync": True,
           "weights": np.asarray(step_metrics["sync_weights"]).round(6).tolist(),
           "local_steps": np.asarray(step_metrics["sync_local_steps"]).tolist()}
    if "sync_outliers" in step_metrics:
        row["outliers"] = int(step_metrics["sync_outliers"])
    return row
