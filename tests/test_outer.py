"""The outer optimizer against a plain-numpy reference written replica by replica."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from edit_jax import delayed_nesterov as delayed_nesterov_module
from edit_jax import outer, xla_flags
from edit_jax.compression import Compression
from edit_jax.outer import (AnomalyStats, PenaltyState, StackedSum, clip_by_norm,
                            init_anomaly_stats, penalty_weights, pseudo_gradient_penalty)
from edit_jax.sparse import TopK

# Leaf name -> (shape, spec over 'shard'); "b" is whole on every device (mask False).
LEAVES = {"a": ((8, 3), P("shard")), "b": ((5,), P()), "c": ((3, 4), P(None, "shard"))}
MASK = {"a": True, "b": False, "c": True}
ON = dict(anomaly=True, weighting=True, clip_norm=0.35, temperature=2.0, alpha=0.3,
          anomaly_warmup=2, threshold=3.0)
OFF = dict(anomaly=False, weighting=False, clip_norm=0.0)
LR, MOMENTUM = 0.7, 0.5


def _reference_sync(phi, thetas, ref, *, anomaly=True, weighting=True, clip_norm=1.0,
                    temperature=1.0, alpha=0.02, anomaly_warmup=120, threshold=3.0):
    """One sync in float64 numpy; `ref` holds mean, var, count, trace and is updated in place."""
    deltas = [{k: phi[k] - theta[k] for k in phi} for theta in thetas]
    norms = [math.sqrt(sum(float(np.sum(d[k] ** 2)) for k in d)) for d in deltas]
    outliers = []
    for r, n in enumerate(norms):
        mean, var = ref["mean"][r], ref["var"][r]
        bad = not math.isfinite(n)
        if (anomaly and not bad and ref["count"] >= anomaly_warmup and var > 0
                and (n - mean) / math.sqrt(var) > threshold):
            bad = True
        if not bad:
            d = n - mean
            ref["mean"][r] = mean + alpha * d
            ref["var"][r] = (1 - alpha) * (var + alpha * d * d)
        outliers.append(bad)
    ref["count"] += 1
    kept = [r for r in range(len(thetas)) if not outliers[r]]
    if weighting:
        scores = {r: math.exp(-norms[r] / temperature) for r in kept}
    else:
        scores = {r: 1.0 for r in kept}
    weights = [scores[r] / sum(scores.values()) if r in scores else 0.0
               for r in range(len(thetas))]
    if not kept:
        return phi, weights, outliers
    combined = {k: sum(weights[r] * deltas[r][k] for r in kept) for k in phi}
    if clip_norm > 0:
        total = math.sqrt(sum(float(np.sum(v ** 2)) for v in combined.values()))
        combined = {k: v * min(1.0, clip_norm / (total + 1e-6)) for k, v in combined.items()}
    ref["trace"] = {k: combined[k] + MOMENTUM * ref["trace"][k] for k in phi}
    return {k: phi[k] - LR * ref["trace"][k] for k in phi}, weights, outliers


def _new_reference(phi, num_replicas):
    return dict(mean=[0.0] * num_replicas, var=[0.0] * num_replicas, count=0,
                trace={k: np.zeros_like(v) for k, v in phi.items()})


def _sync_fn(tx):
    """(phi, theta of this replica, state) -> (new phi, state), run once per replica."""

    def sync(phi, theta, state):
        delta = jax.tree.map(jnp.subtract, phi, theta)
        updates, state = tx.update(delta, state, phi)
        return optax.apply_updates(phi, updates), state

    return sync


def _vmap_sync(tx):
    return jax.jit(jax.vmap(_sync_fn(tx), axis_name="replica", in_axes=(None, 0, None),
                            out_axes=None))


def _shard_map_sync(tx, mesh, state):
    """jit(shard_map(sync)) on the ('replica', 'shard') mesh; thetas are stacked over replica."""
    phi_specs = {k: spec for k, (_, spec) in LEAVES.items()}
    theta_specs = {k: P("replica", *spec) for k, spec in phi_specs.items()}
    by_shape = {shape: spec for shape, spec in LEAVES.values()}
    state_specs = jax.tree.map(lambda x: by_shape.get(x.shape, P()), state)
    sync = _sync_fn(tx)

    def local(phi, thetas, state):
        return sync(phi, jax.tree.map(lambda x: x[0], thetas), state)

    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(phi_specs, theta_specs, state_specs),
                                 out_specs=(phi_specs, state_specs)))

    def put(tree, specs):
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

    return lambda phi, thetas, state: step(put(phi, phi_specs), put(thetas, theta_specs),
                                           put(state, state_specs))


def _scenario(num_replicas, syncs=5, seed=0):
    """Thetas around the current phi; replica 1 spikes at sync 3 (after the warm-up of 2)."""
    rng = np.random.default_rng(seed)
    scales = 0.05 * (1 + np.arange(num_replicas))
    for t in range(syncs):
        spike = np.ones(num_replicas)
        if t == 3:
            spike[1] = 100.0
        yield [{k: scales[r] * spike[r] * rng.standard_normal(shape).astype(np.float32)
                for k, (shape, _) in LEAVES.items()} for r in range(num_replicas)]


def _check_against_reference(make_sync, num_replicas, config):
    tx = pseudo_gradient_penalty(optax.sgd(LR, momentum=MOMENTUM), replica_axis="replica",
                                 num_replicas=num_replicas, shard_axis=config.pop("shard_axis"),
                                 sharded_mask=config.pop("sharded_mask"), **config)
    rng = np.random.default_rng(1)
    phi = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in LEAVES.items()}
    state = tx.init(phi)
    sync = make_sync(tx, state)
    ref = _new_reference(phi, num_replicas)
    ref_phi = {k: v.astype(np.float64) for k, v in phi.items()}
    seen_outlier = False
    for offsets in _scenario(num_replicas):
        thetas = [{k: ref_phi[k] + o[k] for k in o} for o in offsets]
        ref_phi, ref_weights, ref_outliers = _reference_sync(ref_phi, thetas, ref, **config)
        stacked = {k: np.stack([t[k] for t in thetas]).astype(np.float32) for k in phi}
        phi, state = sync({k: v.astype(np.float32) for k, v in phi.items()}, stacked, state)
        for k in phi:
            np.testing.assert_allclose(phi[k], ref_phi[k], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(state.inner_state[0].trace[k], ref["trace"][k],
                                       rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.weights, ref_weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(state.outliers, ref_outliers)
        np.testing.assert_allclose(state.stats.mean, ref["mean"], rtol=1e-5)
        np.testing.assert_allclose(state.stats.var, ref["var"], rtol=1e-5)
        assert int(state.stats.count) == ref["count"]
        phi = {k: np.asarray(v) for k, v in phi.items()}
        seen_outlier |= any(ref_outliers)
    assert seen_outlier == config.get("anomaly", True)


@pytest.mark.parametrize("config", [ON, OFF], ids=["penalty", "averaging"])
def test_vmap_matches_numpy(config):
    config = dict(config, shard_axis=None, sharded_mask=None)
    _check_against_reference(lambda tx, state: _vmap_sync(tx), 4, config)


@pytest.mark.parametrize("joint", [True, False], ids=["joint-psum", "shard-then-replica"])
@pytest.mark.parametrize("config", [ON, OFF], ids=["penalty", "averaging"])
def test_shard_map_matches_numpy(config, joint, monkeypatch):
    """Both structures of the norms' collectives (`xla_flags.overlaps_collectives`) give the
    reference's sync."""
    monkeypatch.setattr(xla_flags, "overlaps_collectives", lambda: joint)
    mesh = jax.make_mesh((2, 4), ("replica", "shard"))
    config = dict(config, shard_axis="shard", sharded_mask=MASK)
    _check_against_reference(lambda tx, state: _shard_map_sync(tx, mesh, state), 2, config)


