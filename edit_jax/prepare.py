"""`edit-jax prepare`: a corpus tokenized once into token shards (token_shards.py's format).

Sources are the run's documents: the bundled corpus, or each file of `data.paths` (.txt, .jsonl
(.gz, .zst), .parquet). Files are tokenized in parallel, one worker process per file. Each
source's documents are split the way `data.source=files` splits them (every k-th document, k =
round(1 / data.val_fraction), is held out for validation; a source with fewer than k documents
holds out its last one) and written to `train-<source>-<part>.bin` and `val-<source>-<part>.bin`
shards of about `shard_tokens` tokens (documents are never split, each ends with EOS).

Crash safety: a shard is written to `<name>.tmp` and renamed when complete; a source is done
when its record `.prepare/source-<n>.json` is written (also atomically); `index.json`, the
directory's table of contents, comes last. Rerunning the command skips the sources whose record
matches the file (path, size, modification time) and the settings; a source that was cut short
continues after its last complete training shard (`.prepare/source-<n>.partial.json`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import queue as queue_lib
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from edit_jax import corpus_files, data, token_shards
from edit_jax.config import DataConfig
from edit_jax.data import load_tokenizer
from edit_jax.errors import UserError
from edit_jax.metrics import write_atomically
from edit_jax.tokenizer import Tokenizer

RECORDS_DIR = ".prepare"
SHARD_NAME = re.compile(r"^(train|val)-\d{5}-\d{4}\.bin$")
ENCODE_BATCH_BYTES = 4 << 20  # text tokenized per call (tokenizers parallelises a batch)
PROGRESS_EVERY_S = 0.5


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: a file of `data.paths`, or the bundled corpus (path None)."""

    number: int
    name: str
    size: int  # bytes, for progress
    mtime_ns: int
    path: Path | None = None

    def identity(self) -> dict:
        return {"name": self.name, "size": self.size, "mtime_ns": self.mtime_ns}

    def documents(self, text_field: str) -> Iterator[tuple[str, int]]:
        """(document, bytes of the source read so far)."""
        if self.path is not None:
            yield from corpus_files.read_documents(self.path, text_field)
            return
        done = 0
        for text in data._bundled_documents():
            done += len(text.encode("utf-8"))
            yield text, done


def sources(cfg: DataConfig) -> list[Source]:
    """The inputs `cfg` names, numbered in order."""
    if cfg.source == "bundled":
        size = sum(len(t.encode("utf-8")) for t in data._bundled_documents())
        return [Source(0, data.BUNDLED_ID, size, 0)]
    if cfg.source == "files":
        paths = corpus_files.expand_paths(cfg.paths)
        return [Source(n, str(p), p.stat().st_size, p.stat().st_mtime_ns, p)
                for n, p in enumerate(paths)]
    raise UserError(f"edit-jax prepare reads data.source=bundled or files, not {cfg.source}; "
                    "set data.source=files and data.paths to your text files")


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a worker needs to tokenize one source (picklable)."""

    source: Source
    data_cfg: DataConfig
    out: Path
    settings: dict  # the output's settings: dtype, tokenizer, hold-out rule, shard size


def prepare(cfg: DataConfig, out: str | os.PathLike, *, workers: int | None = None,
            shard_tokens: int = 100_000_000, progress: bool = True) -> dict:
    """Tokenize the corpus of `cfg` into shards under `out`; returns the index (also written
    to `out/index.json`). Resumes an interrupted run; a finished one returns at once."""
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    workers = workers or os.cpu_count() or 1
    if workers <= 0:
        raise UserError(f"--workers must be positive, got {workers}")
    out = Path(out).expanduser().resolve()
    name = cfg.tokenizer or token_shards.default_tokenizer(cfg.source, cfg.paths,
                                                           cfg.token_dtype)
    cfg = dataclasses.replace(cfg, tokenizer=name)
    inputs = sources(cfg)
    tokenizer = load_tokenizer(cfg)  # trains and caches a BPE first, before the workers load it
    _claim(out)
    settings = {"format": token_shards.INDEX_FORMAT, "tokenizer": _copy_tokenizer(cfg, tokenizer,
                                                                                 out),
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "dtype": token_shards.dtype_for_vocab(tokenizer.vocab_size),
                "text_field": cfg.text_field, "holdout_every": data._holdout_every(cfg),
                "shard_tokens": shard_tokens}
    records, todo = {}, []
    for source in inputs:
        record = _read_record(_record_path(out, source.number), source, settings, out)
        if record is None:
            todo.append(source)
        else:
            records[source.number] = record
    if todo:
        jobs = [_Job(s, cfg, out, settings) for s in todo]
        for record in _run_jobs(jobs, workers, progress, skipped=len(records)):
            number = record["source"]["number"]
            write_atomically(_record_path(out, number), json.dumps({**record,
                                                                     "settings": settings}))
            _record_path(out, number, partial=True).unlink(missing_ok=True)
            records[number] = record
    index = _index(settings, [records[s.number] for s in inputs])
    if not index["documents"]["val"]:
        raise UserError(f"no document of the corpus was held out for validation "
                        f"({index['documents']['train']} training documents); add documents "
                        "(a source needs 2 or more) or raise data.val_fraction")
    write_atomically(out / token_shards.INDEX_FILE, json.dumps(index, indent=1) + "\n")
    _remove_unlisted_shards(out, index)
    return index


def _claim(out: Path) -> None:
    """Create `out`, or check that it is a token-shard directory; drop half-written files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a directory for the shards")
    if out.is_dir() and any(out.iterdir()) and not (
            (out / token_shards.INDEX_FILE).exists() or (out / RECORDS_DIR).is_dir()):
        raise UserError(f"--out {out} is not empty and holds no token shards; name a new "
                        "directory")
    try:
        (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        for tmp in out.glob("*.tmp"):
            tmp.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror}); name a writable "
                        "directory") from None


