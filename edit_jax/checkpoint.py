"""Checkpoints of the sharded train state, the run config and the data position, via Orbax.

Each step directory holds three items: `state` (the arrays, restorable onto any mesh the
caller's target shardings name), `config` (JSON) and `data` (one grain iterator-state file per
process). Saves are asynchronous; Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it
only once every item is complete, so a save cut short by a crash is never taken for a checkpoint.
Checkpoints that cannot be restored become a one-line `UnusableCheckpoint`: `CorruptCheckpoint`
when files are damaged or missing (however Orbax and TensorStore report it),
`MismatchedCheckpoint` when the saved state does not fit the run, so that a caller can fall
back to an earlier step and `set_aside` the bad one; anything else surfaces as a bug.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import grain.checkpoint
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from edit_jax.errors import UserError

_PARTIAL_SAVE = ".orbax-checkpoint-tmp"  # Orbax's suffix of a save in progress
_CORRUPT_FIX = ("delete that step directory to resume from an earlier one, "
                "or use a new run.run_dir")
_MISMATCH_FIX = "use a fresh run.run_dir or the config the checkpoint was saved with"
# TensorStore reports missing or damaged files as ValueErrors carrying these status codes.
_STORAGE_STATUS = re.compile(r"^(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION): ")


class UnusableCheckpoint(UserError):
    """A checkpoint this run cannot restore; `step` names it, `reason` says why, `problem` is
    the kind, as a sentence's predicate."""

    problem = "cannot be restored"

    def __init__(self, message: str, step: int, reason: str):
        super().__init__(message)
        self.step, self.reason = step, reason


class CorruptCheckpoint(UnusableCheckpoint):
    """A checkpoint whose files are damaged or missing."""

    problem = "is corrupt or incomplete"


class MismatchedCheckpoint(UnusableCheckpoint):
    """A checkpoint whose state has other arrays or shapes than this run's: saved with another
    config, or its metadata is damaged."""

    problem = "does not match this run"