def test_shard_axis_without_mask_means_every_leaf_sharded():
    mesh = jax.make_mesh((2, 4), ("replica", "shard"))
    deltas = {"a": np.arange(48, dtype=np.float32).reshape(2, 8, 3) / 50,
              "c": -np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 30}
    specs = {"a": P("replica", "shard"), "c": P("replica", None, "shard")}

    def local(delta):
        delta = jax.tree.map(lambda x: x[0], delta)
        norms = outer.replica_norms(delta, replica_axis="replica", shard_axis="shard")
        clipped = clip_by_norm(delta, 1.0, shard_axis="shard")
        return norms, jax.tree.map(lambda x: x[None], clipped)

    norms, clipped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs,),
                                           out_specs=(P(), specs)))(
        jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), deltas, specs))
    expected = [math.sqrt(float(np.sum(deltas["a"][r] ** 2) + np.sum(deltas["c"][r] ** 2)))
                for r in range(2)]
    np.testing.assert_allclose(norms, expected, rtol=1e-6)
    for k in deltas:
        for r in range(2):
            np.testing.assert_allclose(np.asarray(clipped[k])[r],
                                       deltas[k][r] / (expected[r] + 1e-6),
                                       rtol=1e-5)


def _run(tx, phi, thetas, state=None):
    state = tx.init(phi) if state is None else state
    return _vmap_sync(tx)(phi, thetas, state)


