"""Tokenizers: exact byte ids, BPE training on training documents only, caching, tokenizer.json."""

import dataclasses
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from edit_jax import tokenizer as tokenizer_lib
from edit_jax.config import DataConfig
from edit_jax.data import bpe_cache_path, load_tokenizer
from edit_jax.errors import UserError
from edit_jax.tokenizer import ByteTokenizer


def test_byte_tokenizer_exact_ids_and_round_trip():
    tok = load_tokenizer(DataConfig(tokenizer="byte"))
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids = tok.encode("Hé!")
    assert ids.dtype == np.int32
    assert ids.tolist() == [72, 195, 169, 33]  # 'H', UTF-8 of 'é' (C3 A9), '!'
    assert tok.decode([72, 195, 169, 33, 256]) == "Hé!"  # EOS is dropped
    text = "In the beginning — 日本語\n"
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture
def corpus_cfg(tmp_path, monkeypatch):
    """A jsonl corpus whose training lines say 'quokka' and held-out lines say 'zzyzxq'."""
    monkeypatch.setenv("EDIT_JAX_CACHE", str(tmp_path / "cache"))
    lines = [{"text": ("quokka " if i % 2 == 0 else "zzyzxq ") * 50} for i in range(20)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    # val_fraction 0.5 holds out every 2nd document: lines 1, 3, 5, ... (the 'zzyzxq' ones).
    return DataConfig(source="files", paths=(str(path),), val_fraction=0.5, tokenizer="bpe",
                      bpe_vocab_size=300)


def test_bpe_trains_on_training_documents_only(corpus_cfg):
    tok = load_tokenizer(corpus_cfg)
    assert len(tok.encode(" quokka")) == 1  # learned from training documents
    assert len(tok.encode(" zzyzxq")) > 1  # validation documents were not seen
    saved = tokenizers.Tokenizer.from_file(str(bpe_cache_path(corpus_cfg)))
    assert tok.eos_id == saved.token_to_id("<|endoftext|>")
    assert tok.vocab_size <= 300
    text = "quokka zzyzxq, naïve 日本"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.append(tok.encode("quokka"), tok.eos_id)) == "quokka"


def test_bpe_is_cached_and_not_retrained(corpus_cfg, monkeypatch):
    first = load_tokenizer(corpus_cfg)
    path = bpe_cache_path(corpus_cfg)
    assert path.is_file() and path.parent.name == "cache"
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(tokenizer_lib, "train_bpe", no_training)
    second = load_tokenizer(corpus_cfg)
    assert path.stat().st_mtime_ns == mtime
    assert second.encode("quokka zzyzxq").tolist() == first.encode("quokka zzyzxq").tolist()
    assert not list(path.parent.glob("*.tmp"))
    other_size = dataclasses.replace(corpus_cfg, bpe_vocab_size=400)
    assert bpe_cache_path(other_size) != path


def _save_word_level(path, vocab: dict[str, int], specials: list[str]) -> None:
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path))


def test_tokenizer_json_path(tmp_path):
    path = tmp_path / "tokenizer.json"
    _save_word_level(path, {"hello": 0, "world": 1, "</s>": 2, "[UNK]": 3}, ["</s>"])
    tok = load_tokenizer(DataConfig(tokenizer=str(path)))
    assert (tok.vocab_size, tok.eos_id) == (4, 2)
    assert tok.encode("hello world hello").tolist() == [0, 1, 0]
    assert tok.decode([0, 1, 2]) == "hello world"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer file not found: .*missing\.json; set data"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json")))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(UserError, match=r"cannot load tokenizer .*garbage\.json: .*tokenizers"):
        load_tokenizer(DataConfig(tokenizer=str(garbage)))
    no_eos = tmp_path / "no_eos.json"
    _save_word_level(no_eos, {"hello": 0, "[UNK]": 1}, [])
    with pytest.raises(UserError, match=r"no end-of-sequence token; add one of </s>"):
        load_tokenizer(DataConfig(tokenizer=str(no_eos)))
    with pytest.raises(UserError, match=r"unknown tokenizer 'sentencepiece'; set data.tokenizer"):
        load_tokenizer(DataConfig(tokenizer="sentencepiece"))


def test_unwritable_cache_is_a_user_error(corpus_cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("EDIT_JAX_CACHE", str(blocker / "cache"))
    with pytest.raises(UserError, match=r"cannot write tokenizer cache .*; set EDIT_JAX_CACHE"):
        load_tokenizer(corpus_cfg)
