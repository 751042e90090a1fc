"""Collective bytes, mesh axes, loop counts and memory read from compiled programs.

Expected bytes are hand-computed with the payload convention of `edit_jax.inspect_hlo`
(all-gather: result bytes; the other kinds: operand bytes) and its ring wire convention.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from edit_jax.inspect_hlo import (
    collective_stats, collective_stats_from_text, format_table, memory_stats,
    parse_replica_groups, shape_bytes, summarize)

AXES = ("replica", "shard")
FLAT = P(AXES)


def auto_mesh(shape):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 2)


def compile_shard_map(mesh, fn, *local_sizes):
    """Compile `fn` under shard_map with each argument f32[local] per device, split over all."""
    wrapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(FLAT,) * len(local_sizes),
                                    out_specs=FLAT, check_vma=False))
    args = [jax.ShapeDtypeStruct((mesh.size * n,), jnp.float32) for n in local_sizes]
    return wrapped.lower(*args).compile()


def only_row(compiled, mesh):
    rows = collective_stats(compiled, mesh)
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_psum_over_replica(shape):
    mesh = auto_mesh(shape)
    row = only_row(compile_shard_map(mesh, lambda a: jax.lax.psum(a, "replica"), 1024), mesh)
    n = shape[0]
    assert (row.kind, row.axis, row.group_size) == ("all-reduce", "replica", n)
    assert row.payload_bytes == 4096 and row.wire_bytes == 2 * (n - 1) * 4096 // n
    assert (row.executions, row.exact) == (1, True)


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_all_gather_over_shard(shape):
    mesh = auto_mesh(shape)
    row = only_row(compile_shard_map(
        mesh, lambda a: jax.lax.all_gather(a, "shard", tiled=True), 256), mesh)
    n = shape[1]
    assert (row.kind, row.axis, row.group_size) == ("all-gather", "shard", n)
    assert row.payload_bytes == n * 1024 and row.wire_bytes == (n - 1) * 1024


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_psum_scatter_over_shard(shape):
    mesh = auto_mesh(shape)
    row = only_row(compile_shard_map(
        mesh, lambda a: jax.lax.psum_scatter(a, "shard", tiled=True), 1024), mesh)
    n = shape[1]
    assert (row.kind, row.axis, row.group_size) == ("reduce-scatter", "shard", n)
    assert row.payload_bytes == 4096 and row.wire_bytes == (n - 1) * 4096 // n


def test_psum_over_both_axes():
    mesh = auto_mesh((2, 4))
    row = only_row(compile_shard_map(mesh, lambda a: jax.lax.psum(a, AXES), 1024), mesh)
    assert (row.kind, row.axes, row.axis, row.group_size) == (
        "all-reduce", AXES, "both", 8)
    assert row.payload_bytes == 4096 and row.wire_bytes == 2 * 7 * 4096 // 8


def test_ppermute_and_all_to_all():
    mesh = auto_mesh((2, 4))
    perm = only_row(compile_shard_map(
        mesh, lambda a: jax.lax.ppermute(a, "shard", [(i, (i + 1) % 4) for i in range(4)]),
        1024), mesh)
    assert (perm.kind, perm.axis, perm.payload_bytes, perm.wire_bytes) == (
        "collective-permute", "shard", 4096, 4096)
    # CPU lowers the array all-to-all to a tuple all-to-all of 4 slices of 1 KiB each.
    a2a = only_row(compile_shard_map(
        mesh, lambda a: jax.lax.all_to_all(a, "shard", 0, 0, tiled=True), 1024), mesh)
    assert (a2a.kind, a2a.axis, a2a.payload_bytes, a2a.wire_bytes) == (
        "all-to-all", "shard", 4096, 3072)


def test_scan_body_is_counted_per_iteration():
    mesh = auto_mesh((2, 4))

    def fn(a):
        def body(c, _):
            return c + jax.lax.all_gather(a * c[0], "shard", tiled=True)[:256], None
        return jax.lax.scan(body, a, None, length=5)[0]

    compiled = compile_shard_map(mesh, fn, 256)
    assert '"known_trip_count":{"n":"5"}' in compiled.as_text()  # XLA kept the loop
    row = only_row(compiled, mesh)
    assert (row.axis, row.payload_bytes, row.executions, row.exact) == ("shard", 4096, 5, True)
    assert row.bytes == 5 * 4096
    assert summarize([row])["by_axis"]["shard"]["bytes"] == 5 * 4096


def test_nested_loops_multiply():
    mesh = auto_mesh((2, 4))

    def fn(a, b):
        def inner(c, _):
            return c + jax.lax.psum(c * 1.5, "replica"), None

        def outer(c, _):
            c = jax.lax.scan(inner, c, None, length=3)[0]
            return c + jax.lax.all_gather(b * c[0], "shard", tiled=True)[:1024], None

        return jax.lax.scan(outer, a, None, length=4)[0]

    compiled = compile_shard_map(mesh, fn, 1024, 256)
    rows = {r.kind: r for r in collective_stats(compiled, mesh)}
    assert rows.keys() == {"all-reduce", "all-gather"}
    assert (rows["all-reduce"].axis, rows["all-reduce"].executions) == ("replica", 12)
    assert (rows["all-gather"].axis, rows["all-gather"].executions) == ("shard", 4)
    summary = summarize(rows.values())
    assert summary["by_axis"]["replica"]["bytes"] == 12 * 4096
    assert summary["by_axis"]["shard"]["bytes"] == 4 * 4096
    assert summary["total"]["bytes"] == 16 * 4096 and summary["total"]["ops"] == 2
    assert summary["by_kind"]["all-reduce"]["executions"] == 12 and summary["exact"]


def test_no_collectives():
    mesh = auto_mesh((2, 4))
    compiled = compile_shard_map(mesh, lambda a: jnp.sin(a) * 2, 1024)
    assert collective_stats(compiled, mesh) == []
    summary = summarize([])
    assert summary["total"] == {"bytes": 0, "wire_bytes": 0, "ops": 0, "executions": 0}
    assert all(b["bytes"] == 0 for b in summary["by_axis"].values())


def test_logical_ids_are_mesh_positions():
    """A permuted device order: HLO ids index mesh.devices.flat, not device ids."""
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    mesh = Mesh(np.array(jax.devices())[order].reshape(2, 4), AXES,
                axis_types=(AxisType.Auto,) * 2)
    fn = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "shard"), mesh=mesh,
                               in_specs=FLAT, out_specs=FLAT))
    x = jnp.arange(8.0)
    compiled = fn.lower(x).compile()
    # jax 0.10 prints {{0,1,2,3},{4,5,6,7}}, jax 0.11+ mesh['replica'=2,'shard'=4] {'shard'}:
    # either way the groups are mesh positions, never the permuted device ids.
    printed = re.findall(r"replica_groups=(mesh\[[^{]*\{[^}]*\}|\{[{}\d,]*\}|\S+?),",
                         compiled.as_text())
    assert len(printed) == 1, printed
    assert parse_replica_groups(printed[0]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert only_row(compiled, mesh).axis == "shard"
    out = fn(jax.device_put(x, NamedSharding(mesh, FLAT)))
    np.testing.assert_allclose(out, [6, 6, 6, 6, 22, 22, 22, 22])


def test_jit_partitioner_forms():
    """Collectives the partitioner inserts print mesh-axes or iota groups; both are mapped."""
    mesh = auto_mesh((2, 4))
    x = jax.device_put(jnp.ones((16, 64)), NamedSharding(mesh, P(*AXES)))
    by_name = {}
    for name, fn in [("sum0", lambda x: x.sum(0)), ("sum1", lambda x: x.sum(1)),
                     ("matmul", lambda x: x @ x.T)]:
        compiled = jax.jit(fn).lower(x).compile()
        by_name[name] = sorted((r.kind, r.axis, r.payload_bytes)
                               for r in collective_stats(compiled, mesh))
    # local block f32[8,16]: x.sum(0) -> f32[16] summed over replica; x.sum(1) -> f32[8] over shard
    assert by_name["sum0"] == [("all-reduce", "replica", 64)]
    assert by_name["sum1"] == [("all-reduce", "shard", 32)]
    assert by_name["matmul"] == [("all-gather", "replica", 1024), ("all-reduce", "shard", 512)]


def test_memory_stats_counts_per_device_arguments():
    mesh = auto_mesh((2, 4))
    compiled = compile_shard_map(mesh, lambda a, b: a * 2 + b.sum(), 1024, 16)
    memory = memory_stats(compiled)
    assert memory["argument"] == 1024 * 4 + 16 * 4
    assert memory["output"] == 1024 * 4
    assert memory["peak"] == (memory["argument"] + memory["output"] + memory["temp"]
                              - memory["alias"])
    table = format_table(summarize(collective_stats(compiled, mesh)), memory, "step")
    assert table.startswith("step\n====") and "axis replica" in table and "4,160" in table


@pytest.mark.parametrize("text, groups", [
    ("{{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("{}", None),
    ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("[4,2]<=[2,2,2]T(0,2,1)", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("mesh[a=2,b=4] {b}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", [list(range(8))]),
    ("mesh['axis_0'=4,'axis_1'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0':(2)2}",
     [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ("mesh['a'=8] {'a':(1)2}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
])
def test_parse_replica_groups(text, groups):
    parsed = parse_replica_groups(text)
    assert parsed == groups if groups is None else sorted(map(sorted, parsed)) == groups


def test_shape_bytes():
    assert shape_bytes("f32[1024]{0}") == 4096
    assert shape_bytes("(bf16[2,3]{1,0}, s8[5], pred[])") == 12 + 5 + 1
    assert shape_bytes("(f32[256]{0}, f32[1024]{0:S(1)})") == 5 * 1024


LITERAL_HLO = """\
HloModule literal, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%gather_body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %ags = (f32[256]{0}, f32[1024]{0}) all-gather-start(%x), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="body=%none"}
  %agd = f32[1024]{0} all-gather-done(%ags)
  %y = f32[256]{0} slice(%agd), slice={[0:256]}
  ROOT %t = (s32[], f32[256]{0}) tuple(%i, %y)
}