def _copy_tokenizer(cfg: DataConfig, tokenizer: Tokenizer, out: Path) -> dict:
    """The index's tokenizer entry; a tokenizer.json is copied beside the shards."""
    if getattr(tokenizer, "path", None) is None:
        return {"name": cfg.tokenizer}
    target = out / token_shards.TOKENIZER_FILE
    if Path(tokenizer.path).resolve() != target:
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(tokenizer.path, tmp)
        os.replace(tmp, target)
    return {"name": cfg.tokenizer, "file": token_shards.TOKENIZER_FILE,
            "sha256": token_shards.file_sha256(target)}


def _record_path(out: Path, number: int, partial: bool = False) -> Path:
    """Where source `number`'s record lies: once it is done, or (`partial`) the checkpoint of
    an interrupted run."""
    return out / RECORDS_DIR / f"source-{number:05d}{'.partial' if partial else ''}.json"


def _read_record(path: Path, source: Source, settings: dict, out: Path) -> dict | None:
    """The record at `path` (without its settings), if it was written for `source` as it is
    now, with these settings, and its shards are intact; else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings") != settings or record.get("source", {}).get(
            "identity") != source.identity():
        return None
    itemsize = np.dtype(settings["dtype"]).itemsize
    if not all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size
               == s["tokens"] * itemsize for s in record["shards"]):
        return None
    return {k: v for k, v in record.items() if k != "settings"}


def _run_jobs(jobs: list[_Job], workers: int, progress: bool, skipped: int):
    """Yield each job's record as it finishes; one process per job, at most `workers` at a
    time (in this process when only one job or worker), with one progress bar."""
    total = sum(j.source.size for j in jobs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               desc=f"tokenizing {len(jobs)} file(s)" + (f" ({skipped} done before)"
                                                         if skipped else ""))
    counts = {"documents": 0, "tokens": 0}

    def report(update: dict) -> None:
        bar.update(update["bytes"])
        counts["documents"] += update["documents"]
        counts["tokens"] += update["tokens"]
        bar.set_postfix(docs=f"{counts['documents']:,}", tokens=f"{counts['tokens']:,}")

    with bar:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                yield tokenize_source(job, report)
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        with context.Manager() as manager:
            updates = manager.Queue()
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                        mp_context=context) as pool:
                pending = {pool.submit(tokenize_source, job, updates.put) for job in jobs}
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=PROGRESS_EVERY_S)
                    _drain(updates, report)
                    for future in done:
                        yield future.result()
                _drain(updates, report)


def _drain(updates, report) -> None:
    while True:
        try:
            report(updates.get_nowait())
        except queue_lib.Empty:
            return


def tokenize_source(job: _Job, report) -> dict:
    """Tokenize one source into its shards; `report` receives progress increments.

    Each time a training shard is complete, the open validation shard is closed too and a
    checkpoint records the documents placed so far; a rerun after an interruption skips those
    documents (reading, not tokenizing them) and continues with the next shards."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker per core already
    tokenizer = load_tokenizer(job.data_cfg)
    every = job.settings["holdout_every"]
    source = {"number": job.source.number, "identity": job.source.identity()}
    checkpoint = _record_path(job.out, job.source.number, partial=True)
    resume = (_read_record(checkpoint, job.source, job.settings, job.out)
              or {"placed": 0, "held_out": 0, "shards": []})
    writers = {split: _ShardWriter(job, split, [s for s in resume["shards"]
                                                if s["split"] == split])
               for split in ("train", "val")}
    progress = _Progress(report)
    state = {"placed": resume["placed"], "held_out": resume["held_out"]}
    batch: list[tuple[str, str]] = []  # (split, text) placed, not yet tokenized
    batch_bytes = read = 0

    def place(number: int, text: str, last: bool) -> None:
        nonlocal batch_bytes
        validation = number % every == every - 1 or (last and not state["held_out"]
                                                     and number >= 1)
        state["held_out"] += validation
        state["placed"] += 1
        batch.append(("val" if validation else "train", text))
        batch_bytes += len(text)

    def flush() -> None:
        nonlocal batch, batch_bytes
        trained = len(writers["train"].shards)
        if batch:
            splits, texts = zip(*batch)
            for split, ids in zip(splits, tokenizer.encode_batch(list(texts))):
                writers[split].add(np.append(ids, tokenizer.eos_id))
                progress.add(documents=1, tokens=len(ids) + 1)
            batch, batch_bytes = [], 0
        if len(writers["train"].shards) > trained:
            writers["val"].finish()
            write_atomically(checkpoint, json.dumps(
                {"source": source, "settings": job.settings, **state,
                 "shards": writers["train"].shards + writers["val"].shards}))

    previous, number = None, -1  # one document held back: a short source's last is held out
    for number, (text, done) in enumerate(job.source.documents(job.data_cfg.text_field)):
        progress.add(bytes_read=done - read)
        read = done
        if number < resume["placed"]:
            continue
        if previous is not None:
            place(number - 1, previous, last=False)
        previous = text
        if batch_bytes >= ENCODE_BATCH_BYTES:
            flush()
    if previous is not None:
        place(number, previous, last=True)
    flush()
    progress.add(bytes_read=job.source.size - read)
    progress.send()
    shards = [shard for w in writers.values() for shard in w.close()]
    return {"source": source, "documents": number + 1, "shards": shards}


