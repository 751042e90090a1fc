"""EDiT, DiLoCo and local SGD on the (2, 4) mesh against a reference computed replica by replica.

The reference trains each replica alone on one device (plain JAX + plain optax AdamW) and does
the sync in numpy, following docs/algorithms.md section 3 for every synced unit (each layer, and the
non-layer parameters together): delta_r = phi - theta_r, anomaly test on EWMA statistics,
softmax weights, weighted sum, clipping, SGD with Nesterov momentum, theta_r <- phi.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edit_jax.config import Config, MeshConfig, MethodConfig, ModelConfig, OptimizerConfig, RunConfig
from edit_jax.inspect_hlo import collective_stats
from edit_jax.methods import StepKind
from edit_jax.model import init_model, loss_fn
from edit_jax.optimizer import decay_mask, lr_schedule
from edit_jax.program import build_program
from edit_jax.sharding import BATCH_SPEC

MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=1, eps=1e-4, clip_norm=0.5)  # eps: see test_step.py
VOCAB, ROWS, R, STEPS = 61, 16, 2, 11
# W=2 warm-up steps, tau=3: syncs at the start of steps 5 and 8 (and the DiLoCo-style
# after-step sync at the end of steps 4, 7, 10 for the other rules).
EDIT = MethodConfig(name="edit", warmup_steps=2, sync_every=3, outer_lr=0.7, outer_momentum=0.9,
                    anomaly=True, anomaly_warmup=1, anomaly_threshold=3.0, weighting=True,
                    temperature=0.05, clip_norm=0.05, norm_granularity="global")


def _config(method: MethodConfig) -> Config:
    return Config(model=MODEL, mesh=MeshConfig(R, 4), optimizer=OPT, method=method,
                  run=RunConfig(steps=STEPS))


def _batches():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, (ROWS, 17)).astype(np.int32) for _ in range(STEPS)]


def _run_ours(method: MethodConfig, before_step=lambda t, state: state):
    """Losses, final state and each sync's local steps per replica; `before_step(t, state)` may
    change the state before step t."""
    program = build_program(_config(method), VOCAB)
    state, losses, synced = program.init_state(), [], []
    for t, batch in enumerate(_batches()):
        state = before_step(t, state)
        state, metrics, _ = program.step(state, t, jax.device_put(batch, program.layout.batch_sharding))
        losses.append(float(metrics["loss"].mean()))
        if "sync_local_steps" in metrics:
            synced.append(np.asarray(metrics["sync_local_steps"]).tolist())
    return losses, state, synced


# ----------------------------------------------------------------------------- the reference


def _units(params):
    """Synced units as lists of (path, numpy array) views: the non-layer params, then each layer."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    rest = [(p, np.asarray(x, np.float64)) for p, x in flat if p[0].key != "layers"]
    layers = [[(p, np.asarray(x, np.float64)[l]) for p, x in flat if p[0].key == "layers"]
              for l in range(MODEL.n_layers)]
    return [rest] + layers


def _unit_arrays(params):
    return [[a for _, a in unit] for unit in _units(params)]


