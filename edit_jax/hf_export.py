"""`edit-jax export`: one checkpoint of a run as a Hugging Face LlamaForCausalLM directory.

Which parameters: phi (the outer parameters) for a method with an outer state once its local
phase has begun (step > method.warmup_steps), else the mean of the replicas (what evaluation
uses). The directory holds config.json, generation_config.json, model.safetensors (float32),
tokenizer.json and tokenizer_config.json; `transformers.LlamaForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load it, and `model.init_from` starts a run from it.

Memory: nothing goes to a device. The checkpoint is read leaf by leaf into host memory, so the
host holds the exported tensors (4 bytes per parameter), plus while writing the serialised copy
safetensors makes (4 more), plus one leaf at a time as saved (R copies of it for the mean of
R replicas): about 8 bytes per parameter in all, e.g. 56 GB for 7B parameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.numpy import save_file

from edit_jax.checkpoint import Checkpointer
from edit_jax.config import Config
from edit_jax.errors import UserError
from edit_jax.hf_config import CONFIG_FILE, TOKENIZER_FILE, to_hf_config
from edit_jax.hf_tokenizer import TOKENIZER_CONFIG_FILE, write_tokenizer
from edit_jax.hf_weights import WEIGHTS_FILE, at_path, leaf_paths, to_hf_tensors

GENERATION_CONFIG_FILE = "generation_config.json"
EXPORT_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE,
                TOKENIZER_CONFIG_FILE)


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> dict:
    """Write checkpoint `step` (default: the newest) of `run_dir` to `out`; returns what was
    exported: {'out', 'step', 'source' (phi or the replicas' mean), 'num_params'}."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = _run_config(run_dir)
    checkpoints = run_dir / "checkpoints"
    ckpt = (Checkpointer(checkpoints, save_every=1, keep=1, read_only=True)
            if checkpoints.is_dir() else None)
    try:
        step = _existing_step(ckpt.all_steps() if ckpt else [], step, run_dir)
        _prepare_out(out)
        tensors, source = _restore_tensors(ckpt, step, cfg.method.warmup_steps)
    finally:
        if ckpt:
            ckpt.close()
    try:
        eos_id = write_tokenizer(cfg.data, out, cfg.model.max_seq_len)
        vocab_size = tensors["lm_head.weight"].shape[0]
        _write_json(out / CONFIG_FILE, to_hf_config(cfg.model, vocab_size, eos_id))
        _write_json(out / GENERATION_CONFIG_FILE, {"eos_token_id": eos_id})
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UserError(f"cannot write the export to {out} ({reason}); free disk space or "
                        "pass another --out") from None
    return {"out": str(out), "step": step, "source": source,
            "num_params": int(sum(t.size for t in tensors.values()))}


def _existing_step(steps: list[int], step: int | None, run_dir: Path) -> int:
    """`step`, or the newest of `steps` for None; one that was not saved is an error."""
    if not steps:
        raise UserError(f"{run_dir} has no checkpoint yet; train until the first one is saved "
                        "(run.checkpoint_every) or pass another run directory")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"{run_dir} has no checkpoint of step {step}; pass --step one of "
                        f"{', '.join(map(str, steps))}")
    return step


def _run_config(run_dir: Path) -> Config:
    """The resolved config `edit-jax train` wrote to RUN_DIR/config.json."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; pass the run.run_dir of a run")
    if not path.is_file():
        raise UserError(f"{path} not found; pass a run.run_dir that `edit-jax train` wrote")
    try:
        values = json.loads(path.read_text())
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
    except (OSError, json.JSONDecodeError, OmegaConfBaseException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read the run config {path} ({reason}); pass a run directory "
                        "written by this version of edit-jax") from None


def _prepare_out(out: Path) -> None:
    """Create `out`, or reuse it if it is empty or holds only an earlier export's files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a new or empty directory")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= set(EXPORT_FILES):
        raise UserError(f"--out {out} is a non-empty directory that is not an export; pass a "
                        "new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); pass a writable "
                        "directory") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable; pass a writable directory")


def _restore_tensors(ckpt: Checkpointer, step: int, warmup_steps: int
                     ) -> tuple[dict[str, np.ndarray], str]:
    """The Hugging Face tensors of the exported parameters, and which they are; the
    checkpoint is read one leaf at a time."""
    saved = ckpt.saved_state_shapes(step)
    use_phi = isinstance(saved.get("outer"), dict) and step > warmup_steps
    prefix = ("outer", "phi") if use_phi else ("params",)
    shapes = at_path(saved, prefix)
    tensors = {}
    for path in leaf_paths(shapes):
        item = at_path(shapes, path)
        for key in reversed((*prefix, *path)):
            item = {key: item}
        value = at_path(ckpt.restore_on_host(step, item), (*prefix, *path))
        if not use_phi:
            value = value.mean(axis=0)
        for key in reversed(path):
            value = {key: value}
        tensors.update(to_hf_tensors(value))
    replicas = at_path(saved["params"], ("lm_head", "kernel")).shape[0]
    return tensors, "phi" if use_phi else f"mean of {replicas} replicas"


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
