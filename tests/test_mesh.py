"""Mesh shapes from config: -1 as "the rest", clear errors when sizes do not fit."""

import jax
import pytest

from edit_jax.config import MeshConfig
from edit_jax.errors import UserError
from edit_jax.mesh import distributed_args_from_env, make_mesh, resolve_mesh_shape


@pytest.mark.parametrize("replica, shard, expected", [
    (2, 4, (2, 4)), (-1, 4, (2, 4)), (8, -1, (8, 1)), (1, -1, (1, 8)), (-1, 1, (8, 1))])
def test_resolve(replica, shard, expected):
    assert resolve_mesh_shape(MeshConfig(replica, shard), 8) == expected


@pytest.mark.parametrize("replica, shard, message", [
    (3, 4, "mesh (3, 4) needs 12 devices but 8 are available"),
    (-1, 3, "mesh size 3 does not divide the 8 devices"),
    (2, 2, "mesh (2, 2) needs 4 devices but 8 are available")])
def test_sizes_that_do_not_fit(replica, shard, message):
    with pytest.raises(UserError, match="set mesh.replica and mesh.shard") as e:
        resolve_mesh_shape(MeshConfig(replica, shard), 8)
    assert message in str(e.value)


def test_mesh_axes_and_device_order():
    mesh = make_mesh(MeshConfig(2, 4))
    assert mesh.axis_names == ("replica", "shard")
    assert mesh.devices.shape == (2, 4)
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


def test_distributed_args(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert distributed_args_from_env() == ("10.0.0.1:1234", 4, 2)
    assert distributed_args_from_env(process_id=3).process_id == 3
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    with pytest.raises(UserError, match="must be an integer"):
        distributed_args_from_env()
