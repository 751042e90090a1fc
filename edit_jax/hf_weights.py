"""Our parameter tree <-> Hugging Face LlamaForCausalLM tensor names, in both directions.

Our model already computes what transformers' Llama computes (RoPE on the two halves of each
head, grouped-query attention, RMSNorm, an untied head), so the conversion is a renaming plus
two layout changes: the stacked layer axis of `layers.*` becomes one tensor per layer
(`model.layers.{i}.*`), and every kernel, stored (in, out) here, is transposed to torch's
(out, in) `weight`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from edit_jax.model import LAYER_GROUP, Params

WEIGHTS_FILE = "model.safetensors"  # one file; larger checkpoints come as shards and an index


class HFTensor(NamedTuple):
    """Where one of our leaves lives in a Hugging Face checkpoint."""

    name: str  # a layer's name has `{i}` for the layer index
    transposed: bool  # a kernel: torch stores its transpose

    def layer(self, i: int) -> str:
        return self.name.format(i=i)


# (group, *path inside the group) -> its Hugging Face tensor.
HF_TENSORS = {
    ("embed", "embedding"): HFTensor("model.embed_tokens.weight", False),
    (LAYER_GROUP, "attn_norm", "scale"): HFTensor("model.layers.{i}.input_layernorm.weight",
                                                  False),
    (LAYER_GROUP, "attn", "wq", "kernel"): HFTensor("model.layers.{i}.self_attn.q_proj.weight",
                                                    True),
    (LAYER_GROUP, "attn", "wk", "kernel"): HFTensor("model.layers.{i}.self_attn.k_proj.weight",
                                                    True),
    (LAYER_GROUP, "attn", "wv", "kernel"): HFTensor("model.layers.{i}.self_attn.v_proj.weight",
                                                    True),
    (LAYER_GROUP, "attn", "wo", "kernel"): HFTensor("model.layers.{i}.self_attn.o_proj.weight",
                                                    True),
    (LAYER_GROUP, "mlp_norm", "scale"): HFTensor(
        "model.layers.{i}.post_attention_layernorm.weight", False),
    (LAYER_GROUP, "mlp", "w_gate", "kernel"): HFTensor("model.layers.{i}.mlp.gate_proj.weight",
                                                       True),
    (LAYER_GROUP, "mlp", "w_up", "kernel"): HFTensor("model.layers.{i}.mlp.up_proj.weight", True),
    (LAYER_GROUP, "mlp", "w_down", "kernel"): HFTensor("model.layers.{i}.mlp.down_proj.weight",
                                                       True),
    ("final_norm", "scale"): HFTensor("model.norm.weight", False),
    ("lm_head", "kernel"): HFTensor("lm_head.weight", True),
}
TIED_HEAD = HFTensor("model.embed_tokens.weight", True)  # lm_head under tie_word_embeddings


def leaf_paths(params: Params) -> list[tuple[str, ...]]:
    """Every leaf's key path, e.g. ('layers', 'attn', 'wq', 'kernel'); each must be mapped."""
    paths = []

    def walk(tree, prefix):
        if isinstance(tree, dict):
            for key, sub in tree.items():
                walk(sub, (*prefix, key))
        else:
            paths.append(prefix)

    walk(params, ())
    unmapped = [p for p in paths if p not in HF_TENSORS]
    if unmapped:
        raise ValueError(f"no Hugging Face name for parameters {unmapped}")
    return paths


def at_path(params: Params, path: tuple[str, ...]):
    """The subtree (or leaf) of `params` at key path `path`."""
    for key in path:
        params = params[key]
    return params


def to_hf_tensors(params: Params) -> dict[str, np.ndarray]:
    """Our (host, numpy) parameters as Hugging Face tensors: layers split, kernels transposed."""
    tensors = {}
    for path in leaf_paths(params):
        value, target = np.asarray(at_path(params, path)), HF_TENSORS[path]
        blocks = ([(target.layer(i), value[i]) for i in range(value.shape[0])]
                  if path[0] == LAYER_GROUP else [(target.name, value)])
        for name, block in blocks:
            tensors[name] = np.ascontiguousarray(block.T if target.transposed else block)
    return tensors


# read(name, index) -> the numpy block `index` (a tuple of slices) of Hugging Face tensor `name`
ReadFn = Callable[[str, tuple], np.ndarray]


def read_block(read: ReadFn, path: tuple[str, ...], shape: tuple[int, ...], index: tuple,
               tied: bool = False) -> np.ndarray:
    """Block `index` (slices of our leaf's `shape`) of leaf `path`, reading only that block:
    for the stacked layers one tensor per layer in the block, each in torch's orientation.
    `tied`: lm_head is the transposed token embedding (tie_word_embeddings)."""
    target = _source(path, tied)
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))

    def one(name: str, block: tuple) -> np.ndarray:
        if target.transposed:
            return read(name, block[::-1]).T
        return read(name, block)

    if path[0] != LAYER_GROUP:
        return one(target.name, index)
    layers, rest = index[0], index[1:]
    return np.stack([one(target.layer(i), rest) for i in range(layers.start, layers.stop)])


def hf_shapes(params: Params, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape each Hugging Face tensor must have for parameters of these shapes."""
    shapes = {}
    for path in leaf_paths(params):
        shape, target = tuple(at_path(params, path).shape), _source(path, tied)
        stacked = path[0] == LAYER_GROUP
        one = shape[1:] if stacked else shape
        names = [target.layer(i) for i in range(shape[0])] if stacked else [target.name]
        shapes.update((name, one[::-1] if target.transposed else one) for name in names)
    return shapes


def _source(path: tuple[str, ...], tied: bool) -> HFTensor:
    return TIED_HEAD if tied and path == ("lm_head", "kernel") else HF_TENSORS[path]