%gather_cond (p.1: (s32[], f32[256])) -> pred[] {
  %p.1 = (s32[], f32[256]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (q: (s32[], f32[256])) -> (s32[], f32[256]) {
  %q = (s32[], f32[256]{0}) parameter(0)
  ROOT %w.inner = (s32[], f32[256]{0}) while(%q), condition=%gather_cond, body=%gather_body, backend_config={"known_trip_count":{"n":"3"}}
}

%rs_comp (r: f32[1024]) -> f32[256] {
  %r = f32[1024]{0} parameter(0)
  ROOT %rs = f32[256]{0} reduce-scatter(%r), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, dimensions={0}, to_apply=%add
}

%dyn_body (d: (s32[], f32[256])) -> (s32[], f32[256]) {
  %d = (s32[], f32[256]{0}) parameter(0)
  %dx = f32[256]{0} get-tuple-element(%d), index=1
  %ar.dyn = f32[256]{0} all-reduce(%dx), channel_id=5, replica_groups={}, use_global_device_ids=true, to_apply=%add
  ROOT %dt = (s32[], f32[256]{0}) tuple(%dx, %ar.dyn)
}

ENTRY %main (x.0: f32[256], big: f32[1024]) -> f32[256] {
  %x.0 = f32[256]{0} parameter(0)
  %big = f32[1024]{0} parameter(1)
  %ars = f32[256]{0} all-reduce-start(%x.0), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), use_global_device_ids=true, to_apply=%add
  %ard = f32[256]{0} all-reduce-done(%ars)
  %cps = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%ard), channel_id=2, source_target_pairs={{0,1},{1,0},{2,2}}
  %cpd = f32[256]{0} collective-permute-done(%cps)
  %t0 = (s32[], f32[256]{0}) tuple(%x.0, %cpd)
  %w.outer = (s32[], f32[256]{0}) while(%t0), condition=%gather_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
  %w.dyn = (s32[], f32[256]{0}) while(%w.outer), condition=%gather_cond, body=%dyn_body
  %rss = ((f32[1024]{0}), f32[256]{0}) async-start(%big), calls=%rs_comp
  %rsd = f32[256]{0} async-done(%rss), calls=%rs_comp
  ROOT %ar.plain = f32[256]{0} all-reduce(%rsd), channel_id=6, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, use_global_device_ids=true, to_apply=%add
}
"""


def test_literal_hlo_async_loops_and_forms():
    rows = {r.name: r for r in collective_stats_from_text(LITERAL_HLO, auto_mesh((2, 4)))}
    assert rows.keys() == {"ars", "cps", "ags", "ar.dyn", "rs", "ar.plain"}
    summary_of = {name: (r.kind, r.axis, r.payload_bytes, r.executions, r.exact)
                  for name, r in rows.items()}
    assert summary_of == {
        "ars": ("all-reduce", "replica", 1024, 1, True),
        "cps": ("collective-permute", "shard", 1024, 1, True),
        "ags": ("all-gather", "shard", 4096, 6, True),
        "ar.dyn": ("all-reduce", "both", 1024, 1, False),
        "rs": ("reduce-scatter", "shard", 4096, 1, True),
        "ar.plain": ("all-reduce", "none", 0, 1, True),
    }
    assert rows["ags"].wire_bytes == 3 * 1024
    summary = summarize(rows.values())
    assert summary["by_axis"]["shard"]["bytes"] == 1024 + 6 * 4096 + 4096
    assert summary["by_axis"]["none"]["ops"] == 1 and not summary["exact"]


# The groups of one all-reduce over `shard` and one over `replica` on a (2, 4) mesh, in each form
# jax 0.10-0.12 print: explicit (shard_map on 0.10), iota and mesh axes with XLA's axis names
# (partitioner on 0.10), mesh axes with the JAX mesh's names (shard_map on 0.11 and 0.12), and
# mesh axes over an explicit id mesh.
REPLICA_GROUP_FORMS = {
    "explicit (jax 0.10 shard_map)": ("{{0,1,2,3},{4,5,6,7}}", "{{0,4},{1,5},{2,6},{3,7}}"),
    "iota (jax 0.10-0.12 partitioner)": ("[2,4]<=[8]", "[4,2]<=[2,4]T(1,0)"),
    "mesh, XLA names (jax 0.10 partitioner)": ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}",
                                               "mesh['axis_0'=2,'axis_1'=4] {'axis_0'}"),
    "mesh, JAX names (jax 0.11-0.12)": ("mesh['replica'=2,'shard'=4] {'shard'}",
                                        "mesh['replica'=2,'shard'=4] {'replica'}"),
    "mesh with device ids": ("mesh['a'=2,'b'=4], device_ids=([8]) {'b'}",
                             "mesh['a'=2,'b'=2,'c'=2], device_ids=([2,4]<=[8]) {'a'}"),
}

FORMS_HLO = """\
HloModule forms, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}}

