"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the corpus, or a tokenizer.json file.

Every tokenizer has one end-of-sequence id; the data pipeline appends it after each document.
The BPE is trained once per (corpus, vocab size) and cached as a tokenizer.json under
`$EDIT_JAX_CACHE` (default `~/.cache/edit-jax`), so every process and every later run loads the
same file; training is deterministic, so processes that race to create it write identical files.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from edit_jax import token_shards
from edit_jax.cache import cache_dir
from edit_jax.errors import UserError

BPE_EOS = "<|endoftext|>"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")
BPE_TRAIN_DOCS = 1_000_000  # documents the BPE sees at most: keeps training on huge corpora bounded
_BPE_FORMAT = "bytelevel-bpe-v1"  # part of the cache key; bump when train_bpe changes


class Tokenizer(abc.ABC):
    """Text <-> int32 token ids, with `vocab_size` ids in total and one end-of-sequence id."""

    vocab_size: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """The ids of `text` as a 1-D int32 array, without EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`; special tokens such as EOS are dropped."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text."""
        return [self.encode(text) for text in texts]

    def file_sha256(self) -> str | None:
        """The SHA-256 of the tokenizer.json this tokenizer was loaded from (None: no file)."""
        return None


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and EOS as 256: needs no training and no files."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids_N = np.asarray(ids, dtype=np.int64)
        bytes_N = ids_N[(ids_N >= 0) & (ids_N < 256)].astype(np.uint8)
        return bytes(bytes_N).decode("utf-8", "replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (BPE or any tokenizer.json) whose token `eos` ends documents."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos: str, path: Path | None = None):
        self._tokenizer, self.path = tokenizer, path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(eos)

    def file_sha256(self) -> str | None:
        return None if self.path is None else token_shards.file_sha256(self.path)

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many texts in one call, which the library spreads over threads."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_named(name: str, bpe: Callable[[], HFTokenizer]) -> Tokenizer:
    """The tokenizer `name` names: 'byte', 'bpe' (built by `bpe`, which knows the corpus) or a
    tokenizer.json path."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return bpe()
    if name.endswith(".json"):
        return load_tokenizer_file(name)
    raise UserError(f"unknown tokenizer '{name}'; "
                    "set data.tokenizer to byte, bpe or the path of a tokenizer.json")


def load_tokenizer_file(path: str) -> HFTokenizer:
    """A tokenizer.json file; its EOS is the first of EOS_CANDIDATES in its vocabulary."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"tokenizer file not found: {path}; "
                        "set data.tokenizer to an existing tokenizer.json, or to byte or bpe")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust parser raises plain Exceptions
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer {path}: {reason}; "
                        "pass a tokenizer.json saved by the `tokenizers` library") from None
    for eos in EOS_CANDIDATES:
        if tokenizer.token_to_id(eos) is not None:
            return HFTokenizer(tokenizer, eos, file)
    raise UserError(f"tokenizer {path} has no end-of-sequence token; "
                    f"add one of {' '.join(EOS_CANDIDATES)} to its vocabulary")


def bpe_cache_file(corpus_id: str, vocab_size: int) -> Path:
    """The cache file of the BPE for the corpus `corpus_id` names and `vocab_size`."""
    key = f"{_BPE_FORMAT}|{corpus_id}|{vocab_size}"
    return cache_dir() / f"bpe-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def train_bpe(documents: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE with `vocab_size` ids (EOS included) learned from `documents`."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def cached_bpe(path: Path, documents: Callable[[], Iterable[str]],
               vocab_size: int) -> HFTokenizer:
    """The BPE cached at `path`, or trained on the first BPE_TRAIN_DOCS of `documents()` and
    written there atomically."""
    if path.is_file():
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), BPE_EOS, path)
    tokenizer = train_bpe(itertools.islice(documents(), BPE_TRAIN_DOCS), vocab_size)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write tokenizer cache {path}: {e.strerror}; "
                        "set EDIT_JAX_CACHE to a writable directory") from None
    return HFTokenizer(tokenizer, BPE_EOS, path)