class _Progress:
    """Progress increments, sent at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, report):
        self._report, self._sent = report, time.monotonic()
        self._pending = {"bytes": 0, "documents": 0, "tokens": 0}

    def add(self, *, bytes_read: int = 0, documents: int = 0, tokens: int = 0) -> None:
        self._pending["bytes"] += bytes_read
        self._pending["documents"] += documents
        self._pending["tokens"] += tokens
        if time.monotonic() - self._sent >= PROGRESS_EVERY_S:
            self.send()

    def send(self) -> None:
        self._report(dict(self._pending))
        self._pending = dict.fromkeys(self._pending, 0)
        self._sent = time.monotonic()


class _ShardWriter:
    """Appends documents to `<split>-<source>-<part>.bin` shards of about `shard_tokens`
    tokens, each written as `.tmp` and renamed when complete; `shards` lists the complete
    ones (starting from those of an interrupted run)."""

    def __init__(self, job: _Job, split: str, shards: list[dict]):
        self.out, self.split = job.out, split
        self.prefix = f"{split}-{job.source.number:05d}"
        self.shard_tokens = job.settings["shard_tokens"]
        self.dtype = np.dtype(job.settings["dtype"]).newbyteorder("<")
        self.shards = list(shards)
        self._file = None

    def add(self, ids: np.ndarray) -> None:
        if self._file is None:
            self._name = f"{self.prefix}-{len(self.shards):04d}.bin"
            self._file = open(self.out / (self._name + ".tmp"), "wb")
            self._tokens = self._documents = self._max = 0
        self._file.write(ids.astype(self.dtype).tobytes())
        self._tokens += len(ids)
        self._documents += 1
        self._max = max(self._max, int(ids.max()))
        if self._tokens >= self.shard_tokens:
            self.finish()

    def finish(self) -> None:
        """Complete the open shard, if any."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out / (self._name + ".tmp"), self.out / self._name)
        self.shards.append({"file": self._name, "split": self.split,
                            "documents": self._documents, "tokens": self._tokens,
                            "max_token_id": self._max})
        self._file = None

    def close(self) -> list[dict]:
        self.finish()
        return self.shards


def _index(settings: dict, records: list[dict]) -> dict:
    shards = [{**shard, "source": r["source"]["number"]} for r in records for shard in r["shards"]]
    totals: dict[str, Any] = {"documents": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}}
    for shard in shards:
        totals["documents"][shard["split"]] += shard["documents"]
        totals["tokens"][shard["split"]] += shard["tokens"]
    return {**{k: v for k, v in settings.items() if k != "shard_tokens"}, **totals,
            "validation": f"every {settings['holdout_every']}th document of each source (a "
                          "source with fewer holds out its last)",
            "sources": [{"number": r["source"]["number"], **r["source"]["identity"]}
                        for r in records],
            "shards": shards}


def _remove_unlisted_shards(out: Path, index: dict) -> None:
    """Shards left by an earlier run over other sources are not part of the corpus now."""
    listed = {s["file"] for s in index["shards"]}
    for path in out.iterdir():
        if SHARD_NAME.match(path.name) and path.name not in listed:
            path.unlink()