def test_plain_averaging_is_the_mean():
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=3, **OFF)
    thetas = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 2)), jnp.float32)}
    phi, _ = _run(tx, {"w": jnp.zeros((4, 2))}, thetas)
    np.testing.assert_allclose(phi["w"], np.mean(thetas["w"], axis=0), atol=1e-6)


def test_single_replica_outer_step_is_a_no_op():
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=1, **OFF)
    theta = {"w": jnp.asarray([[1.5, -2.0, 3.25]])}
    phi, _ = _run(tx, {"w": jnp.asarray([0.5, 0.5, 0.5])}, theta)
    np.testing.assert_allclose(phi["w"], theta["w"][0], atol=1e-6)


@pytest.mark.parametrize("temperature, expected", [
    (1.0, [0.6652409557748219, 0.24472847105479767, 0.09003057317038046]),
    (2.0, [0.506480391055654, 0.3071958857184984, 0.18632372322584756])])
def test_softmax_weights(temperature, expected):
    weights, _, outliers = penalty_weights(jnp.asarray([1.0, 2.0, 3.0]), init_anomaly_stats(3),
                                           temperature=temperature)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert not outliers.any()


def test_uniform_weights_and_non_finite_norms():
    weights, _, _ = penalty_weights(jnp.asarray([1.0, 2.0, 3.0]), init_anomaly_stats(3),
                                    weighting=False)
    np.testing.assert_allclose(weights, [1 / 3] * 3, rtol=1e-6)
    weights, stats, outliers = penalty_weights(jnp.asarray([1.0, 2.0, jnp.nan, jnp.inf]),
                                               init_anomaly_stats(4), anomaly=False)
    np.testing.assert_allclose(weights, [0.7310585786300049, 0.2689414213699951, 0, 0],
                               rtol=1e-6)
    np.testing.assert_array_equal(outliers, [False, False, True, True])
    np.testing.assert_array_equal(stats.mean[2:], [0, 0])


def test_step_weighting_hand_values():
    # Softmax weights at T=1 of norms (1, 2, 3): w = (0.66524, 0.24473, 0.09003). Steps since
    # the last sync (6, 3, 1) -> shares (0.6, 0.3, 0.1); rho = 0.5 averages the two.
    norms, steps = jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([6.0, 3.0, 1.0])
    weights, _, _ = penalty_weights(norms, init_anomaly_stats(3), steps=steps, step_weighting=0.5)
    np.testing.assert_allclose(weights, [0.6326204778874110, 0.2723642355273988,
                                         0.0950152865851902], rtol=1e-6)
    # rho = 1 with uniform norm weights: the step shares alone; an outlier (NaN norm) gets 0 and
    # the shares are taken over the others: (6, 3) -> (2/3, 1/3).
    weights, _, _ = penalty_weights(jnp.asarray([1.0, 2.0, jnp.nan]), init_anomaly_stats(3),
                                    weighting=False, steps=steps, step_weighting=1.0)
    np.testing.assert_allclose(weights, [2 / 3, 1 / 3, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="step counts"):
        penalty_weights(norms, init_anomaly_stats(3), step_weighting=0.5)


def test_step_weighted_sync_under_vmap():
    """The weighted combination uses the mixed weights: phi moves by -lr * sum_r w_r delta_r."""
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=2,
                                 anomaly=False, weighting=False, clip_norm=0, step_weighting=1.0)
    phi = {"w": jnp.zeros(2)}
    thetas = {"w": jnp.asarray([[1.0, 1.0], [4.0, 4.0]])}

    def sync(theta, state):
        delta = jax.tree.map(jnp.subtract, phi, theta)
        updates, state = tx.update(delta, state, phi, steps=jnp.asarray([3.0, 1.0]))
        return optax.apply_updates(phi, updates), state

    new_phi, state = jax.vmap(sync, axis_name="replica", in_axes=(0, None),
                              out_axes=None)(thetas, tx.init(phi))
    np.testing.assert_allclose(state.weights, [0.75, 0.25])
    np.testing.assert_allclose(new_phi["w"], [1.75, 1.75], rtol=1e-6)  # 0.75*1 + 0.25*4


