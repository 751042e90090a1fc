"""A deterministic one-device simulator of asynchronous Local-SGD with a server.

The setting of Liu et al., arXiv 2401.09135 (docs/algorithms.md section 5).

W workers with faked seconds per local step share one device. A worker reads phi, runs its
local steps (AdamW, one jitted loop) and its pseudo-gradient phi_at_start - theta reaches the
server at start + steps * step_time * (a per-task jitter factor, `step_time_jitter`). The
server follows the paper's task scheduling with a grace period (its Algorithms 2 and 5): it
takes the first arrival, keeps taking arrivals until `grace_seconds` after it, applies each one
through the outer rule in event order ((time, worker id)), and then every worker of that group
restarts together from the current phi when the window closes; the others keep running.
Outer rules: `sync` (DiLoCo: every worker runs, the server waits for the slowest, averages and
takes one Nesterov step), `nesterov` (naive asynchronous DiLoCo: Nesterov per arrival) and
`delayed_nesterov` (`delayed_nesterov.delayed_nesterov` with N = W). DyLU gives worker w
max(1, floor(H * v_w / max v)) local steps, v = 1 / step time, so workers finish together.

The paper's protocol (section 4 there): every rule starts from one model pretrained
synchronously (`pretrain_steps` AdamW steps on the global batch, computed once and shared; each
worker starts with its optimizer state), and the rules are compared at equal local steps over
all workers (`num_local_steps`, the paper's "updates") and over simulated time. With
`min_lr_ratio` < 1 the inner learning rate follows a cosine from `inner_lr` to
`inner_lr * min_lr_ratio` over the local-step budget, driven by the local steps the server has
applied when a worker reads phi (the paper drives one schedule per data shard and balances the
shards' progress, which makes it follow the global progress too).

Choices: each worker keeps its own AdamW state from one round to the next (DiLoCo's choice);
only its parameters restart from phi. Worker w reads rows [w*B/W, (w+1)*B/W) of the global
batches (`train_iterator` with process_index=w), after those pretraining used, so the workers'
streams are disjoint. `updates` counts pseudo-gradients applied: one per arrival, W per
synchronous round.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from edit_jax.config import DataConfig, ModelConfig
from edit_jax.data import eval_batches, train_iterator
from edit_jax.errors import UserError
from edit_jax.model import init_model, loss_fn
from edit_jax.optimizer import decay_mask
from edit_jax.delayed_nesterov import delayed_nesterov
from edit_jax.data import load_tokenizer

PAPER_STEP_TIMES = (0.58, 0.75, 1.51, 3.33)  # s per local step, the authors' public notebook
PRETRAIN_CHUNK = 50  # pretraining steps per jitted call
OUTER_RULES = ("sync", "nesterov", "delayed_nesterov")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """One simulated run; set at least one budget: `num_updates`, `num_local_steps` or
    `sim_time` (0 = no limit)."""

    step_times: tuple[float, ...] = PAPER_STEP_TIMES  # simulated seconds per local step
    local_steps: int = 50  # H
    outer: str = "delayed_nesterov"  # sync | nesterov | delayed_nesterov
    dylu: bool = False
    num_updates: int = 0  # stop once this many pseudo-gradients are applied
    num_local_steps: int = 0  # stop once the applied ones hold this many local steps
    sim_time: float = 0.0  # stop before the first arrival after this simulated time
    pretrain_steps: int = 0  # synchronous AdamW steps on the global batch before the rules run
    grace_seconds: float = 0.5  # tau_grace: how long the server keeps a group open
    step_time_jitter: float = 0.0  # j: each task's step time is scaled by U(1 - j, 1 + j)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    activation: float = 0.0  # delayed Nesterov's c
    inner_lr: float = 3e-3
    min_lr_ratio: float = 1.0  # < 1: cosine decay over num_local_steps (1 = constant)
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # inner global-norm clipping; 0 = off
    eval_every: int = 4  # evaluate each time this many more pseudo-gradients are applied
    eval_batches: int = 2
    seed: int = 0  # model initialisation and the step-time jitter


@dataclasses.dataclass
class SimResult:
    """What a run produced; `dataclasses.asdict` of it is JSON-serialisable.

    evals: {time, updates, local_steps, eval_loss}, the first at time 0, the last at the end.
    arrivals: {time, worker, steps, staleness} per applied pseudo-gradient, in order;
        staleness = updates applied between the worker reading phi and its arrival.
    """

    config: dict[str, Any]
    steps_per_worker: list[int]
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    arrivals: list[dict[str, float]] = dataclasses.field(default_factory=list)


def local_step_counts(step_times: Sequence[float], local_steps: int, dylu: bool) -> list[int]:
    """H per worker, or with DyLU max(1, floor(H * v_w / max v)) with v = 1 / step time."""
    if not dylu:
        return [local_steps] * len(step_times)
    speeds = [1 / t for t in step_times]
    return [max(1, math.floor(local_steps * v / max(speeds))) for v in speeds]


def inner_tx(weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
    """The workers' optimizer at learning rate 1: global-norm clipping (if clip_norm > 0), then
    AdamW; scaling its update by lr is AdamW at lr (weight decay included)."""
    adamw = optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def inner_lr(sim: SimConfig, applied_local_steps: int) -> float:
    """The inner learning rate of a round that starts when the server has applied
    `applied_local_steps`: constant, or a cosine over the local-step budget."""
    if sim.min_lr_ratio == 1.0:
        return sim.inner_lr
    progress = min(applied_local_steps / sim.num_local_steps, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return sim.inner_lr * (sim.min_lr_ratio + (1 - sim.min_lr_ratio) * cosine)


def outer_tx(sim: SimConfig) -> optax.GradientTransformation:
    """The server's optimizer for `sim.outer`."""
    if sim.outer == "delayed_nesterov":
        return delayed_nesterov(sim.outer_lr, sim.outer_momentum,
                                buffer_size=len(sim.step_times), activation=sim.activation)
    return optax.sgd(sim.outer_lr, momentum=sim.outer_momentum, nesterov=True)


