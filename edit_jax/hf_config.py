"""The mapping between a Hugging Face `LlamaConfig` (config.json) and our `ModelConfig` fields.

Pure Python, so that config.py can layer a checkpoint's architecture under the user's settings
before JAX starts. Reading accepts both spellings transformers has used: `rope_theta` /
`rope_scaling` (v4) and `rope_parameters` (v5); writing emits both, so either version loads
the export. Architectures our model cannot reproduce exactly are refused with a one-line
`UserError`: any RoPE scaling, biases, an activation other than SiLU, a head_dim other than
hidden_size / num_attention_heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edit_jax.errors import UserError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# ModelConfig field -> the LlamaConfig key holding the same value.
FIELD_KEYS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
              "d_ff": "intermediate_size", "rope_theta": "rope_theta",
              "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size",
              "max_seq_len": "max_position_embeddings"}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size")
# LlamaConfig's defaults for the keys a config.json may leave out.
_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}


def read_hf_config(directory: str | Path) -> dict:
    """DIR/config.json, checked to describe a Llama our model reproduces exactly."""
    path = Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; model.init_from must be a directory with a Hugging "
                        "Face Llama checkpoint (config.json and model.safetensors)")
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); pass a Hugging Face checkpoint directory "
                        "with a valid config.json") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path} is not a JSON object; pass a Hugging Face config.json")
    _check_supported(hf, path)
    return hf


def _check_supported(hf: dict, path: Path) -> None:
    def refuse(problem: str) -> UserError:
        return UserError(f"{path}: {problem}; only plain Llama checkpoints (model_type llama, "
                         "SiLU, no biases, no RoPE scaling) can initialise a run")

    if hf.get("model_type") != "llama":
        raise refuse(f"model_type is {hf.get('model_type')!r}, not 'llama'")
    for key in _REQUIRED:
        if not (isinstance(hf.get(key), int) and hf[key] > 0):
            raise refuse(f"{key} is {hf.get(key)!r}, not a positive integer")
    if hf.get("rope_scaling"):
        raise refuse(f"rope_scaling is set ({hf['rope_scaling']})")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise refuse(f"rope_parameters has rope_type {rope_type!r}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise refuse(f"{key} is true")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act is {hf['hidden_act']!r}, not 'silu'")
    natural = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, natural) or hf["hidden_size"] % hf[
            "num_attention_heads"]:
        raise refuse(f"head_dim is {hf.get('head_dim')}, not hidden_size / num_attention_heads "
                     f"= {hf['hidden_size']} / {hf['num_attention_heads']}")


def _hf_value(hf: dict, key: str) -> Any:
    """The value of LlamaConfig `key` in `hf`, with transformers' defaults filled in."""
    if key == "num_key_value_heads":
        return hf.get(key) or hf["num_attention_heads"]
    if key == "rope_theta" and "rope_theta" in (hf.get("rope_parameters") or {}):
        return float(hf["rope_parameters"]["rope_theta"])
    value = hf.get(key, _DEFAULTS.get(key))
    return float(value) if key in ("rope_theta", "rms_norm_eps") else value


def model_fields(hf: dict) -> dict:
    """The ModelConfig fields (d_model, ...) that config.json `hf` determines."""
    return {field: _hf_value(hf, key) for field, key in FIELD_KEYS.items()}


def tied_embeddings(hf: dict) -> bool:
    """Whether lm_head shares the token embeddings (then the checkpoint may lack lm_head)."""
    return bool(hf.get("tie_word_embeddings", False))


def to_hf_config(model: Any, vocab_size: int, eos_token_id: int) -> dict:
    """config.json for LlamaForCausalLM from `model` (a ModelConfig): float32, untied head."""
    rope_theta = float(model.rope_theta)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": model.d_model, "intermediate_size": model.d_ff,
            "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
            "num_key_value_heads": model.n_kv_heads, "head_dim": model.d_model // model.n_heads,
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "rms_norm_eps": float(model.norm_eps), "vocab_size": vocab_size,
            "max_position_embeddings": model.max_seq_len, "tie_word_embeddings": False,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": None,
            "torch_dtype": "float32", "dtype": "float32",
            "initializer_range": float(model.init_std)}
