"""Bytes over `replica` and outer-state memory of the compiled train steps of each method.

A small Llama (every leaf divides R*S = 8) on the (2, 4) mesh, compiled from abstract values.
P/S is the fp32 parameter bytes divided by the shard count: one device's parameter shard.
"""

import functools
import json
import subprocess
import sys

import pytest

from edit_jax.cli import main
from edit_jax.config import load_config
from edit_jax.inspect_steps import bytes_per_device, inspect_program
from edit_jax.program import build_program

SMALL = ("model.d_model=64", "model.n_layers=2", "model.d_ff=128", "model.n_heads=4",
         "model.n_kv_heads=2", "model.vocab_size=256", "data.seq_len=32",
         "data.global_batch_size=16", "method.warmup_steps=0")
SCALARS = 64  # bytes: a few fp32 metrics (loss, grad norm)
PENALTY = 1024  # bytes: norms, weights and scalars of the sync's penalty


def program(*overrides: str):
    return build_program(load_config(None, SMALL + overrides), 256)


@functools.cache
def report(*overrides: str) -> dict:
    return inspect_program(program(*overrides))


def param_bytes_per_shard(rep: dict) -> float:
    return rep["param_bytes"] / rep["mesh"]["shard"]


def test_small_model_splits_every_leaf_over_shard():
    prog = program("method.name=ddp")
    params = prog.abstract_state().params
    assert bytes_per_device(params) == 4 * prog.num_params / prog.layout.num_shards


@pytest.mark.parametrize("method", ["edit", "diloco", "local_sgd"])
def test_local_step_moves_nothing_over_replica(method):
    rep = report(f"method.name={method}")
    local = rep["steps"]["local"]
    assert local["collectives"]["exact"]
    assert local["replica_bytes"] == 0, local["collectives"]["by_axis"]
    assert local["collectives"]["by_axis"]["shard"]["bytes"] > 0


@pytest.mark.parametrize("method", ["edit", "diloco", "local_sgd"])
def test_sync_step_moves_every_parameter_shard_once(method):
    rep = report(f"method.name={method}")
    moved = rep["steps"]["sync"]["replica_bytes"]
    assert param_bytes_per_shard(rep) <= moved <= param_bytes_per_shard(rep) + PENALTY


def test_average_over_a_sync_period():
    rep = report("method.name=edit")
    tau, steps = rep["sync_every"], rep["steps"]
    assert sorted(steps) == ["local", "sync"]  # no warm-up: no DDP step
    expected = ((tau - 1) * steps["local"]["replica_bytes"] + steps["sync"]["replica_bytes"]) / tau
    assert rep["replica_bytes_per_step"] == pytest.approx(expected)


def test_ddp_step_all_reduces_the_gradient_shards():
    """Exactly: one fp32 all-reduce of this device's gradient shard (P/S bytes) plus at most
    SCALARS bytes of metrics."""
    rep = report("method.name=ddp")
    assert list(rep["steps"]) == ["ddp"]
    ddp = rep["steps"]["ddp"]
    assert ddp["collectives"]["exact"]
    shard_bytes = param_bytes_per_shard(rep)
    assert shard_bytes <= ddp["replica_bytes"] <= shard_bytes + SCALARS
    assert rep["replica_bytes_per_step"] == ddp["replica_bytes"]
    assert rep["outer_state_bytes_per_device"] == 0


def test_outer_state_sharded_over_replica():
    layer_norms = ("method.name=edit", "method.norm_granularity=layer")
    sharded = layer_norms + ("method.shard_outer_over_replica=true",)
    rep = report(*sharded)
    replicas = rep["mesh"]["replica"]
    whole = bytes_per_device(program(*layer_norms).abstract_state().outer)
    split = rep["outer_state_bytes_per_device"]
    assert whole >= 2 * param_bytes_per_shard(rep)  # phi + momentum: 2P/S
    assert whole / split >= 0.9 * replicas
    sync = rep["steps"]["sync"]
    assert sync["collectives"]["exact"]
    # all-to-all of the pseudo-gradient pieces + all-gather of phi: on the wire, what a ring
    # all-reduce of the P/S shard sends, 2(R-1)/R * P/S.
    ring_all_reduce = 2 * (replicas - 1) / replicas * param_bytes_per_shard(rep)
    assert sync["replica_wire_bytes"] <= ring_all_reduce + PENALTY
    assert sync["replica_bytes"] >= param_bytes_per_shard(rep)  # it syncs everything
    assert rep["steps"]["local"]["replica_bytes"] == 0


def test_cli_inspect_json(capsys):
    """A compressed run (int4 with error feedback): its wire bytes by element type, its
    residual (one more copy of the replica's shard) and its saving against the same run in
    fp32, compiled alongside."""
    assert main(["inspect", "--json", *SMALL, "method.name=diloco", "method.compression=int4",
                 "method.error_feedback=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "diloco" and out["mesh"] == {"replica": 2, "shard": 4}
    for key in ("param_bytes", "param_bytes_per_shard", "outer_state_bytes_per_device",
                "replica_bytes_per_step", "device_kind"):
        assert key in out
    assert out["param_bytes_per_shard"] == out["param_bytes"] / 4
    assert out["error_feedback_bytes_per_device"] == out["param_bytes_per_shard"]
    by_dtype = out["replica_wire_bytes_by_dtype_per_step"]
    assert set(by_dtype) >= {"u8", "f32"} and by_dtype["u8"] > 4 * by_dtype["f32"]
    assert sum(by_dtype.values()) == pytest.approx(out["replica_wire_bytes_per_step"], abs=8)
    assert 6 < out["compression_saving"] < 8
    assert out["fp32_replica_wire_bytes_per_step"] == pytest.approx(
        out["compression_saving"] * out["replica_wire_bytes_per_step"])
    for step in out["steps"].values():
        assert {"replica", "shard", "both"} <= set(step["collectives"]["by_axis"])
        assert step["memory"]["peak"] > 0


def test_cli_inspect_bad_key(capsys):
    assert main(["inspect", "--json", "method.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "method.bogus" in err and "\n" not in err


def test_output_piped_into_head_ends_quietly():
    """`edit-jax inspect | head`: when the reader leaves, the CLI stops with the shell's SIGPIPE
    status and no traceback (the command is replaced by one that prints 100,000 lines)."""
    script = ("import sys; from edit_jax import cli; "
              "cli.COMMANDS['inspect'] = lambda args: [print(i) for i in range(100_000)]; "
              "sys.exit(cli.main(['inspect']))")
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | head -n 1; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout == "0\n" and proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
