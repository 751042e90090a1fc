"""DreamDDP's layer-wise partial-synchronization schedule and its time model (arXiv 2502.11058).

Local SGD with a period of H iterations where each iteration averages only some units (decoder
layers, plus one unit for every other parameter) over the replicas, and every unit is averaged at
least once per period. A unit's all-reduce may start once its backward is done, so it runs while
the backward of the units below goes on. The schedule picks which units each iteration averages
so that as much communication as possible hides under the backward. Pure Python, no JAX.

Time model. Units are listed in backward order (index 0: the first unit whose backward ends),
with backward seconds b[k] and communication seconds c[k]; `forward_seconds` (forward and
optimizer) never overlaps. An iteration averaging the set S: unit k's backward ends at
B_k = b[0] + ... + b[k]; the communications of S run one at a time in increasing k,
start_k = max(B_k, end of the previous one), end_k = start_k + c[k]. The exposed wait is
max(0, last end - B_{K-1}) (0 for an empty S); the iteration takes forward + sum(b) + wait.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Iterable

from edit_jax.errors import UserError
from edit_jax.metrics import write_atomically

Schedule = tuple[frozenset[int], ...]  # the units (backward order) each iteration averages


@dataclasses.dataclass(frozen=True)
class UnitProfile:
    """Per-unit backward and communication seconds, units in backward order (edit-jax's models:
    "rest", "layer 3", ..., "layer 0"): the only input the schedules and times need."""

    names: tuple[str, ...]
    backward_seconds: tuple[float, ...]
    comm_seconds: tuple[float, ...]
    forward_seconds: float = 0.0

    def __post_init__(self):
        for field in ("names", "backward_seconds", "comm_seconds"):  # lists -> hashable tuples
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if not self.names:
            raise UserError("the profile has no units; list at least one unit")
        if not len(self.names) == len(self.backward_seconds) == len(self.comm_seconds):
            raise UserError(f"the profile has {len(self.names)} names, "
                            f"{len(self.backward_seconds)} backward times and "
                            f"{len(self.comm_seconds)} comm times; give one of each per unit")
        times = {"forward_seconds": [self.forward_seconds],
                 "backward_seconds": self.backward_seconds, "comm_seconds": self.comm_seconds}
        for field, values in times.items():
            for value in values:
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value < 0):
                    raise UserError(f"the profile's {field} has {value!r}; "
                                    "times must be finite numbers >= 0 (seconds)")

    @property
    def num_units(self) -> int:
        return len(self.names)


def comm_seconds(num_bytes: float, link_gbps: float, latency_ms: float,
                 num_replicas: int) -> float:
    """Seconds of a ring all-reduce of `num_bytes` over `num_replicas`: the latency plus
    2 (R - 1) / R of the bytes over the link; 0 for one replica (nothing to average)."""
    if num_replicas < 1 or link_gbps <= 0 or latency_ms < 0 or num_bytes < 0:
        raise UserError(f"comm_seconds needs num_replicas >= 1, link_gbps > 0, latency_ms >= 0 "
                        f"and num_bytes >= 0; got {num_replicas}, {link_gbps}, {latency_ms}, "
                        f"{num_bytes}")
    if num_replicas == 1:
        return 0.0
    sent = 2 * (num_replicas - 1) / num_replicas * num_bytes
    return latency_ms / 1000 + sent * 8 / (link_gbps * 1e9)


def iteration_wait(profile: UnitProfile, units: Iterable[int]) -> float:
    """Exposed communication seconds of one iteration averaging `units` (indices in backward
    order): how long the last all-reduce runs past the end of the backward."""
    units = sorted(set(units))
    if units and not 0 <= units[0] <= units[-1] < profile.num_units:
        raise UserError(f"unit indices {units} are outside 0..{profile.num_units - 1}; "
                        "index the profile's units in backward order")
    ends = list(_backward_ends(profile))
    end = 0.0
    for k in units:
        end = max(ends[k], end) + profile.comm_seconds[k]
    return max(0.0, end - ends[-1]) if units else 0.0


def iteration_seconds(profile: UnitProfile, units: Iterable[int]) -> float:
    """Seconds of one iteration averaging `units`: forward + backward + exposed wait."""
    return profile.forward_seconds + sum(profile.backward_seconds) + iteration_wait(profile, units)


def mean_iteration_seconds(profile: UnitProfile, schedule: Schedule) -> float:
    """Mean seconds per iteration over one period of `schedule`."""
    _check_period(len(schedule))
    return sum(iteration_seconds(profile, units) for units in schedule) / len(schedule)


def full_sync_seconds(profile: UnitProfile, period: int) -> float:
    """Mean seconds per iteration of plain local SGD: the whole model is averaged after the
    step once per period, so none of its communication overlaps."""
    _check_period(period)
    return (profile.forward_seconds + sum(profile.backward_seconds)
            + sum(profile.comm_seconds) / period)


def plsgd_schedule(num_units: int, period: int) -> Schedule:
    """Partial local SGD's schedule: the units in backward order cut into `period` contiguous
    groups whose sizes differ by at most one, larger groups first (as numpy.array_split);
    with fewer units than iterations the trailing iterations average nothing."""
    _check_period(period)
    size, extra = divmod(num_units, period)
    groups, start = [], 0
    for i in range(period):
        stop = start + size + (i < extra)
        groups.append(frozenset(range(start, stop)))
        start = stop
    return tuple(groups)


def dreamddp_schedule(profile: UnitProfile, period: int, *, fill_bubbles: bool = True) -> Schedule:
    """DreamDDP's schedule: every unit averaged at least once per period, least total wait.

    Walking the units in backward order, a unit whose communication still hides under the rest
    of the backward joins the current iteration (the search would pick that too: moving a
    hidden unit earlier never costs; packing saves the branch). Otherwise a depth-first search
    with memoization tries both averaging it now (paying the wait) and deferring it, which
    closes the current iteration; ties go to averaging now. So each iteration gets a contiguous
    run of units, and the last one takes every remaining unit. Deferring from an empty
    iteration is not tried: the same schedule one iteration earlier costs the same.
    With `fill_bubbles`, each iteration then also averages every other unit (in backward order)
    that leaves its wait unchanged, so spare link time averages more often.
    """
    _check_period(period)
    num_units = profile.num_units

    @functools.cache
    def wait(first: int, stop: int) -> float:
        return iteration_wait(profile, range(first, stop))

    @functools.cache
    def best(k: int, i: int, first: int) -> tuple[float, tuple[int, ...]]:
        """Least total wait of iterations i.. when iteration i holds units first..k-1 and unit k
        comes next, with the first unit of each later iteration."""
        if k == num_units or i == period - 1:
            return wait(first, num_units), ()
        if wait(first, k + 1) == 0:
            return best(k + 1, i, first)
        now = best(k + 1, i, first)
        if first == k:
            return now
        later_wait, later_starts = best(k, i + 1, k)
        later = (wait(first, k) + later_wait, (k,) + later_starts)
        return later if later[0] < now[0] else now

    starts = (0, *best(0, 0, 0)[1], num_units)
    groups = [set(range(a, b)) for a, b in zip(starts, starts[1:])]
    groups += [set() for _ in range(period - len(groups))]
    if fill_bubbles:
        for units in groups:
            before = iteration_wait(profile, units)
            for k in range(num_units):
                if k not in units and iteration_wait(profile, units | {k}) == before:
                    units.add(k)
    return tuple(frozenset(units) for units in groups)


def schedule_report(profile: UnitProfile, period: int) -> dict:
    """Local SGD (full sync after the step), PLSGD and DreamDDP over one period, as a
    JSON-serializable dict: {"period", "forward_seconds", "units": [{"name", "backward_seconds",
    "comm_seconds"}], "schedules": {name: {"mean_iteration_seconds", "total_wait_seconds",
    "iterations": [{"units": [names], "comm_seconds", "wait_seconds", "iteration_seconds"}]}}}."""
    _check_period(period)
    step = profile.forward_seconds + sum(profile.backward_seconds)
    everything = sum(profile.comm_seconds)
    local_sgd = [{"units": [], "comm_seconds": 0.0, "wait_seconds": 0.0, "iteration_seconds": step}
                 for _ in range(period - 1)]
    local_sgd.append({"units": list(profile.names), "comm_seconds": everything,
                      "wait_seconds": everything, "iteration_seconds": step + everything})
    schedules = {"local_sgd": local_sgd}
    for name, schedule in (("plsgd", plsgd_schedule(profile.num_units, period)),
                           ("dreamddp", dreamddp_schedule(profile, period))):
        schedules[name] = [{"units": [profile.names[k] for k in sorted(units)],
                            "comm_seconds": sum(profile.comm_seconds[k] for k in units),
                            "wait_seconds": iteration_wait(profile, units),
                            "iteration_seconds": iteration_seconds(profile, units)}
                           for units in schedule]
    return {"period": period, "forward_seconds": profile.forward_seconds,
            "units": [{"name": n, "backward_seconds": b, "comm_seconds": c} for n, b, c in
                      zip(profile.names, profile.backward_seconds, profile.comm_seconds)],
            "schedules": {name: {"mean_iteration_seconds":
                                 sum(row["iteration_seconds"] for row in rows) / period,
                                 "total_wait_seconds": sum(row["wait_seconds"] for row in rows),
                                 "iterations": rows}
                          for name, rows in schedules.items()}}


def format_schedule_report(report: dict) -> str:
    """`schedule_report`'s dict as a plain text table, times in milliseconds."""
    rows = [("schedule", "iteration", "units", "comm ms", "wait ms", "iteration ms")]
    for name, schedule in report["schedules"].items():
        for i, it in enumerate(schedule["iterations"]):
            rows.append((name, str(i), ", ".join(it["units"]) or "-",
                         *(f"{it[key] * 1e3:.2f}" for key in
                           ("comm_seconds", "wait_seconds", "iteration_seconds"))))
        mean_wait = schedule["total_wait_seconds"] / report["period"]
        rows.append((name, "mean", "", "", f"{mean_wait * 1e3:.2f}",
                     f"{schedule['mean_iteration_seconds'] * 1e3:.2f}"))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = [f"period {report['period']}; units in backward order: "
             + ", ".join(unit["name"] for unit in report["units"])]
    for row in rows:
        cells = [cell.ljust(w) if col < 3 else cell.rjust(w)
                 for col, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def save_profile(profile: UnitProfile, path: str | Path) -> None:
    """Write `profile` as JSON: {"units": [{"name", "backward_seconds", "comm_seconds"}, ...],
    "forward_seconds"}, the form `load_profile` reads."""
    data = {"units": [{"name": n, "backward_seconds": b, "comm_seconds": c} for n, b, c in
                      zip(profile.names, profile.backward_seconds, profile.comm_seconds)],
            "forward_seconds": profile.forward_seconds}
    try:
        write_atomically(Path(path), json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the profile {path}: {e.strerror}; check the path") from e


def load_profile(path: str | Path) -> UnitProfile:
    """Read a profile written by `save_profile` (or by hand); "forward_seconds" may be left
    out (0)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read the profile {path}: {e.strerror}; check the path") from e
    except ValueError as e:
        raise UserError(f"the profile {path} is not valid JSON ({e}); fix or rewrite it") from e
    units = data.get("units") if isinstance(data, dict) else None
    if not isinstance(units, list) or not all(isinstance(unit, dict) for unit in units):
        raise UserError(f"the profile {path} needs a 'units' list of objects "
                        '{"name", "backward_seconds", "comm_seconds"}')
    for i, unit in enumerate(units):
        missing = [key for key in ("name", "backward_seconds", "comm_seconds") if key not in unit]
        if missing:
            raise UserError(f"the profile {path}: unit {i} lacks {', '.join(missing)}; "
                            "give every unit a name, backward_seconds and comm_seconds")
    try:
        return UnitProfile(names=tuple(str(unit["name"]) for unit in units),
                           backward_seconds=tuple(unit["backward_seconds"] for unit in units),
                           comm_seconds=tuple(unit["comm_seconds"] for unit in units),
                           forward_seconds=data.get("forward_seconds", 0.0))
    except UserError as e:
        raise UserError(f"the profile {path}: {e}") from e


def _backward_ends(profile: UnitProfile) -> Iterable[float]:
    """B_k: when unit k's backward ends, from the start of the backward."""
    total = 0.0
    for seconds in profile.backward_seconds:
        total += seconds
        yield total


def _check_period(period: int) -> None:
    if period < 1:
        raise UserError(f"the period is {period}; give at least 1 iteration per period")