class Checkpointer:
    """Saves every `save_every` steps into `directory`, keeping the `keep` newest checkpoints.

    `read_only`: for readers (`edit-jax export`): creates nothing, and leaves alone the
    temporary directory of a save that a run still training there may have in progress. A
    writer removes such directories, left by a save that a crash cut short, and `warn`s of each
    (so the writer must be the directory's only one: run_lock.py).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
                 read_only: bool = False, warn: Callable[[str], None] = print):
        self.directory = Path(os.path.abspath(directory))
        self.save_every = save_every
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"checkpoint directory {self.directory} is not a directory; "
                            "remove that file or set run.run_dir to a new path")
        access = os.R_OK | os.X_OK | (0 if read_only else os.W_OK)
        if self.directory.is_dir() and not os.access(self.directory, access):
            needs = "readable" if read_only else "readable and writable"
            raise UserError(f"checkpoint directory {self.directory} is not {needs}; fix its "
                            "permissions or set run.run_dir to a new path")
        if read_only:
            options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
            for partial in sorted(self.directory.glob(f"*{_PARTIAL_SAVE}*")):
                warn(f"removing {partial}, a checkpoint that an interrupted run did not finish "
                     "writing")
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        with self._write_errors():
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)

    def all_steps(self) -> list[int]:
        """Every complete checkpoint's step, oldest first (after any pending save finishes)."""
        self.wait()
        return sorted(self._manager.all_steps())

    def set_aside(self, step: int) -> Path:
        """Move checkpoint `step` to `<step>.corrupt` beside it (nothing a user saved is
        deleted), out of Orbax's sight; returns the new path. Every process must call it:
        process 0 moves, the others wait for it, then all forget the step."""
        target = self.directory / f"{step}.corrupt"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt{n}"
        with self._write_errors():
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(target)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"edit-jax-set-aside-{step}")
            self._manager.reload()
        return target

    def save(self, step: int, state, *, config: dict,
             data_iterator: grain.DatasetIterator | None = None, force: bool = False) -> bool:
        """Start saving `state` if `step % save_every == 0` or `force`; returns whether it did.

        The arrays are copied off the device before this returns (the caller may donate them);
        writing continues in the background until `wait()`. An already saved step is skipped.
        """
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state),
                 # A copy taken now, so later changes to `config` cannot leak into the save.
                 "config": ocp.args.JsonSave(json.loads(json.dumps(config)))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._write_errors():
            return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target, *, data_iterator: grain.DatasetIterator | None = None
                ) -> tuple[Any, dict]:
        """(state, config) of `step`, laid out as `target`'s ShapeDtypeStructs with shardings.

        The target's mesh may differ from the one saved from; tree structure and shapes must
        match. `data_iterator`, if given, is moved in place to the saved position: this
        process's, or, if the checkpoint was saved by another number of processes, process 0's
        (every process reads the same stream of global batches, data.py).
        """
        step_dir = self._step_dir(step)
        items = {"state": None, "config": ocp.args.JsonRestore()}
        _require_items(step_dir, [*items, *(["data"] if data_iterator is not None else [])])
        items["state"] = ocp.args.StandardRestore(_present(target, self.saved_state_shapes(step)))
        data_file = None if data_iterator is None else self._data_state_file(step_dir)
        saved = jax.tree.leaves(self.saved_state_shapes(step, like=target))
        for (path, t), s in zip(jax.tree_util.tree_flatten_with_path(target)[0], saved):
            if s.shape != t.shape:
                raise _mismatch(step_dir, f"{_name(path)} has shape {s.shape} in the checkpoint "
                                          f"but {t.shape} here")
        with _read_errors(step_dir):
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            if data_file is not None:
                _set_data_state(data_iterator, data_file, step_dir)
        state = restored["state"]
        return _as_target(target, state), restored["config"]

    def restore_on_host(self, step: int, item):
        """Part of the state saved at `step`, as host numpy arrays, without using any device:
        `item` is a subtree of `saved_state_shapes(step)` (its nested dicts, with
        ShapeDtypeStruct leaves); nothing outside it is read."""
        step_dir = self._step_dir(step)
        _require_items(step_dir, ["state"])
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        with _read_errors(step_dir), ocp.PyTreeCheckpointer() as reader:
            return reader.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))

    def saved_state_shapes(self, step: int, *, like=None):
        """ShapeDtypeStructs (no shardings) of the state saved at `step`, read from metadata only.

        Orbax's metadata keeps dicts but turns tuples and namedtuples into lists and dicts; with
        `like` (e.g. the restore target) the result takes `like`'s tree structure instead, so it
        can be tree-mapped together with it. A structure mismatch raises `UserError`.
        """
        step_dir = self._step_dir(step)
        _require_items(step_dir, ["state"])
        with _read_errors(step_dir):
            metadata = self._manager.item_metadata(step)["state"]
        if metadata is None:
            raise _corrupt(step_dir, "state/_METADATA is missing")
        shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata.tree,
                              is_leaf=lambda x: isinstance(x, ocp.metadata.Metadata))
        return shapes if like is None else _arrange_like(shapes, like, step_dir)

    def wait(self) -> None:
        """Block until pending saves are complete on disk."""
        with self._write_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's resources."""
        with self._write_errors():
            self._manager.close()

    def _step_dir(self, step: int) -> Path:
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            raise UserError(f"no checkpoint for step {step} in {self.directory}; "
                            "resume from an existing step or use a new run.run_dir")
        return step_dir

    def _data_state_file(self, step_dir: Path) -> Path:
        """This process's data-iterator state, or process 0's of another process count."""
        own = step_dir / "data" / _data_file_name(jax.process_index(), jax.process_count())
        if own.is_file():
            return own
        saved = list((step_dir / "data").glob(_data_file_name(0, "*")))
        if saved and _saved_count(saved[0]) != jax.process_count():
            return saved[0]
        raise _corrupt(step_dir, f"no data-iterator state for this process: data/{own.name} "
                                 "is missing")

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise UserError(f"cannot write checkpoints in {self.directory} ({_reason(e)}); free "
                            "disk space, fix permissions or set run.run_dir to a new path") from e


def _data_file_name(process_index, process_count) -> str:
    """grain's name for one process's iterator state."""
    return f"process_{process_index}-of-{process_count}.json"


def _saved_count(data_file: Path) -> int:
    return int(data_file.stem.rsplit("-of-", 1)[1])


def _require_items(step_dir: Path, names) -> None:
    for name in names:
        if not (step_dir / name).is_dir():
            raise _corrupt(step_dir, f"{name}/ is missing")


def _corrupt(step_dir: Path, reason: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {step_dir} is corrupt or incomplete ({reason}); "
                             f"{_CORRUPT_FIX}", int(step_dir.name), reason)


def _mismatch(step_dir: Path, reason: str) -> MismatchedCheckpoint:
    return MismatchedCheckpoint(f"checkpoint {step_dir} does not match this run: {reason}; "
                                f"{_MISMATCH_FIX}", int(step_dir.name), reason)


