"""What the compiled train steps of a run move and hold, per device (`edit-jax inspect`).

`inspect_program` compiles each step plan the method runs (which units sync in the step, which
delayed outer steps land) from abstract values (no arrays are allocated) and reports, from the
optimized HLO (inspect_hlo.py), bytes per mesh axis and op kind, memory, the outer state's size
per device, and the replica bytes per step over a sync period: their mean and their peak
(streaming fragments lower the peak, not the mean). A compressed run (method.compression) also
gets its wire bytes by element type, the error-feedback residual's size and, from the same
config compiled in fp32, the saving.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import mean

import jax

from edit_jax.inspect_hlo import (collective_stats, format_table, human_bytes, memory_stats,
                                  replica_traffic, summarize)
from edit_jax.methods import METHODS, Method, StepPlan, SyncRule
from edit_jax.program import Program, build_program


def sync_period(method: Method) -> list[StepPlan]:
    """The step plans of one steady-state sync period (tau steps after the first sync)."""
    start = method.warmup_steps + method.sync_every
    return [method.plan(step) for step in range(start, start + method.sync_every)]


def compile_steps(program: Program) -> dict[StepPlan, jax.stages.Compiled]:
    """The compiled train step of every plan the method runs (compiled from abstract values
    only, once per program: the executables a run executes)."""
    return {plan: program.compiled_step(plan) for plan in program.method.plans()}


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of abstract arrays with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def _fp32_twin(program: Program) -> Program:
    """The same run with uncompressed syncs (what a compressed run saves against)."""
    method = dataclasses.replace(program.cfg.method, compression="none", error_feedback=False)
    return build_program(dataclasses.replace(program.cfg, method=method), program.vocab_size,
                         list(program.layout.mesh.devices.flat), program.profile)


def inspect_program(program: Program,
                    compiled: dict[StepPlan, jax.stages.Compiled] | None = None,
                    compare_fp32: bool = True) -> dict:
    """Communication and memory per device of a run's train steps (`compile_steps` output, or
    compiled here), plus its parameter and outer-state sizes.

    'replica_bytes' of a step counts every collective whose groups span `replica`;
    'replica_bytes_per_step' averages it over the steps of a sync period (every step for ddp),
    'replica_bytes_peak_per_step' is the largest of them; 'replica_wire_bytes_by_dtype_per_step'
    splits the mean wire bytes by element type. With compression (and `compare_fp32`) the same
    config is compiled with fp32 syncs: 'fp32_replica_wire_bytes_per_step' and the
    'compression_saving' factor, on wire bytes (the payload convention counts a quantized
    all-reduce's all-to-all and all-gather at full size each, an all-reduce once).
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
    by_dtype: dict[str, float] = {}
    for step in period:
        for dtype, b in step["collectives"]["replica_by_dtype"].items():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + b["wire_bytes"] / len(period)
    wire = mean(step["replica_wire_bytes"] for step in period)
    compression = {}
    if program.cfg.method.compression != "none" and compare_fp32:
        fp32 = inspect_program(_fp32_twin(program), compare_fp32=False)
        compression = {"fp32_replica_wire_bytes_per_step": fp32["replica_wire_bytes_per_step"],
                       "compression_saving": fp32["replica_wire_bytes_per_step"] / wire}
    return {
        "method": program.method.name,
        "mesh": dict(mesh.shape),
        "device_kind": mesh.devices.flat[0].device_kind,
        "num_params": program.num_params,
        "param_bytes": param_bytes,
        "param_bytes_per_shard": param_bytes / mesh.shape["shard"],
        "outer_state_bytes_per_device": bytes_per_device(program.abstract_state().outer),
        "error_feedback_bytes_per_device": bytes_per_device(program.abstract_state().residual),
        "in_flight_bytes_per_device": bytes_per_device(program.abstract_state().in_flight),
        "compression": program.cfg.method.compression,
        "sync_every": program.method.sync_every,
        "timed_syncs": program.method.timed,  # a_edit: tau is nominal, syncs follow the clock
        "replica_bytes_per_step": mean(step["replica_bytes"] for step in period),
        "replica_bytes_peak_per_step": max(step["replica_bytes"] for step in period),
        "replica_wire_bytes_per_step": wire,
        "replica_wire_bytes_by_dtype_per_step": by_dtype,
        **compression,
        "steps": steps,
    }


def format_report(report: dict) -> str:
    """`inspect_program` output as text: the sizes, then one `format_table` per step plan."""
    mesh = report["mesh"]
    nominal = "nominal " if report["timed_syncs"] else ""
    per_step = ("replica bytes per step" if METHODS[report["method"]].rule is SyncRule.NONE
                else f"replica bytes per step (mean of {nominal}tau={report['sync_every']})")
    header = (f"method {report['method']}: {report['num_params']:,} parameters on a "
              f"{mesh['replica']} x {mesh['shard']} ('replica', 'shard') mesh of "
              f"{report['device_kind']} devices; bytes are per device")
    sizes = [("parameter bytes", report["param_bytes"]),
             ("parameter bytes / S", report["param_bytes_per_shard"]),
             ("outer state", report["outer_state_bytes_per_device"]),
             ("error-feedback residual", report["error_feedback_bytes_per_device"]),
             ("sliced syncs' terms in flight", report["in_flight_bytes_per_device"]),
             (per_step, report["replica_bytes_per_step"]),
             ("  peak of one step", report["replica_bytes_peak_per_step"]),
             ("  ring wire bytes", report["replica_wire_bytes_per_step"])]
    sizes += [(f"    of them {dtype}", b)
              for dtype, b in report["replica_wire_bytes_by_dtype_per_step"].items()]
    if "compression_saving" in report:
        sizes.append(("  wire bytes with fp32 syncs", report["fp32_replica_wire_bytes_per_step"]))
    width = max(len(name) for name, _ in sizes)
    lines = [header] + [f"  {name:<{width}}{round(value):>14,}{human_bytes(round(value)):>12}"
                        for name, value in sizes]
    if "compression_saving" in report:
        lines.append(f"  {report['compression']} syncs send {report['compression_saving']:.2f}x "
                     "fewer wire bytes over replica than fp32")
    for name, step in report["steps"].items():
        lines += ["", format_table(step["collectives"], step["memory"], f"{name} step")]
    return "\n".join(lines)
