"""XLA flags for GPU runs: collectives that overlap compute, as current JAX trainers set them.

EDiT's layer-wise sync and the FSDP all-gathers only hide behind compute when XLA runs
collectives asynchronously and its latency-hiding scheduler may move them; on NVIDIA GPUs
that takes flags (`GPU_FLAGS`, after the JAX-Toolbox GPU performance guide and MaxText's GPU
configs). Flags come and go between jaxlib releases, and an unknown flag in XLA_FLAGS aborts
the process, so the candidates are checked against the installed jaxlib first: a child process
(CPU only, the same flag parser) is started with them, and each flag it rejects is dropped
(`supported_flags`, cached per jaxlib version). CPU runs get none of them.

Precedence, lowest first: these defaults (GPU only), then `run.xla_flags`, then the user's own
`XLA_FLAGS` environment variable, which always wins; a flag is identified by its name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

GPU_FLAGS = (
    # Let XLA move collectives to overlap them with compute (the one flag JAX-Toolbox bakes in).
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Pipeline the all-gathers / reduce-scatters / all-reduces of a scanned loop (the layer
    # scan) one iteration ahead, and double-buffer the loop so they can.
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    # Fewer, larger collectives (128 MiB), not combined across dimensions.
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    # cuBLAS rather than Triton for the dense bf16 matmuls.
    "--xla_gpu_enable_triton_gemm=false",
)
_REJECTED = re.compile(r"Unknown flags? in XLA_FLAGS: (\S+)")
_PROBE = "import jax, jax.numpy as jnp; (jnp.ones(2) + 1).block_until_ready()"


_CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def overlaps_collectives() -> bool:
    """Whether this process's XLA runtime can run a step's collectives beside its compute:
    everywhere but XLA:CPU before jax 0.12. That runtime runs each device's program, and the
    collectives it starts beside it, on one pool of one thread per device; a sync running beside
    the layer scans can leave every thread waiting in a different collective (a deadlock,
    aborted after 40 s: compressed DreamDDP on 8 fake devices under load, 2 runs in 4). jax
    0.12's CPU runtime executes programs on threads of their own (25 runs in 25 without)."""
    import jax  # here, so that setting XLA_FLAGS before JAX starts needs no JAX import

    return jax.default_backend() != "cpu" or jax.__version_info__ >= (0, 12)


def detect_platform(environ=os.environ, driver: Path = Path("/proc/driver/nvidia")) -> str:
    """The platform JAX will start on, known before its backend starts: 'gpu' where a CUDA
    plugin is installed, an NVIDIA driver is loaded (`driver` exists) and JAX_PLATFORMS allows
    it, else the first platform JAX_PLATFORMS names, else 'cpu'."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    allowed = not platforms or any(p in ("cuda", "gpu") for p in platforms)
    if allowed and driver.exists() and any(importlib.util.find_spec(name)
                                           for name in _CUDA_PLUGINS):
        return "gpu"
    return "cpu" if not platforms or platforms[0] in ("cuda", "gpu") else platforms[0]


def flag_name(flag: str) -> str:
    """`--name=value` -> `name`."""
    return flag.lstrip("-").split("=", 1)[0]


def merge(*layers: Sequence[str]) -> list[str]:
    """Flags of several layers, later layers overriding earlier ones by flag name, in order."""
    merged: dict[str, str] = {}
    for layer in layers:
        for flag in layer:
            merged.pop(flag_name(flag), None)
            merged[flag_name(flag)] = flag
    return list(merged.values())


def default_flags(platform: str, supported: Callable[[Sequence[str]], list[str]]) -> list[str]:
    """The defaults for `platform` ('gpu', 'cpu', ...): GPU_FLAGS that `supported` keeps."""
    return supported(GPU_FLAGS) if platform == "gpu" else []


def effective_flags(platform: str, run_flags: Sequence[str], env_flags: str,
                    supported: Callable[[Sequence[str]], list[str]]) -> list[str]:
    """The XLA_FLAGS a run starts with: the platform's defaults < run.xla_flags < $XLA_FLAGS."""
    return merge(default_flags(platform, supported), run_flags, env_flags.split())


def supported_flags(flags: Sequence[str], *, cache_dir: Path | None = None,
                    python: str = sys.executable) -> list[str]:
    """`flags` without those the installed jaxlib's flag parser rejects (each probe is a short
    child process on the CPU; the answer is cached per jaxlib version and flag set)."""
    import jaxlib

    key = json.dumps([jaxlib.__version__, sorted(flags)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = cache_dir / f"xla-flags-{digest}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["supported"]
    kept = list(flags)
    while kept:
        rejected = _rejected(kept, python)
        if rejected is None:
            break
        kept = [f for f in kept if flag_name(f) != rejected]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "supported": kept}))
    return kept


def _rejected(flags: Sequence[str], python: str) -> str | None:
    """The name of the first flag the parser rejects (None: it accepts them all)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    probe = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True,
                           timeout=300)
    if probe.returncode == 0:
        return None
    match = _REJECTED.search(probe.stderr)
    if match is None:  # rejected for another reason (a value of the wrong type): find it
        if len(flags) == 1:
            return flag_name(flags[0])
        half = len(flags) // 2
        return _rejected(flags[:half], python) or _rejected(flags[half:], python)
    return flag_name(match.group(1))
