"""XLA flags: the GPU defaults checked against this jaxlib's own flag parser, the precedence
(defaults < run.xla_flags < $XLA_FLAGS), the platform known before JAX starts, and start-up."""

import importlib.util
import os
import subprocess
import sys

import pytest

from edit_jax import mesh, xla_flags
from edit_jax.config import MeshConfig, load_config
from edit_jax.errors import UserError

RETIRED = "--xla_gpu_enable_async_collectives=true"  # old JAX-Toolbox advice, gone from XLA


def test_every_gpu_default_is_known_to_this_jaxlib_and_a_retired_flag_is_dropped(tmp_path,
                                                                                monkeypatch):
    """A real check: the child process parses the flags as this jaxlib would on a GPU (it
    aborts on an unknown one); run on each jax version CI installs (0.10.2 and the newest)."""
    kept = xla_flags.supported_flags([*xla_flags.GPU_FLAGS, RETIRED], cache_dir=tmp_path)
    assert kept == list(xla_flags.GPU_FLAGS)
    probe = subprocess.run([sys.executable, "-c", xla_flags._PROBE], capture_output=True, text=True,
                           env={**os.environ, "XLA_FLAGS": RETIRED, "JAX_PLATFORMS": "cpu"})
    assert probe.returncode != 0 and "Unknown flag" in probe.stderr  # what dropping it avoids
    monkeypatch.setattr(subprocess, "run", None)  # the answer is cached: no child process now
    assert xla_flags.supported_flags([*xla_flags.GPU_FLAGS, RETIRED], cache_dir=tmp_path) == kept


def test_precedence_and_platforms():
    def keep_all(flags):
        return list(flags)

    run = ["--xla_gpu_enable_triton_gemm=true", "--xla_dump_to=/tmp/dump"]
    env = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_gpu_enable_triton_gemm=false"
    gpu = xla_flags.effective_flags("gpu", run, env, keep_all)
    assert gpu[:len(xla_flags.GPU_FLAGS) - 2] == [  # the defaults the others left alone
        f for f in xla_flags.GPU_FLAGS if "latency_hiding" not in f and "triton_gemm" not in f]
    assert gpu[-3:] == ["--xla_dump_to=/tmp/dump",  # run.xla_flags over the defaults ...
                        "--xla_gpu_enable_latency_hiding_scheduler=false",  # ... $XLA_FLAGS
                        "--xla_gpu_enable_triton_gemm=false"]  # over both
    assert xla_flags.effective_flags("cpu", [], "", keep_all) == []  # CPU runs: nothing
    assert xla_flags.effective_flags("cpu", run, "--xla_foo=1", keep_all) == [*run, "--xla_foo=1"]
    assert xla_flags.effective_flags("gpu", [], "", lambda f: f[:1]) == [xla_flags.GPU_FLAGS[0]]


def test_platform_is_known_before_jax_starts(tmp_path, monkeypatch):
    driver = tmp_path / "nvidia"
    plugin = importlib.util.find_spec("json")  # stands in for an installed CUDA plugin
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: plugin if name == "jax_cuda13_plugin" else None)
    assert xla_flags.detect_platform({}, driver) == "cpu"  # no driver loaded
    driver.mkdir()
    assert xla_flags.detect_platform({}, driver) == "gpu"
    assert xla_flags.detect_platform({"JAX_PLATFORMS": "cuda,cpu"}, driver) == "gpu"
    assert xla_flags.detect_platform({"JAX_PLATFORMS": "cpu"}, driver) == "cpu"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert xla_flags.detect_platform({}, driver) == "cpu"  # no plugin


def test_start_jax_sets_the_flags_and_keeps_the_users(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/mine")
    mesh.start_jax(MeshConfig(), xla_flags=["--xla_dump_to=/tmp/run", "--xla_foo=1"])
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_dump_to=/tmp/mine"  # the user's wins
    monkeypatch.delenv("XLA_FLAGS")
    mesh.start_jax(MeshConfig())
    assert "XLA_FLAGS" not in os.environ  # on CPU nothing is added


def test_bad_flags_and_profile_ranges_are_config_errors():
    with pytest.raises(UserError, match="run.xla_flags.*written --name=value"):
        load_config(None, ["run.xla_flags=[xla_foo=1]"])
    assert load_config(None, ["run.profile_steps='3,5'"]).run.profile_steps == "3,5"
    for bad in ("5", "5,3", "0,2", "a,b", "1,2,3"):
        with pytest.raises(UserError, match="run.profile_steps.*is not A,B with 1 <= A <= B"):
            load_config(None, [f"run.profile_steps='{bad}'"])
