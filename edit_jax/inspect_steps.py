"""What the compiled train steps of a run move and hold, per device (`edit-jax inspect`).

`inspect_program` compiles each step plan the method runs (which units sync in the step, which
delayed outer steps land) from abstract values (no arrays are allocated) and reports, from the
optimized HLO (inspect_hlo.py), bytes per mesh axis and op kind, memory, the outer state's size
per device, and the replica bytes per step over a sync period: their mean and their peak
(streaming fragments lower the peak, not the mean).
"""

from __future__ import annotations

import math
from statistics import mean

import jax
import jax.numpy as jnp

from edit_jax.inspect_hlo import (collective_stats, format_table, human_bytes, memory_stats,
                                  summarize)
from edit_jax.methods import Method, StepPlan
from edit_jax.program import Program


def sync_period(method: Method) -> list[StepPlan]:
    """The step plans of one steady-state sync period (tau steps after the first sync)."""
    start = method.warmup_steps + method.sync_every
    return [method.plan(step) for step in range(start, start + method.sync_every)]


def step_plans(method: Method) -> list[StepPlan]:
    """The step plans `method` runs: those of its warm-up and of its sync periods, in order of
    first use."""
    end = method.warmup_steps + 2 * method.sync_every + method.fragment_delay
    return list(dict.fromkeys(method.plan(step) for step in range(end)))


def compile_step(program: Program, plan: StepPlan) -> jax.stages.Compiled:
    """Compile the train step of one plan from abstract values only (nothing is allocated; a
    step already compiled for the same shapes comes from JAX's compilation cache)."""
    cfg = program.cfg
    batch = jax.ShapeDtypeStruct((cfg.data.global_batch_size, cfg.data.seq_len + 1), jnp.int32,
                                 sharding=program.layout.batch_sharding)
    return program.train_step(plan).lower(program.abstract_state(), batch).compile()


def compile_steps(program: Program) -> dict[StepPlan, jax.stages.Compiled]:
    """Compile the train step of every plan the method runs, from abstract values only."""
    return {plan: compile_step(program, plan) for plan in step_plans(program.method)}


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of abstract arrays with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def replica_traffic(summary: dict) -> dict[str, int]:
    """Per device, payload and wire bytes of the ops whose device groups span `replica` (axis
    'replica' or 'both'), from a `summarize` output."""
    return {name: summary["by_axis"]["replica"][key] + summary["by_axis"]["both"][key]
            for name, key in (("replica_bytes", "bytes"), ("replica_wire_bytes", "wire_bytes"))}


def inspect_program(program: Program,
                    compiled: dict[StepPlan, jax.stages.Compiled] | None = None) -> dict:
    """Communication and memory per device of a run's train steps (`compile_steps` output, or
    compiled here), plus its parameter and outer-state sizes.

    'replica_bytes' of a step counts every collective whose groups span `replica`;
    'replica_bytes_per_step' averages it over the steps of a sync period (every step for ddp),
    'replica_bytes_peak_per_step' is the largest of them.
    """
    compiled = compile_steps(program) if compiled is None else compiled
    mesh = program.layout.mesh
    num_layers = program.method.num_layers
    steps = {}
    for plan, step in compiled.items():
        summary = summarize(collective_stats(step, mesh))
        steps[plan.name(num_layers)] = {**replica_traffic(summary), "collectives": summary,
                                        "memory": memory_stats(step)}
    period = [steps[plan.name(num_layers)] for plan in sync_period(program.method)]
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(program.params_shapes))
    return {
        "method": program.method.name,
        "mesh": dict(mesh.shape),
        "device_kind": mesh.devices.flat[0].device_kind,
        "num_params": program.num_params,
        "param_bytes": param_bytes,
        "param_bytes_per_shard": param_bytes / mesh.shape["shard"],
        "outer_state_bytes_per_device": bytes_per_device(program.abstract_state().outer),
        "sync_every": program.method.sync_every,
        "timed_syncs": program.method.timed,  # a_edit: tau is nominal, syncs follow the clock
        "replica_bytes_per_step": mean(step["replica_bytes"] for step in period),
        "replica_bytes_peak_per_step": max(step["replica_bytes"] for step in period),
        "replica_wire_bytes_per_step": mean(step["replica_wire_bytes"] for step in period),
        "steps": steps,
    }


def format_report(report: dict) -> str:
    """`inspect_program` output as text: the sizes, then one `format_table` per step plan."""
    mesh = report["mesh"]
    nominal = "nominal " if report["timed_syncs"] else ""
    per_step = ("replica bytes per step" if report["method"] == "ddp"
                else f"replica bytes per step (mean of {nominal}tau={report['sync_every']})")
    header = (f"method {report['method']}: {report['num_params']:,} parameters on a "
              f"{mesh['replica']} x {mesh['shard']} ('replica', 'shard') mesh of "
              f"{report['device_kind']} devices; bytes are per device")
    sizes = [("parameter bytes", report["param_bytes"]),
             ("parameter bytes / S", report["param_bytes_per_shard"]),
             ("outer state", report["outer_state_bytes_per_device"]),
             (per_step, report["replica_bytes_per_step"]),
             ("  peak of one step", report["replica_bytes_peak_per_step"]),
             ("  ring wire bytes", report["replica_wire_bytes_per_step"])]
    width = max(len(name) for name, _ in sizes)
    lines = [header] + [f"  {name:<{width}}{round(value):>14,}{human_bytes(round(value)):>12}"
                        for name, value in sizes]
    for name, step in report["steps"].items():
        lines += ["", format_table(step["collectives"], step["memory"], f"{name} step")]
    return "\n".join(lines)