def _set_data_state(iterator: grain.DatasetIterator, data_file: Path, step_dir: Path) -> None:
    """Move `iterator` to the position saved in `data_file` (grain's JSON of `get_state`)."""
    state = json.loads(data_file.read_text())
    try:
        iterator.set_state(state)
    except (LookupError, TypeError, ValueError) as e:  # valid JSON, but not such a state
        raise _corrupt(step_dir, f"data/{data_file.name} is not a data-iterator state: "
                                 f"{type(e).__name__} {e}") from e


@contextlib.contextmanager
def _read_errors(step_dir: Path) -> Iterator[None]:
    """Turn the errors Orbax and TensorStore raise for missing or damaged files into UserErrors."""
    _quiet_stragglers()
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        damage = _storage_error(e)
        if damage is None:
            raise
        raise _corrupt(step_dir, _reason(damage)) from e


def _storage_error(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain of causes that says a file is missing or damaged, if any
    (Orbax re-raises TensorStore's read errors of sharded arrays as a bare `Exception`)."""
    return next((e for e in _causes(error) if isinstance(e, (OSError, json.JSONDecodeError)) or (
        isinstance(e, ValueError) and _STORAGE_STATUS.match(str(e)))), None)


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what it was raised from or while handling, and so on."""
    seen = []
    while error is not None and not any(error is e for e in seen):
        seen.append(error)
        yield error
        error = error.__cause__ or error.__context__


@functools.cache  # install once
def _quiet_stragglers() -> None:
    """Keep the reads a failed read leaves in flight from printing tracebacks of their own.

    When one TensorStore read fails, Orbax stops waiting and closes its event loop. The other
    reads then end in a TensorStore thread with `RuntimeError('Event loop is closed')` (printed
    as an ignored exception), as tasks whose storage error nobody retrieved (logged by asyncio),
    or as coroutines closed unfinished when they are collected, whose `GeneratorExit` Orbax
    turns into an exception (printed as ignored). That can happen before the failure reaches
    us, or much later, so this runs before reading; it drops exactly those and passes
    everything else on.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _abandoned_read(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _abandoned_read(record.exc_info[1])))


def _abandoned_read(error: BaseException | None) -> bool:
    """Whether `error` is how a read left in flight by a failed read ends (see above)."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    return any(isinstance(e, GeneratorExit) for e in _causes(error)) or (
        error is not None and _storage_error(error) is not None)


def _reason(e: Exception) -> str:
    """A short one-line cause: TensorStore's innermost message without its spec dump."""
    if isinstance(e, json.JSONDecodeError):
        return f"bad JSON: {e.msg}"
    message = str(e).split(" [tensorstore_spec")[0]
    status = _STORAGE_STATUS.match(message)
    if status:
        message = status.group(1) + ": " + message.rsplit(": ", 1)[-1]
    message = " ".join(message.split())
    return message if len(message) <= 200 else message[:197] + "..."


def _name(path) -> str:
    """A key path as Orbax spells it, e.g. `opt_state.1.0.mu.embed`."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _present(target, saved):
    """The restore target for a checkpoint whose state is `saved` (its metadata tree): each
    NamedTuple of the target, at any depth, as a dict without the fields that are None here and
    absent there (a field added since, such as `TrainState.residual` or `OuterState.arrived`, so
    that older checkpoints still restore); `_as_target` turns the result back."""
    if not (hasattr(target, "_fields") and isinstance(saved, dict)):
        return target
    kept = {f: _present(v, saved.get(f)) for f, v in target._asdict().items()
            if f in saved or v is not None}
    unchanged = len(kept) == len(target) and all(kept[f] is getattr(target, f) for f in kept)
    return target if unchanged else kept


def _as_target(target, state):
    """`state` restored from `_present(target, ...)` in `target`'s NamedTuples again."""
    if not (hasattr(target, "_fields") and isinstance(state, dict)):
        return state
    return type(target)(**{f: _as_target(getattr(target, f), state[f]) for f in state})


def _arrange_like(saved, like, step_dir: Path):
    """`saved`'s leaves in `like`'s tree structure, matched by key path name."""
    by_name = {_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
    wanted, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [_name(p) for p, _ in wanted]
    for name, (_, leaf) in zip(names, wanted):
        if name not in by_name:
            raise _mismatch(step_dir, f"{name} (shape {leaf.shape} here) is not in the "
                                      "checkpoint")
    extra = next((n for n in by_name if n not in set(names)), None)
    if extra is not None:
        raise _mismatch(step_dir, f"the checkpoint has {extra} (shape "
                                  f"{by_name[extra].shape}), which this run lacks")
    return jax.tree_util.tree_unflatten(treedef, [by_name[n] for n in names])
