"""`model.init_from`: a Hugging Face Llama checkpoint's weights, loaded straight onto the mesh.

The directory holds config.json (config.py has already taken the architecture from it) and
model.safetensors, or shards named by model.safetensors.index.json. Each of our parameters
becomes a global array laid out as phi is (split over `shard`, whole on every replica) by
`jax.make_array_from_callback`, whose callback reads only the requested block of the
memory-mapped file(s), one layer tensor at a time, transposed to our (in, out) kernels (each
replica's copy of a block is read anew). So no host or device ever holds the whole model: the
host holds one device's block at a time, each device its own shards (4 bytes per parameter / S,
until the train state is built from them). Weights in bf16 or fp16 become float32.
With tie_word_embeddings, lm_head starts as the (transposed) token embeddings and then trains
on its own: our head is never tied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
import tokenizers
from safetensors import safe_open

from edit_jax.errors import UserError
from edit_jax.hf_config import TOKENIZER_FILE, read_hf_config, tied_embeddings
from edit_jax.hf_weights import WEIGHTS_FILE, hf_shapes, read_block
from edit_jax.model import Params
from edit_jax.sharding import named, outer_param_specs

if TYPE_CHECKING:
    from edit_jax.program import Program

INDEX_FILE = "model.safetensors.index.json"


class _Weights:
    """The tensors of a checkpoint directory, open for reading blocks of them."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"cannot read {index} ({type(e).__name__}: {e}); pass a "
                                "checkpoint whose index has a weight_map") from None
        elif (directory / WEIGHTS_FILE).is_file():
            weight_map = None
        else:
            raise UserError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; "
                            "model.init_from needs the weights as safetensors")
        files = {WEIGHTS_FILE} if weight_map is None else set(weight_map.values())
        self._open = {name: self._open_file(name) for name in sorted(files)}
        self._file_of = weight_map or dict.fromkeys(self._open[WEIGHTS_FILE].keys(),
                                                     WEIGHTS_FILE)

    def _open_file(self, name: str):
        path = self.directory / name
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # the Rust reader raises its own error types
            raise UserError(f"cannot open {path} ({str(e).splitlines()[0] if str(e) else e!r}); "
                            "pass a checkpoint with complete safetensors files") from None

    def _slice(self, name: str):
        if name not in self._file_of:
            raise UserError(f"{self.directory} has no tensor {name}; pass a Llama checkpoint "
                            "with every layer's weights")
        return self._open[self._file_of[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple) -> np.ndarray:
        """Block `index` (a tuple of slices) of tensor `name`, as float32."""
        return np.asarray(self._slice(name)[index], dtype=np.float32)


def load_params(directory: str, program: Program) -> Params:
    """The checkpoint's weights as `program`'s parameters, laid out as phi on its mesh."""
    path = Path(directory).expanduser()
    tied = tied_embeddings(read_hf_config(path))
    weights = _Weights(path)
    for name, shape in hf_shapes(program.params_shapes, tied).items():
        if weights.shape(name) != shape:
            raise UserError(f"{path}: tensor {name} has shape {weights.shape(name)} but its "
                            f"config.json implies {shape}; the weights and config.json disagree")
    layout = program.layout
    shardings = named(layout.mesh, outer_param_specs(program.params_shapes, layout.dims, None))

    def load(key_path, leaf, sharding):
        our_path = tuple(k.key for k in key_path)
        return jax.make_array_from_callback(
            leaf.shape, sharding,
            lambda index: read_block(weights.read, our_path, leaf.shape, index, tied))

    return jax.tree_util.tree_map_with_path(load, program.params_shapes, shardings)


def check_vocab(directory: str, model_vocab: int, tokenizer_vocab: int) -> None:
    """A run from `directory` must tokenize as the checkpoint did: its tokenizer may not have
    more ids than the model, nor another count than the checkpoint's own tokenizer.json."""
    own = Path(directory).expanduser() / TOKENIZER_FILE
    own_vocab = (tokenizers.Tokenizer.from_file(str(own)).get_vocab_size(with_added_tokens=True)
                 if own.is_file() else None)
    if tokenizer_vocab > model_vocab or own_vocab not in (None, tokenizer_vocab):
        theirs = f"{own} has {own_vocab}" if own_vocab else f"the model has {model_vocab}"
        raise UserError(f"data.tokenizer has {tokenizer_vocab} ids but {theirs}; leave "
                        "data.tokenizer unset to use the checkpoint's tokenizer.json, or set it "
                        "to the tokenizer the checkpoint was trained with")