def test_statistics_update():
    _, stats, _ = penalty_weights(jnp.asarray([1.0, 2.0, 3.0]), init_anomaly_stats(3))
    np.testing.assert_allclose(stats.mean, [0.02, 0.04, 0.06], rtol=1e-6)
    np.testing.assert_allclose(stats.var, [0.0196, 0.0784, 0.1764], rtol=1e-6)
    assert int(stats.count) == 1


def test_clip_by_norm():
    tree = {"x": jnp.asarray([3.0, 4.0])}
    np.testing.assert_allclose(clip_by_norm(tree, 1.0)["x"], [0.599999880000024, 0.799999840000032],
                               rtol=1e-6)
    np.testing.assert_allclose(clip_by_norm(tree, 10.0)["x"], [3.0, 4.0])
    assert clip_by_norm(tree, 0.0) is tree


WARM = AnomalyStats(mean=jnp.ones(3), var=jnp.full(3, 0.01), count=jnp.asarray(120, jnp.int32))


def test_anomaly_is_flagged_and_kept_out_of_the_statistics():
    norms = jnp.asarray([1.05, 10.0, 0.98])  # z = 0.5, 90, -0.2
    weights, stats, outliers = penalty_weights(norms, WARM)
    np.testing.assert_array_equal(outliers, [False, True, False])
    assert weights[1] == 0 and abs(float(weights.sum()) - 1) < 1e-6
    assert stats.mean[1] == 1 and stats.var[1] == np.float32(0.01)
    np.testing.assert_allclose(np.asarray(stats.mean)[[0, 2]], [1.001, 0.9996], rtol=1e-6)
    assert int(stats.count) == 121
    _, _, outliers = penalty_weights(norms, WARM._replace(count=jnp.asarray(119, jnp.int32)))
    assert not outliers.any()  # still warming up
    _, _, outliers = penalty_weights(norms, WARM, anomaly=False)
    assert not outliers.any()


def test_anomalous_replica_is_excluded_from_the_sync():
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=3,
                                 weighting=False, clip_norm=0)
    state = tx.init({"w": jnp.zeros(4)})._replace(stats=WARM)
    thetas = {"w": jnp.stack([jnp.full(4, 0.5), jnp.full(4, 5.0), jnp.full(4, 0.49)])}
    phi, state = _run(tx, {"w": jnp.zeros(4)}, thetas, state)  # norms 1, 10, 0.98
    np.testing.assert_array_equal(state.outliers, [False, True, False])
    np.testing.assert_allclose(phi["w"], np.full(4, 0.495), rtol=1e-6)
    assert state.stats.mean[1] == 1 and state.stats.var[1] == np.float32(0.01)


# ---- the per-step anomaly rule (A-EDiT): with step counts, a norm is judged per local step


def _warm_stats(mean, var, count=120):
    """Statistics past the warm-up (anomaly_warmup=120), written by hand."""
    return AnomalyStats(mean=jnp.asarray(mean, jnp.float32), var=jnp.asarray(var, jnp.float32),
                        count=jnp.asarray(count, jnp.int32))


