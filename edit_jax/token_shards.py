"""Token shards on disk, read by random access: what `data.source=tokens` trains from.

A shard is a flat little-endian array of token ids, documents separated by EOS: the plain
memmap layout nanoGPT, llm.c and modded-nanogpt use. Two kinds of directories are read:

  prepared  `edit-jax prepare`'s output: `*.bin` shards plus `index.json`, which records the
            dtype, the tokenizer (and a copy of its file), the vocabulary, each shard's split,
            documents, tokens and largest id, and the source files. Validation is the `val`
            shards: every k-th document of each source, held out when preparing.
  raw       `.bin` files without an index (a directory of them, or globs): an llm.c header
            (256 int32: magic 20240520, version 1 = uint16 / 2 = uint32, token count) is
            recognised; a file without it is headerless with dtype `data.token_dtype`. Files
            whose name contains `val` are validation; without any, the last `data.val_fraction`
            of the last shard's tokens is held out.

Training takes non-overlapping windows of seq_len + 1 tokens inside each train shard (a shard's
remainder is dropped), shuffled with a new order every epoch; a global batch is B window ids,
and each process reads only its own rows, each with one positioned read (`os.pread`) rather than
through a memory map, so neither the process's memory nor its mapped pages grow with the corpus
(the kernel's page cache still keeps what was read). The iterator's state is one index, the
same on every process.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edit_jax.errors import UserError

INDEX_FILE = "index.json"
INDEX_FORMAT = "edit-jax-token-shards-v1"
TOKENIZER_FILE = "tokenizer.json"  # the copy of a prepared directory's tokenizer
LLMC_MAGIC, LLMC_HEADER_BYTES = 20240520, 256 * 4
LLMC_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
DTYPES = ("uint16", "uint32")


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file of tokens: `tokens` ids of `dtype` from byte `offset` on."""

    path: Path
    dtype: np.dtype
    tokens: int
    split: str  # train | val
    offset: int = 0  # header bytes
    max_token_id: int | None = None  # known for prepared shards

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) (fewer at the end of the shard) as int32."""
        count = max(0, min(count, self.tokens - start))
        tokens = np.empty(count, self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [tokens], self.offset + start * self.dtype.itemsize)
        if got != tokens.nbytes:
            raise UserError(f"token shard {self.path} ended early (read {got:,} of "
                            f"{tokens.nbytes:,} bytes); the file changed after it was opened")
        return tokens.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards a run reads, and what the directory says about its tokenizer."""

    shards: tuple[Shard, ...]
    tokenizer: str | None  # prepared: "byte" or the path of the copied tokenizer.json
    tokenizer_sha256: str | None
    holdout_tail: float = 0.0  # raw shards without val files: held-out share of the last one

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]


def find_index(paths: Sequence[str]) -> Path | None:
    """The index.json of a prepared directory named by `paths` (one directory), else None."""
    if len(paths) == 1:
        index = Path(paths[0]).expanduser() / INDEX_FILE
        if index.is_file():
            return index
    return None


def open_shards(paths: Sequence[str], token_dtype: str = "uint16",
                val_fraction: float = 0.02) -> ShardSet:
    """The shards of a prepared directory or of raw `.bin` files (directories or globs)."""
    index = find_index(paths)
    shard_set = _prepared(index) if index else _raw(paths, token_dtype, val_fraction)
    if not shard_set.split("train"):
        raise UserError(f"no training shards in data.paths={list(paths)}; every shard is "
                        "validation: rename them, or prepare the corpus again")
    return shard_set


def default_tokenizer(source: str, paths: Sequence[str], token_dtype: str) -> str:
    """What `data.tokenizer` "" means for `data.source`, `data.paths` and `data.token_dtype`:
    a prepared directory's own tokenizer for token shards, else `byte`. Raw .bin shards do not
    say which tokenizer made them: that is an error."""
    if source != "tokens" or not paths:
        return "byte"
    shard_set = open_shards(paths, token_dtype)
    if shard_set.tokenizer is None:
        raise UserError("raw .bin token shards do not say which tokenizer made them; set "
                        "data.tokenizer to its tokenizer.json (or byte), and model.vocab_size "
                        "if the model's vocabulary is larger")
    return shard_set.tokenizer