ENTRY %main (x: f32[256], y: f32[64]) -> (f32[256], f32[64]) {{
  %x = f32[256]{{0}} parameter(0)
  %y = f32[64]{{0}} parameter(1)
  %ar.shard = f32[256]{{0}} all-reduce(%x), channel_id=1, replica_groups={shard}, use_global_device_ids=true, to_apply=%add, metadata={{op_name="psum"}}
  %ar.replica = f32[64]{{0}} all-reduce(%y), channel_id=2, replica_groups={replica}, use_global_device_ids=true, to_apply=%add
  ROOT %t = (f32[256]{{0}}, f32[64]{{0}}) tuple(%ar.shard, %ar.replica)
}}
"""


@pytest.mark.parametrize("form", REPLICA_GROUP_FORMS)
def test_replica_group_forms_give_the_same_bytes(form):
    shard_groups, replica_groups = REPLICA_GROUP_FORMS[form]
    text = FORMS_HLO.format(shard=shard_groups, replica=replica_groups)
    summary = summarize(collective_stats_from_text(text, auto_mesh((2, 4))))
    # f32[256] over 4 devices: 1,024 B payload, ring wire 2 * 3/4 * 1,024 = 1,536 B;
    # f32[64] over 2 devices: 256 B payload, ring wire 2 * 1/2 * 256 = 256 B.
    assert summary["by_axis"]["shard"] == {"bytes": 1024, "wire_bytes": 1536, "ops": 1,
                                           "executions": 1}
    assert summary["by_axis"]["replica"] == {"bytes": 256, "wire_bytes": 256, "ops": 1,
                                             "executions": 1}
    assert summary["exact"]


def test_mesh_mismatch_is_an_error():
    with pytest.raises(ValueError, match="8 devices but the mesh has 4"):
        collective_stats_from_text(LITERAL_HLO,
                                   jax.make_mesh((1, 4), AXES, devices=jax.devices()[:4]))