def test_a_replica_running_3x_the_steps_is_not_an_outlier():
    stats = _warm_stats([1.0, 1.0, 1.0], [0.01, 0.01, 0.01])
    norms, steps = jnp.asarray([3.0, 1.0, 1.0]), jnp.asarray([3.0, 1.0, 1.0])
    # The raw rule (no step counts): z_0 = (3 - 1) / sqrt(0.01) = 20 > 3, replica 0 is flagged
    # only because it ran three times as many steps as its peers.
    _, _, outliers = penalty_weights(norms, stats)
    np.testing.assert_array_equal(outliers, [True, False, False])
    # Per step: 3/3 = 1/1 = 1/1 = 1.0, the mean: z = 0 for everyone.
    weights, new_stats, outliers = penalty_weights(norms, stats, steps=steps)
    np.testing.assert_array_equal(outliers, [False, False, False])
    # The softmax weights keep the raw norms: exp(-3), exp(-1), exp(-1), normalised.
    np.testing.assert_allclose(weights, [0.06337893833303762, 0.4683105308334812,
                                         0.4683105308334812], rtol=1e-6)
    # The per-step norms equal the mean: d = 0, mean stays 1, var = 0.98 * 0.01.
    np.testing.assert_allclose(new_stats.mean, [1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(new_stats.var, [0.0098, 0.0098, 0.0098], rtol=1e-6)
    assert int(new_stats.count) == 121


@pytest.mark.parametrize("steps, norms, expected", [
    ([1.0, 1.0, 1.0], [1.0, 10.0, 0.98], [False, True, False]),  # per step 10: z = 90
    ([3.0, 1.0, 1.0], [30.0, 1.0, 1.0], [True, False, False]),  # per step 30/3 = 10: z = 90
    ([3.0, 1.0, 1.0], [3.0, 1.6, 1.0], [False, True, False]),  # per step 1, 1.6, 1: z = 0, 6, 0
])
def test_a_real_spike_per_step_is_still_an_outlier(steps, norms, expected):
    stats = _warm_stats([1.0, 1.0, 1.0], [0.01, 0.01, 0.01])
    weights, new_stats, outliers = penalty_weights(jnp.asarray(norms), stats,
                                                   steps=jnp.asarray(steps), weighting=False)
    np.testing.assert_array_equal(outliers, expected)
    np.testing.assert_allclose(weights, np.where(expected, 0.0, 0.5), rtol=1e-6)
    bad = expected.index(True)  # the outlier's statistics are left alone
    assert new_stats.mean[bad] == 1 and new_stats.var[bad] == np.float32(0.01)


def test_per_step_statistics_update_by_hand():
    # mean 1, var 0.25 (sd 0.5), alpha 0.1. Steps (4, 2, 1), raw norms (6, 2.4, 0.9): per step
    # (1.5, 1.2, 0.9), z = (1, 0.4, -0.2): nobody flagged (raw z would be 10, 2.8, -0.2).
    stats = _warm_stats([1.0, 1.0, 1.0], [0.25, 0.25, 0.25])
    norms, steps = jnp.asarray([6.0, 2.4, 0.9]), jnp.asarray([4.0, 2.0, 1.0])
    _, _, outliers = penalty_weights(norms, stats, alpha=0.1)
    np.testing.assert_array_equal(outliers, [True, False, False])  # the raw rule
    _, new_stats, outliers = penalty_weights(norms, stats, alpha=0.1, steps=steps)
    assert not outliers.any()
    # d = (0.5, 0.2, -0.1): mean + 0.1 d = (1.05, 1.02, 0.99);
    # var = 0.9 * (0.25 + 0.1 d^2) = (0.2475, 0.2286, 0.2259).
    np.testing.assert_allclose(new_stats.mean, [1.05, 1.02, 0.99], rtol=1e-6)
    np.testing.assert_allclose(new_stats.var, [0.2475, 0.2286, 0.2259], rtol=1e-6)
    assert int(new_stats.count) == 121


def test_per_step_rule_edge_cases():
    stats = _warm_stats([1.0, 1.0, 1.0], [0.01, 0.01, 0.01])
    # Zero steps count as one (no division by zero): per step (1, 1, 1), nobody flagged.
    _, new_stats, outliers = penalty_weights(jnp.asarray([1.0, 1.0, 1.0]), stats,
                                             steps=jnp.asarray([0.0, 1.0, 1.0]))
    assert not outliers.any()
    np.testing.assert_allclose(new_stats.mean, [1.0, 1.0, 1.0], rtol=1e-6)
    # A non-finite norm is an outlier whatever its steps, and stays out of the statistics.
    weights, new_stats, outliers = penalty_weights(jnp.asarray([jnp.nan, jnp.inf, 1.0]), stats,
                                                   steps=jnp.asarray([3.0, 5.0, 1.0]))
    np.testing.assert_array_equal(outliers, [True, True, False])
    np.testing.assert_allclose(weights, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(new_stats.mean, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(new_stats.var, [0.01, 0.01, 0.0098], rtol=1e-6)


def test_equal_steps_judge_like_the_raw_rule():
    """EDiT: every replica ran tau steps; the per-step statistics are the raw ones / tau (var /
    tau^2), so the same replicas are flagged (here tau = 4; raw z = 0.5, 90, -0.2)."""
    norms = jnp.asarray([1.05, 10.0, 0.98])
    _, raw_stats, raw_outliers = penalty_weights(norms, _warm_stats([1.0] * 3, [0.01] * 3))
    _, stats, outliers = penalty_weights(norms, _warm_stats([0.25] * 3, [0.01 / 16] * 3),
                                         steps=jnp.full(3, 4.0))
    np.testing.assert_array_equal(raw_outliers, [False, True, False])
    np.testing.assert_array_equal(outliers, raw_outliers)
    np.testing.assert_allclose(stats.mean, [1.001 / 4, 0.25, 0.9996 / 4], rtol=1e-6)
    np.testing.assert_allclose(stats.var, np.asarray(raw_stats.var) / 16, rtol=1e-5)


def test_step_counts_reach_the_anomaly_test_of_the_sync():
    """End to end under vmap: replica 0 ran 3 steps and moved 3x as far (norms 3, 1, 1 against
    a mean of 1, sd 0.1). Without step counts it is excluded (phi = mean of the others, 0.5);
    with them it is kept (phi = mean of 1.5, 0.5, 0.5 = 5/6)."""
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=3,
                                 weighting=False, clip_norm=0)
    phi = {"w": jnp.zeros(4)}
    state = tx.init(phi)._replace(stats=_warm_stats([1.0] * 3, [0.01] * 3))
    thetas = {"w": jnp.stack([jnp.full(4, 1.5), jnp.full(4, 0.5), jnp.full(4, 0.5)])}

    def sync(steps):
        def one(theta, state):
            delta = jax.tree.map(jnp.subtract, phi, theta)
            kwargs = {} if steps is None else {"steps": jnp.asarray(steps)}
            updates, state = tx.update(delta, state, phi, **kwargs)
            return optax.apply_updates(phi, updates), state

        return jax.vmap(one, axis_name="replica", in_axes=(0, None), out_axes=None)(thetas,
                                                                                    state)

    raw_phi, raw_state = sync(None)
    np.testing.assert_array_equal(raw_state.outliers, [True, False, False])
    np.testing.assert_allclose(raw_phi["w"], np.full(4, 0.5), rtol=1e-6)
    new_phi, new_state = sync([3.0, 1.0, 1.0])
    np.testing.assert_array_equal(new_state.outliers, [False, False, False])
    np.testing.assert_allclose(new_phi["w"], np.full(4, 2.5 / 3), rtol=1e-6)
    np.testing.assert_allclose(new_state.stats.mean, [1.0, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_replica_is_excluded(bad):
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=3,
                                 weighting=False, clip_norm=0)
    thetas = np.stack([np.full(4, 1.0), np.full(4, 3.0), np.full(4, 2.0)]).astype(np.float32)
    thetas[2, 1] = bad
    phi, state = _run(tx, {"w": jnp.zeros(4)}, {"w": jnp.asarray(thetas)})
    np.testing.assert_array_equal(state.outliers, [False, False, True])
    np.testing.assert_allclose(phi["w"], np.full(4, 2.0), rtol=1e-6)
    assert np.isfinite(state.stats.mean).all() and np.isfinite(state.stats.var).all()


@pytest.mark.parametrize("bad", ["nan", "spike"])
def test_all_outliers_skip_the_outer_step(bad):
    tx = pseudo_gradient_penalty(optax.sgd(0.5, momentum=0.9), replica_axis="replica",
                                 num_replicas=3, anomaly_warmup=0)
    phi = {"w": jnp.zeros(4)}
    state = tx.init(phi)._replace(stats=WARM)
    phi, state = _run(tx, phi, {"w": jnp.full((3, 4), 0.5)}, state)  # norms 1: all kept
    assert not state.outliers.any() and np.abs(state.inner_state[0].trace["w"]).min() > 0
    thetas = jnp.full((3, 4), jnp.nan if bad == "nan" else 100.0)
    new_phi, new_state = _run(tx, phi, {"w": thetas}, state)
    assert new_state.outliers.all() and not new_state.weights.any()
    np.testing.assert_array_equal(new_phi["w"], phi["w"])
    np.testing.assert_array_equal(new_state.inner_state[0].trace["w"],
                                  state.inner_state[0].trace["w"])
    np.testing.assert_array_equal(new_state.stats.mean, state.stats.mean)
    np.testing.assert_array_equal(new_state.stats.var, state.stats.var)


def test_state_types_are_stable_under_jit():
    tx = pseudo_gradient_penalty(optax.adam(0.1), replica_axis="replica", num_replicas=2)
    phi = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,), jnp.bfloat16)}
    state = tx.init(phi)
    assert isinstance(state, PenaltyState)
    thetas = jax.tree.map(lambda x: jnp.stack([x + 1, x - 2]), phi)
    new_phi, new_state = _run(tx, phi, thetas, state)
    def kinds(tree):
        return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)

    assert kinds(new_state) == kinds(state) and kinds(new_phi) == kinds(phi)


