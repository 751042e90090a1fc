"""Injected stragglers: which slowness a process takes on, and how long it sleeps."""

import time

import jax.numpy as jnp
import pytest

from edit_jax import stragglers
from edit_jax.config import StragglerConfig
from edit_jax.errors import UserError
from edit_jax.stragglers import Straggler


def test_a_process_takes_the_slowest_of_its_replicas():
    cfg = StragglerConfig(slowdown=(1.0, 3.0, 1.0, 2.0), delay_seconds=(0.0, 0.0, 0.5, 0.0))
    assert vars(Straggler.for_replicas(cfg, 4, [0])) == {"slowdown": 1.0, "delay_seconds": 0.0}
    assert not Straggler.for_replicas(cfg, 4, [0]).active
    assert vars(Straggler.for_replicas(cfg, 4, [1, 2])) == {"slowdown": 3.0,
                                                            "delay_seconds": 0.5}
    assert not Straggler.for_replicas(StragglerConfig(), 4, [0, 1, 2, 3]).active


def test_one_value_per_replica():
    with pytest.raises(UserError, match="straggler.slowdown has 2 values for 4 replicas"):
        Straggler.for_replicas(StragglerConfig(slowdown=(1.0, 2.0)), 4, [0])


def test_sleeps_the_slowdown_times_the_step_plus_the_delay(monkeypatch):
    slept = []
    monkeypatch.setattr(stragglers.time, "sleep", slept.append)
    now = time.perf_counter()
    Straggler(slowdown=3.0, delay_seconds=0.25).after_step(jnp.zeros(()), now - 2.0)
    assert slept and 0.25 + 2 * 2.0 <= slept[0] < 0.25 + 2 * 2.5
    Straggler().after_step(jnp.zeros(()), now - 2.0)
    assert len(slept) == 1  # no straggler: no wait, no sleep
