"""The sharded step against an unsharded single-device reference written with plain optax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from edit_jax.config import MeshConfig, ModelConfig, OptimizerConfig
from edit_jax.mesh import make_mesh
from edit_jax.methods import DDP_PLAN, LOCAL_PLAN
from edit_jax.model import abstract_model, init_model, loss_fn
from edit_jax.optimizer import decay_mask, inner_optimizer, lr_schedule
from edit_jax.sharding import BATCH_SPEC, is_sharded, shard_dims
from edit_jax.step import init_state, make_eval_step, make_layout, make_train_step

MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64)
# eps=1e-4: Adam's first updates are g/(|g|+eps); with eps=1e-8 elements whose gradient is ~1e-9
# turn float32 round-off into 1e-4 parameter differences, which would hide real errors.
OPT = OptimizerConfig(lr=1e-2, warmup_steps=1, eps=1e-4, clip_norm=0.5)
VOCAB, STEPS, TOTAL = 61, 3, 10


def _batches(rows):
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, (rows, 17)).astype(np.int32) for _ in range(STEPS)]


@functools.cache
def _reference_step():
    """(initial params, AdamW init, one jitted reference step), built once per test process."""
    graphdef, params = init_model(MODEL, VOCAB, 0)
    tx = optax.chain(optax.clip_by_global_norm(OPT.clip_norm),
                     optax.adamw(lr_schedule(OPT, TOTAL), b1=OPT.b1, b2=OPT.b2, eps=OPT.eps,
                                 weight_decay=OPT.weight_decay, mask=decay_mask))

    @jax.jit
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, p, tokens)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return params, tx.init, step


def _reference(batches):
    """One model on one device, plain optax: clip_by_global_norm + adamw."""
    params, tx_init, step = _reference_step()
    opt_state, losses = tx_init(params), []
    for tokens in batches:
        params, opt_state, loss = step(params, opt_state, tokens)
        losses.append(float(loss))
    return losses, params


def _sharded(mesh_shape, batches, plan):
    mesh = make_mesh(MeshConfig(*mesh_shape))
    graphdef, shapes = abstract_model(MODEL, VOCAB)
    tx = inner_optimizer(OPT, TOTAL, is_sharded(shard_dims(shapes, mesh_shape[1])))
    layout = make_layout(mesh, shapes, tx)
    state = init_state(layout, lambda: init_model(MODEL, VOCAB, 0)[1], tx)
    step = make_train_step(graphdef, tx, layout, plan)
    losses = []
    for tokens in batches:
        state, metrics = step(state, jax.device_put(tokens, layout.batch_sharding))
        losses.append(float(metrics["loss"].mean()))
    return losses, state, layout


def _assert_params_close(stacked, replica, reference, tol):
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a)[replica], np.asarray(b), atol=tol, rtol=0)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4), (8, 1)])
def test_ddp_step_equals_unsharded_reference(mesh_shape):
    batches = _batches(16)
    ref_losses, ref_params = _reference(batches)
    losses, state, layout = _sharded(mesh_shape, batches, DDP_PLAN)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    for r in range(mesh_shape[0]):
        _assert_params_close(state.params, r, ref_params, 1e-5)
    spec = layout.state_specs.params["layers"]["mlp"]["w_up"]["kernel"]
    assert spec[0] == "replica" and ("shard" in tuple(spec)) == (mesh_shape[1] > 1)
    leaf = state.params["layers"]["mlp"]["w_up"]["kernel"]
    assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(layout.mesh, spec), leaf.ndim)
    assert leaf.addressable_shards[0].data.shape == (1, 2, 64, 96 // mesh_shape[1])


def test_without_replica_reduction_each_replica_trains_on_its_own_rows():
    batches = _batches(16)
    losses, state, _ = _sharded((2, 4), batches, LOCAL_PLAN)
    ref = [_reference([b[8 * r:8 * (r + 1)] for b in batches]) for r in range(2)]
    np.testing.assert_allclose(losses, np.mean([ref[0][0], ref[1][0]], axis=0), atol=1e-5)
    for r in range(2):
        _assert_params_close(state.params, r, ref[r][1], 1e-5)
    leaf = state.params["embed"]["embedding"]
    assert not np.allclose(leaf[0], leaf[1])  # the replicas really drifted apart


def test_eval_step_scores_the_replica_average():
    """The mean loss over the evaluation's batches of the replica-averaged model: replicas
    moved by +d and -d score as the initial model."""
    graphdef, params = init_model(MODEL, VOCAB, 0)
    tokens = np.stack(_batches(16)[:2])
    mesh = make_mesh(MeshConfig(2, 4))
    _, shapes = abstract_model(MODEL, VOCAB)
    tx = inner_optimizer(OPT, TOTAL, is_sharded(shard_dims(shapes, 4)))
    layout = make_layout(mesh, shapes, tx)
    state = init_state(layout, lambda: init_model(MODEL, VOCAB, 0)[1], tx)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *BATCH_SPEC))
    apart = jax.tree.map(lambda x: x + 0.05 * jnp.array([1.0, -1.0]).reshape(
        (2,) + (1,) * (x.ndim - 1)), state.params)
    loss = make_eval_step(graphdef, layout)(apart, jax.device_put(tokens, sharding))
    expected = np.mean([loss_fn(graphdef, params, jnp.asarray(batch))[0] for batch in tokens])
    np.testing.assert_allclose(loss, expected, atol=1e-5)