def test_bad_arguments_are_user_errors():
    with pytest.raises(ValueError, match="temperature"):
        pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=2,
                                temperature=0.0)
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=2)
    with pytest.raises(ValueError, match="num_replicas=3"):
        _run(tx, {"w": jnp.zeros(2)}, {"w": jnp.zeros((3, 2))})


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for module in (outer, delayed_nesterov_module) for t in finder.find(module)
             if t.examples]
    assert len(tests) >= 2  # the penalty's example and delayed Nesterov's
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize("spelling", ["combine", "compression"])
def test_top_k_codes_combine_by_hand(spelling):
    """combine=TopK (or its older spelling compression=): each replica sends the 2 largest of
    its 4 values (8-bit codes hit +-scale exactly), keeps the rest as its residual, and phi
    moves by minus the mean of what was sent."""
    codes = TopK(block=4, fraction=0.5, value_bits=8, decay=1.0)
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=2, **OFF,
                                 error_feedback=True, **{spelling: codes})
    phi = {"w": jnp.zeros(4)}
    thetas = {"w": jnp.asarray([[-3.0, 0.0, 3.0, 1.0], [0.0, -2.0, 1.0, 2.0]])}

    def sync(theta, state):
        updates, state = tx.update(jax.tree.map(jnp.subtract, phi, theta), state, phi)
        return optax.apply_updates(phi, updates), state

    new_phi, states = jax.vmap(sync, axis_name="replica", in_axes=(0, None))(thetas,
                                                                             tx.init(phi))
    np.testing.assert_allclose(new_phi["w"], [[-1.5, -1.0, 1.5, 1.0]] * 2, rtol=1e-6)
    np.testing.assert_allclose(states.residual["w"], [[0, 0, 0, -1], [0, 0, -1, 0]], atol=1e-6)