@functools.cache
def _programs(graphdef, weight_decay: float, clip_norm: float):
    """(inner optimizer, jitted local run, jitted evaluation), cached so that runs of one model
    and inner optimizer share the compilations."""
    tx = inner_tx(weight_decay, clip_norm)

    def run_local(params, opt_state, batches_HxBxT1, num_steps, lr):
        def step(i, carry):
            params, opt_state = carry
            grads = jax.grad(lambda p: loss_fn(graphdef, p, batches_HxBxT1[i])[0])(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: lr * u, updates)
            return optax.apply_updates(params, updates), opt_state

        return jax.lax.fori_loop(0, num_steps, step, (params, opt_state))

    def evaluate(params, batches_NxBxT1):
        return jnp.mean(jax.lax.map(lambda b: loss_fn(graphdef, params, b)[0], batches_NxBxT1))

    return tx, jax.jit(run_local), jax.jit(evaluate)


@functools.partial(jax.jit, static_argnums=0)
def _server_step(tx: optax.GradientTransformation, phi, state, phi_start, thetas):
    """phi after the outer step on mean_w(phi_start - theta_w), and the outer state."""
    delta = jax.tree.map(lambda p, *ts: p - sum(ts) / len(ts), phi_start, *thetas)
    updates, state = tx.update(delta, state, phi)
    return optax.apply_updates(phi, updates), state


class _Worker:
    """One worker: its data stream, its AdamW state, its step count and time, and its own
    jitter generator (seeded by (seed, index), so draws do not depend on the event order)."""

    def __init__(self, index: int, steps: int, step_time: float, jitter: float, seed: int,
                 batches, opt_state, run_local, max_steps: int):
        self.index, self.steps, self.step_time = index, steps, step_time
        self._jitter, self._rng = jitter, np.random.default_rng([seed, index])
        self._batches, self._opt_state = batches, opt_state
        self._run_local, self._max_steps = run_local, max_steps

    def duration(self) -> float:
        """Simulated seconds of this worker's next task: steps * step_time * U(1 - j, 1 + j)."""
        factor = self._rng.uniform(1 - self._jitter, 1 + self._jitter) if self._jitter else 1.0
        return self.steps * self.step_time * factor

    def run(self, phi, lr: float):
        """theta after this worker's local steps from phi at inner learning rate `lr`; its
        AdamW state carries over."""
        batches = [next(self._batches) for _ in range(self.steps)]
        batches += [np.zeros_like(batches[0])] * (self._max_steps - self.steps)  # never read
        theta, self._opt_state = self._run_local(phi, self._opt_state, np.stack(batches),
                                                 self.steps, lr)
        return theta