def _prepared(index_path: Path) -> ShardSet:
    directory = index_path.parent
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != INDEX_FORMAT:
            raise KeyError("format")
        dtype = np.dtype(index["dtype"]).newbyteorder("<")
        shards = tuple(Shard(directory / s["file"], dtype, int(s["tokens"]), s["split"],
                             max_token_id=int(s["max_token_id"])) for s in index["shards"])
        tokenizer = index["tokenizer"]
        tokenizer_path = (tokenizer["name"] if tokenizer["name"] == "byte"
                          else str(directory / tokenizer["file"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read token shard index {index_path} ({type(e).__name__}: {e}); "
                        "run `edit-jax prepare` again into a new --out directory") from None
    for shard in shards:
        expected = shard.tokens * dtype.itemsize
        size = shard.path.stat().st_size if shard.path.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise UserError(f"token shard {shard.path} {found} but {index_path.name} says "
                            f"{expected:,} ({shard.tokens:,} tokens); the directory is damaged "
                            "or incomplete: run `edit-jax prepare` again")
    return ShardSet(shards, tokenizer_path, tokenizer.get("sha256"))


def _raw(paths: Sequence[str], token_dtype: str, val_fraction: float) -> ShardSet:
    files = _raw_files(paths)
    shards = tuple(_raw_shard(f, token_dtype) for f in files)
    holdout = 0.0 if any(s.split == "val" for s in shards) else val_fraction
    return ShardSet(shards, None, None, holdout_tail=holdout)


def _raw_files(paths: Sequence[str]) -> list[Path]:
    files: dict[Path, None] = {}
    for pattern in paths:
        expanded = str(Path(pattern).expanduser())
        if Path(expanded).is_dir():
            matches = sorted(str(p) for p in Path(expanded).glob("*.bin"))
        else:
            matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise UserError(f"no token shards in data.paths entry '{pattern}'; point it at a "
                            "directory made by `edit-jax prepare`, or at .bin token files")
        for match in matches:
            path = Path(match).resolve()
            if not path.is_file() or path.suffix != ".bin":
                raise UserError(f"{match} is not a .bin token shard; data.source=tokens reads "
                                "`edit-jax prepare` directories or .bin files")
            files[path] = None
    return list(files)


def _raw_shard(path: Path, token_dtype: str) -> Shard:
    split = "val" if "val" in path.name else "train"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(LLMC_HEADER_BYTES)
    header = np.frombuffer(head, dtype="<i4") if len(head) == LLMC_HEADER_BYTES else None
    if header is not None and header[0] == LLMC_MAGIC:
        dtype = LLMC_DTYPES.get(int(header[1]))
        if dtype is None:
            raise UserError(f"{path} has an llm.c header of unknown version {header[1]}; "
                            "versions 1 (uint16) and 2 (uint32) are known")
        tokens = int(header[2])
        if size != LLMC_HEADER_BYTES + tokens * dtype.itemsize:
            raise UserError(f"{path}: its llm.c header says {tokens:,} tokens but the file has "
                            f"{size - LLMC_HEADER_BYTES:,} bytes after the header; the file is "
                            "truncated or not an llm.c shard")
        return Shard(path, dtype, tokens, split, offset=LLMC_HEADER_BYTES)
    dtype = np.dtype(token_dtype).newbyteorder("<")
    if size % dtype.itemsize:
        raise UserError(f"{path} has {size:,} bytes, not a multiple of {token_dtype}'s "
                        f"{dtype.itemsize}; set data.token_dtype to the shard's dtype "
                        f"({' or '.join(DTYPES)}) or fix the file")
    return Shard(path, dtype, size // dtype.itemsize, split)


def check_vocabulary(shard_set: ShardSet, vocab_size: int, tokenizer_name: str,
                     tokenizer_sha256: str | None) -> None:
    """The run's tokenizer and model vocabulary must be the shards' (prepared directories)."""
    if shard_set.tokenizer is None:
        return
    same = (tokenizer_name == shard_set.tokenizer if shard_set.tokenizer == "byte"
            else tokenizer_sha256 == shard_set.tokenizer_sha256)
    if not same:
        raise UserError(f"data.tokenizer={tokenizer_name} is not the tokenizer the shards were "
                        f"prepared with; set data.tokenizer={shard_set.tokenizer} (or leave it "
                        "unset without model.init_from)")
    largest = max(s.max_token_id for s in shard_set.shards)
    if largest >= vocab_size:
        raise UserError(f"the token shards hold id {largest}, but the model's vocabulary has "
                        f"{vocab_size} ids; raise model.vocab_size above {largest} (or leave it 0)")


class _Windows:
    """Train window i -> (shard, token offset): non-overlapping windows inside each shard."""

    def __init__(self, shards: Sequence[Shard], window: int, holdout_tail: float):
        self.shards, self.window = list(shards), window
        usable = [s.tokens for s in self.shards]
        if holdout_tail and usable:
            usable[-1] -= _tail_tokens(self.shards[-1], holdout_tail)
        counts = np.array([n // window for n in usable], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if self.starts[-1] == 0:
            raise UserError(f"the training shards hold no window of {window} tokens; "
                            "shorten data.seq_len or add data")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, i: int) -> tuple[np.ndarray, Shard]:
        shard_index = int(np.searchsorted(self.starts, i, side="right")) - 1
        shard = self.shards[shard_index]
        offset = (i - int(self.starts[shard_index])) * self.window
        return shard.read(offset, self.window), shard


def _tail_tokens(shard: Shard, fraction: float) -> int:
    return max(1, int(np.ceil(shard.tokens * fraction)))


def train_iterator(shard_set: ShardSet, *, window: int, global_batch: int, rows: slice,
                   seed: int, vocab_size: int, read_options):
    """Endless (rows of a global batch, window) int32 batches, a grain DatasetIterator whose
    state is the next batch's index."""
    import grain  # imports JAX; config.py reads shard directories without it

    windows = _Windows(shard_set.split("train"), window, shard_set.holdout_tail)

    def read_rows(ids_B: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids_B[rows]), window), np.int32)
        for r, i in enumerate(ids_B[rows]):
            tokens, shard = windows.read(int(i))
            out[r] = _checked(tokens, shard, vocab_size)
        return out

    ids = (grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat()
           .batch(global_batch, drop_remainder=True).map(read_rows))
    return iter(ids.to_iter_dataset(read_options))


def val_tokens(shard_set: ShardSet, wanted: int, vocab_size: int) -> np.ndarray:
    """Up to `wanted` validation tokens, in shard order (for raw shards without val files:
    the held-out tail of the last train shard)."""
    pieces, collected = [], 0
    val = shard_set.split("val")
    if not val:
        last = shard_set.split("train")[-1]
        tail = _tail_tokens(last, shard_set.holdout_tail)
        val = [dataclasses.replace(last, offset=last.offset + (last.tokens - tail)
                                   * last.dtype.itemsize, tokens=tail)]
    for shard in val:
        if collected >= wanted:
            break
        pieces.append(_checked(shard.read(0, wanted - collected), shard, vocab_size))
        collected += len(pieces[-1])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    if not len(tokens):
        raise UserError("the validation shards are empty; prepare the corpus with more "
                        "documents or a larger data.val_fraction")
    return tokens


def _checked(tokens: np.ndarray, shard: Shard, vocab_size: int) -> np.ndarray:
    """`tokens`, once the ids of a raw shard (whose largest id is not known) are checked."""
    if shard.max_token_id is None and len(tokens) and tokens.max() >= vocab_size:
        raise UserError(f"token shard {shard.path} holds id {int(tokens.max())}, but the "
                        f"model's vocabulary has {vocab_size} ids; set data.tokenizer (or "
                        "model.vocab_size) to the shards' tokenizer")
    return tokens