def test_stacked_sum_weighs_every_replicas_row_locally():
    """combine=StackedSum(mask): each device holds every replica's delta as a row; the norms
    (5 and 1) and the softmax weights come from the rows, with no traffic, and phi moves by
    minus their weighted sum."""
    tx = pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=2,
                                 anomaly=False, clip_norm=0.0, combine=StackedSum({"w": False}))
    rows = np.asarray([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    phi = {"w": jnp.zeros(3)}

    def sync(stacked, state):
        updates, state = tx.update(stacked, state, phi)
        return optax.apply_updates(phi, updates), state

    new_phi, state = jax.vmap(sync, axis_name="replica", in_axes=(None, None), axis_size=2,
                              out_axes=None)({"w": jnp.asarray(rows)}, tx.init(phi))
    weights = np.exp([-5.0, -1.0]) / np.exp([-5.0, -1.0]).sum()
    np.testing.assert_allclose(state.weights, weights, rtol=1e-6)
    np.testing.assert_allclose(new_phi["w"], -(weights @ rows), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(combine=Compression("int8", 4), compression=Compression("int4", 4)),
     "combine= and compression= both choose"),
    (dict(error_feedback=True), "error_feedback needs codes"),
    (dict(combine="psum"), "has no combine"),
])
def test_conflicting_combinations_are_refused_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pseudo_gradient_penalty(optax.sgd(1.0), replica_axis="replica", num_replicas=2, **kwargs)