@functools.cache
def pretrained(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, steps: int,
               lr: float, weight_decay: float, clip_norm: float):
    """(phi, AdamW state) after `steps` synchronous AdamW steps at `lr` on the global batches
    from the initial model of `seed`; cached, so every rule of a comparison starts from it."""
    tokenizer = load_tokenizer(data_cfg)
    graphdef, params = init_model(model_cfg, model_cfg.vocab_size or tokenizer.vocab_size, seed)
    tx, run_local, _ = _programs(graphdef, weight_decay, clip_norm)
    opt_state = tx.init(params)
    batches = train_iterator(data_cfg, tokenizer, process_index=0, process_count=1)
    for done in range(0, steps, PRETRAIN_CHUNK):
        chunk = min(PRETRAIN_CHUNK, steps - done)
        stacked = [next(batches) for _ in range(chunk)]
        stacked += [np.zeros_like(stacked[0])] * (PRETRAIN_CHUNK - chunk)  # never read
        params, opt_state = run_local(params, opt_state, np.stack(stacked), chunk, lr)
    return params, opt_state


def simulate(model_cfg: ModelConfig, data_cfg: DataConfig, sim: SimConfig,
             observe: Callable[[int, Any], None] | None = None) -> SimResult:
    """Runs one simulated training and returns its evaluation curve and arrival log.

    Args:
        model_cfg: the Llama; vocab_size 0 takes the tokenizer's.
        data_cfg: corpus, tokenizer, seq_len; global_batch_size is summed over the workers.
        sim: workers, local steps, outer rule, DyLU, budget and hyper-parameters.
        observe: if given, called as observe(updates, phi) after every outer step (to compare
            the parameters of two rules step by step).

    Returns:
        A `SimResult`.
    """
    _validate(sim, data_cfg)
    num_workers = len(sim.step_times)
    tokenizer = load_tokenizer(data_cfg)
    graphdef, _ = init_model(model_cfg, model_cfg.vocab_size or tokenizer.vocab_size, sim.seed)
    _, run_local, evaluate = _programs(graphdef, sim.weight_decay, sim.clip_norm)
    phi, opt_state = pretrained(model_cfg, data_cfg, sim.seed, sim.pretrain_steps, sim.inner_lr,
                                sim.weight_decay, sim.clip_norm)
    steps = local_step_counts(sim.step_times, sim.local_steps, sim.dylu)
    streams = [train_iterator(data_cfg, tokenizer, process_index=w, process_count=num_workers)
               for w in range(num_workers)]
    for stream in streams:  # past the batches pretraining used
        for _ in range(sim.pretrain_steps):
            next(stream)
    workers = [_Worker(w, steps[w], sim.step_times[w], sim.step_time_jitter, sim.seed,
                       streams[w], opt_state, run_local, max(steps))
               for w in range(num_workers)]
    val_NxBxT1 = np.stack(eval_batches(data_cfg, tokenizer, num_batches=sim.eval_batches,
                                       process_index=0, process_count=1))
    result = SimResult(config={**dataclasses.asdict(sim), "step_times": list(sim.step_times)},
                       steps_per_worker=steps)
    server = _Server(sim, outer_tx(sim), phi, lambda p: float(evaluate(p, val_NxBxT1)), result,
                     observe)
    (_sync_rounds if sim.outer == "sync" else _async_arrivals)(sim, workers, server)
    server.finish()
    return result


class _Server:
    """phi and its outer optimizer, and the books: updates, local steps, arrivals, evals."""

    def __init__(self, sim: SimConfig, tx: optax.GradientTransformation, phi, evaluate,
                 result: SimResult, observe):
        self.phi, self._tx, self._state = phi, tx, tx.init(phi)
        self._sim, self._evaluate, self._result = sim, evaluate, result
        self._observe = observe
        self.updates = self._local_steps = 0
        self.time = 0.0
        self._record()

    def apply(self, time: float, phi_start, thetas: list, arrivals: list[tuple[_Worker, int]]):
        """One outer step on mean(phi_start - theta) for the (worker, staleness) `arrivals`."""
        self.phi, self._state = _server_step(self._tx, self.phi, self._state, phi_start, thetas)
        before, self.time = self.updates, time
        for worker, staleness in arrivals:
            self._result.arrivals.append({"time": time, "worker": worker.index,
                                          "steps": worker.steps, "staleness": staleness})
            self.updates += 1
            self._local_steps += worker.steps
        if self._observe:
            self._observe(self.updates, self.phi)
        if self.updates // self._sim.eval_every > before // self._sim.eval_every:
            self._record()

    @property
    def lr(self) -> float:
        """The inner learning rate of a round starting now."""
        return inner_lr(self._sim, self._local_steps)

    def done(self) -> bool:
        sim = self._sim
        return (0 < sim.num_updates <= self.updates
                or 0 < sim.num_local_steps <= self._local_steps)

    def finish(self) -> None:
        """Evaluates the final phi unless that was just done."""
        if self._result.evals[-1]["updates"] != self.updates:
            self._record()

    def _record(self) -> None:
        self._result.evals.append({"time": self.time, "updates": self.updates,
                                   "local_steps": self._local_steps,
                                   "eval_loss": self._evaluate(self.phi)})


