"""The tokenizer of a Hugging Face export: tokenizer.json and tokenizer_config.json.

A run whose tokenizer is a tokenizer.json (or bpe, whose cached file is one) exports that file
as it is. The byte tokenizer becomes a `tokenizers` byte-level BPE without merges: the ByteLevel
pre-tokenizer (no regex split, no prefix space) turns each UTF-8 byte b into one printable
character, the vocabulary maps that character to id b and `<|endoftext|>` to 256, so a text
encodes to the ids `ByteTokenizer.encode` gives (the literal text `<|endoftext|>` excepted:
it becomes the EOS id, as in every Hugging Face tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from edit_jax.data import bpe_cache_path
from edit_jax.errors import UserError
from edit_jax.hf_config import TOKENIZER_FILE
from edit_jax.tokenizer import BPE_EOS, ByteTokenizer, load_tokenizer_file

if TYPE_CHECKING:
    from edit_jax.config import DataConfig

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def byte_level_chars() -> list[str]:
    """The character ByteLevel writes for each byte 0..255: printable Latin-1 bytes stand for
    themselves, every other byte for the next unused code point from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    unused = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(unused)) for b in range(256)]


def byte_tokenizer() -> tokenizers.Tokenizer:
    """The byte tokenizer as a `tokenizers.Tokenizer` with the same ids (EOS included)."""
    vocab = {char: byte for byte, char in enumerate(byte_level_chars())}
    vocab[BPE_EOS] = ByteTokenizer.eos_id
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([tokenizers.AddedToken(BPE_EOS, special=True)])
    return tokenizer


def write_tokenizer(data: DataConfig, out: Path, max_length: int) -> int:
    """Write the run's tokenizer (`data.tokenizer`) and its tokenizer_config.json into `out`;
    returns the EOS id (found as `load_tokenizer_file` finds it)."""
    target = out / TOKENIZER_FILE
    if data.tokenizer == "byte":
        byte_tokenizer().save(str(target))
    else:
        source = (bpe_cache_path(data) if data.tokenizer == "bpe"
                  else Path(data.tokenizer).expanduser())
        if not source.is_file():
            raise UserError(f"the run's tokenizer file {source} (data.tokenizer="
                            f"{data.tokenizer}) is gone; restore it (bpe: rerun `edit-jax "
                            "train` on the same corpus, or set EDIT_JAX_CACHE) and export again")
        shutil.copyfile(source, target)
    eos_id = load_tokenizer_file(str(target)).eos_id
    eos_token = tokenizers.Tokenizer.from_file(str(target)).id_to_token(eos_id)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
                "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return eos_id
