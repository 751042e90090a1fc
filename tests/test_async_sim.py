"""Delayed Nesterov against hand-computed values, and the asynchronous Local-SGD simulator."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edit_jax.async_sim import PAPER_STEP_TIMES, SimConfig, local_step_counts, simulate
from edit_jax.config import DataConfig, ModelConfig
from edit_jax.data import eval_batches, train_iterator
from edit_jax.errors import UserError
from edit_jax.model import init_model, loss_fn
from edit_jax.optimizer import decay_mask
from edit_jax.delayed_nesterov import DelayedNesterovState, delayed_nesterov
from edit_jax.data import load_tokenizer

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64,
                    remat="none")
ROWS = 4  # sequences per worker per local step


def _data(num_workers: int, seed: int = 0) -> DataConfig:
    return DataConfig(seq_len=32, global_batch_size=ROWS * num_workers, shuffle_seed=seed)


def _run_dn(tx, grads):
    """Per arrival: (update, momentum, buffer, count) for scalar pseudo-gradients."""
    state = tx.init(jnp.zeros(()))
    rows = []
    for g in grads:
        update, state = tx.update(jnp.asarray(g, jnp.float32), state)
        rows.append((float(update), float(state.momentum), float(state.buffer), int(state.count)))
    return rows


def test_delayed_nesterov_hand_values():
    # N=2, lr=0.5, b=0.5. t=0: buf 1, update -0.5*(1/2). t=1: buf 4, m = 0 + 4/2 = 2,
    # update -0.5*(0.5*2 + 3/2) = -1.25, buf 0. t=2: buf 2, update -0.5*(2/2) = -0.5.
    # t=3: buf 8, m = 0.5*2 + 8/2 = 5, update -0.5*(0.5*5 + 6/2) = -2.75.
    tx = delayed_nesterov(0.5, 0.5, buffer_size=2)
    assert _run_dn(tx, [1.0, 3.0, 2.0, 6.0]) == [
        (-0.25, 0.0, 1.0, 1), (-1.25, 2.0, 0.0, 2), (-0.5, 2.0, 2.0, 3), (-2.75, 5.0, 0.0, 4)]


def test_delayed_nesterov_activation_hand_values():
    # c=0.25: inside a cycle -lr*(c*b*m + g/N); at its end -lr*((1 - 2c + c)*b*m + g/N).
    # t=0: -0.5*(0 + 0.5) = -0.25; t=1 (m=2): -0.5*(0.75*0.5*2 + 1.5) = -1.125;
    # t=2: -0.5*(0.25*0.5*2 + 1) = -0.625; t=3 (m=5): -0.5*(0.75*0.5*5 + 3) = -2.4375.
    tx = delayed_nesterov(0.5, 0.5, buffer_size=2, activation=0.25)
    updates = [row[0] for row in _run_dn(tx, [1.0, 3.0, 2.0, 6.0])]
    assert updates == [-0.25, -1.125, -0.625, -2.4375]
    # c = 1/N spreads the momentum evenly: every arrival applies c*b*m (m of that arrival).
    tx = delayed_nesterov(0.5, 0.5, buffer_size=2, activation=0.5)
    assert [row[0] for row in _run_dn(tx, [1.0, 3.0, 2.0, 6.0])] == [-0.25, -1.0, -0.75, -2.125]


def test_delayed_nesterov_cycle_is_one_optax_nesterov_step_on_the_mean():
    # Over a cycle (c=0) the updates sum to -lr*(mean + b*(b*m + mean)); optax's Nesterov step
    # on the mean is -lr*(mean + b*trace) with trace = b*trace + mean: the same expression.
    n, lr, b = 4, 0.3, 0.9
    dn = delayed_nesterov(lr, b, buffer_size=n)
    sgd = optax.sgd(lr, momentum=b, nesterov=True)
    keys = jax.random.split(jax.random.key(0), 3 * n)
    grads = [{"a": jax.random.normal(k, (3, 2)), "b": jax.random.normal(k, (5,)) * 2}
             for k in keys]
    params = jax.tree.map(jnp.zeros_like, grads[0])
    dn_state, sgd_state = dn.init(params), sgd.init(params)
    for cycle in range(3):
        block = grads[cycle * n:(cycle + 1) * n]
        total = jax.tree.map(jnp.zeros_like, params)
        for g in block:
            update, dn_state = dn.update(g, dn_state)
            total = jax.tree.map(jnp.add, total, update)
        mean = jax.tree.map(lambda *gs: sum(gs) / n, *block)
        expected, sgd_state = sgd.update(mean, sgd_state)
        for key in params:
            np.testing.assert_allclose(total[key], expected[key], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(dn_state.momentum[key], sgd_state[0].trace[key],
                                       rtol=1e-5, atol=1e-6)


def test_naive_nesterov_overapplies_where_delayed_does_not():
    # Four arrivals of the same g=1 (lr=1, b=0.5): naive Nesterov applies
    # 4 + 4b + 3b^2 + 2b^3 + b^4 = 7.0625; delayed Nesterov one step on their mean: 1 + b = 1.5.
    naive = optax.sgd(1.0, momentum=0.5, nesterov=True)
    state, naive_total = naive.init(jnp.zeros(())), 0.0
    for _ in range(4):
        update, state = naive.update(jnp.ones(()), state)
        naive_total += float(update)
    delayed = sum(row[0] for row in _run_dn(delayed_nesterov(1.0, 0.5, buffer_size=4), [1.0] * 4))
    assert naive_total == -7.0625
    assert delayed == -1.5


def test_delayed_nesterov_state_is_stable_under_jit():
    tx = delayed_nesterov(0.1, 0.9, buffer_size=3, activation=0.2)
    params = {"w": jnp.ones((4, 2), jnp.bfloat16), "s": jnp.ones((3,), jnp.float32)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    eager_state = state
    for i in range(5):
        grads = jax.tree.map(lambda x, g=i + 1: jnp.full_like(x, g), params)
        updates, state = step(grads, state)
        eager_updates, eager_state = tx.update(grads, eager_state)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), updates) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), tx.init(params))
        jax.tree.map(np.testing.assert_array_equal, updates, eager_updates)
    assert isinstance(state, DelayedNesterovState) and int(state.count) == 5


@pytest.mark.parametrize("kwargs", [{"buffer_size": 0}, {"buffer_size": 4, "activation": 0.3},
                                    {"buffer_size": 4, "momentum": 1.0}])
def test_delayed_nesterov_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        delayed_nesterov(0.7, **kwargs)


def _arrivals(result):
    return [(a["time"], a["worker"], a["steps"], a["staleness"]) for a in result.arrivals]


def test_grace_zero_applies_arrivals_in_event_order():
    # Grace 0, durations 2, 3, 5 s (H=2): worker w finishes at k*d_w (ties restart together at
    # the tie time), so the order is that of sorted (k*d_w, w). A worker that read phi at
    # (k-1)*d_w after the arrivals at that time finds those strictly between, and those at its
    # own time with a smaller id. Built here from the times alone, not from the simulator.
    sim = SimConfig(step_times=(1.0, 1.5, 2.5), local_steps=2, outer="nesterov",
                    grace_seconds=0.0, num_updates=12, eval_every=4, eval_batches=1)
    result = simulate(MODEL, _data(3), sim)
    events = sorted((k * 2 * t, w) for w, t in enumerate(sim.step_times) for k in range(1, 9))
    events = events[:12]
    expected = []
    for time, w in events:
        read = time - 2 * sim.step_times[w]
        stale = sum(read < t < time or (t == time and v < w) for t, v in events)
        expected.append((time, w, 2, stale))
    assert _arrivals(result) == expected
    # By hand: w0 at 4 read at 2 and finds w1's arrival at 3; w1 at 6 read at 3 and finds
    # w0 (4), w2 (5) and w0 (6, smaller id).
    assert expected[:6] == [(2.0, 0, 2, 0), (3.0, 1, 2, 1), (4.0, 0, 2, 1), (5.0, 2, 2, 3),
                            (6.0, 0, 2, 1), (6.0, 1, 2, 3)]
    # Evaluations after every 4th arrival: at 5 s (w2), 9 s (w1) and 12 s (w1).
    assert [(e["time"], e["updates"], e["local_steps"]) for e in result.evals] == [
        (0.0, 0, 0), (5.0, 4, 8), (9.0, 8, 16), (12.0, 12, 24)]
    # A time budget stops before the first arrival after it.
    timed = simulate(MODEL, _data(3), dataclasses.replace(sim, num_updates=0, sim_time=6.0))
    assert _arrivals(timed) == expected[:6]
    # Synchronous rounds wait for the slowest worker (5 s) and count every pseudo-gradient.
    sync = simulate(MODEL, _data(3), dataclasses.replace(sim, outer="sync", num_updates=0,
                                                         sim_time=11.0))
    assert _arrivals(sync) == [(t, w, 2, 0) for t in (5.0, 10.0) for w in range(3)]


def test_grace_period_groups_a_hand_worked_schedule():
    # Durations 2, 3, 8 s, grace 1 s. t=2: w0 opens a window to 3; w1 (t=3) joins; both restart
    # at 3 (w0 -> 5, w1 -> 6). t=5: w0 opens a window to 6; w1 (t=6) joins; restart at 6 (w0 -> 8,
    # w1 -> 9). t=8: w0 (first of the tie), then w2 (8) and w1 (9) join. Staleness = updates
    # applied since the read: w1 read at 0 and finds w0's; w2 read at 0 and finds 5.
    sim = SimConfig(step_times=(1.0, 1.5, 4.0), local_steps=2, outer="delayed_nesterov",
                    grace_seconds=1.0, num_updates=7, eval_every=7, eval_batches=1)
    result = simulate(MODEL, _data(3), sim)
    assert _arrivals(result) == [(2.0, 0, 2, 0), (3.0, 1, 2, 1), (5.0, 0, 2, 0),
                                 (6.0, 1, 2, 1), (8.0, 0, 2, 0), (8.0, 2, 2, 5), (9.0, 1, 2, 2)]


@pytest.mark.parametrize("grace", [0.0, 0.5])
def test_delayed_nesterov_with_equal_speeds_is_synchronous_diloco(grace):
    # The paper's pipeline check (its footnote 5): equal step times make every round one group
    # of W arrivals from the same phi; DN with N = W then takes one Nesterov step on their mean,
    # so phi after each round must equal DiLoCo's up to float rounding (atol 1e-6, a few
    # float32 ulps at the weights' scale; measured 2e-7 to 7e-7). Naive Nesterov per arrival
    # differs by at least 0.02 from the first round on, so the comparison can fail.
    phis = {}
    for outer in ("sync", "delayed_nesterov", "nesterov"):
        seen = phis[outer] = {}
        simulate(MODEL, _data(3), SimConfig(step_times=(1.0,) * 3, local_steps=2, outer=outer,
                                            grace_seconds=grace, num_updates=12,
                                            eval_every=12, eval_batches=1),
                 observe=lambda updates, phi, seen=seen: seen.__setitem__(updates, phi))
    assert sorted(phis["sync"]) == [3, 6, 9, 12]
    for updates in (3, 6, 9, 12):
        sync = jax.tree.leaves(phis["sync"][updates])
        for a, b in zip(sync, jax.tree.leaves(phis["delayed_nesterov"][updates])):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        naive = jax.tree.leaves(phis["nesterov"][updates])
        assert max(float(np.max(np.abs(a - b))) for a, b in zip(sync, naive)) > 0.02


def test_dylu_step_counts_and_equal_finish_times():
    # floor(50 * 0.58 / t): 50, 38.67 -> 38, 19.21 -> 19, 8.71 -> 8; finish times 29, 28.5,
    # 28.69, 26.64 s instead of 29 ... 166.5 s. A worker always runs at least one step.
    counts = local_step_counts(PAPER_STEP_TIMES, 50, dylu=True)
    assert counts == [50, 38, 19, 8]
    finish = [n * t for n, t in zip(counts, PAPER_STEP_TIMES)]
    assert max(finish) / min(finish) < 1.1
    assert local_step_counts((1.0, 100.0), 10, dylu=True) == [10, 1]
    assert local_step_counts((1.0, 100.0), 10, dylu=False) == [10, 10]
    # In the simulator, (1, 2) s/step and H=4 give 4 and 2 steps that both end after 4 s; they
    # form one group and restart together when the 0.5 s grace window closes.
    sim = SimConfig(step_times=(1.0, 2.0), local_steps=4, outer="delayed_nesterov", dylu=True,
                    grace_seconds=0.5, num_updates=4, eval_every=4, eval_batches=1)
    result = simulate(MODEL, _data(2), sim)
    assert result.steps_per_worker == [4, 2]
    assert _arrivals(result) == [(4.0, 0, 4, 0), (4.0, 1, 2, 1), (8.5, 0, 4, 0),
                                 (8.5, 1, 2, 1)]


def test_simulation_with_jitter_is_deterministic_and_json_serialisable():
    # Jitter 0.25 scales each task of 2 x 1 s by U(0.75, 1.25): one worker's arrivals are
    # 1.5-2.5 s apart, not all 2 s, and the same seed draws the same times.
    sim = SimConfig(step_times=(1.0, 2.0), local_steps=2, outer="delayed_nesterov",
                    step_time_jitter=0.25, grace_seconds=0.0, num_updates=8, eval_every=2,
                    eval_batches=1, seed=3)
    first, second = simulate(MODEL, _data(2), sim), simulate(MODEL, _data(2), sim)
    assert first == second
    assert json.loads(json.dumps(dataclasses.asdict(first))) == dataclasses.asdict(first)
    gaps = np.diff([0.0] + [a["time"] for a in first.arrivals if a["worker"] == 0])
    assert len(gaps) >= 3 and np.all((gaps >= 1.5) & (gaps <= 2.5)) and np.ptp(gaps) > 0.05


@pytest.mark.parametrize("pretrain_steps, min_lr_ratio, round_lrs", [
    (0, 1.0, (1.0, 1.0)),
    # A cosine to half the rate over 6 local steps: round 2 starts at progress 3/6, where the
    # cosine factor is 0.5, so its rate is 0.5 + 0.5 * 0.5 = 0.75 of inner_lr.
    (2, 0.5, (1.0, 0.75)),
])
def test_one_worker_sync_diloco_is_sequential_adamw(pretrain_steps, min_lr_ratio, round_lrs):
    # One worker, outer lr 1, no momentum: phi <- phi - (phi - theta) = theta, and the worker
    # keeps its AdamW state (from pretraining, which reads the same stream first), so P
    # pretraining steps and R rounds of H steps are P + R*H plain AdamW steps on its stream.
    data = _data(1)
    sim = SimConfig(step_times=(1.0,), local_steps=3, outer="sync", num_local_steps=6,
                    outer_lr=1.0, outer_momentum=0.0, eval_every=1, eval_batches=2,
                    pretrain_steps=pretrain_steps, min_lr_ratio=min_lr_ratio)
    result = simulate(MODEL, data, sim)

    tokenizer = load_tokenizer(data)
    graphdef, params = init_model(MODEL, tokenizer.vocab_size, sim.seed)
    batches = train_iterator(data, tokenizer, process_index=0, process_count=1)
    val = eval_batches(data, tokenizer, num_batches=2, process_index=0, process_count=1)

    def adamw(lr):
        return optax.chain(optax.clip_by_global_norm(sim.clip_norm),
                           optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=sim.weight_decay,
                                       mask=decay_mask))

    @jax.jit
    def step(params, opt_state, batch, lr):
        grads = jax.grad(lambda p: loss_fn(graphdef, p, batch)[0])(params)
        updates, opt_state = adamw(lr).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def evaluate(params):
        return float(np.mean([loss_fn(graphdef, params, batch)[0] for batch in val]))

    opt_state = adamw(sim.inner_lr).init(params)
    for _ in range(pretrain_steps):
        params, opt_state = step(params, opt_state, next(batches), sim.inner_lr)
    expected = [evaluate(params)]
    for lr in round_lrs:
        for _ in range(3):
            params, opt_state = step(params, opt_state, next(batches), lr * sim.inner_lr)
        expected.append(evaluate(params))
    np.testing.assert_allclose([e["eval_loss"] for e in result.evals], expected, rtol=2e-5)
    assert [e["time"] for e in result.evals] == [0.0, 3.0, 6.0]


def test_one_worker_makes_every_outer_rule_the_same():
    # With W=1, naive async Nesterov is DiLoCo's Nesterov per round, and delayed Nesterov with
    # N=1 folds every arrival into the momentum at once: m = b*m + g, update -lr*(b*m + g).
    base = SimConfig(step_times=(1.0,), local_steps=3, num_updates=3, eval_every=1,
                     eval_batches=1)
    losses = [[e["eval_loss"] for e in simulate(MODEL, _data(1), dataclasses.replace(
        base, outer=outer)).evals] for outer in ("sync", "nesterov", "delayed_nesterov")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-5)


def test_seed002_naive_async_is_worse_and_delayed_nesterov_dylu_closes_the_gap():
    # The paper's 4 workers (0.58 ... 3.33 s/step), H=20, 40 pseudo-gradients each, grace
    # 0.5 s, the mean of the last 3 evals. Measured over data/model seeds 0-4: sync 2.32-2.42,
    # naive async Nesterov 8.3-13.1 (it diverges), naive at lr/4 2.72-2.93, DN 2.45-2.51,
    # DN+DyLU 2.50-2.59.
    data = _data(4)
    base = SimConfig(local_steps=20, num_updates=40, eval_every=4, eval_batches=8)

    def run(outer, dylu=False, outer_lr=base.outer_lr):
        return simulate(MODEL, data, dataclasses.replace(base, outer=outer, dylu=dylu,
                                                         outer_lr=outer_lr))

    def tail(result):
        return float(np.mean([e["eval_loss"] for e in result.evals[-3:]]))

    sync, naive = run("sync"), run("nesterov")
    dn, dn_dylu = run("delayed_nesterov"), run("delayed_nesterov", dylu=True)
    gap = tail(naive) - tail(sync)
    assert gap > 2.0
    assert tail(dn) - tail(sync) < 0.3
    assert tail(dn_dylu) - tail(sync) < 0.15 * gap
    # Not just a smaller step: naive Nesterov at lr/4 stays clearly behind DN (by 0.21-0.43).
    assert tail(dn) < tail(run("nesterov", outer_lr=base.outer_lr / 4)) - 0.1
    # In simulated time DN+DyLU is ahead: it ends at 117 s (about 11.7 s per 4 arrivals), DiLoCo
    # needs 66.6 s per round of 4, and at 117 s DiLoCo was at 3.22-3.27.
    end = dn_dylu.evals[-1]["time"]
    sync_then = [e["eval_loss"] for e in sync.evals if e["time"] <= end][-1]
    assert tail(dn_dylu) < sync_then - 0.2


def test_bad_simulation_input_is_a_user_error():
    for sim, data in [(SimConfig(outer="adam", num_updates=1), _data(4)),
                      (SimConfig(num_updates=1, min_lr_ratio=0.5), _data(4)),
                      (SimConfig(), _data(4)),
                      (SimConfig(num_updates=1), DataConfig(seq_len=32, global_batch_size=6)),
                      (SimConfig(step_times=(1.0, 0.0), num_updates=1), _data(2)),
                      (SimConfig(num_updates=1, grace_seconds=-1.0), _data(4)),
                      (SimConfig(num_updates=1, step_time_jitter=1.0), _data(4))]:
        with pytest.raises(UserError):
            simulate(MODEL, data, sim)