def _over_time(sim: SimConfig, time: float) -> bool:
    return sim.sim_time > 0 and time > sim.sim_time


def _sync_rounds(sim: SimConfig, workers: list[_Worker], server: _Server) -> None:
    """DiLoCo: every worker runs from phi, the slowest sets the round time, one outer step."""
    while not server.done():
        round_time = max(w.duration() for w in workers)
        if _over_time(sim, server.time + round_time):
            break
        thetas = [w.run(server.phi, server.lr) for w in workers]
        server.apply(server.time + round_time, server.phi, thetas, [(w, 0) for w in workers])


def _async_arrivals(sim: SimConfig, workers: list[_Worker], server: _Server) -> None:
    """Groups of arrivals (the paper's grace period): the first arrival opens a window of
    `grace_seconds`; every arrival up to its close is applied alone, in event order; then the
    group restarts together from the current phi at the close."""
    pending, queue = {}, []

    def start(worker: _Worker, now: float) -> None:
        pending[worker.index] = (server.phi, worker.run(server.phi, server.lr), server.updates)
        heapq.heappush(queue, (now + worker.duration(), worker.index))

    for worker in workers:
        start(worker, 0.0)
    while not server.done() and not _over_time(sim, queue[0][0]):
        close, group = queue[0][0] + sim.grace_seconds, []
        while (queue and queue[0][0] <= close and not server.done()
               and not _over_time(sim, queue[0][0])):
            time, index = heapq.heappop(queue)
            phi_start, theta, read_at = pending.pop(index)
            server.apply(time, phi_start, [theta], [(workers[index], server.updates - read_at)])
            group.append(workers[index])
        if not server.done():  # else their next tasks would never be applied
            for worker in group:
                start(worker, close)


def _validate(sim: SimConfig, data_cfg: DataConfig) -> None:
    if not sim.step_times or min(sim.step_times) <= 0:
        raise UserError(f"step_times must be one positive time per worker, got {sim.step_times}")
    if sim.local_steps < 1:
        raise UserError(f"local_steps must be at least 1, got {sim.local_steps}")
    if sim.grace_seconds < 0 or not 0 <= sim.step_time_jitter < 1:
        raise UserError(f"grace_seconds must be at least 0 and step_time_jitter in [0, 1), got "
                        f"{sim.grace_seconds} and {sim.step_time_jitter}")
    if sim.outer not in OUTER_RULES:
        raise UserError(f"unknown outer rule '{sim.outer}'; use one of {', '.join(OUTER_RULES)}")
    if sim.num_updates <= 0 and sim.num_local_steps <= 0 and sim.sim_time <= 0:
        raise UserError("the simulation needs a budget: set num_updates, num_local_steps or "
                        "sim_time above 0")
    if not 0 <= sim.min_lr_ratio <= 1 or (sim.min_lr_ratio < 1 and sim.num_local_steps <= 0):
        raise UserError("min_lr_ratio must be in [0, 1], and below 1 (a decay) it needs "
                        "num_local_steps, the length of the schedule")
    if sim.pretrain_steps < 0:
        raise UserError(f"pretrain_steps must be at least 0, got {sim.pretrain_steps}")
    if sim.eval_every < 1 or sim.eval_batches < 1:
        raise UserError("eval_every and eval_batches must be at least 1")
    if data_cfg.global_batch_size % len(sim.step_times):
        raise UserError(f"data.global_batch_size={data_cfg.global_batch_size} is not divisible "
                        f"by the {len(sim.step_times)} workers; use a multiple of them")
