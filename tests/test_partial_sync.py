"""Partial synchronization: streaming fragments (diloco, edit) and DreamDDP / PLSGD averaging.

Three kinds of evidence: scalar trajectories worked out by hand (the schedule over units and
the per-unit rule, with delay and alpha); the real sharded step against the replica-by-replica
reference of test_sync.py; and the compiled HLO (bytes of exactly the scheduled units; the
averaging depends on nothing of the step's compute; streaming's lower peak).
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from edit_jax import xla_flags
from edit_jax.config import MeshConfig, MethodConfig
from edit_jax.fragments import blend, fragment_due, fragment_layers
from edit_jax.inspect_hlo import collective_stats, upstream_opcodes
from edit_jax.inspect_steps import bytes_per_device, inspect_program
from edit_jax.mesh import make_mesh
from edit_jax.methods import REST_UNIT, Method
from edit_jax.program import build_program
from edit_jax.step import make_layout
from edit_jax.sync import OuterSync
from test_sync import (EDIT, MODEL, R, VOCAB, ReferenceSync, _assert_replicas_equal, _batches,
                       _config, _reference_functions, _run_ours, _set_units, _unit_arrays)

# ----------------------------------------------------------------------------- the schedule


def test_fragment_layers_and_offsets():
    assert fragment_layers(6, 3) == [[0, 3], [1, 4], [2, 5]]
    assert fragment_layers(6, 3, "sequential") == [[0, 1], [2, 3], [4, 5]]
    # H = 6, P = 3: fragment p after (p+1)*2 local steps, then every 6.
    assert [fragment_due(n, 6, 3) for n in range(13)] == [
        None, None, 0, None, 1, None, 2, None, 0, None, 1, None, 2]
    with pytest.raises(ValueError, match="divisor of 6"):
        fragment_layers(6, 4)
    with pytest.raises(ValueError, match="divisible by the fragments"):
        fragment_due(2, 6, 4)


def test_plans_of_streaming_methods(monkeypatch):
    """Sends at the start of step W + n for edit (and delayed syncs), at the end of step
    W + n - 1 for diloco; a delayed fragment lands at the end of step W + n + d - 1; the rest
    unit rides with the last fragment. A runtime that cannot overlap collectives with compute
    sends a delayed sync whole when it starts."""
    method = MethodConfig(name="diloco", warmup_steps=1, sync_every=4, fragments=2)
    monkeypatch.setattr(xla_flags, "overlaps_collectives", lambda: False)
    unsliced = Method.from_config(dataclasses.replace(method, fragment_delay=2), 4)
    assert [unsliced.plan(t).name(4) for t in range(3, 5)] == ["sync[L0,L2]", "apply[L0,L2]"]
    monkeypatch.setattr(xla_flags, "overlaps_collectives", lambda: True)
    names = lambda m: [m.plan(t).name(4) for t in range(10)]  # noqa: E731
    diloco = Method.from_config(method, 4)
    assert names(diloco) == ["ddp", "local", "sync[L0,L2]", "local", "sync[L1,L3,rest]", "local",
                             "sync[L0,L2]", "local", "sync[L1,L3,rest]", "local"]
    edit = Method.from_config(dataclasses.replace(method, name="edit"), 4)
    assert names(edit) == ["ddp", "local", "local", "sync[L0,L2]", "local", "sync[L1,L3,rest]",
                           "local", "sync[L0,L2]", "local", "sync[L1,L3,rest]"]
    delayed = Method.from_config(dataclasses.replace(method, fragment_delay=2), 4)
    assert names(delayed) == ["ddp", "local", "local", "sync[L0,L2]", "send2[L0,L2]+apply[L0,L2]",
                              "sync[L1,L3,rest]", "send2[L1,L3,rest]+apply[L1,L3,rest]",
                              "sync[L0,L2]", "send2[L0,L2]+apply[L0,L2]", "sync[L1,L3,rest]"]
    # Compressed codes do not slice: the whole payload travels when the sync starts.
    coded = Method.from_config(dataclasses.replace(method, fragment_delay=2,
                                                   compression="int8"), 4)
    assert names(coded)[3:5] == ["sync[L0,L2]", "apply[L0,L2]"]
    # d = 3 over a fragment every step: three fragments in flight, one slice of each per step.
    overlapping = Method.from_config(MethodConfig(name="diloco", warmup_steps=0, sync_every=4,
                                                  fragments=4, fragment_delay=3), 4)
    assert names(overlapping)[1:6] == [
        "sync[L0]", "sync[L1]+send2[L0]", "sync[L2]+send2[L1]+send3[L0]+apply[L0]",
        "sync[L3,rest]+send2[L2]+send3[L1]+apply[L1]",
        "sync[L0]+send2[L3,rest]+send3[L2]+apply[L2]"]
    # H = 4, P = 1, d = 3: a step that only sends a slice.
    whole = Method.from_config(MethodConfig(name="diloco", warmup_steps=0, sync_every=4,
                                            fragment_delay=3), 4)
    assert names(whole)[3:8] == ["local", "sync", "send2",
                                 "send3+apply[L0,L1,L2,L3,rest]", "local"]
    sequential = Method.from_config(dataclasses.replace(method, fragment_layout="sequential"), 4)
    assert sequential.fragments == (frozenset({0, 1}), frozenset({2, 3, REST_UNIT}))


# ----------------------------------------------------------------------------- scalar trajectories


def _scalar_run(delay: float, alpha: float, steps: int, name: str = "diloco"):
    """2 replicas, 2 layers and the rest unit, every parameter one scalar starting at 0; each
    step replica r subtracts its constant gradient g_r (1 and 3); outer SGD with lr 1 and no
    momentum (phi <- mean of the replicas); H = 2, P = 2 (fragment 0 = layer 0, fragment 1 =
    layer 1 + rest), no warm-up. The sync calls follow step.py's order: a sync due at the start
    (from the step's input), the inner step, a sync due at the end, a delayed fragment's apply.
    Returns layer 0's and layer 1's values per replica after every step."""
    cfg = MethodConfig(name=name, warmup_steps=0, sync_every=2, outer_lr=1.0, outer_momentum=0.0,
                       anomaly=False, weighting=False, clip_norm=0.0, fragments=2,
                       fragment_delay=delay, fragment_alpha=alpha)
    method = Method.from_config(cfg, 2)
    params = {"head": {"w": jnp.zeros(1)}, "layers": {"w": jnp.zeros((2, 1))}}
    outer = OuterSync.create(cfg, R, method.fragments, jax.tree.map(lambda _: False, params),
                             penalty=False)
    mesh = make_mesh(MeshConfig(R, 1), jax.devices()[:R])

    def one_step(theta, outer_state, steps_r, plan):
        g = jnp.array([1.0, 3.0])[jax.lax.axis_index("replica")]
        theta = jax.tree.map(lambda x: x[0], theta)
        if plan.sync and method.syncs_before_step:
            synced, outer_state, _, _ = outer.sync_units(theta, outer_state, steps_r, plan.sync)
            theta = theta if delay else synced
        theta = jax.tree.map(lambda x: x - g, theta)
        steps_r = steps_r + 1
        if plan.sync and not method.syncs_before_step:
            theta, outer_state, _, _ = outer.sync_units(theta, outer_state, steps_r, plan.sync)
        if plan.apply:
            theta = outer.apply_units(theta, outer_state, plan.apply)
        return jax.tree.map(lambda x: x[None], theta), outer_state, steps_r

    theta = jax.tree.map(lambda x: jnp.stack([x] * R), params)
    outer_state, steps_r = outer.init(params), jnp.zeros((R,), jnp.int32)
    specs = (P("replica"), P(), P("replica"))
    trajectory, compiled = [], {}
    for t in range(steps):
        plan = method.plan(t)
        if plan not in compiled:
            compiled[plan] = jax.jit(jax.shard_map(
                lambda a, b, c, plan=plan: one_step(a, b, c, plan), mesh=mesh, in_specs=specs,
                out_specs=specs))
        theta, outer_state, steps_r = compiled[plan](theta, outer_state, steps_r)
        trajectory.append(np.asarray(theta["layers"]["w"])[:, :, 0].T.tolist())  # [layer][replica]
    return trajectory


# Each entry: after steps 0..3, [[layer 0 of replica 0, of replica 1], [layer 1 of 0, of 1]].
# Fragment 0 (layer 0) is due after 1, 3, ... local steps, fragment 1 (layer 1) after 2, 4, ...
SCALAR_CASES = {
    # diloco, d = 0, alpha = 0: after step 0 layer 0 is -1, -3 -> phi = -2 for both; after step 1
    # layer 1 is -2, -6 -> -4; after step 2 layer 0 is -4, -8 -> -2 - (2 + 6)/2 = -6; after
    # step 3 layer 1 is -6, -10 -> -4 - (2 + 6)/2 = -8.
    ("diloco", 0, 0.0): [[[-2, -2], [-1, -3]], [[-3, -5], [-4, -4]], [[-6, -6], [-5, -7]],
                         [[-7, -9], [-8, -8]]],
    # alpha = 0.5: theta <- (theta + phi) / 2. Step 0: layer 0 (-1 + -2)/2 = -1.5, (-3 + -2)/2 =
    # -2.5 (phi_0 = -2). Step 1: layer 0 -2.5, -5.5; layer 1 -2, -6 -> phi_1 = -4 -> -3, -5.
    # Step 2: layer 0 -3.5, -8.5, delta = phi - theta = 1.5, 6.5 -> phi_0 = -2 - 4 = -6 ->
    # -4.75, -7.25; layer 1 -4, -8. Step 3: layer 1 -5, -11, deltas 1, 7 -> phi_1 = -8 -> -6.5,
    # -9.5; layer 0 -5.75, -10.25.
    ("diloco", 0, 0.5): [[[-1.5, -2.5], [-1, -3]], [[-2.5, -5.5], [-3, -5]],
                         [[-4.75, -7.25], [-4, -8]], [[-5.75, -10.25], [-6.5, -9.5]]],
    # d = 1: the sync due after n local steps runs at the start of step n from its input and lands
    # at the end of that step (alpha = 0: the step's own progress on the fragment is replaced).
    # Step 0: nothing due: -1, -3 both layers. Step 1: layer 0 input -1, -3 -> phi_0 = -2, lands
    # at the end: -2, -2; layer 1 -2, -6. Step 2: layer 1 input -2, -6 -> -4 lands; layer 0 -3,
    # -5. Step 3: layer 0 input -3, -5 -> phi_0 = -2 - (1 + 3)/2... delta = (-2 - -3, -2 - -5) =
    # (1, 3) -> phi_0 = -4, lands; layer 1 -5, -7.
    ("diloco", 1, 0.0): [[[-1, -3], [-1, -3]], [[-2, -2], [-2, -6]], [[-3, -5], [-4, -4]],
                         [[-4, -4], [-5, -7]]],
    # d = 2, alpha = 0.5: layer 0 sent at the start of step 1 (input -1, -3 -> phi_0 = -2), lands
    # at the end of step 2: local -3, -9 -> (-3 + -2)/2 = -2.5, (-9 + -2)/2 = -5.5. Layer 1 sent
    # at the start of step 2 (input -2, -6 -> phi_1 = -4), lands at the end of step 3: local
    # -4, -12 -> -4, -8. Layer 0 sent again at the start of step 3 (input -2.5, -5.5, deltas
    # 0.5, 3.5 -> phi_0 = -4), landing at step 4; meanwhile it trains on to -3.5, -8.5.
    ("diloco", 2, 0.5): [[[-1, -3], [-1, -3]], [[-2, -6], [-2, -6]], [[-2.5, -5.5], [-3, -9]],
                         [[-3.5, -8.5], [-4, -8]]],
    # edit (penalty off here) syncs at the start of its step: like diloco d = 0, one step later.
    # Step 0: -1, -3. Step 1: layer 0 input -1, -3 -> -2 both, then -3, -5; layer 1 -2, -6.
    # Step 2: layer 1 input -2, -6 -> -4, then -5, -7; layer 0 -4, -8. Step 3: layer 0 input
    # -4, -8 -> phi_0 = -2 - 4 = -6, then -7, -9; layer 1 -6, -10.
    ("edit", 0, 0.0): [[[-1, -3], [-1, -3]], [[-3, -5], [-2, -6]], [[-4, -8], [-5, -7]],
                       [[-7, -9], [-6, -10]]],
}


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda c: f"{c[0]}-delay{c[1]}-alpha{c[2]}")
def test_scalar_trajectories_by_hand(case):
    name, delay, alpha = case
    np.testing.assert_allclose(_scalar_run(delay, alpha, 4, name), SCALAR_CASES[case], atol=1e-6)


def test_blend():
    local, synced = {"w": jnp.array([1.0, jnp.nan])}, {"w": jnp.array([3.0, 5.0])}
    np.testing.assert_array_equal(blend(local, synced, 0.0)["w"], [3.0, 5.0])  # NaN dropped
    np.testing.assert_allclose(blend(local, synced, 0.25)["w"][0], 2.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend(local, synced, 1.5)


# ----------------------------------------------------------------------------- the real step vs numpy

# Reference units: 0 = the non-layer unit, 1 + l = layer l (test_sync._units).
REST_REF = 0


def _blend_units(thetas_units, phi, units, alpha):
    return [[[alpha * t + (1 - alpha) * p for t, p in zip(th[u], phi[u])] if u in units else th[u]
             for u in range(len(th))] for th in thetas_units]


def _run_streaming_reference(method: MethodConfig, penalty: bool):
    """Streaming DiLoCo / EDiT replica by replica (docs/algorithms.md section 7): fragment p
    (strided layers; the rest unit with the last) is due after (p+1)H/P + kH local steps; it
    syncs at the start of the next step (edit, or delayed) or at the end of the current one
    (diloco), and lands d steps later blended by alpha."""
    params0, tx_init, grad_fn, adamw_step, mean = _reference_functions()
    thetas, opt_states = [params0] * R, [tx_init(params0) for _ in range(R)]
    W, H, P, d, a = (method.warmup_steps, method.sync_every, method.fragments,
                     method.fragment_delay, method.fragment_alpha)
    layers = MODEL.n_layers
    frags = [[1 + l for l in range(p, layers, P)] + ([REST_REF] if p == P - 1 else [])
             for p in range(P)]
    due = lambda n: None if n <= 0 or n % (H // P) else (n // (H // P) - 1) % P  # noqa: E731
    at_start = method.name == "edit" or d > 0
    last, landing, losses, outer = [0] * P, {}, [], None

    def sync(f, n, thetas):
        units = sorted(frags[f])  # the rest first, as the step syncs it
        phi = outer.sync([_unit_arrays(th) for th in thetas], [n - last[f]] * R, units=units)
        last[f] = n
        return phi

    def blended(thetas, units):
        new = _blend_units([_unit_arrays(th) for th in thetas], outer.phi, units, a)
        return [_set_units(thetas[r], new[r]) for r in range(R)]

    for t, batch in enumerate(_batches()):
        rows = [batch[8 * r:8 * (r + 1)] for r in range(R)]
        if t == W:
            outer = ReferenceSync(method, _unit_arrays(thetas[0]), penalty)
        if t >= W and at_start and (f := due(t - W)) is not None:
            sync(f, t - W, thetas)
            if d == 0:
                thetas = blended(thetas, frags[f])
            else:
                landing[t + d - 1] = frags[f]
        results = [grad_fn(thetas[r], rows[r]) for r in range(R)]
        grads = [g for _, g in results]
        if t < W:
            grads = [mean(*grads)] * R
        for r in range(R):
            thetas[r], opt_states[r] = adamw_step(grads[r], opt_states[r], thetas[r])
        losses.append(float(np.mean([loss for loss, _ in results])))
        if t >= W and not at_start and (f := due(t - W + 1)) is not None:
            sync(f, t - W + 1, thetas)
            thetas = blended(thetas, frags[f])
        if t in landing:
            thetas = blended(thetas, landing.pop(t))
    return losses, thetas


STREAMING = dict(warmup_steps=2, sync_every=2, fragments=2)
SLICES_NEED_OVERLAP = ("XLA:CPU before jax 0.12 cannot run collectives beside compute, so "
                       "delayed syncs are sent whole there; CI's newest-jax leg runs this")


@pytest.mark.parametrize("method, penalty", [
    (MethodConfig(name="diloco", outer_lr=0.7, outer_momentum=0.9, **STREAMING), False),
    (dataclasses.replace(EDIT, anomaly_threshold=6.0, **STREAMING), True),
    (dataclasses.replace(EDIT, anomaly_threshold=6.0, fragment_delay=2, fragment_alpha=0.5,
                         norm_granularity="layer", shard_outer_over_replica=True, **STREAMING),
     True),
    (dataclasses.replace(EDIT, anomaly_threshold=6.0, fragment_delay=2, fragment_alpha=0.5,
                         **STREAMING), True),
], ids=["diloco", "edit", "edit-delay2-alpha0.5-layer-norms-outer-sharded", "edit-delay2-sliced-where-overlapping"])
def test_streaming_equals_reference(method, penalty):
    losses, state, _ = _run_ours(method)
    ref_losses, ref_thetas = _run_streaming_reference(method, penalty)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
    _assert_replicas_equal(state, ref_thetas, 1e-4)


def _run_partial_reference(period_units):
    """DreamDDP / PLSGD: at local step i the units of period_units[i % H] are averaged over the
    replicas from the step's input; the gradients come from the replicas' own parameters and the
    AdamW update starts from the averaged ones."""
    params0, tx_init, grad_fn, adamw_step, mean = _reference_functions()
    thetas, opt_states, losses = [params0] * R, [tx_init(params0) for _ in range(R)], []
    W = 2
    for t, batch in enumerate(_batches()):
        rows = [batch[8 * r:8 * (r + 1)] for r in range(R)]
        results = [grad_fn(thetas[r], rows[r]) for r in range(R)]
        grads = [g for _, g in results]
        if t < W:
            grads = [mean(*grads)] * R
        else:
            units = period_units[(t - W) % len(period_units)]
            average = _unit_arrays(mean(*thetas))
            own = [_unit_arrays(th) for th in thetas]
            thetas = [_set_units(thetas[r], [average[u] if u in units else own[r][u]
                                             for u in range(len(own[r]))]) for r in range(R)]
        for r in range(R):
            thetas[r], opt_states[r] = adamw_step(grads[r], opt_states[r], thetas[r])
        losses.append(float(np.mean([loss for loss, _ in results])))
    return losses, thetas


def _dreamddp_profile(path):
    """Backward order rest, layer 1, layer 0; each backward 1 s, each all-reduce 0.5 s, H = 2.
    By hand: the rest's all-reduce runs 1-1.5 and layer 1's 2-2.5, both under the 3 s backward;
    layer 0's starts at 3 (its backward ends last) and waits 0.5 wherever it goes, so DreamDDP
    syncs it now (ties go to syncing now): iteration 0 = all units, wait 0.5; bubble filling
    then gives iteration 1 the rest and layer 1 (still no wait), but not layer 0."""
    units = [{"name": n, "backward_seconds": 1.0, "comm_seconds": 0.5}
             for n in ("rest", "layer 1", "layer 0")]
    path.write_text(json.dumps({"units": units, "forward_seconds": 1.0}))
    return [{REST_REF, 1, 2}, {REST_REF, 2}]  # in reference units: rest, layer 0 (1), layer 1 (2)


@pytest.mark.parametrize("name", ["plsgd", "dreamddp"])
def test_partial_averaging_equals_reference(name, tmp_path):
    if name == "plsgd":  # 3 units in backward order (rest, layer 1, layer 0) over H = 3
        method = MethodConfig(name="plsgd", warmup_steps=2, sync_every=3)
        period = [{REST_REF}, {2}, {1}]
    else:
        profile = tmp_path / "profile.json"
        period = _dreamddp_profile(profile)
        method = MethodConfig(name="dreamddp", warmup_steps=2, sync_every=2,
                              layer_profile=str(profile))
    program = build_program(_config(method), VOCAB)
    as_ref = lambda units: {REST_REF if u == REST_UNIT else 1 + u for u in units}  # noqa: E731
    assert [as_ref(units) for units in program.method.period] == period
    losses, state, _ = _run_ours(method)
    ref_losses, ref_thetas = _run_partial_reference(period)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)
    _assert_replicas_equal(state, ref_thetas, 1e-4)


# ----------------------------------------------------------------------------- the compiled HLO


def _unit_bytes_per_device(program) -> dict[int, int]:
    """Per device, the bytes of each unit's parameter shard (a layer's share of the stacked
    leaves), from the shardings of the replica-stacked parameters."""
    params = program.abstract_state().params

    def shard_bytes(x):
        shape = x.sharding.shard_shape(x.shape)
        return int(np.prod(shape[1:])) * x.dtype.itemsize  # one replica's piece

    rest = sum(shard_bytes(x) for k, v in params.items() if k != "layers"
               for x in jax.tree.leaves(v))
    layers = sum(shard_bytes(x) for x in jax.tree.leaves(params["layers"]))
    num_layers = program.method.num_layers
    return {REST_UNIT: rest, **{l: layers // num_layers for l in range(num_layers)}}


def test_dreamddp_step_moves_exactly_its_units_with_no_dependency_on_compute():
    """Each sync step's bytes over `replica` are exactly its scheduled units' shards, and no
    data dependency ties those all-reduces to the layer scans or any matmul: they average the
    step's input, so XLA may overlap them with the backward pass. local_sgd's average, taken
    after the update, depends on the backward (the check can fail)."""
    program = build_program(_config(MethodConfig(name="plsgd", warmup_steps=2, sync_every=2)),
                            VOCAB)
    sizes = _unit_bytes_per_device(program)
    mesh = program.layout.mesh
    for units in program.method.period:
        plan = program.method.plan(2 + program.method.period.index(units))
        compiled = program.compiled_step(plan)
        rows = [r for r in collective_stats(compiled, mesh) if r.axis == "replica"]
        assert sum(r.payload_bytes * r.executions for r in rows) == sum(sizes[u] for u in units)
        text = compiled.as_text()
        for row in rows:
            assert not {"while", "dot", "convolution"} & upstream_opcodes(text, row.name)
    assert bytes_per_device(program.abstract_state().outer) == 0  # no outer state at all
    local_sgd = build_program(_config(MethodConfig(name="local_sgd", warmup_steps=2,
                                                   sync_every=2)), VOCAB)
    compiled = local_sgd.compiled_step(local_sgd.method.full_sync)
    rows = [r for r in collective_stats(compiled, mesh) if r.axis == "replica"]
    assert all("while" in upstream_opcodes(compiled.as_text(), r.name) for r in rows)


def _one_shot(program):
    """The same program with its delayed syncs sent whole when they start (slices = 1)."""
    outer = dataclasses.replace(program.outer, slices=1)
    return dataclasses.replace(
        program, method=dataclasses.replace(program.method, slices=1), outer=outer,
        layout=make_layout(program.layout.mesh, program.params_shapes, program.tx, outer))


@pytest.mark.skipif(not xla_flags.overlaps_collectives(), reason=SLICES_NEED_OVERLAP)
def test_sliced_delayed_syncs_equal_the_one_shot_sync_exactly():
    """Streaming edit (penalty, global norms, alpha 0.5), H = 4, P = 2, d = 3, so two fragments
    overlap in flight: sending each fragment in 3 slices over its 3 steps gives bit-identical
    replicas after every step to sending it whole at its start."""
    method = dataclasses.replace(EDIT, anomaly_threshold=6.0, sync_every=4, fragments=2,
                                 fragment_delay=3, fragment_alpha=0.5)
    sliced = build_program(_config(method), VOCAB)
    assert sliced.method.slices == 3 and "send3" in " ".join(
        p.name(2) for p in sliced.method.plans())
    one_shot = _one_shot(sliced)
    states = [sliced.init_state(), one_shot.init_state()]
    for t, batch in enumerate(_batches()):
        batch = jax.device_put(batch, sliced.layout.batch_sharding)
        states = [program.step(state, t, batch)[0]
                  for program, state in zip((sliced, one_shot), states)]
        for a, b in zip(*(jax.tree.leaves(s.params) for s in states)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {t}")
    assert states[1].in_flight is None and states[0].in_flight is not None


def test_sliced_delay_sends_one_slice_per_step_from_the_step_input(monkeypatch):
    """diloco, 4 layers, H = 4, P = 2, d = 2: each fragment's payload travels in two halves,
    one in the step its sync starts and one in the next, so every step's bytes over `replica`
    are half a fragment's (plus a few scalars) and the peak halves; no data dependency ties any
    of those all-reduces (payload, norms, step counts) to the layer scans or a matmul (XLA may
    overlap them with the compute). The terms in flight are an f32 copy of the shard. Where the
    runtime cannot overlap collectives safely (XLA:CPU before jax 0.12), the norms' psum joins
    the backward pass's and the sync's payload follows the backward (checked here on both
    structures, whatever this runtime is)."""
    model = dataclasses.replace(MODEL, n_layers=4)
    cfg = dataclasses.replace(_config(MethodConfig(name="diloco", warmup_steps=2, sync_every=4,
                                                   fragments=2, fragment_delay=2)), model=model)
    monkeypatch.setattr(xla_flags, "overlaps_collectives", lambda: False)
    staged = build_program(cfg, VOCAB)
    plan = next(p for p in staged.method.plans() if p.sync)
    compiled = staged.compiled_step(plan)
    rows = [r for r in collective_stats(compiled, staged.layout.mesh) if "replica" in r.axes]
    assert any("while" in upstream_opcodes(compiled.as_text(), r.name) for r in rows)

    monkeypatch.setattr(xla_flags, "overlaps_collectives", lambda: True)
    program = build_program(cfg, VOCAB)
    sizes = _unit_bytes_per_device(program)
    fragment = {"[L0,L2]": 2 * sizes[0], "[L1,L3,rest]": 2 * sizes[0] + sizes[REST_UNIT]}
    scalars = 64  # the step counts' gather at a sync's start
    inspected = inspect_program(program)
    assert inspected["in_flight_bytes_per_device"] == inspected["param_bytes_per_shard"]  # f32
    report = inspected["steps"]
    assert set(report) == {"ddp", "local", "sync[L0,L2]", "send2[L0,L2]+apply[L0,L2]",
                           "sync[L1,L3,rest]", "send2[L1,L3,rest]+apply[L1,L3,rest]"}
    for name, units in (("sync[L0,L2]", "[L0,L2]"), ("send2[L0,L2]+apply[L0,L2]", "[L0,L2]"),
                        ("sync[L1,L3,rest]", "[L1,L3,rest]"),
                        ("send2[L1,L3,rest]+apply[L1,L3,rest]", "[L1,L3,rest]")):
        assert report[name]["replica_bytes"] == pytest.approx(fragment[units] / 2, abs=scalars)
    for plan in program.method.plans():
        if plan.sync or plan.send:
            compiled = program.compiled_step(plan)
            text = compiled.as_text()
            rows = [r for r in collective_stats(compiled, program.layout.mesh)
                    if "replica" in r.axes]  # the payload's, the norms' and the step counts'
            assert rows
            for row in rows:
                assert not {"while", "dot", "convolution"} & upstream_opcodes(text, row.name)


def test_streaming_peak_is_one_fragment():
    """diloco with P = 2 fragments of 2 layers (4 layers): each fragment's step moves its two
    layers' shards (plus the rest with the last fragment, plus a few scalars for the step
    counts), half of the whole-model sync's layer bytes; so the peak per step falls while the
    mean over a period stays that of the whole-model sync / H."""
    model = dataclasses.replace(MODEL, n_layers=4)
    base = MethodConfig(name="diloco", warmup_steps=2, sync_every=2)
    whole = build_program(dataclasses.replace(_config(base), model=model), VOCAB)
    streaming = build_program(dataclasses.replace(
        _config(dataclasses.replace(base, fragments=2)), model=model), VOCAB)
    full_sync = sum(r.payload_bytes * r.executions for r in collective_stats(
        whole.compiled_step(whole.method.full_sync), whole.layout.mesh) if r.axis == "replica")
    frag = inspect_program(streaming)
    sizes = _unit_bytes_per_device(streaming)
    layers = 4 * sizes[0]
    scalars = 64  # the step counts' gather: a few int32 per replica
    assert full_sync == pytest.approx(layers + sizes[REST_UNIT], abs=scalars)
    steps = {name: s["replica_bytes"] for name, s in frag["steps"].items()}
    assert steps["sync[L0,L2]"] == pytest.approx(layers / 2, abs=scalars)
    assert steps["sync[L1,L3,rest]"] == pytest.approx(layers / 2 + sizes[REST_UNIT], abs=scalars)
    assert frag["replica_bytes_peak_per_step"] == steps["sync[L1,L3,rest]"]
    assert frag["replica_bytes_per_step"] == pytest.approx(full_sync / 2, abs=scalars)


# ----------------------------------------------------------------------------- edit-jax schedule


def test_cli_schedule_from_a_profile(tmp_path, capsys):
    """`edit-jax schedule` with a user profile: the table and --json agree with the hand-solved
    instance of `_dreamddp_profile` (iteration 0 waits 0.5 s for layer 0; local SGD waits the
    whole 1.5 s of communication once per period), and a bad profile is a one-line error."""
    from edit_jax.cli import main

    profile = tmp_path / "profile.json"
    _dreamddp_profile(profile)
    args = ["schedule", "model.n_layers=2", "method.sync_every=2",
            f"method.layer_profile={profile}"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dream = report["schedules"]["dreamddp"]
    assert [it["units"] for it in dream["iterations"]] == [["rest", "layer 1", "layer 0"],
                                                          ["rest", "layer 1"]]
    assert dream["total_wait_seconds"] == pytest.approx(0.5)
    # forward 1 + backward 3 per iteration, + 0.5 s of wait once per period of 2
    assert dream["mean_iteration_seconds"] == pytest.approx(4.25)
    assert report["schedules"]["local_sgd"]["mean_iteration_seconds"] == pytest.approx(4.75)
    assert main(args) == 0
    assert re.search(r"dreamddp +mean +250.00 +4250.00", capsys.readouterr().out)
    profile.write_text('{"units": [{"name": "rest"}]}')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lacks backward_seconds, comm_seconds" in err and err.count("\n") == 1
    one_unit = {"name": "rest", "backward_seconds": 1.0, "comm_seconds": 0.5}
    profile.write_text(json.dumps({"units": [one_unit] * 2}))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has 2 units, but the model has 3" in err and err.count("\n") == 1
