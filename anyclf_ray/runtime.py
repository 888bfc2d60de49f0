"""Connecting to Ray: a running cluster when one is named, else an embedded local one.

In: an optional address (``--address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets).
Out: an initialised Ray, and the engine settings resolved against what the cluster has.
"""

from __future__ import annotations

import logging
import os

import ray

from typing import TypeVar

import pyarrow as pa

from anyclf_ray.config import ActorPlacement, ConfigError

Placement = TypeVar("Placement", bound=ActorPlacement)

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        log.info("starting an embedded local Ray")
        ray.init(include_dashboard=False)


def resolve_placement(placement: Placement, section: str) -> Placement:
    """Pick the device for ``auto`` and check the replicas can ever be placed on this cluster."""
    resources = ray.cluster_resources()
    device = placement.device
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    if device == "cuda":
        need, have, unit = placement.replicas * placement.gpus_per_replica, resources.get("GPU", 0), "GPU"
    else:
        need, have, unit = placement.replicas * placement.cpus_per_replica, resources.get("CPU", 0), "CPU"
    if need > have:
        raise ConfigError(
            f"{section}.replicas: {placement.replicas} replica(s) need {need:g} {unit}(s) but the cluster "
            f"has {have:g}; lower {section}.replicas (or cpus_per_replica / tensor_parallel_size) or add nodes"
        )
    return placement.model_copy(update={"device": device})


def actor_options(placement: ActorPlacement) -> dict:
    """``map_batches`` arguments for a pool of ``placement.replicas`` model actors."""
    if placement.device not in ("cpu", "cuda"):
        raise ValueError("device must be resolved (runtime.resolve_placement) before actors are placed")
    return {
        "compute": ray.data.ActorPoolStrategy(size=placement.replicas),
        "num_cpus": placement.cpus_per_replica,
        "num_gpus": 1 if placement.device == "cuda" else 0,
    }


def blocks_dataset(table: pa.Table, batch_size: int, replicas: int) -> ray.data.Dataset:
    """``table`` as a Dataset cut into enough blocks that every replica gets work."""
    rows_per_block = max(1, min(batch_size, -(-table.num_rows // replicas)))
    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)