def _set_units(params, units):
    """params with every unit's arrays replaced."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    rest, layers = units[0], units[1:]
    leaves, i_rest, i_layer = [], 0, 0
    for path, x in flat:
        if path[0].key == "layers":
            leaves.append(np.stack([layers[l][i_layer] for l in range(MODEL.n_layers)])
                          .astype(np.float32))
            i_layer += 1
        else:
            leaves.append(rest[i_rest].astype(np.float32))
            i_rest += 1
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])


class ReferenceSync:
    """docs/algorithms.md section 3, c-f, per unit, in numpy float64."""

    def __init__(self, method: MethodConfig, phi_units, penalty: bool):
        self.m, self.penalty = method, penalty
        self.phi = [[a.copy() for a in unit] for unit in phi_units]
        self.momentum = [[np.zeros_like(a) for a in unit] for unit in phi_units]
        self.mean = [np.zeros(R) for _ in phi_units]
        self.var = [np.zeros(R) for _ in phi_units]
        self.count = [0 for _ in phi_units]
        self.weights_log, self.outliers_log = [], []

    def _weights(self, u, norms, steps):
        m = self.m
        outlier = ~np.isfinite(norms)
        # The anomaly test and its statistics use the norm per local step (our deviation,
        # docs/algorithms.md section 4); the weights below keep the raw norms.
        per_step = norms / np.maximum(steps, 1.0)
        if self.penalty and m.anomaly and self.count[u] >= m.anomaly_warmup:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = (per_step - self.mean[u]) / np.sqrt(self.var[u])
            outlier |= (self.var[u] > 0) & (z > m.anomaly_threshold)
        keep = ~outlier
        d = np.where(keep, per_step - self.mean[u], 0.0)
        self.mean[u] = self.mean[u] + m.anomaly_alpha * d
        self.var[u] = np.where(keep, (1 - m.anomaly_alpha) * (self.var[u] + m.anomaly_alpha * d * d),
                               self.var[u])
        self.count[u] += 1
        self.outliers_log.append(outlier)
        if not keep.any():
            return np.zeros(R)
        if self.penalty and m.weighting:
            logits = np.where(keep, -norms / m.temperature, -np.inf)
            w = np.exp(logits - logits[keep].max())
        else:
            w = keep.astype(np.float64)
        w = w / w.sum()
        if self.penalty and m.step_weighting > 0:  # A-EDiT: mix in the shares of local steps
            share = np.where(keep, steps, 0.0) / np.where(keep, steps, 0.0).sum()
            w = (1 - m.step_weighting) * w + m.step_weighting * share
        return w

    def sync(self, thetas_units, steps, units=None):
        """thetas_units[r][u] = list of arrays, steps[r] = local steps since the last sync;
        syncs `units` (default: all; global norms over them) and returns the new phi units
        (theta_r <- phi)."""
        units = range(len(self.phi)) if units is None else units
        deltas = [[[p - t for p, t in zip(self.phi[u], thetas_units[r][u])]
                   for u in range(len(self.phi))] for r in range(R)]
        global_norms = np.array([np.sqrt(sum(np.sum(x ** 2) for u in units for x in deltas[r][u]))
                                 for r in range(R)])
        m = self.m
        for u in units:
            if self.penalty and m.norm_granularity == "layer":
                norms = np.array([np.sqrt(sum(np.sum(x ** 2) for x in deltas[r][u]))
                                  for r in range(R)])
            else:
                norms = global_norms
            w = self._weights(u, norms, np.asarray(steps, np.float64))
            self.weights_log.append(w)
            if not w.any():  # every replica is an outlier: skip the outer step
                continue
            combined = [sum(w[r] * deltas[r][u][i] for r in range(R))
                        for i in range(len(self.phi[u]))]
            if self.penalty and m.clip_norm > 0:
                norm = np.sqrt(sum(np.sum(c ** 2) for c in combined))
                combined = [c * min(1.0, m.clip_norm / (norm + 1e-6)) for c in combined]
            for i, g in enumerate(combined):  # optax.sgd(lr, momentum, nesterov=True)
                self.momentum[u][i] = g + m.outer_momentum * self.momentum[u][i]
                step = g + m.outer_momentum * self.momentum[u][i] if m.nesterov else \
                    self.momentum[u][i]
                self.phi[u][i] = self.phi[u][i] - m.outer_lr * step
        return self.phi


@functools.cache
def _reference_functions():
    """(initial params, AdamW init, jitted loss-and-grad, jitted AdamW step, jitted mean of
    two trees), shared by every reference run of a test process (jitted once, not op by op)."""
    graphdef, params0 = init_model(MODEL, VOCAB, 0)
    tx = optax.chain(optax.clip_by_global_norm(OPT.clip_norm),
                     optax.adamw(lr_schedule(OPT, STEPS), b1=OPT.b1, b2=OPT.b2, eps=OPT.eps,
                                 weight_decay=OPT.weight_decay, mask=decay_mask))
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(graphdef, p, t)[0]))

    @jax.jit
    def adamw_step(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    mean = jax.jit(lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b))
    return params0, tx.init, grad_fn, adamw_step, mean


def _run_reference(method: MethodConfig, penalty: bool, rule: str, sync_steps=None):
    """sync_steps: the local steps per replica each sync sees (default: tau each)."""
    params0, tx_init, grad_fn, adamw_step, mean = _reference_functions()
    thetas = [params0, params0]
    opt_states = [tx_init(params0) for _ in range(R)]
    outer, losses = None, []
    W, tau = method.warmup_steps, method.sync_every
    sync_steps = iter(sync_steps or [[tau] * R] * STEPS)
    for t, batch in enumerate(_batches()):
        rows = [batch[8 * r:8 * (r + 1)] for r in range(R)]
        if t == W and rule != "average":
            outer = ReferenceSync(method, _unit_arrays(thetas[0]), penalty)
        if rule == "layerwise" and t > W and (t - W) % tau == 0:
            phi = outer.sync([_unit_arrays(th) for th in thetas], next(sync_steps))
            thetas = [_set_units(thetas[r], phi) for r in range(R)]
        results = [grad_fn(thetas[r], rows[r]) for r in range(R)]
        grads = [g for _, g in results]
        if t < W:
            mean_grad = mean(*grads)
            grads = [mean_grad, mean_grad]
        for r in range(R):
            thetas[r], opt_states[r] = adamw_step(grads[r], opt_states[r], thetas[r])
        losses.append(float(np.mean([loss for loss, _ in results])))
        if t >= W and (t + 1 - W) % tau == 0 and rule in ("outer", "average"):
            if rule == "outer":
                phi = outer.sync([_unit_arrays(th) for th in thetas], next(sync_steps))
                thetas = [_set_units(thetas[r], phi) for r in range(R)]
            else:
                average = mean(*thetas)
                thetas = [average, average]
    return losses, thetas, outer


def _assert_replicas_equal(state, thetas, atol):
    for r in range(R):
        for ours, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(thetas[r])):
            np.testing.assert_allclose(np.asarray(ours)[r], np.asarray(ref), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- the tests


WEIGHTING = dataclasses.replace(EDIT, anomaly_threshold=6.0)  # nobody flagged: softmax weights
ANOMALY = dataclasses.replace(EDIT, anomaly_threshold=3.0)  # both flagged at sync 2: step skipped


@pytest.mark.parametrize("method", [
    WEIGHTING,
    dataclasses.replace(WEIGHTING, norm_granularity="layer"),
    dataclasses.replace(WEIGHTING, norm_granularity="layer", shard_outer_over_replica=True),
    ANOMALY,
], ids=["global-norms", "layer-norms", "outer-sharded-over-replica", "all-outliers-skip"])
def test_edit_with_penalty_equals_reference(method):
    losses, state, _ = _run_ours(method)
    ref_losses, ref_thetas, ref = _run_reference(method, penalty=True, rule="layerwise")
    np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
    _assert_replicas_equal(state, ref_thetas, 1e-4)
    rest = state.outer.rest
    last_rest_sync = -len(ref.phi)  # the non-layer unit is synced first at every sync
    np.testing.assert_allclose(rest.weights, ref.weights_log[last_rest_sync], atol=1e-4)
    np.testing.assert_array_equal(rest.outliers, ref.outliers_log[last_rest_sync])
    np.testing.assert_allclose(rest.stats.mean, ref.mean[0], rtol=1e-4)
    np.testing.assert_allclose(rest.inner_state[0].trace["embed"]["embedding"],
                               ref.momentum[0][0], atol=1e-4)
    if method is ANOMALY:
        assert ref.outliers_log[last_rest_sync].all()
    else:
        assert not np.any(ref.outliers_log) and max(np.ptp(w) for w in ref.weights_log) > 0.02


def test_edit_without_penalty_is_diloco():
    plain = dataclasses.replace(EDIT, anomaly=False, weighting=False, clip_norm=0.0)
    edit_losses, edit_state, _ = _run_ours(plain)
    diloco_losses, diloco_state, _ = _run_ours(dataclasses.replace(plain, name="diloco"))
    ref_losses, ref_thetas, _ = _run_reference(plain, penalty=False, rule="outer")
    np.testing.assert_allclose(diloco_losses, ref_losses, atol=1e-4, rtol=0)
    _assert_replicas_equal(diloco_state, ref_thetas, 1e-4)
    # The same trajectory; only the last sync differs: diloco's runs at the end of step 10,
    # edit's would run at the start of step 11.
    np.testing.assert_allclose(edit_losses, diloco_losses, atol=1e-5, rtol=0)
    _, ref_edit_thetas, _ = _run_reference(plain, penalty=False, rule="layerwise")
    _assert_replicas_equal(edit_state, ref_edit_thetas, 1e-4)


def test_local_sgd_and_the_averaging_identity():
    """local_sgd averages; edit with tau=1, outer lr 1, momentum 0, no penalty does the same."""
    avg = MethodConfig(name="local_sgd", warmup_steps=2, sync_every=1)
    losses, state, _ = _run_ours(avg)
    ref_losses, ref_thetas, _ = _run_reference(avg, penalty=False, rule="average")
    np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
    _assert_replicas_equal(state, ref_thetas, 1e-4)
    identity = MethodConfig(name="edit", warmup_steps=2, sync_every=1, outer_lr=1.0,
                            outer_momentum=0.0, anomaly=False, weighting=False, clip_norm=0.0)
    id_losses, id_state, _ = _run_ours(identity)
    np.testing.assert_allclose(id_losses, losses, atol=1e-5, rtol=0)
    _, ref_id_thetas, _ = _run_reference(identity, penalty=False, rule="layerwise")
    _assert_replicas_equal(id_state, ref_id_thetas, 1e-4)


def test_schedule_of_step_plans():
    program = build_program(_config(EDIT), VOCAB)
    kinds = [program.method.plan(t).kind for t in range(STEPS)]
    D, L, S = StepKind.DDP, StepKind.LOCAL, StepKind.SYNC
    assert kinds == [D, D, L, L, L, S, L, L, S, L, L]
    assert program.method.plan(5) == program.method.full_sync  # every unit at once
    diloco = build_program(_config(dataclasses.replace(EDIT, name="diloco")), VOCAB)
    assert [diloco.method.plan(t).kind for t in range(STEPS)] == [D, D, L, L, S, L, L, S, L, L, S]


def test_step_weighted_sync_with_unequal_local_steps_equals_reference():
    """A-EDiT's step weighting: replica 1 is made to look 2 steps behind at the first sync
    (3 and 1 local steps since the last sync), as a slower replica would be; both syncs mix the
    shares of local steps into the weights, and the metrics report the counts."""
    method = dataclasses.replace(WEIGHTING, step_weighting=0.6)

    def lag_replica_1(t, state):
        if t != 5:
            return state
        steps = np.asarray(state.replica_steps) - np.array([0, 2], np.int32)
        return state._replace(replica_steps=jax.device_put(steps, state.replica_steps.sharding))

    losses, state, synced = _run_ours(method, lag_replica_1)
    assert synced == [[3, 1], [3, 3]]
    ref_losses, ref_thetas, ref = _run_reference(method, penalty=True, rule="layerwise",
                                                 sync_steps=synced)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
    _assert_replicas_equal(state, ref_thetas, 1e-4)
    first_rest_weights = ref.weights_log[0]
    assert first_rest_weights[0] > 0.6  # the step share (3/4) pulls towards replica 0
    np.testing.assert_allclose(state.outer.rest.weights, ref.weights_log[-len(ref.phi)],
                               atol=1e-4)


def test_evaluating_phi_scores_phi_with_only_the_loss_over_replica():
    """run.eval_params=phi: phi's loss equals that of replicas moved by +d and -d around it
    (their mean, which the default evaluation scores), and the compiled evaluation sends only
    the scalar loss over `replica`, where the default one averages every parameter."""
    cfg = _config(MethodConfig(name="diloco", warmup_steps=0, sync_every=2))
    program = build_program(dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, eval_params="phi")), VOCAB)
    state = program.init_state()
    apart = jax.tree.map(lambda x: x + 0.05 * jnp.array([1.0, -1.0]).reshape(
        (2,) + (1,) * (x.ndim - 1)), state.params)
    mesh = program.layout.mesh
    tokens = jax.device_put(np.stack(_batches()[:2]), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, *BATCH_SPEC)))
    np.testing.assert_allclose(program.eval_phi_step(state.outer.phi, tokens),
                               program.eval_step(apart, tokens), atol=1e-5)
    sent = {}
    for name, step, params in (("phi", program.eval_phi_step, state.outer.phi),
                               ("average", program.eval_step, apart)):
        rows = collective_stats(step.lower(params, tokens).compile(), mesh)
        sent[name] = sum(r.payload_bytes for r in rows if "replica" in r.axes)
    shard_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                      for x in jax.tree.leaves(state.outer.phi))
    assert sent["phi"] <= 8 and sent["average"] >= shard_bytes
