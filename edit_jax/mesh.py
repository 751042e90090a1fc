"""The ('replica', 'shard') device mesh, fake CPU devices, and multi-host start-up.

`shard` spans the devices of one host (fast network: per-layer all-gathers, reduce-scatters);
`replica` spans hosts (slow network: what the local-SGD methods communicate rarely). Devices are
ordered by (process, id) before reshaping, so each replica's devices sit on one host whenever
`shard` divides the per-host device count.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import jax
import numpy as np

from edit_jax.cache import cache_dir
from edit_jax.config import MeshConfig
from edit_jax.errors import UserError
from edit_jax.xla_flags import detect_platform, effective_flags, supported_flags

AXES = ("replica", "shard")
_CLUSTER_ENV_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


class DistributedArgs(NamedTuple):
    """How this process joins a multi-process run; all None for a single process."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def distributed_args_from_env(coordinator_address: str | None = None,
                              num_processes: int | None = None,
                              process_id: int | None = None) -> DistributedArgs:
    """Flags win; otherwise JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
    env = os.environ

    def as_int(value, name):
        if value in (None, ""):
            return None
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{name} must be an integer, got '{value}'") from None

    return DistributedArgs(
        coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
        as_int(num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"),
               "number of processes (--num-processes / JAX_NUM_PROCESSES)"),
        as_int(process_id if process_id is not None else env.get("JAX_PROCESS_ID"),
               "process id (--process-id / JAX_PROCESS_ID)"),
    )


def start_jax(mesh_cfg: MeshConfig, dist: DistributedArgs = DistributedArgs(),
              peer_timeout_s: float = 300.0, xla_flags: Sequence[str] = ()) -> None:
    """Set XLA_FLAGS, set up fake CPU devices and join the other processes; call before any
    JAX computation.

    XLA_FLAGS: on GPUs the defaults of xla_flags.py (checked against this jaxlib), then
    `xla_flags` (run.xla_flags), then the user's own XLA_FLAGS, which win. JAX's coordination
    service ends every process (with a C++ stack trace) once a peer has missed heartbeats for
    its timeout; that timeout is set well above `peer_timeout_s` (the run's barrier timeout),
    so that our own clearer error (peers.py) comes first.
    """
    flags = effective_flags(detect_platform(), xla_flags, os.environ.get("XLA_FLAGS", ""),
                            lambda f: supported_flags(f, cache_dir=cache_dir()))
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
    jax.config.update("jax_num_cpu_devices", mesh_cfg.num_cpu_devices)
    cluster = any(v in os.environ for v in _CLUSTER_ENV_VARS)
    if dist.coordinator_address is None and dist.num_processes is None and not cluster:
        return
    if dist.num_processes is not None and dist.num_processes > 1:
        if dist.coordinator_address is None or dist.process_id is None:
            raise UserError("a multi-process run needs --coordinator-address HOST:PORT and "
                            "--process-id (or JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID)")
        if not 0 <= dist.process_id < dist.num_processes:
            raise UserError(f"process id {dist.process_id} is outside 0..{dist.num_processes - 1}")
    jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id,
                               heartbeat_timeout_seconds=int(max(100, 2 * peer_timeout_s + 30)))


def resolve_mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(R, S) with -1 replaced by "the rest"; R * S must equal the device count."""
    replica, shard = mesh_cfg.replica, mesh_cfg.shard
    hint = (f"set mesh.replica and mesh.shard so that replica*shard = {num_devices} "
            "(or one of them to -1)")
    if replica == -1 or shard == -1:
        known = shard if replica == -1 else replica
        if num_devices % known:
            raise UserError(f"mesh size {known} does not divide the {num_devices} devices; {hint}")
        replica, shard = (num_devices // known, shard) if replica == -1 else (replica,
                                                                              num_devices // known)
    if replica * shard != num_devices:
        raise UserError(f"mesh ({replica}, {shard}) needs {replica * shard} devices but "
                        f"{num_devices} are available; {hint}")
    return replica, shard


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    replica, shard = resolve_mesh_shape(mesh_cfg, len(devices))
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.array(ordered).reshape(replica, shard), AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
