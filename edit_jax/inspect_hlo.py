"""Communication and memory of a compiled program, read from its optimized HLO.

The project's claims ("a local step moves zero bytes over `replica`", "a sync moves at most
param_bytes / S over `replica` per device") are checked against what XLA really compiled, not
against what the Python code intends: `collective_stats` parses `compiled.as_text()`, finds every
collective, sizes it, maps its device groups to mesh axes and multiplies ops inside while loops by
the loop's trip count (`compiled.cost_analysis()` counts a loop body once, so it cannot be used).

Byte conventions, per device and per execution of an op whose group has n devices:

* `payload_bytes` is the op's full (unsharded) payload: all-reduce, reduce-scatter, all-to-all and
  collective-permute: the operand bytes; all-gather: the result bytes (n x operand). This is the
  size the claims are stated in (an all-reduce of a parameter shard "moves" the shard's bytes).
* `wire_bytes` is what one device sends with the usual ring / pairwise algorithms:
  all-reduce 2(n-1)/n x operand, all-gather (n-1) x operand, reduce-scatter and all-to-all
  (n-1)/n x operand, collective-permute the operand.
* Groups of one device move nothing: both are 0.

Device ids: the ids in `replica_groups` and `source_target_pairs` are logical ids. With jit over a
mesh (one replica, `num_partitions` partitions) logical id i is `mesh.devices.flat[i]`, whatever the
physical device ids are; `tests/test_inspect_hlo.py` checks this with a permuted device order.
A flattened id is replica * num_partitions + partition.

Replica groups are read in every form XLA prints (jax 0.10.2 on CPU prints all three: explicit
for `shard_map` collectives, iota or mesh axes for ones the partitioner inserts):
explicit `{{0,4},{1,5}}` (`{}` is one group of all ids); iota `[G,S]<=[d0,d1,...]T(p0,p1,...)`
(iota over the dims, transposed, reshaped to G groups of S); mesh axes
`mesh['a'=4,'b'=2], device_ids=([2,2,2]T(0,2,1)) {'a':(2)2}` (an id mesh, iota unless
`device_ids` is given, grouped over the listed axes or sub-axes `name:(pre)size`). The id mesh is
XLA's own factorization of the ids, not the JAX mesh: axes are found by mapping ids to JAX mesh
coordinates. Async pairs (`all-gather-start` / `-done`) count once, at the start; collectives
wrapped in `async-start` count inside the wrapped computation. Collective-permute pairs that send
to themselves move nothing; the bytes are those of a device that sends.

Loops: a while body runs `known_trip_count` times (its condition one more). A loop without a
known count, or a conditional branch (which may not run), is counted once and marks the row
inexact (`exact=False`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

import jax
import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
AXIS_LABELS = ("replica", "shard", "both", "none")

_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
    "c64": 64, "c128": 128, "token": 0,
}
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_IOTA_RE = re.compile(r"(?:\[\d+(?:,\d+)*\]<=)?\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_RE = re.compile(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((.+?)\))?\s*\{([^}]*)\}")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLEE_RE = re.compile(
    r"\b(condition|body|to_apply|calls|true_computation|false_computation"
    r"|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class CollectiveRow:
    """One collective op of the compiled program, sized for one device."""

    name: str                 # HLO instruction name
    kind: str                 # one of KINDS (the -start form reports its base kind)
    computation: str          # HLO computation holding the op
    axes: tuple[str, ...]     # mesh axes its device groups span, in mesh order
    group_size: int           # devices per group (2 for a collective-permute pair)
    payload_bytes: int        # per execution, see the module docstring
    wire_bytes: int           # per execution, see the module docstring
    executions: int           # times it runs per program run (product of loop trip counts)
    exact: bool               # False: a loop had no known trip count or the op is in a branch
    operand_dtypes: tuple[tuple[str, int], ...] = ()  # (element type, operand bytes) pairs

    def bytes_by_dtype(self, wire: bool = False) -> dict[str, int]:
        """Payload (or wire) bytes per program run, split over element types by operand bytes."""
        total = self.total_wire_bytes if wire else self.bytes
        operand = sum(b for _, b in self.operand_dtypes)
        return {dtype: total * b // operand for dtype, b in self.operand_dtypes} if operand else {}

    @property
    def axis(self) -> str:
        """'none', the single axis name, 'both' for ('replica', 'shard'), else 'a+b+...'."""
        if not self.axes:
            return "none"
        return "both" if self.axes == ("replica", "shard") else "+".join(self.axes)

    @property
    def bytes(self) -> int:
        """Payload bytes per program run."""
        return self.payload_bytes * self.executions

    @property
    def total_wire_bytes(self) -> int:
        """Wire bytes per program run."""
        return self.wire_bytes * self.executions


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str       # attribute text with quoted strings blanked
    raw_attrs: str   # attribute text as printed (for backend_config)


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in HLO line: {text[:200]}")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


def _parse_instr(line: str) -> _Instr | None:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    pos = m.end()
    if line[pos] == "(":
        end = _balanced(line, pos, "(", ")")
    else:
        end = line.index(" ", pos)
    shape = line[pos:end]
    op = re.compile(r"\s*([\w\-]+)\(").match(line, end)
    if not op:
        return None
    args_end = _balanced(line, op.end() - 1, "(", ")")
    operands = [a.split()[-1].lstrip("%") for a in _split_top(line[op.end():args_end - 1])]
    raw = line[args_end:]
    return _Instr(m.group(1), shape, op.group(1), operands, _QUOTED_RE.sub('""', raw), raw)


def _parse_module(text: str) -> tuple[dict, dict[str, list[_Instr]], str]:
    """Header fields, computations (name -> instructions) and the entry computation's name."""
    header: dict[str, int] = {"num_partitions": 1, "replica_count": 1}
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if line.startswith("HloModule"):
            for key in header:
                m = re.search(rf"\b{key}=(\d+)", line)
                if m:
                    header[key] = int(m.group(1))
        elif line and not line[0].isspace() and line.rstrip().endswith("{"):
            is_entry = line.startswith("ENTRY")
            current = line.removeprefix("ENTRY").split()[0].lstrip("%")
            comps[current] = []
            if is_entry:
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instr = _parse_instr(_COMMENT_RE.sub("", line))
            if instr is not None:
                comps[current].append(instr)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return header, comps, entry


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; tuples add their elements, layouts are ignored."""
    return sum(shape_bytes_by_dtype(shape).values())


def shape_bytes_by_dtype(shape: str) -> dict[str, int]:
    """Bytes of an HLO shape string per element type ('f32', 's8', 'u8', 'f8e4m3fn', ...)."""
    bits_by_dtype: dict[str, int] = {}
    for dtype, dims in _ARRAY_RE.findall(re.sub(r"\{[^{}]*\}", "", shape)):
        if dtype not in _DTYPE_BITS:
            if dtype.startswith("f8") or dtype.startswith("f4") or dtype.startswith("f6"):
                bits = int(dtype[1])
            else:
                raise ValueError(f"unknown HLO element type '{dtype}' in {shape}")
        else:
            bits = _DTYPE_BITS[dtype]
        count = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        bits_by_dtype[dtype] = bits_by_dtype.get(dtype, 0) + bits * count
    return {dtype: (bits + 7) // 8 for dtype, bits in bits_by_dtype.items() if bits}


def _iota_ids(text: str) -> np.ndarray:
    """Flat ids of an iota list `[d0,...]T(p0,...)`, optionally prefixed by `[G,S]<=`."""
    m = _IOTA_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"cannot parse iota device list: {text}")
    dims = [int(d) for d in m.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(2):
        ids = ids.transpose([int(p) for p in m.group(2).split(",")])
    return ids.ravel()


def _mesh_groups(text: str) -> list[list[int]]:
    """Groups of the mesh-axes form `mesh[a=2,b=4], device_ids=(..) {a, b:(1)2}`.

    Devices sharing every mesh coordinate outside the listed axes (or sub-axes `name:(pre)size`,
    the size-`size` factor after a major factor of `pre`) form one group.
    """
    m = _MESH_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"cannot parse replica groups: {text}")
    names, sizes = [], []
    for item in m.group(1).split(","):
        name, size = item.split("=")
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    ids = np.arange(math.prod(sizes))
    if m.group(2):
        ids = (np.array([int(i) for i in m.group(2).split(",")]) if "[" not in m.group(2)
               else _iota_ids(m.group(2)))
    coords = np.array(np.unravel_index(np.arange(ids.size), sizes)).T  # (device, mesh axis)
    keys = coords.copy()
    for ref in filter(None, (r.strip() for r in m.group(3).split(","))):
        sub = re.fullmatch(r"(.+?)(?::\((\d+)\)(\d+))?", ref)
        axis = names.index(sub.group(1).strip("'\""))
        if sub.group(2) is None:
            keys[:, axis] = 0
        else:
            post = sizes[axis] // (int(sub.group(2)) * int(sub.group(3)))
            keys[:, axis] -= (coords[:, axis] // post % int(sub.group(3))) * post
    groups: dict[tuple, list[int]] = {}
    for key, device in zip(map(tuple, keys), ids):
        groups.setdefault(key, []).append(int(device))
    return list(groups.values())


def parse_replica_groups(text: str) -> list[list[int]] | None:
    """Groups of ids of any printed form (explicit, iota, mesh axes); None for `{}` (all ids)."""
    text = text.strip()
    if text.startswith("mesh["):
        return _mesh_groups(text)
    if text.startswith("["):
        m = re.match(r"\[(\d+),(\d+)\]<=", text)
        if not m:
            raise ValueError(f"cannot parse replica groups: {text}")
        return _iota_ids(text).reshape(int(m.group(1)), int(m.group(2))).tolist()
    if text.startswith("{") and text.endswith("}"):
        inner = re.findall(r"\{([\d,\s]*)\}", text[1:-1])
        if not inner and text[1:-1].strip():
            raise ValueError(f"cannot parse replica groups: {text}")
        groups = [[int(i) for i in g.split(",") if i.strip()] for g in inner]
        return groups or None
    raise ValueError(f"cannot parse replica groups: {text}")


def _attr(attrs: str, key: str) -> str | None:
    """The value text of `key=` (a bracketed or mesh-axes value in full), or None when absent."""
    m = re.search(rf"\b{key}=", attrs)
    if not m:
        return None
    pos = m.end()
    if attrs.startswith("mesh[", pos):
        brace = attrs.index("{", pos)
        return attrs[pos:_balanced(attrs, brace, "{", "}")]
    if attrs[pos] == "{":
        return attrs[pos:_balanced(attrs, pos, "{", "}")]
    if attrs[pos] == "[":
        return re.match(r"[^\s]+?(?=,\s|$)", attrs[pos:]).group(0)
    return re.match(r"[^,\s]+", attrs[pos:]).group(0)


def _device_groups(instr: _Instr, kind: str, header: dict) -> list[list[int]]:
    """Groups of flattened device ids (replica * num_partitions + partition) of one op."""
    parts, reps = header["num_partitions"], header["replica_count"]
    has_channel = _attr(instr.attrs, "channel_id") is not None
    if kind == "collective-permute":
        text = _attr(instr.attrs, "source_target_pairs") or ""
        pairs = [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", text) if a != b]
        if has_channel:  # pairs of partitions, in every replica
            return [[r * parts + a, r * parts + b] for r in range(reps) for a, b in pairs]
        return [[a * parts + p, b * parts + p] for p in range(parts) for a, b in pairs]
    text = _attr(instr.attrs, "replica_groups")
    groups = parse_replica_groups(text) if text is not None else None
    global_ids = _attr(instr.attrs, "use_global_device_ids") == "true"
    if global_ids:
        return groups or [list(range(reps * parts))]
    if not has_channel:  # cross-replica: groups of replicas, one set per partition
        groups = groups or [list(range(reps))]
        return [[r * parts + p for r in g] for p in range(parts) for g in groups]
    if kind == "all-to-all":  # no use_global_device_ids attribute: cross-partition
        groups = groups or [list(range(parts))]
        return [[r * parts + p for p in g] for r in range(reps) for g in groups]
    # cross-replica-and-partition: the listed replicas, each with all its partitions
    groups = groups or [list(range(reps))]
    return [[r * parts + p for r in g for p in range(parts)] for g in groups]


def _group_axes(groups: Iterable[list[int]], mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """Mesh axes along which the members of some group differ."""
    varying = set()
    for g in groups:
        coords = np.array(np.unravel_index(np.asarray(g), mesh.devices.shape)).T
        varying.update(np.flatnonzero((coords != coords[0]).any(axis=0)).tolist())
    return tuple(mesh.axis_names[a] for a in sorted(varying))


def _sizes(kind: str, operand: int, n: int) -> tuple[int, int]:
    """(payload_bytes, wire_bytes) per execution, see the module docstring."""
    if n <= 1:
        return 0, 0
    if kind == "all-reduce":
        return operand, 2 * (n - 1) * operand // n
    if kind == "all-gather":
        return n * operand, (n - 1) * operand
    if kind == "collective-permute":
        return operand, operand
    return operand, (n - 1) * operand // n


def _callees(instr: _Instr) -> list[tuple[str, str]]:
    """(attribute, computation) pairs an instruction calls."""
    out = []
    for key, value in _CALLEE_RE.findall(instr.attrs):
        for name in re.findall(r"%?([\w.\-]+)", value):
            out.append((key, name))
    return out


def collective_stats(compiled, mesh: jax.sharding.Mesh) -> list[CollectiveRow]:
    """Every collective in `compiled` (a `jax.stages.Compiled`), sized per device, in call order.

    `mesh` must be the mesh the program was compiled for (logical id i = mesh.devices.flat[i]).
    """
    return collective_stats_from_text(compiled.as_text(), mesh)


def collective_stats_from_text(text: str, mesh: jax.sharding.Mesh) -> list[CollectiveRow]:
    """`collective_stats` on HLO text (for tests on literal snippets)."""
    header, comps, entry = _parse_module(text)
    shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
    counts: dict[str, list] = {}  # op name -> [computation, instr, executions, exact]

    def walk(comp: str, mult: int, exact: bool) -> None:
        for instr in comps[comp]:
            base = instr.opcode.removesuffix("-start")
            if base in KINDS:
                seen = counts.setdefault(instr.name, [comp, instr, 0, True])
                seen[2] += mult
                seen[3] = seen[3] and exact
            if instr.opcode.endswith("-done") or instr.opcode == "async-update":
                continue  # the -start / async-start already walked the wrapped computation
            trip = _TRIP_RE.search(instr.raw_attrs) if instr.opcode == "while" else None
            for key, callee in _callees(instr):
                if callee not in comps:
                    continue
                if instr.opcode == "while":
                    n = int(trip.group(1)) if trip else 1
                    walk(callee, mult * (n if key == "body" else n + 1), exact and bool(trip))
                elif instr.opcode == "conditional":
                    walk(callee, mult, False)
                else:
                    walk(callee, mult, exact)

    walk(entry, 1, True)
    num_ids = header["num_partitions"] * header["replica_count"]
    if counts and num_ids != mesh.size:
        raise ValueError(f"program runs on {num_ids} devices but the mesh has {mesh.size}")
    rows = []
    for name, (comp, instr, executions, exact) in counts.items():
        kind = instr.opcode.removesuffix("-start")
        groups = _device_groups(instr, kind, header)
        by_dtype: dict[str, int] = {}
        for o in instr.operands:
            for dtype, b in shape_bytes_by_dtype(shapes[o]).items():
                by_dtype[dtype] = by_dtype.get(dtype, 0) + b
        operand = sum(by_dtype.values())
        n = max((len(g) for g in groups), default=1)
        payload, wire = _sizes(kind, operand, n)
        rows.append(CollectiveRow(name, kind, comp, _group_axes(groups, mesh), n, payload, wire,
                                  executions, exact, tuple(sorted(by_dtype.items()))))
    return rows


def upstream_opcodes(text: str, name: str) -> set[str]:
    """The opcodes of everything instruction `name` depends on: its operands within its
    computation, transitively, and every instruction of the computations those call (fusion
    and loop bodies). No 'while' or 'dot' among them means no data dependency ties the
    instruction to the model's layer scans or matmuls, so a latency-hiding scheduler may
    overlap it with them."""
    _, comps, _ = _parse_module(text)
    home = next(instrs for instrs in comps.values() if any(i.name == name for i in instrs))
    by_name = {i.name: i for i in home}
    seen, todo, opcodes, walked = set(), list(by_name[name].operands), set(), set()

    def called(instr: _Instr) -> None:
        for _, callee in _callees(instr):
            if callee in walked:
                continue
            walked.add(callee)
            for inner in comps.get(callee, []):
                opcodes.add(inner.opcode)
                called(inner)

    while todo:
        operand = todo.pop()
        if operand in seen or operand not in by_name:
            continue
        seen.add(operand)
        instr = by_name[operand]
        opcodes.add(instr.opcode)
        called(instr)
        todo.extend(instr.operands)
    return opcodes


def _zero() -> dict:
    return {"bytes": 0, "wire_bytes": 0, "ops": 0, "executions": 0}


def summarize(rows: Iterable[CollectiveRow]) -> dict:
    """Bytes per device per program run, by axis label and by op kind, and totals.

    Each bucket has 'bytes' (payload), 'wire_bytes', 'ops' (ops in the program) and
    'executions' (op runs, loops counted). 'exact' is False when some count is an upper bound
    or a guess (loop without a known trip count, op inside a conditional branch).
    'replica_by_dtype' splits the bytes of the ops spanning `replica` by element type.
    """
    by_axis = {label: _zero() for label in AXIS_LABELS}
    by_kind = {kind: _zero() for kind in KINDS}
    replica_by_dtype: dict[str, dict] = {}
    total = _zero()
    exact = True
    for row in rows:
        if "replica" in row.axes:
            wire = row.bytes_by_dtype(wire=True)
            for dtype, b in row.bytes_by_dtype().items():
                bucket = replica_by_dtype.setdefault(dtype, {"bytes": 0, "wire_bytes": 0})
                bucket["bytes"] += b
                bucket["wire_bytes"] += wire[dtype]
        for bucket in (by_axis.setdefault(row.axis, _zero()), by_kind[row.kind], total):
            bucket["bytes"] += row.bytes
            bucket["wire_bytes"] += row.total_wire_bytes
            bucket["ops"] += 1
            bucket["executions"] += row.executions
        exact = exact and row.exact
    return {"by_axis": by_axis, "by_kind": by_kind, "total": total, "exact": exact,
            "replica_by_dtype": dict(sorted(replica_by_dtype.items()))}


def replica_traffic(summary: dict) -> dict[str, int]:
    """Per device, payload and wire bytes of the ops whose device groups span `replica` (axis
    'replica' or 'both'), from a `summarize` output."""
    return {name: summary["by_axis"]["replica"][key] + summary["by_axis"]["both"][key]
            for name, key in (("replica_bytes", "bytes"), ("replica_wire_bytes", "wire_bytes"))}


def memory_stats(compiled) -> dict:
    """Per-device memory of `compiled` from XLA's buffer assignment, in bytes.

    'peak' = argument + output + temp - alias: everything live at once, with outputs that reuse
    (donated) argument buffers counted once. It is an upper bound on device memory during a run.
    """
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend reports no memory analysis")
    stats = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
    }
    stats["peak"] = stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]
    return stats


def human_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    if abs(n) < 1024:
        return f"{n} B"
    power = min(int(math.log(abs(n), 1024)), 3)
    return f"{n / 1024 ** power:.2f} {('KiB', 'MiB', 'GiB')[power - 1]}"


def format_table(summary: dict, memory: dict, title: str) -> str:
    """A text table of `summarize` and `memory_stats` output."""
    note = "" if summary["exact"] else " (upper bound: a loop or branch count is inexact)"
    lines = [title, "=" * len(title), "communication per device per run" + note,
             f"  {'':<28}{'payload bytes':>16}{'':>12}{'wire bytes':>16}{'ops':>6}{'runs':>7}"]

    def row(label: str, b: dict) -> str:
        return (f"  {label:<28}{b['bytes']:>16,}{human_bytes(b['bytes']):>12}{b['wire_bytes']:>16,}"
                f"{b['ops']:>6}{b['executions']:>7}")

    lines += [row(f"axis {k}", v) for k, v in summary["by_axis"].items()]
    lines += [row(k, v) for k, v in summary["by_kind"].items() if v["ops"]]
    lines += [row("total", summary["total"]), "memory per device"]
    names = {"peak": "peak (arg+out+temp-alias)"}
    lines += [f"  {names.get(k, k):<28}{v:>16,}{human_bytes(v):>12}" for k, v in memory.items()]
    return "\n".join(lines)
