"""Data parallelism with `jax.sharding`: one mesh axis "data" over every device of every host.

Parameters, optimizer state and BatchNorm statistics are replicated; the batch is split along its
first axis. Each process feeds only its own slice of the global batch (its devices' share), and
`jax.make_array_from_process_local_data` assembles the global array without copying across hosts.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables by which `jax.distributed.initialize()` finds a cluster on its own.
CLUSTER_ENV_VARS = (
    "SLURM_JOB_ID",  # SLURM (with SLURM_NTASKS > 1)
    "OMPI_MCA_orte_hnp_uri",  # Open MPI
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU pods
    "JAX_COORDINATOR_ADDRESS",  # Kubernetes / generic
)


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process job given by flags, or one described by the cluster's environment;
    a lone process does nothing."""
    if num_processes is not None and num_processes > 1:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif num_processes is None and _in_cluster():
        jax.distributed.initialize()


def _in_cluster() -> bool:
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    return any(name in os.environ for name in CLUSTER_ENV_VARS)


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int) -> str | None:
    """Why the devices cannot split this batch, or None."""
    devices = jax.device_count()
    if global_batch_size % devices:
        return f"--batch-size {global_batch_size} does not divide over {devices} devices: expected a multiple of {devices}"
    return None


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's numpy slice -> one global jax.Array per entry, sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
